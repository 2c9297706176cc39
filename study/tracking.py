"""MLflow: one run per trial, logged from the driver.

Logging from the driver (a Tune callback) rather than from trial processes means one writer per
store, so an embedded SQLite file never locks, and workers on other nodes need no route to the
tracking server. Runs are found again by their study and trial ids, because `Tuner.restore` does
not remember them: a resumed study continues the same runs instead of duplicating them, and never
touches the runs of another study that shares its name.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
from concurrent.futures import Future
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune

import contract as c
from tinyvit.config import Config
from tinyvit.data import Arrays

from .spec import Plan


def experiment_of(uri: str, plan: Plan) -> tuple[str, str | None]:
    """The study's experiment name and artifact location. A server stores artifacts itself; an
    embedded store keeps them beside the study, not in ./mlruns of whatever folder the driver
    ran in."""
    return plan.experiment, None if uri.startswith("http") else (plan.path / "mlartifacts").as_uri()


def prepare_experiment(uri: str, name: str, location: str | None) -> str:
    """The experiment's id, created on first use (with the SQLite schema, for a new store), and
    marked as model training so that MLflow's UI opens it on its runs."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, location, tags=dict([c.EXPERIMENT_KIND]))
    client.set_experiment_tag(found.experiment_id, *c.EXPERIMENT_KIND)
    return found.experiment_id


def dataset_input(cfg: Config, arrays: Arrays) -> DatasetInput:
    """The study's data set as an MLflow dataset input: what it is, where it came from, its
    sizes, and a digest of the decoded images and labels (the same digest, the same data)."""
    digest = hashlib.sha1()
    for tensor in (arrays.train_x, arrays.train_y, arrays.test_x, arrays.test_y):
        digest.update(tensor.contiguous().numpy().tobytes())
    d = cfg.data
    name = Path(d.root).name.split(".")[0] if d.source == "imagefolder" else d.source
    profile = {"train_images": len(arrays.train_y) - d.val_size, "val_images": d.val_size,
               "test_images": len(arrays.test_y), "classes": len(arrays.classes),
               "split_seed": d.split_seed, "subset": d.subset}
    dataset = Dataset(name=name, digest=digest.hexdigest()[:16], source_type="local",
                      source=json.dumps({"source": d.source, "root": d.root}),
                      schema=json.dumps({"images": ["uint8", *arrays.train_x.shape[1:]],
                                         "labels": "int64", "classes": arrays.classes}),
                      profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def run_name(plan: Plan, config: dict) -> str:
    """What the trial is, readable in MLflow's run list: its cell and seed, or its values."""
    overrides = plan.design.overrides(config)
    cell = plan.design.cell(config)
    if cell is not None:
        ladder = f" {overrides['train.epochs']} epochs" if plan.design.budgets else ""
        return f"{cell} seed {overrides['train.seed']}{ladder}"
    shown = [f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
             for k, v in overrides.items() if k in plan.design.searched]
    if plan.design.repeats > 1:
        shown.append(f"seed {overrides['train.seed']}")
    return " ".join(shown)[:250]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class MlflowTrials(tune.Callback):
    def __init__(self, uri: str, plan: Plan, identity: str, dataset: DatasetInput,
                 experiment: Future | None = None):
        self.uri, self.plan, self.dataset = uri, plan, dataset
        self.experiment = experiment_of(uri, plan)
        self._pending, self._experiment_id, self._parent = experiment, None, None
        commit = git_commit()
        self.tags = {c.STUDY: plan.name, c.STUDY_ID: identity, c.MODE: plan.design.mode,
                     c.SEARCHED: ",".join(plan.design.searched), c.RESULTS: str(plan.path),
                     c.GIT_COMMIT: commit, **plan.analysis_tags(),
                     # what MLflow's UI shows as a run's source, user and version
                     "mlflow.source.name": "python -m study.run", "mlflow.source.type": "LOCAL",
                     "mlflow.source.git.commit": commit, "mlflow.user": getpass.getuser()}
        self.client, self.runs = None, {}

    def __getstate__(self):  # Tuner pickles its callbacks: a restored one looks its ids up again
        return {**self.__dict__, "client": None, "runs": {}, "_pending": None,
                "_experiment_id": None, "_parent": None}

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

    @property
    def parent_id(self) -> str:
        """The study's parent run (found again on --resume), every trial's run its child."""
        if self._parent is None:
            found = self._own_runs(f" and tags.{c.RUN_KIND} = '{c.STUDY_RUN}'")
            if found:
                self._parent = found[0].info.run_id
                self.client.update_run(self._parent, status="RUNNING")
            else:
                self._parent = self.client.create_run(
                    self.experiment_id, run_name=self.plan.name,
                    tags={**self.tags, c.RUN_KIND: c.STUDY_RUN}).info.run_id
                fixed = [Param(k, str(v)) for k, v in self.plan.config.flat().items()]
                self.client.log_batch(self._parent, params=fixed)
                self.client.log_inputs(self._parent, [self.dataset])
        return self._parent

    def run_id(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self._own_runs(f" and tags.{c.TRIAL_ID} = '{trial.trial_id}'")
        if found:  # a resumed study or a retried trial: continue its run
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            cfg = self.plan.trial_config(trial.config)
            sampled = self.plan.sampled(trial.config)
            tags = {**self.tags, c.TRIAL_ID: trial.trial_id, c.SEED: str(cfg.train.seed),
                    c.MAX_EPOCHS: str(cfg.train.epochs), c.BUDGET: "0", c.STATUS: c.RUNNING,
                    c.SAMPLED: ",".join(sampled), c.PARENT: self.parent_id,
                    c.RUN_KIND: c.TRIAL_RUN}
            cell = self.plan.design.cell(trial.config)
            if cell is not None:
                tags[c.CELL] = cell
            run_id = self.client.create_run(self.experiment_id,
                                            run_name=run_name(self.plan, trial.config),
                                            tags=tags).info.run_id
            unsampled = set(self.plan.design.searched) - set(sampled)
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cfg.flat().items()
                                                  if k not in unsampled])
            self.client.log_inputs(run_id, [self.dataset])
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
        for run in self._own_runs(f" and tags.{c.RUN_KIND} = '{c.TRIAL_RUN}'"):
            if run.data.tags.get(c.TRIAL_ID) not in known:
                self.client.delete_run(run.info.run_id)
        self.client.set_terminated(self.parent_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, c.STATUS, c.ERRORED)
        self.client.set_tag(run_id, c.ERROR, _error_line(trial))
        self.client.set_terminated(run_id, "FAILED")


