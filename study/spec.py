"""The experiment file: one YAML document describing a study, validated before anything runs.

Every problem is a `SpecError` whose one-line message names the key, so that `study.run` can exit
with code 2 before Ray starts and before MLflow is touched. The model/data/train sections are the
trainer's own config (`tinyvit.config`), validated by the same code the trainer uses.
"""
from __future__ import annotations

import copy
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tinyvit.config import Config, ConfigError, parse_override, read_yaml, set_dotted

from .space import SpaceError, parse_ablation, parse_space, sample_configs

TOP_KEYS = {"name", "mode", "base", "model", "data", "train", "search", "ablation", "scheduler",
            "resources", "mlflow", "storage", "max_failures"}
SEARCH_KEYS = {"num_samples", "metric", "mode", "seed", "space", "constraints"}
ABLATION_KEYS = {"factors", "design", "baseline", "seeds"}
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor"}
RESOURCE_KEYS = {"cpu", "gpu", "max_concurrent"}
MLFLOW_KEYS = {"tracking_uri", "experiment"}
METRICS = ("val_acc", "val_loss", "train_loss", "train_acc", "params", "images_per_sec")


class SpecError(ValueError):
    """The experiment file is wrong; the message names the key and what was expected."""


@dataclass
class Spec:
    name: str
    mode: str  # search | ablation
    base: dict  # nested model/data/train config every trial starts from
    storage: Path  # absolute: Ray workers chdir into their trial folders
    search: dict = field(default_factory=dict)
    ablation: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    tracking_uri: str | None = None
    experiment: str = ""
    max_failures: int = 2
    space: object = None  # study.space.Space (search) or list[Cell] (ablation)

    @property
    def path(self) -> Path:
        """Ray's results for this study; the table, best config and default MLflow store too."""
        return self.storage / self.name

    @property
    def metrics(self) -> list[str]:
        m = self.search.get("metric", "val_acc")
        return m if isinstance(m, list) else [m]

    @property
    def modes(self) -> list[str]:
        m = self.search.get("mode", "max")
        return m if isinstance(m, list) else [m]

    @property
    def searched(self) -> list[str]:
        return list(self.space.params) if self.mode == "search" else list(self.ablation["factors"])

    def trial_count(self) -> int:
        if self.mode == "search":
            return self.search["num_samples"]
        return len(self.space) * len(self.ablation["seeds"])


def load_spec(path: str | Path, overrides: list[str] = ()) -> Spec:
    try:
        raw = read_yaml(path)
        for item in overrides:
            key, value = parse_override(item)
            set_dotted(raw, key, value)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    return parse_spec(raw)


def parse_spec(raw: dict) -> Spec:
    raw = copy.deepcopy(raw)
    _known(raw, TOP_KEYS, "")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise SpecError("name must be a non-empty string without '/' (the study's name)")
    mode = raw.get("mode", "search")
    if mode not in ("search", "ablation"):
        raise SpecError(f"mode={mode!r} is not one of search, ablation")
    base = {}
    if raw.get("base"):
        try:  # typically another study's best_config.yaml: ablate around what a search found
            base = read_yaml(Path(raw["base"]).expanduser())
        except ConfigError as e:
            raise SpecError(f"base: {e}") from None
    for section in ("model", "data", "train"):
        sub = raw.get(section) or {}
        if not isinstance(sub, dict):
            raise SpecError(f"{section} must be a mapping of {section}.* keys")
        base.setdefault(section, {}).update(sub)
    base = _absolute_paths(base)
    try:
        Config.from_dict(base)
    except ConfigError as e:
        raise SpecError(str(e)) from None

    spec = Spec(name=name, mode=mode, base=base,
                storage=Path(raw.get("storage") or "runs").expanduser().resolve(),
                max_failures=_int(raw.get("max_failures", 2), "max_failures", lo=0))
    spec.search = _section(raw, "search", SEARCH_KEYS)
    spec.ablation = _section(raw, "ablation", ABLATION_KEYS)
    spec.scheduler = _scheduler(_section(raw, "scheduler", SCHEDULER_KEYS))
    spec.resources = _resources(_section(raw, "resources", RESOURCE_KEYS))
    ml = _section(raw, "mlflow", MLFLOW_KEYS)
    spec.tracking_uri = ml.get("tracking_uri")
    spec.experiment = ml.get("experiment") or name

    try:
        if mode == "search":
            _search(spec)
        else:
            _ablation(spec)
        sample_configs(spec)  # every sampled / grid configuration must be a valid trainer config
    except SpaceError as e:
        raise SpecError(str(e)) from None
    if spec.scheduler["type"] == "asha" and len(spec.metrics) > 1:
        raise SpecError("scheduler.type=asha needs a single search.metric; multi-objective "
                        "searches run with scheduler.type=none")
    return spec


