"""MLflow: the study's run, one run per trial, written from the driver through its outbox."""
from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from ray import tune

import contract as c
from tinyvit.config import Config
from tinyvit.data import Arrays

from .outbox import Outbox
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


STUDY_LEVEL = (c.GIT_COMMIT, "mlflow.source.git.commit", "mlflow.user")  # who ran it, and what


def study_tags(plan: Plan, identity: str) -> dict:
    """The tags of the study's run and of every trial's run: which study, run by what."""
    commit = git_commit()
    return {c.STUDY: plan.name, c.STUDY_ID: identity, c.MODE: plan.design.mode,
            c.SEARCHED: ",".join(plan.design.searched), c.RESULTS: str(plan.path),
            c.GIT_COMMIT: commit, **plan.analysis_tags(),
            # what MLflow's UI shows as a run's source, user and version
            "mlflow.source.name": "python -m study.run", "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": commit, "mlflow.user": getpass.getuser()}


@dataclass
class Op:
    """One write to MLflow, waiting in the outbox: `kind` names the `Runs` method applying it."""
    kind: str  # open | log | fill | close | end
    trial_id: str | None = None
    config: dict | None = None  # the trial's Ray config: its run is created from it if need be
    args: dict = field(default_factory=dict)


def result_entries(result: dict) -> tuple[list[Metric], dict]:
    """What one of a trial's results puts in its run: the epoch's metrics, with the epoch as
    step and Ray's own timestamp (a result sent twice is then the same point twice, which
    MLflow keeps once), the parameter count at step 0 with the first epoch, and tags."""
    step, now = int(result["epoch"]), int(result.get("timestamp", 0)) * 1000
    metrics = [Metric(k, float(result[k]), now, step)
               for k in (*c.EPOCH_METRICS, *c.FINAL_METRICS) if k in result]
    if step == 1:
        metrics.append(Metric(c.PARAM_COUNT, float(result[c.PARAM_COUNT]), now, 0))
    return metrics, {c.BUDGET: str(step), c.NODE: str(result.get("node_id", ""))}


def opened(trial, reopen: bool, start_ms: int | None) -> Op:
    """The trial's run, found again by its tags or created; `reopen` marks a found one as
    running again (a resumed study, a retried trial)."""
    return Op("open", trial.trial_id, trial.config, {"reopen": reopen, "start_ms": start_ms})


def logged(trial, result: dict) -> Op:
    metrics, tags = result_entries(result)
    return Op("log", trial.trial_id, trial.config, {"metrics": metrics, "tags": tags})


def filled(trial, results: list[dict]) -> Op:
    """The trial's results as Ray holds them, of which the run gets the points it lacks."""
    return Op("fill", trial.trial_id, trial.config, {"results": results})


def closed(plan: Plan, trial, errored: bool) -> Op:
    """The trial's outcome: status and budget tags, the checkpoint of a completed trial, the
    run terminated when its last result came (so that a late or repeated write moves nothing)."""
    last = trial.last_result or {}
    budget = int(last.get("epoch", 0))
    status = (c.ERRORED if errored
              else c.trial_status(budget, plan.trial_config(trial.config).train.epochs))
    end = last.get("timestamp")
    return Op("close", trial.trial_id, trial.config, {
        "status": status, "budget": budget, "error": _error_line(trial) if errored else None,
        "checkpoint": trial.checkpoint if status == c.COMPLETED else None,
        "end_ms": int(end) * 1000 if end else None})


def merged(results: list[Op]) -> tuple[list[Metric], dict]:
    """One trial's results as one write: every metric, and the tags in order (the last
    budget tag stays)."""
    return ([m for op in results for m in op.args["metrics"]],
            {k: v for op in results for k, v in op.args["tags"].items()})


def ended(trials, end_ms: int | None) -> Op:
    return Op("end", args={"known": [t.trial_id for t in trials], "end_ms": end_ms})


