"""TinyViT on CIFAR-10: model, data and trainer. Knows nothing of Ray, Optuna or MLflow."""
import os

# Before torch loads libgomp: an idle OpenMP thread spins ~0.1 ms (10,000 spins) before it sleeps.
# libgomp's default, ~3 ms, lets a spinning thread hold a core that another process needs, and
# every parallel region (hundreds per step) then waits out a scheduler slice; sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) pays a wake-up per region instead. Seed model, 2 threads, img/s
# (bench/RESULTS.md): quiet 1,205 PASSIVE / 1,443 here / 1,414 default; beside one busy process
# 728 / 595 / 165; beside two 448 / 552 / 218-539. Only takes effect when tinyvit is imported
# before torch (the CLI, the study's trials, bench/speed.py); an explicit setting of either wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .config import Config, ConfigError  # noqa: E402
from .model import TinyViT  # noqa: E402

__all__ = ["Config", "ConfigError", "TinyViT"]
