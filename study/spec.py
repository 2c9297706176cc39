"""The experiment file, parsed once into a typed, validated `Plan` before anything runs.

Every problem is a `SpecError` whose one-line message names the key, so that `study.run` can exit
with code 2 before Ray starts and before MLflow is touched. The model/data/train sections are the
trainer's own config (`tinyvit.config`), validated by the same code the trainer uses; what the
study varies is a `Search` or an `Ablation` (study/space.py).
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shlex
import tempfile
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

import contract as c
from tinyvit.config import (Config, ConfigError, apply_overrides, parse_override, read_yaml,
                            set_dotted, short)

from .space import Ablation, Search, SpaceError, parse_ablation, parse_search, validate_trials

TOP_KEYS = {"name", "mode", "base", "model", "data", "train", "search", "ablation", "scheduler",
            "resources", "mlflow", "storage", "max_failures"}
SEARCH_KEYS = {"num_samples", "metric", "mode", "seed", "space", "constraints", "repeats"}
ABLATION_KEYS = {"factors", "design", "baseline", "seeds", "budgets", "min_effect"}
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor"}
RESOURCE_KEYS = {"cpu", "gpu", "max_concurrent", "trial_timeout_s"}
MLFLOW_KEYS = {"tracking_uri", "experiment", "report"}
# what every trial of a study is compared on: one data set (decoded once, by the driver), one
# validation split, one image shape; a study that varied them would rank trials on different
# questions
FIXED_KEYS = ("data.source", "data.root", "data.cache_dir", "data.synthetic_train",
              "data.synthetic_test", "data.val_size", "data.split_seed", "model.image_size",
              "model.num_classes")
RECORD = "study.yaml"  # in the study folder: its id and the experiment it was started with


class SpecError(ValueError):
    """The experiment file is wrong; the message names the key and what was expected."""


@dataclass
class Plan:
    name: str
    design: Search | Ablation
    base: dict  # nested model/data/train config every trial starts from
    config: Config  # the base, validated
    storage: Path  # absolute: Ray workers chdir into their trial folders
    scheduler: dict
    resources: dict
    tracking_uri: str | None
    experiment: str  # MLflow experiment
    max_failures: int
    report: bool  # build the study's report at its end and attach it to the study's MLflow run
    source: dict  # the experiment as read (file, --set, the base file's values): --resume compares

    @property
    def path(self) -> Path:
        """Ray's results for this study; the table, best config and default MLflow store too."""
        return self.storage / self.name

    @property
    def epochs(self) -> int:
        """A trial's most epochs: train.epochs, or the longest budget of an ablation's ladder."""
        return max(self.design.budgets or [self.config.train.epochs])

    def trial_config(self, config: dict) -> Config:
        """The config one trial trains: the base with its overrides (Ray's `config`)."""
        return Config.from_dict(apply_overrides(self.base, self.design.overrides(config)))

    def sampled(self, config: dict) -> list[str]:
        """The searched keys this trial has values for: a conditional key whose `when` was
        false is no factor level of it (absent from its MLflow params and its table row)."""
        overrides = self.design.overrides(config)
        return [k for k in self.design.searched if k in overrides]

    def rungs(self) -> list[int]:
        """The epochs at which ASHA compares trials (Ray's rule: grace_period x
        reduction_factor^k below the last epoch); none without ASHA."""
        s = self.scheduler
        if s["type"] != "asha":
            return []
        rungs, t = [], s["grace_period"]
        while t < self.epochs:
            rungs.append(t)
            t *= s["reduction_factor"]
        return rungs

    def analysis_tags(self) -> dict:
        """What the report needs to know of the study beyond its trials' own values."""
        tags = ({c.MIN_EFFECT: str(self.design.min_effect)} if self.design.mode == "ablation"
                else {c.REPEATS: str(self.design.repeats)})
        if self.rungs():
            tags[c.RUNGS] = ",".join(map(str, self.rungs()))
        return tags

    def describe(self, uri: str, address: str | None) -> str:
        r, s = self.resources, self.scheduler
        gpu = ("a share of a" if r["gpu"] == "auto" else r["gpu"])
        limit = (f"stopped after {r['trial_timeout_s']:g}s without a result; "
                 if r["trial_timeout_s"] else "")
        return "\n".join([
            f"study     {self.name} ({self.design.mode}), {self.design.trial_count()} trials of "
            f"up to {self.epochs} epochs",
            self.design.plan_line(),
            "scheduler " + ("none (every trial runs its full budget)" if s["type"] == "none" else
                            f"ASHA, grace period {s['grace_period']} epochs, reduction factor "
                            f"{s['reduction_factor']}"),
            f"resources {r['cpu']} CPU, {gpu} GPU per trial; at most {r['max_concurrent']} at "
            f"once; retries {self.max_failures}; {limit}Ray at {address or 'a new local cluster'}",
            f"results   {self.path}",
            f"mlflow    {uri} (experiment '{self.experiment}')",
        ])