class Runs:
    """The study's runs in MLflow: the study's parent run, one child run per trial. Runs are
    found again by their study and trial ids, because `Tuner.restore` does not remember them:
    a resumed study continues the same runs instead of duplicating them, and never touches the
    runs of another study that shares its name. Every operation can be applied again (after an
    answer lost on its way back, or replayed from Ray's results) without writing anything twice.
    A replay never marks a run running again, and takes the study's git commit and user from
    the study's run, which the study's own driver wrote."""

    def __init__(self, uri: str, plan: Plan, identity: str, dataset: DatasetInput,
                 experiment: Future | None = None, replay: bool = False, fresh: bool = False):
        self.uri, self.plan, self.dataset, self.replay = uri, plan, dataset, replay
        # A study this driver started: a trial's run exists only if this object created it, so
        # it is searched for (a query over the study's runs, slower as they grow) only after a
        # creation that failed without an answer; a resumed or replayed study searches always.
        self.fresh, self._unsure = fresh, set()
        self.client = MlflowClient(uri)
        self.tags = study_tags(plan, identity)
        self._pending, self._experiment_id, self._parent = experiment, None, None
        # the outbox applies different trials' operations on several threads: the experiment and
        # the study's run, which they share, are made once, under this lock
        self._shared = threading.RLock()
        self.runs: dict[str, str] = {}  # trial id -> run id
        # a run this driver created: its params go with its first batch, and its checkpoint
        # where its creation said, without asking the server again (two requests a trial fewer)
        self._owed: dict[str, list[Param]] = {}  # run id -> params not yet logged
        self._artifacts: dict[str, str] = {}  # run id -> artifact URI
        self.added = 0  # points a fill found missing

    @property
    def experiment_id(self) -> str:
        """The first trial waits here, if at all, for the set-up that the driver started in a
        thread alongside Tune's start-up; a restored study finds it by name."""
        with self._shared:
            if self._experiment_id is None:
                pending, self._pending = self._pending, None  # failed once: by name, retried
                self._experiment_id = (pending.result() if pending is not None
                                       else prepare_experiment(self.uri, *experiment_of(
                                           self.uri, self.plan)))
        return self._experiment_id

    def _own_runs(self, extra: str = "") -> list:
        # ids are hex: safe inside the filter whatever the study's name or folder holds
        query = f"tags.{c.STUDY_ID} = '{self.tags[c.STUDY_ID]}'" + extra
        return self.client.search_runs([self.experiment_id], query, max_results=50000)

    def parent_id(self, start_ms: int | None = None, reopen: bool = False) -> str:
        """The study's parent run (found again on --resume), every trial's run its child."""
        with self._shared:
            if self._parent is None:
                found = self._own_runs(f" and tags.{c.RUN_KIND} = '{c.STUDY_RUN}'")
                if not found:
                    parent = self.client.create_run(
                        self.experiment_id, start_ms, run_name=self.plan.name,
                        tags={**self.tags, c.RUN_KIND: c.STUDY_RUN}).info.run_id
                else:
                    parent = found[0].info.run_id
                    if self.replay:
                        self.tags.update({k: v for k, v in found[0].data.tags.items()
                                          if k in STUDY_LEVEL})
                    elif reopen:
                        self.client.update_run(parent, status="RUNNING")
                # again on a found run: its creation may have been cut short before these
                fixed = [Param(k, str(v)) for k, v in self.plan.config.flat().items()]
                self.client.log_batch(parent, params=fixed)
                self.client.log_inputs(parent, [self.dataset])
                self._parent = parent
        return self._parent

    def run_id(self, trial_id: str, config: dict, start_ms: int | None = None,
               reopen: bool = False) -> str:
        if trial_id in self.runs:
            return self.runs[trial_id]
        found = (self._own_runs(f" and tags.{c.TRIAL_ID} = '{trial_id}'")
                 if not self.fresh or trial_id in self._unsure else [])
        cfg, unsampled = self.plan.trial_config(config), (set(self.plan.design.searched)
                                                         - set(self.plan.sampled(config)))
        params = [Param(k, str(v)) for k, v in cfg.flat().items() if k not in unsampled]
        if not found:
            run_id = self._create(trial_id, config, start_ms, reopen)
            self._owed[run_id] = params
        else:
            run_id = found[0].info.run_id
            if reopen and not self.replay:  # a resumed study or a retried trial: its run goes on
                self.client.update_run(run_id, status="RUNNING")
            # again on a found run: its creation may have been cut short before these
            self.client.log_batch(run_id, params=params)
        self.client.log_inputs(run_id, [self.dataset])
        self.runs[trial_id] = run_id
        return run_id

    def _create(self, trial_id: str, config: dict, start_ms: int | None, reopen: bool) -> str:
        """A trial's run and its tags: what it is, where it stands, whose child it is."""
        cfg = self.plan.trial_config(config)
        parent = self.parent_id(start_ms, reopen)  # first: a replay takes the study's tags there
        tags = {**self.tags, c.TRIAL_ID: trial_id, c.SEED: str(cfg.train.seed),
                c.MAX_EPOCHS: str(cfg.train.epochs), c.BUDGET: "0", c.STATUS: c.RUNNING,
                c.SAMPLED: ",".join(self.plan.sampled(config)), c.PARENT: parent,
                c.RUN_KIND: c.TRIAL_RUN}
        cell = self.plan.design.cell(config)
        if cell is not None:
            tags[c.CELL] = cell
        try:
            info = self.client.create_run(self.experiment_id, start_ms, tags=tags,
                                          run_name=run_name(self.plan, config)).info
            self._artifacts[info.run_id] = info.artifact_uri
            return info.run_id
        except Exception:  # the run may exist (an answer lost on its way back): look first
            self._unsure.add(trial_id)
            raise

    def apply(self, ops: list[Op]) -> None:
        """One operation, or one trial's consecutive results and the close that may follow
        them (Outbox), in one write."""
        *results, last = ops
        if last.kind == "close":
            return self.close(last, results)
        if last.kind == "log":
            return self.log(ops)
        getattr(self, last.kind)(last)

    def open(self, op: Op) -> None:
        self.run_id(op.trial_id, op.config, op.args["start_ms"], op.args["reopen"])

    def log(self, ops: list[Op]) -> None:
        self._log_batch(self.run_id(ops[0].trial_id, ops[0].config), *merged(ops))

    def fill(self, op: Op) -> None:
        """The points of Ray's results the run lacks, one per (metric, step): a result that
        Ray holds twice (an epoch re-run after a resume) counts once, by its last value."""
        run_id = self.run_id(op.trial_id, op.config)
        points, tags = {}, {}
        for result in op.args["results"]:
            metrics, tags = result_entries(result)
            points.update({(m.key, m.step): m for m in metrics})
        have = {(key, m.step) for key in {k for k, _ in points}
                for m in self.client.get_metric_history(run_id, key)}
        missing = [m for kv, m in points.items() if kv not in have]
        self._log_batch(run_id, missing, tags)
        with self._shared:
            self.added += len(missing)

    def _log_batch(self, run_id: str, metrics: list[Metric], tags: dict) -> None:
        params = self._owed.get(run_id, [])
        if not metrics and not tags and not params:
            return
        size = 800  # MLflow takes at most 1000 values in one log_batch, 100 of them params
        for i in range(0, max(len(metrics), 1), size):
            self.client.log_batch(run_id, metrics=metrics[i:i + size],
                                  params=params if i == 0 else [],
                                  tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [])
        self._owed.pop(run_id, None)

    def close(self, op: Op, results: list[Op] = ()) -> None:
        """The trial's outcome, in one write with its last `results` if they came with it."""
        run_id, a = self.run_id(op.trial_id, op.config), op.args
        tags = {c.STATUS: a["status"], c.BUDGET: str(a["budget"])}
        if a["error"] is not None:
            tags[c.ERROR] = a["error"]
        metrics, logged = merged(results)
        self._log_batch(run_id, metrics, logged | tags)
        if a["checkpoint"] is not None:  # the reports draw its attention maps
            with a["checkpoint"].as_directory() as folder:
                path = Path(folder) / c.CHECKPOINT_FILE
                stored = {} if self.fresh else {  # a new run's upload is new; a rewrite the same
                    f.path: f.file_size
                    for f in self.client.list_artifacts(run_id, c.CHECKPOINT_DIR)}
                if stored.get(c.CHECKPOINT) != path.stat().st_size:  # none, or cut short
                    self._upload(run_id, path)
        self.client.set_terminated(run_id, "FAILED" if a["status"] == c.ERRORED else "FINISHED",
                                   end_time=a["end_ms"])

    def _upload(self, run_id: str, path: Path) -> None:
        if run_id in self._artifacts:
            get_artifact_repository(self._artifacts[run_id], tracking_uri=self.uri).log_artifact(
                str(path), c.CHECKPOINT_DIR)
        else:
            self.client.log_artifact(run_id, str(path), c.CHECKPOINT_DIR)

    def end(self, op: Op) -> None:
        """One study run and one run per trial. Deleted (MLflow keeps deleted runs
        restorable): a run of a trial that --resume never knew (a driver killed between creating
        it and saving the trial in Ray's state), and a second run of the study or of a trial (a
        creation the driver gave up on, after a timeout, that the server still carried out once
        the retry had created the run again). Kept: the run this driver wrote to, else one
        with metrics; a kept trial's run is made the child of the kept study run. Only this
        study instance's runs are looked at."""
        known, parent = set(op.args["known"]), self.parent_id()
        by_trial: dict[str, list] = {}
        for run in self._own_runs():
            if run.data.tags.get(c.RUN_KIND) == c.STUDY_RUN:
                if run.info.run_id != parent:
                    self.client.delete_run(run.info.run_id)
            else:
                by_trial.setdefault(run.data.tags.get(c.TRIAL_ID), []).append(run)
        for trial_id, runs in by_trial.items():
            ids = [r.info.run_id for r in runs]
            if trial_id not in known:
                keep = None
            elif self.runs.get(trial_id) in ids:
                keep = self.runs[trial_id]
            else:
                keep = next((i for i, r in zip(ids, runs) if r.data.metrics), ids[0])
            for run in runs:
                if run.info.run_id != keep:
                    self.client.delete_run(run.info.run_id)
                elif run.data.tags.get(c.PARENT) != parent:
                    self.client.set_tag(run.info.run_id, c.PARENT, parent)
        if self.client.get_run(parent).info.status != "FINISHED":  # ended once is enough
            self.client.set_terminated(parent, "FINISHED", end_time=op.args["end_ms"])


