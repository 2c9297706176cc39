"""The Ray Tune function trainable: one trial = one `tinyvit.train.fit` run.

It reports every epoch with a checkpoint, so that a killed trial process resumes from its last
epoch (FailureConfig) and a resumed study continues unfinished trials (Tuner.restore).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray
from ray import tune

from contract import CHECKPOINT_FILE, MAX_EPOCHS
from tinyvit.train import fit, load_checkpoint, save_checkpoint

from .spec import Plan


def run_trial(config: dict, plan: Plan, arrays) -> None:
    cfg = plan.trial_config(config)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resume = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    node = ray.get_runtime_context().get_node_id()

    def on_epoch(metrics: dict, state) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state(), Path(folder) / CHECKPOINT_FILE)
            tune.report({**metrics, "node_id": node, MAX_EPOCHS: cfg.train.epochs},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    fit(cfg, arrays, on_epoch, resume=resume)
