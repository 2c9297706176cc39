"""TinyViT on CIFAR-10: model, data and trainer. Knows nothing of Ray, Optuna or MLflow."""
import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. On the shared 2-core
# CPU, with other processes runnable, spinning threads steal the cores from the thread that has
# work and every parallel region waits out a scheduler slice: measured there (load 3-6, patch-8
# model, batch 128) 50 img/s with torch's default 2 threads, 480-500 img/s with PASSIVE (the same
# as 1 thread), 230-270 img/s with GOMP_SPINCOUNT=10000. Only takes effect when tinyvit is
# imported before torch (the CLI, bench/speed.py); an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import Config, ConfigError  # noqa: E402
from .model import TinyViT  # noqa: E402

__all__ = ["Config", "ConfigError", "TinyViT"]