def load_plan(path: str | Path, overrides: list[str] = ()) -> Plan:
    try:
        raw = read_yaml(path)
        for item in overrides:
            key, value = parse_override(item)
            set_dotted(raw, key, value)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    return parse_plan(raw)


def parse_plan(raw: dict) -> Plan:
    raw = copy.deepcopy(raw)
    _known(raw, TOP_KEYS, "")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name \
            or name in (".", "..") or "\0" in name:
        raise SpecError(f"name must be a non-empty string without '/' (the study's folder and "
                        f"experiment), got {short(name)}")
    mode = raw.get("mode", "search")
    if mode not in ("search", "ablation"):
        raise SpecError(f"mode={short(mode)} is not one of search, ablation")
    other = "ablation" if mode == "search" else "search"
    if raw.get(other):  # a section the mode ignores is a study that does not run as written
        raise SpecError(f"{other} is given but mode is {mode}: set mode: {other} or remove it")

    source = copy.deepcopy(raw)
    base = {}
    if raw.get("base") is not None:
        if not isinstance(raw["base"], str):
            raise SpecError(f"base must be the path of a YAML config, got {short(raw['base'])}")
        try:  # typically another study's best_config.yaml: ablate around what a search found
            base = read_yaml(Path(raw["base"]).expanduser())
        except ConfigError as e:
            raise SpecError(f"base: {e}") from None
        source["base"] = copy.deepcopy(base)
    for section in ("model", "data", "train"):
        sub = raw.get(section) or {}
        if not isinstance(sub, dict):
            raise SpecError(f"{section} must be a mapping of {section}.* keys")
        if not isinstance(base.get(section) or {}, dict):
            raise SpecError(f"base: {section} must be a mapping of {section}.* keys")
        base[section] = {**(base.get(section) or {}), **sub}
    _absolute_paths(base)
    try:
        config = Config.from_dict(base)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    if config.data.val_size == 0:
        raise SpecError("data.val_size must be > 0 in a study: trials are selected on "
                        "validation accuracy, never on test")

    storage = raw.get("storage", "runs")
    if not isinstance(storage, str) or not storage:
        raise SpecError(f"storage must be a folder path, got {short(storage)}")
    ml = _section(raw, "mlflow", MLFLOW_KEYS)
    for key in ("tracking_uri", "experiment"):
        if ml.get(key) is not None and (not isinstance(ml[key], str) or not ml[key]):
            raise SpecError(f"mlflow.{key} must be a non-empty string, got {short(ml[key])}")
    if not isinstance(ml.get("report", True), bool):
        raise SpecError(f"mlflow.report must be true or false, got {short(ml['report'])}")
    resources = _resources(_section(raw, "resources", RESOURCE_KEYS))
    # one intra-op thread per CPU the trial holds: more would fight the neighbouring trials
    # (a best_config.yaml base says `threads: null`, which would mean every core of the node)
    if config.train.threads is None:
        base["train"]["threads"] = max(1, int(resources["cpu"]))
    if config.train.device == "cuda" and resources["gpu"] == 0:
        raise SpecError("train.device=cuda needs resources.gpu > 0 (or auto): Ray hides the "
                        "GPUs from a trial that asks for none")

    try:
        if mode == "search":
            design = parse_search(_section(raw, "search", SEARCH_KEYS), config.flat())
        else:
            design = parse_ablation(_section(raw, "ablation", ABLATION_KEYS), base)
        for key in FIXED_KEYS:
            if key in design.searched:
                raise SpecError(f"{key} cannot be searched or ablated: every trial of a study is "
                                "compared on one data set and one validation split")
        validate_trials(design, base)  # every sampled / grid config must be a valid config
    except SpaceError as e:
        raise SpecError(str(e)) from None

    scheduler = _scheduler(_section(raw, "scheduler", SCHEDULER_KEYS))
    if scheduler["type"] == "asha":
        if design.budgets:
            raise SpecError("scheduler.type=asha with ablation.budgets: a ladder trains every "
                            "cell to each budget; use scheduler.type: none")
        if design.mode == "search" and design.repeats > 1:
            raise SpecError("scheduler.type=asha with search.repeats: ASHA would stop single "
                            "seeds of a configuration whose mean the searcher is told; use "
                            "scheduler.type: none")
        if len(design.metrics) > 1:
            raise SpecError("scheduler.type=asha needs a single search.metric; multi-objective "
                            "searches run with scheduler.type=none")
        if scheduler["grace_period"] > config.train.epochs:
            raise SpecError(f"scheduler.grace_period={scheduler['grace_period']} is above "
                            f"train.epochs={config.train.epochs}: ASHA would never stop a trial")
    return Plan(name=name, design=design, base=base, config=Config.from_dict(base),
                storage=Path(storage).expanduser().resolve(), scheduler=scheduler,
                resources=resources, tracking_uri=ml.get("tracking_uri"),
                experiment=ml.get("experiment") or name,
                max_failures=_int(raw.get("max_failures", 2), "max_failures", lo=0),
                report=ml.get("report", True), source=source)