def publish(plan: Plan, uri: str, identity: str, best_trial: str | None, report: Path | None,
            ) -> list[str]:
    """At the study's end: the best trial's model as an MLflow PyTorch model under its run, with
    its signature, registered under the study's name where the store has a model registry; the
    study's report attached to its parent run. Returns lines saying what was done."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from tinyvit.model import TinyViT
    from tinyvit.train import load_checkpoint

    client, lines = MlflowClient(uri), []
    experiment = client.get_experiment_by_name(plan.experiment).experiment_id
    own = client.search_runs([experiment], f"tags.{c.STUDY_ID} = '{identity}'", max_results=50000)
    parent = next(r.info.run_id for r in own if r.data.tags.get(c.RUN_KIND) == c.STUDY_RUN)
    if report is not None:
        client.log_artifacts(parent, str(report), c.REPORT_DIR)
        lines.append(f"report    attached to the study's run, artifacts {c.REPORT_DIR}/")
    client.set_terminated(parent, "FINISHED")  # the study's run lasts until its report is in
    best = next((r for r in own if r.data.tags.get(c.TRIAL_ID) == best_trial), None)
    if best is None:
        return lines
    state = load_checkpoint(mlflow.artifacts.download_artifacts(
        run_id=best.info.run_id, artifact_path=c.CHECKPOINT, tracking_uri=uri))
    cfg = Config.from_dict(state["config"])
    model = TinyViT(cfg.model).eval()
    model.load_state_dict(state["model"])
    example = torch.zeros(2, 3, cfg.model.image_size, cfg.model.image_size)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=best.info.run_id):  # reopened: its end time is restored below
        # the model takes images normalized with the training split's mean and std (metadata);
        # pickled with tinyvit beside it, so loading needs no install of this project and any
        # batch size works (a pt2 export would fix the example's)
        info = mlflow.pytorch.log_model(
            model, name=c.MODEL, signature=signature, code_paths=[_package_dir()],
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={"mean": state["mean"], "std": state["std"], "study": plan.name})
    client.set_terminated(best.info.run_id, "FINISHED", end_time=best.info.end_time)
    lines.append(f"model     best trial {best_trial}: {info.model_uri}")
    try:
        version = mlflow.register_model(info.model_uri, plan.experiment)
        lines.append(f"registry  {plan.experiment} version {version.version}")
    except MlflowException as e:  # a store without a model registry
        lines.append(f"registry  not available at {uri} ({str(e).splitlines()[0][:120]})")
    return lines


def _package_dir() -> str:
    import tinyvit

    return str(Path(tinyvit.__file__).parent)


def _error_line(trial) -> str:
    """The last line of the trial's traceback: the exception and its message."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1][:500] if lines else "unknown error"
    return "unknown error"