def _search(spec: Spec) -> None:
    s = spec.search
    if not s.get("space"):
        raise SpecError("search.space must map at least one config key to a distribution "
                        "(mode: search)")
    s["num_samples"] = _int(s.get("num_samples", 8), "search.num_samples", lo=1)
    s["seed"] = _int(s.get("seed", 0), "search.seed", lo=0)
    metrics = s.get("metric", "val_acc")
    modes = s.get("mode", "max")
    metrics, modes = (metrics if isinstance(metrics, list) else [metrics],
                      modes if isinstance(modes, list) else [modes])
    if len(metrics) != len(modes):
        raise SpecError(f"search.metric and search.mode must have the same length, "
                        f"got {len(metrics)} and {len(modes)}")
    for m in metrics:
        if m not in METRICS:
            raise SpecError(f"search.metric {m!r} is not one of {', '.join(METRICS)}")
    for m in modes:
        if m not in ("max", "min"):
            raise SpecError(f"search.mode {m!r} is not one of max, min")
    spec.space = parse_space(s["space"], s.get("constraints") or [],
                             Config.from_dict(spec.base).flat())


def _ablation(spec: Spec) -> None:
    a = spec.ablation
    if not a.get("factors"):
        raise SpecError("ablation.factors must map at least one config key to a list of values "
                        "(mode: ablation)")
    seeds = a.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds):
        raise SpecError(f"ablation.seeds must be a non-empty list of ints or a count, got {seeds!r}")
    a["seeds"] = seeds
    a["design"] = a.get("design", "one-at-a-time")
    spec.space = parse_ablation(a["factors"], a["design"], a.get("baseline") or {}, spec.base)


def _scheduler(s: dict) -> dict:
    kind = s.get("type", "none")
    if kind not in ("asha", "none"):
        raise SpecError(f"scheduler.type={kind!r} is not one of asha, none")
    return {"type": kind, "grace_period": _int(s.get("grace_period", 1), "scheduler.grace_period", 1),
            "reduction_factor": _int(s.get("reduction_factor", 2), "scheduler.reduction_factor", 2)}


def _resources(r: dict) -> dict:
    cpu, gpu = r.get("cpu", 1), r.get("gpu", 0)
    for key, v in (("cpu", cpu), ("gpu", gpu)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise SpecError(f"resources.{key} must be a number >= 0, got {v!r}")
    if cpu == 0 and gpu == 0:
        raise SpecError("resources.cpu and resources.gpu cannot both be 0")
    return {"cpu": cpu, "gpu": gpu,
            "max_concurrent": _int(r.get("max_concurrent", 2), "resources.max_concurrent", 1)}


def _absolute_paths(base: dict) -> dict:
    """Trial processes run in their own folders: resolve relative paths here, once."""
    data = base.get("data", {})
    for key in ("root", "cache_dir"):
        if isinstance(data.get(key), str):
            data[key] = str(Path(data[key]).expanduser().resolve())
    return base


def _section(raw: dict, name: str, allowed: set) -> dict:
    sub = raw.get(name) or {}
    if not isinstance(sub, dict):
        raise SpecError(f"{name} must be a mapping with keys {', '.join(sorted(allowed))}")
    _known(sub, allowed, f"{name}.")
    return sub


def _known(d: dict, allowed: set, prefix: str) -> None:
    for key in d:
        if key not in allowed:
            raise SpecError(f"unknown key '{prefix}{key}' (allowed: {', '.join(sorted(allowed))})")


def _int(v, key: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SpecError(f"{key} must be an integer >= {lo}, got {v!r}")
    return v


def resolve_tracking_uri(cli_uri: str | None, spec: Spec) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the file's mlflow.tracking_uri, else an
    embedded SQLite store inside the study's folder."""
    return (cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking_uri
            or f"sqlite:///{spec.path / 'mlflow.db'}")


def check_tracking_uri(uri: str) -> None:
    """Fail before Ray starts: an unreachable server or an impossible store path."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                r.read()
        except OSError as e:
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
