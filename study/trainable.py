"""The Ray Tune function trainable: one trial = one `tinyvit.train.fit` run.

It reports every epoch with a checkpoint, so that a killed trial process resumes from its last
epoch (FailureConfig) and a resumed study continues unfinished trials (Tuner.restore). A trial
that goes `resources.trial_timeout_s` without a result is stopped by a watchdog of its own.
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import ray
from ray import tune

from contract import CHECKPOINT_FILE, MAX_EPOCHS
from tinyvit.train import fit, load_checkpoint, save_checkpoint

from .spec import Plan


class TrialTimeout(TimeoutError):
    """The trial went longer than resources.trial_timeout_s without reporting an epoch."""


def run_trial(config: dict, plan: Plan, arrays) -> None:
    cfg = plan.trial_config(config)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resume = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    node = ray.get_runtime_context().get_node_id()
    watchdog = Watchdog(plan.resources["trial_timeout_s"], resume["epoch"] if resume else 0)

    def on_epoch(metrics: dict, state) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state(), Path(folder) / CHECKPOINT_FILE)
            watchdog.beat(metrics["epoch"])
            tune.report({**metrics, "node_id": node, MAX_EPOCHS: cfg.train.epochs},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    watchdog.run(lambda: fit(cfg, arrays, on_epoch, resume=resume))


class Watchdog:
    """Runs the training in a thread of its own, and fails the trial with `TrialTimeout` when the
    training has gone `limit` seconds without a result.

    Tune has no per-trial clock: its stoppers (`stop={"time_total_s": ...}`, `Stopper`) and
    schedulers act on results, which a hung training never reports. So the wait happens here,
    in the thread Tune runs the trainable in: raising there fails the trial as any training
    error does (Ray's error file ends with the why-line, which MLflow's `error` tag carries),
    and Tune then ends the trial's process, the hung thread with it. Like any failure it is
    retried from its last checkpoint, in a fresh process with the limit afresh, at most
    `max_failures` times (a hang is often the node's: a stuck filesystem or device). A hang
    that holds the GIL stops this watchdog too; torch's kernels, sleeps and locks release it."""

    def __init__(self, limit: float | None, epoch: int):
        self.limit, self.epoch = limit, epoch  # the last epoch reported, 0 for none
        self.since = time.monotonic()  # the start of the current silence

    def beat(self, epoch: int) -> None:
        """A result: the silence starts again. Handing it over (persisting its checkpoint to
        storage, waiting for the driver to take it) counts as the next silence's, so that a
        stuck storage path is a hang too."""
        self.epoch, self.since = epoch, time.monotonic()

    def run(self, train) -> None:
        done, failure = threading.Event(), []

        def target():
            try:
                train()
            except BaseException as e:  # noqa: BLE001  SystemExit too: Tune's way to stop a trial
                failure.append(e)
            finally:
                done.set()

        threading.Thread(target=target, name="training", daemon=True).start()
        while not done.wait(None if self.limit is None else 1.0):
            silent = time.monotonic() - self.since
            if silent > self.limit:
                after = f"after epoch {self.epoch}" if self.epoch else "since it started"
                raise TrialTimeout(f"trial exceeded resources.trial_timeout_s={self.limit:g} "
                                   f"(no result for {silent:.0f}s {after})")
        if failure:
            raise failure[0]