# study id -> its outbox, in the driver. Tuner.restore rebuilds the callback from its pickle, so
# the driver reaches the outbox here (to wait for it at the study's end), not through the
# callback object it made.
_OUTBOXES: dict[str, Outbox] = {}


def open_outbox(uri: str, plan: Plan, identity: str, dataset: DatasetInput,
                experiment: Future | None = None, fresh: bool = False) -> Outbox:
    if identity not in _OUTBOXES:
        runs = Runs(uri, plan, identity, dataset, experiment, fresh=fresh)
        _OUTBOXES[identity] = Outbox(runs.apply, uri)
    return _OUTBOXES[identity]


def finish(identity: str, patience: float, more: list[Op] = ()) -> int:
    """At the study's end: `more` operations queued last, then the wait for MLflow to take
    them all (Outbox.close); the number it missed."""
    outbox = _OUTBOXES.pop(identity, None)
    if outbox is None:
        return 0
    for op in more:
        outbox.put(op)
    return outbox.close(patience)


class MlflowTrials(tune.Callback):
    """One MLflow run per trial, logged from the driver. Logging from the driver rather than
    from trial processes means one writer per store, so an embedded SQLite file never locks,
    and workers on other nodes need no route to the tracking server. Tune's loop only queues
    what happened; the driver's outbox writes it."""

    def __init__(self, uri: str, plan: Plan, identity: str, dataset: DatasetInput,
                 experiment: Future | None = None, fresh: bool = False):
        """`fresh`: a study this driver started, not a resumed one (see Runs.fresh)."""
        self.uri, self.plan, self.identity, self.dataset = uri, plan, identity, dataset
        self._experiment, self.outbox, self.fresh = experiment, None, fresh

    def __getstate__(self):  # Tuner pickles its callbacks (what it restores is replaced)
        return {**self.__dict__, "_experiment": None, "outbox": None}

    def setup(self, **info):
        self.outbox = open_outbox(self.uri, self.plan, self.identity, self.dataset,
                                  self._experiment, self.fresh)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.outbox.put(opened(trial, reopen=True, start_ms=int(time.time() * 1000)))

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.outbox.put(logged(trial, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.outbox.put(closed(self.plan, trial, errored=False))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.outbox.put(closed(self.plan, trial, errored=True))

    def on_experiment_end(self, trials, **info):
        self.outbox.put(ended(trials, int(time.time() * 1000)))


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
    from tinyvit.train import load_checkpoint, scored_weights

    client, lines = MlflowClient(uri), []
    _, parent, own = _study_runs(client, plan, identity)
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
    model.load_state_dict(scored_weights(state))
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


def published(plan: Plan, uri: str, identity: str, best_trial: str | None) -> tuple[bool, bool]:
    """Whether the study's run has its report and the best trial's run its model: what a
    replay of the study's end has left to publish."""
    client = MlflowClient(uri)
    experiment, parent, own = _study_runs(client, plan, identity)
    best = next((r.info.run_id for r in own if r.data.tags.get(c.TRIAL_ID) == best_trial), None)
    return (bool(client.list_artifacts(parent, c.REPORT_DIR)),
            best is None or bool(client.search_logged_models(
                [experiment], f"source_run_id = '{best}' AND name = '{c.MODEL}'")))


def _study_runs(client: MlflowClient, plan: Plan, identity: str) -> tuple[str, str, list]:
    """The experiment's id, the study's run id, and all the study's runs."""
    experiment = client.get_experiment_by_name(plan.experiment).experiment_id
    own = client.search_runs([experiment], f"tags.{c.STUDY_ID} = '{identity}'", max_results=50000)
    parent = next(r.info.run_id for r in own if r.data.tags.get(c.RUN_KIND) == c.STUDY_RUN)
    return experiment, parent, own


def _package_dir() -> str:
    import tinyvit

    return str(Path(tinyvit.__file__).parent)


def _error_line(trial) -> str:
    """The last line of the trial's traceback: the exception and its message. Read where the
    driver wrote it, else (a study read back from its folder) from the trial's folder."""
    path = trial.error_file
    text = Path(path).read_text() if path and Path(path).exists() else trial.get_error() or ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "unknown error"