def _scheduler(s: dict) -> dict:
    kind = s.get("type", "none")
    if kind not in ("asha", "none"):
        raise SpecError(f"scheduler.type={short(kind)} is not one of asha, none")
    return {"type": kind, "grace_period": _int(s.get("grace_period", 1), "scheduler.grace_period", 1),
            "reduction_factor": _int(s.get("reduction_factor", 2), "scheduler.reduction_factor", 2)}


def _resources(r: dict) -> dict:
    cpu, gpu = r.get("cpu", 1), r.get("gpu", 0)
    for key, v in (("cpu", cpu), ("gpu", gpu)):
        if key == "gpu" and v == "auto":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise SpecError(f"resources.{key} must be a number >= 0"
                            f"{' or auto' if key == 'gpu' else ''}, got {short(v)}")
    if gpu != "auto" and 1 < gpu != int(gpu):
        raise SpecError(f"resources.gpu={gpu}: above 1 a trial takes whole GPUs")
    if cpu == 0 and gpu == 0:
        raise SpecError("resources.cpu and resources.gpu cannot both be 0")
    timeout = r.get("trial_timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < float("inf")):
        raise SpecError(f"resources.trial_timeout_s must be a number of seconds > 0 (or null: no "
                        f"limit), got {short(timeout)}")
    return {"cpu": cpu, "gpu": gpu,
            "max_concurrent": _int(r.get("max_concurrent", 2), "resources.max_concurrent", 1),
            "trial_timeout_s": timeout}


def _absolute_paths(base: dict) -> None:
    """Trial processes run in their own folders: resolve relative paths here, once."""
    data = base.get("data", {})
    for key in ("root", "cache_dir"):
        if isinstance(data.get(key), str):
            data[key] = str(Path(data[key]).expanduser().resolve())


def _section(raw: dict, name: str, allowed: set) -> dict:
    sub = raw.get(name) or {}
    if not isinstance(sub, dict):
        raise SpecError(f"{name} must be a mapping with keys {', '.join(sorted(allowed))}")
    _known(sub, allowed, f"{name}.")
    return sub


def _known(d: dict, allowed: set, prefix: str) -> None:
    for key in d:
        if key not in allowed:
            raise SpecError(f"unknown key '{prefix}{short(key)}' (allowed: "
                            f"{', '.join(sorted(allowed))})")


def _int(v, key: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SpecError(f"{key} must be an integer >= {lo}, got {short(v)}")
    return v


def study_id(plan: Plan, resume: bool, flag: str = "--resume") -> str:
    """The study instance's id. A new study must not overwrite one with results; a resumed one
    (or one replayed into MLflow: `flag`) must be the study that was started, not an edited file
    (the changed keys are named)."""
    state, record = plan.path / "tuner.pkl", plan.path / RECORD
    if not resume:
        if state.exists():
            raise SpecError(f"study '{plan.name}' already has results at {plan.path}; continue "
                            "it with --resume, or choose another name (--set name=...) or storage")
        return uuid.uuid4().hex
    if not state.exists() or not record.exists():
        raise SpecError(f"{flag}: no study at {plan.path} (storage/name of the file)")
    try:
        saved = yaml.safe_load(record.read_text())
        started, identity = saved["experiment"], saved["study_id"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        raise SpecError(f"{flag}: {record} is unreadable") from None
    check_ray_state(plan, flag)
    changed = sorted(k for k in set(_flat(started)) | set(_flat(plan.source))
                     if _flat(started).get(k, "<unset>") != _flat(plan.source).get(k, "<unset>"))
    if changed:
        raise SpecError(f"{flag}: the experiment differs from the one study '{plan.name}' "
                        f"started with, in {', '.join(changed)}; give the file and --set values "
                        "it started with, or start a new study")
    return identity


def check_ray_state(plan: Plan, flag: str) -> None:
    """Tune continues from the newest experiment_state-*.json in the study folder. A driver killed
    while Tune copied that file there leaves it empty or cut short, and Tune then logs an error
    and runs the study as a new one with no trials' configs (measured on a real 45-trial study).
    Refused instead, with the way out when there is one: Tune writes the file first into its
    session folder (`<temp dir>/ray*/session_*/artifacts/*/NAME/driver_artifacts/`), then copies
    it; that first copy is whole."""
    states = sorted(plan.path.glob("experiment_state-*.json"))  # Tune's own choice: the last name
    if not states or _json_whole(states[-1]):
        return
    broken = states[-1]
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    staged = f"ray*/session_*/artifacts/*/{glob.escape(plan.path.name)}/driver_artifacts"
    copies = [p for p in root.glob(f"{staged}/{broken.name}") if _json_whole(p)]
    newest = max(copies, key=lambda p: p.stat().st_mtime, default=None)
    fix = (f"Ray's own copy is whole: cp {shlex.quote(str(newest))} {shlex.quote(str(broken))}"
           if newest else f"no whole copy of it under {root}/ray*: the study cannot be continued")
    raise SpecError(f"{flag}: Ray's experiment state {broken} is empty or cut short (the driver "
                    f"was stopped while saving it); {fix}")


def _json_whole(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def record_start(plan: Plan, identity: str) -> None:
    """Written once the study is known to start: its id and the experiment it started with."""
    plan.path.mkdir(parents=True, exist_ok=True)
    (plan.path / RECORD).write_text(yaml.safe_dump(
        {"study_id": identity, "experiment": plan.source}, sort_keys=False))


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resolve_tracking_uri(cli_uri: str | None, plan: Plan) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the file's mlflow.tracking_uri, else an
    embedded SQLite store inside the study's folder."""
    return (cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or plan.tracking_uri
            or f"sqlite:///{plan.path / 'mlflow.db'}")


def check_tracking_uri(uri: str) -> None:
    """Fail before Ray starts: an unreachable server or an impossible store path."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                r.read()
        except (OSError, ValueError) as e:
            raise SpecError(f"mlflow.tracking_uri {uri} is unreachable ({e}); start it with "
                            "`mlflow server` or use a sqlite:/// URI") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        probe = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if probe is None or not os.access(probe, os.W_OK):
            raise SpecError(f"mlflow.tracking_uri {uri}: cannot create {folder}")
    else:
        raise SpecError(f"mlflow.tracking_uri {uri} must be sqlite:////abs/path.db or an "
                        "http(s):// mlflow server (MLflow 3 refuses plain file stores)")
