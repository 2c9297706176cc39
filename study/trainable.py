"""The Ray Tune function trainable: one trial = one `tinyvit.train.fit` run.

It reports every epoch with a checkpoint, so that a killed trial process resumes from its last
epoch (FailureConfig) and a resumed study continues unfinished trials (Tuner.restore).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray
from ray import tune

from tinyvit.config import KEYS, Config
from tinyvit.train import fit, load_checkpoint, save_checkpoint

from .space import apply

CHECKPOINT_FILE = "model.pt"


def trial_overrides(config: dict, cells: dict) -> dict:
    """The dotted config keys a trial changes: its ablation cell, its seed, its searched values.
    (Optuna's renamed constrained parameters such as 'model.heads[2,4]' are not config keys.)"""
    overrides = dict(cells[config["cell"]]) if "cell" in config else {}
    overrides.update({k: v for k, v in config.items() if k in KEYS})
    return overrides


def trial_config(base: dict, config: dict, cells: dict) -> Config:
    return Config.from_dict(apply(base, trial_overrides(config, cells)))


def trial_status(budget: int, max_epochs: int) -> str:
    """A finished trial that ran fewer epochs than its budget was stopped early (ASHA)."""
    return "completed" if budget >= max_epochs else "early-stopped"


def run_trial(config: dict, base: dict, cells: dict, arrays) -> None:
    cfg = trial_config(base, config, cells)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resume = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    node = ray.get_runtime_context().get_node_id()

    def on_epoch(metrics: dict, state) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state(), Path(folder) / CHECKPOINT_FILE)
            tune.report({**metrics, "node_id": node},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    fit(cfg, arrays, on_epoch, resume=resume)
