"""MLflow: one run per trial, logged from the driver.

Logging from the driver (a Tune callback) rather than from trial processes means one writer per
store, so an embedded SQLite file never locks, and workers on other nodes need no route to the
tracking server. Runs are found again by their `trial_id` tag, because `Tuner.restore` does not
remember them: a resumed study continues the same runs instead of duplicating them.
"""
from __future__ import annotations

import subprocess
from concurrent.futures import Future
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from .spec import Spec
from .trainable import CHECKPOINT_FILE, trial_config, trial_status

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                 "images_per_sec", "test_loss", "test_acc")


def experiment_of(uri: str, spec: Spec) -> tuple[str, str | None]:
    """The study's experiment name and artifact location. A server stores artifacts itself; an
    embedded store keeps them beside the study, not in ./mlruns of whatever folder the driver
    ran in."""
    return spec.experiment, None if uri.startswith("http") else (spec.path / "mlartifacts").as_uri()


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
    def __init__(self, uri: str, spec: Spec, cells: dict, experiment: Future | None = None):
        self.uri, self.cells, self.base = uri, cells, spec.base
        self.experiment = experiment_of(uri, spec)
        self._pending, self._experiment_id = experiment, None
        # `results` names this study's folder: one study instance, even if a name is reused
        self.tags = {"study": spec.name, "mode": spec.mode, "searched": ",".join(spec.searched),
                     "results": str(spec.path), "git_commit": git_commit()}
        self.client, self.runs = None, {}

    def __getstate__(self):  # Tuner pickles its callbacks: a restored one looks its ids up again
        return {**self.__dict__, "client": None, "runs": {}, "_pending": None,
                "_experiment_id": None}

    @property
    def experiment_id(self) -> str:
        """The first trial waits here, if at all, for the set-up that the driver started in a
        thread alongside Ray's and Tune's start-up; a restored study finds it by name."""
        if self._experiment_id is None:
            self._experiment_id = (self._pending.result() if self._pending is not None
                                   else prepare_experiment(self.uri, *self.experiment))
        return self._experiment_id

    def setup(self, **info):
        self.client = MlflowClient(self.uri)

    def run_id(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self.client.search_runs([self.experiment_id],
                                        f"tags.trial_id = '{trial.trial_id}'", max_results=1)
        if found:  # a resumed study or a retried trial: continue its run
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            cfg = trial_config(self.base, trial.config, self.cells)
            tags = {**self.tags, "trial_id": trial.trial_id, "seed": str(cfg.train.seed),
                    "max_epochs": str(cfg.train.epochs), "budget": "0", "status": "running"}
            if "cell" in trial.config:
                tags["cell"] = trial.config["cell"]
            run_id = self.client.create_run(self.experiment_id, run_name=trial.trial_id,
                                            tags=tags).info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cfg.flat().items()])
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step, now = int(result["epoch"]), int(result.get("timestamp", 0)) * 1000
        metrics = [Metric(k, float(result[k]), now, step) for k in EPOCH_METRICS if k in result]
        if step == 1:
            metrics.append(Metric("params", float(result["params"]), now, 0))
        tags = [RunTag("budget", str(step)), RunTag("node", str(result.get("node_id", "")))]
        self.client.log_batch(self.run_id(trial), metrics=metrics, tags=tags)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        budget = int((trial.last_result or {}).get("epoch", 0))
        max_epochs = trial_config(self.base, trial.config, self.cells).train.epochs
        status = trial_status(budget, max_epochs)
        self.client.set_tag(run_id, "status", status)
        self.client.set_tag(run_id, "budget", str(budget))
        if status == "completed" and trial.checkpoint:  # the reports draw its attention maps
            with trial.checkpoint.as_directory() as folder:
                self.client.log_artifact(run_id, str(Path(folder) / CHECKPOINT_FILE), "checkpoint")
        self.client.set_terminated(run_id, "FINISHED")

    def on_experiment_end(self, trials, **info):
        """A driver killed between creating a trial's run and saving the trial in Ray's state
        leaves a run for a trial that --resume never knew: delete it (MLflow keeps deleted
        runs restorable), so that the study ends with exactly one run per trial."""
        known = {t.trial_id for t in trials}
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.results = '{self.tags['results']}'", max_results=50000)
        for run in runs:
            if run.data.tags.get("trial_id") not in known:
                self.client.delete_run(run.info.run_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "status", "errored")
        self.client.set_tag(run_id, "error", _error_line(trial))
        self.client.set_terminated(run_id, "FAILED")


def _error_line(trial) -> str:
    """The last line of the trial's traceback: the exception and its message."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1][:500] if lines else "unknown error"
    return "unknown error"
