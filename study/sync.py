"""MLflow brought level with Ray's own results: what the driver could not write (a tracking
server down past the study's end, a driver killed with results still in its outbox) is written
from the study folder, through the same operations the driver's callback queues.

Ray's folder holds every trial's config, status, results (result.json) and last checkpoint; its
study.yaml the study's id, which finds the runs. Every operation is idempotent, so running this
any number of times leaves one run per trial and one point per (metric, step).
"""
from __future__ import annotations

import json
from pathlib import Path

from ray.tune import ExperimentAnalysis

from .outbox import Outbox
from .spec import Plan
from .tracking import Op, Runs, closed, dataset_input, ended, filled, opened

FINISHED = ("TERMINATED", "ERROR")  # Ray's states of a trial that will not run again


def ray_ops(plan: Plan) -> tuple[list[Op], Op | None]:
    """The operations that write what Ray holds of each trial, and the study's end (`Runs.end`:
    the study's run ends, a run of a trial Ray never recorded goes) if the study is over: every
    trial it plans, finished."""
    trials = sorted(ExperimentAnalysis(str(plan.path)).trials, key=lambda t: t.trial_id)
    ops, ends = [], []
    for trial in trials:
        results = _results(trial)
        if not results and trial.status not in FINISHED:  # never started: no run yet
            continue
        first = results[0] if results else {}
        start = first.get("timestamp", 0) - first.get("time_this_iter_s", 0)
        ops += [opened(trial, reopen=False, start_ms=int(start * 1000) if results else None),
                filled(trial, results)]
        if trial.status in FINISHED:
            ops.append(closed(plan, trial, errored=trial.status == "ERROR"))
        ends += [int(r["timestamp"]) * 1000 for r in results[-1:]]
    over = len(trials) == plan.design.trial_count() and all(t.status in FINISHED for t in trials)
    return ops, ended(trials, max(ends, default=None)) if over else None


def sync(plan: Plan, uri: str, identity: str, arrays, patience: float) -> tuple[int, int, bool]:
    """Replays Ray's results into MLflow; (operations MLflow missed, points it lacked and now
    has, whether the study is over)."""
    runs = Runs(uri, plan, identity, dataset_input(plan.config, arrays), replay=True)
    ops, end = ray_ops(plan)
    outbox = Outbox(runs.apply, uri)
    for op in ops + ([end] if end else []):
        outbox.put(op)
    return outbox.close(patience), runs.added, end is not None


def _results(trial) -> list[dict]:
    """Every result Ray recorded for the trial, in order (result.json, one JSON line each)."""
    path = Path(trial.path) / "result.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
