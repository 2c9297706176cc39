"""MLflow: one run per trial, logged from the driver.

Logging from the driver (a Tune callback) rather than from trial processes means one writer per
store, so an embedded SQLite file never locks, and workers on other nodes need no route to the
tracking server. Runs are found again by their study and trial ids, because `Tuner.restore` does
not remember them: a resumed study continues the same runs instead of duplicating them, and never
touches the runs of another study that shares its name.
"""
from __future__ import annotations

import subprocess
from concurrent.futures import Future
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

import contract as c

from .spec import Plan


def experiment_of(uri: str, plan: Plan) -> tuple[str, str | None]:
    """The study's experiment name and artifact location. A server stores artifacts itself; an
    embedded store keeps them beside the study, not in ./mlruns of whatever folder the driver
    ran in."""
    return plan.experiment, None if uri.startswith("http") else (plan.path / "mlartifacts").as_uri()


def prepare_experiment(uri: str, name: str, location: str | None) -> str:
    """The experiment's id, created on first use (with the SQLite schema, for a new store)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name, location)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class MlflowTrials(tune.Callback):
    def __init__(self, uri: str, plan: Plan, identity: str, experiment: Future | None = None):
        self.uri, self.plan = uri, plan
        self.experiment = experiment_of(uri, plan)
        self._pending, self._experiment_id = experiment, None
        self.tags = {c.STUDY: plan.name, c.STUDY_ID: identity, c.MODE: plan.design.mode,
                     c.SEARCHED: ",".join(plan.design.searched), c.RESULTS: str(plan.path),
                     c.GIT_COMMIT: git_commit()}
        self.client, self.runs = None, {}

    def __getstate__(self):  # Tuner pickles its callbacks: a restored one looks its ids up again
        return {**self.__dict__, "client": None, "runs": {}, "_pending": None,
                "_experiment_id": None}

    @property
    def experiment_id(self) -> str:
        """The first trial waits here, if at all, for the set-up that the driver started in a
        thread alongside Tune's start-up; a restored study finds it by name."""
        if self._experiment_id is None:
            self._experiment_id = (self._pending.result() if self._pending is not None
                                   else prepare_experiment(self.uri, *self.experiment))
        return self._experiment_id

    def setup(self, **info):
        self.client = MlflowClient(self.uri)

    def _own_runs(self, extra: str = "") -> list:
        # ids are hex: safe inside the filter whatever the study's name or folder holds
        query = f"tags.{c.STUDY_ID} = '{self.tags[c.STUDY_ID]}'" + extra
        return self.client.search_runs([self.experiment_id], query, max_results=50000)

    def run_id(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self._own_runs(f" and tags.{c.TRIAL_ID} = '{trial.trial_id}'")
        if found:  # a resumed study or a retried trial: continue its run
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            cfg = self.plan.trial_config(trial.config)
            overrides = self.plan.design.overrides(trial.config)
            sampled = [k for k in self.plan.design.searched if k in overrides]
            tags = {**self.tags, c.TRIAL_ID: trial.trial_id, c.SEED: str(cfg.train.seed),
                    c.MAX_EPOCHS: str(cfg.train.epochs), c.BUDGET: "0", c.STATUS: c.RUNNING,
                    c.SAMPLED: ",".join(sampled)}
            cell = self.plan.design.cell(trial.config)
            if cell is not None:
                tags[c.CELL] = cell
            run_id = self.client.create_run(self.experiment_id, run_name=trial.trial_id,
                                            tags=tags).info.run_id
            # a conditional key this trial did not sample is no factor level of it: not logged
            unsampled = set(self.plan.design.searched) - set(sampled)
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cfg.flat().items()
                                                  if k not in unsampled])
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step, now = int(result["epoch"]), int(result.get("timestamp", 0)) * 1000
        metrics = [Metric(k, float(result[k]), now, step)
                   for k in (*c.EPOCH_METRICS, *c.FINAL_METRICS) if k in result]
        if step == 1:
            metrics.append(Metric(c.PARAM_COUNT, float(result[c.PARAM_COUNT]), now, 0))
        tags = [RunTag(c.BUDGET, str(step)), RunTag(c.NODE, str(result.get("node_id", "")))]
        self.client.log_batch(self.run_id(trial), metrics=metrics, tags=tags)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        budget = int((trial.last_result or {}).get("epoch", 0))
        status = c.trial_status(budget, self.plan.trial_config(trial.config).train.epochs)
        self.client.set_tag(run_id, c.STATUS, status)
        self.client.set_tag(run_id, c.BUDGET, str(budget))
        if status == c.COMPLETED and trial.checkpoint:  # the reports draw its attention maps
            with trial.checkpoint.as_directory() as folder:
                self.client.log_artifact(run_id, str(Path(folder) / c.CHECKPOINT_FILE),
                                         c.CHECKPOINT_DIR)
        self.client.set_terminated(run_id, "FINISHED")

    def on_experiment_end(self, trials, **info):
        """A driver killed between creating a trial's run and saving the trial in Ray's state
        leaves a run for a trial that --resume never knew: delete it (MLflow keeps deleted
        runs restorable), so that the study ends with exactly one run per trial. Only this
        study instance's runs are looked at."""
        known = {t.trial_id for t in trials}
        for run in self._own_runs():
            if run.data.tags.get(c.TRIAL_ID) not in known:
                self.client.delete_run(run.info.run_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, c.STATUS, c.ERRORED)
        self.client.set_tag(run_id, c.ERROR, _error_line(trial))
        self.client.set_terminated(run_id, "FAILED")


def _error_line(trial) -> str:
    """The last line of the trial's traceback: the exception and its message."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1][:500] if lines else "unknown error"
    return "unknown error"
