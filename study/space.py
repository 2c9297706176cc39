"""What a study varies: an Optuna search over config keys, or a seeded ablation grid.

`Search` and `Ablation` each own what depends on the kind of study: its trial count, its searched
keys, Ray's parameter space, the overrides of one trial and its line of the printed plan, so the
rest of `study/` never branches on the mode.

A search space maps keys to distributions, each optionally conditional (`when`), plus constraints
between keys (`model.embed_dim % model.heads == 0`). Optuna refuses a parameter whose choices
change from trial to trial, so when a constraint removes some choices the parameter is suggested
under a name that carries the remaining choices (`model.heads[2,4]`): Optuna's own recipe for
dynamic spaces. Trials only ever see the clean dotted keys.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from tinyvit.config import KEYS, Config, ConfigError, apply_overrides, coerce, key_type, short

from .expr import Expr, ExprError

KINDS = ("choice", "int", "uniform", "loguniform")
REPEAT_INDEX = "__trial_index__"  # Ray Tune's Repeater: a trial's index among its repeats
OBJECTIVES = ("val_acc", "val_loss", "train_loss", "train_acc", "params", "images_per_sec")


class SpaceError(ValueError):
    pass


@dataclass
class Param:
    key: str
    kind: str
    args: list
    when: Expr | None = None
    step: int = 1

    def candidates(self) -> list:
        """The finite value list of a choice or int parameter (what constraints filter)."""
        if self.kind == "choice":
            return list(self.args)
        return list(range(self.args[0], self.args[1] + 1, self.step))


@dataclass
class Search:
    params: dict[str, Param]
    constraints: list[Expr]
    base: dict  # flat base config: `when` and constraints may name fixed keys
    num_samples: int
    seed: int
    metrics: list[str]
    modes: list[str]
    # seeds per proposed configuration: the searcher is told their mean, so that a search is
    # not won by a lucky seed
    repeats: int = 1
    mode = "search"
    budgets = ()  # every trial trains train.epochs (ASHA may stop it sooner)

    @property
    def searched(self) -> list[str]:
        return list(self.params)

    def trial_count(self) -> int:
        return self.num_samples * self.repeats

    def plan_line(self) -> str:
        seeds = (f" x {self.repeats} seeds each (the searcher sees their mean)"
                 if self.repeats > 1 else "")
        return (f"search    Optuna TPE (seed {self.seed}) over {', '.join(self.searched)}"
                f"{seeds}; objective "
                + ", ".join(f"{m} ({o})" for m, o in zip(self.metrics, self.modes)))

    def param_space(self) -> dict:
        return {}  # OptunaSearch's define-by-run function samples everything

    def overrides(self, config: dict) -> dict:
        """The dotted keys a trial changes: its sampled values, and with repeats its seed, the
        base seed plus its index among the configuration's repeats. (Optuna's renamed
        constrained parameters such as 'model.heads[2,4]' are not config keys; an unsampled
        conditional parameter is absent.)"""
        values = {k: v for k, v in config.items() if k in KEYS}
        if self.repeats > 1:
            values["train.seed"] = self.base["train.seed"] + config[REPEAT_INDEX]
        return values

    def cell(self, config: dict) -> None:
        return None

    def suggest(self, trial) -> dict:
        """Optuna define-by-run: sample the parameters in file order, honouring `when` and the
        constraints; returns {dotted key: value} for the trial's config."""
        values = {}
        for p in self.params.values():
            if p.when and not p.when({**self.base, **values}):
                continue
            allowed = self._allowed(p, values)
            if p.kind in ("choice", "int") and allowed != p.candidates():
                if not allowed:
                    raise SpaceError(f"search.constraints leave no value of {p.key} when "
                                     + ", ".join(f"{k}={v}" for k, v in values.items()))
                name = f"{p.key}[{','.join(map(str, allowed))}]"
                values[p.key] = trial.suggest_categorical(name, allowed)
            elif p.kind == "choice":
                values[p.key] = trial.suggest_categorical(p.key, p.args)
            elif p.kind == "int":
                values[p.key] = trial.suggest_int(p.key, *p.args, step=p.step)
            else:
                values[p.key] = trial.suggest_float(p.key, *p.args, log=p.kind == "loguniform")
        return values

    def _allowed(self, p: Param, values: dict) -> list:
        if p.kind not in ("choice", "int"):
            return []
        # a constraint is checked on the last of its searched keys (parse_search makes sure that
        # one is a choice or an int); keys it names that are not searched come from the base
        ready = [c for c in self.constraints if p.key in c.keys and not any(
            k in self.params and k not in values and k != p.key for k in c.keys)]
        return [v for v in p.candidates()
                if all(c({**self.base, **values, p.key: v}) for c in ready)]


@dataclass
class Cell:
    name: str  # 'baseline' or 'model.pos_embedding=rope2d' or 'model.depth=2,model.pool=mean'
    overrides: dict


@dataclass
class Ablation:
    cells: list[Cell]
    seeds: list[int]
    design: str
    factors: dict = field(default_factory=dict)
    # a budget ladder: every cell and seed trained at each of these epoch counts, each a whole
    # training with its own schedule, so the report can say whether an effect holds as training
    # lengthens; empty: every trial trains train.epochs
    budgets: list[int] = field(default_factory=list)
    min_effect: float = 0.01  # the smallest val_acc difference the study cares about
    mode = "ablation"
    metrics = ["val_acc"]
    modes = ["max"]

    @property
    def searched(self) -> list[str]:
        return list(self.factors)

    def trial_count(self) -> int:
        return len(self.cells) * len(self.seeds) * max(1, len(self.budgets))

    def plan_line(self) -> str:
        ladder = f" x budgets {self.budgets} epochs" if self.budgets else ""
        return (f"ablation  {len(self.cells)} cells ({self.design}) x seeds {self.seeds}{ladder}: "
                + "; ".join(c.name for c in self.cells))

    def param_space(self) -> dict:
        from ray import tune

        space = {"cell": tune.grid_search([c.name for c in self.cells]),
                 "train.seed": tune.grid_search(self.seeds)}
        if self.budgets:
            space["train.epochs"] = tune.grid_search(self.budgets)
        return space

    def overrides(self, config: dict) -> dict:
        cell = next(c for c in self.cells if c.name == config["cell"])
        budget = {"train.epochs": config["train.epochs"]} if self.budgets else {}
        return {**cell.overrides, "train.seed": config["train.seed"], **budget}

    def cell(self, config: dict) -> str:
        return config["cell"]


def parse_search(raw: dict, base: dict, where: str = "search") -> Search:
    """`raw` is the experiment file's search section, `base` the flat base config."""
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise SpaceError(f"{where}.space must map at least one config key to a distribution "
                         "(mode: search)")
    params = {}
    for key, dist in space.items():
        params[key] = _param(key, dist, f"{where}.space.{key}")
        when = params[key].when
        for named in when.keys if when else ():
            if named == key:
                raise SpaceError(f"{where}.space.{key}.when names {key} itself")
            if named in space and named not in params:
                raise SpaceError(f"{where}.space.{key}.when names {named}, which is searched after "
                                 f"it: list {named} first (parameters are sampled in file order)")
    constraints = raw.get("constraints") or []
    if not isinstance(constraints, list):
        raise SpaceError(f"{where}.constraints must be a list of expressions")
    parsed = []
    for i, text in enumerate(constraints):
        c = _expr(text, f"{where}.constraints[{i}]")
        searched = [k for k in params if k in c.keys]
        if not searched or params[searched[-1]].kind not in ("choice", "int"):
            raise SpaceError(f"{where}.constraints[{i}]: the last searched key it names (in file "
                             "order) must be a choice or int parameter, which it then filters")
        parsed.append(c)
    metrics, modes = raw.get("metric", "val_acc"), raw.get("mode", "max")
    metrics = metrics if isinstance(metrics, list) else [metrics]
    modes = modes if isinstance(modes, list) else [modes]
    if len(metrics) != len(modes):
        raise SpaceError(f"{where}.metric and {where}.mode must have the same length, "
                         f"got {len(metrics)} and {len(modes)}")
    if len(set(map(str, metrics))) != len(metrics):
        raise SpaceError(f"{where}.metric names a metric twice: {metrics}")
    for m in metrics:
        if m not in OBJECTIVES:
            raise SpaceError(f"{where}.metric {short(m)} is not one of {', '.join(OBJECTIVES)}")
    for m in modes:
        if m not in ("max", "min"):
            raise SpaceError(f"{where}.mode {short(m)} is not one of max, min")
    repeats = _int(raw.get("repeats", 1), f"{where}.repeats", 1)
    if repeats > 1 and len(metrics) > 1:
        raise SpaceError(f"{where}.repeats needs a single {where}.metric: the searcher is told "
                         "the mean over seeds of one objective")
    if repeats > 1 and "train.seed" in params:
        raise SpaceError(f"{where}.repeats sets train.seed itself: do not search it")
    return Search(params, parsed, base, _int(raw.get("num_samples", 8), f"{where}.num_samples", 1),
                  _int(raw.get("seed", 0), f"{where}.seed", 0), metrics, modes, repeats)


def _param(key: str, dist, where: str) -> Param:
    _check_key(key, where)
    if isinstance(dist, list):
        dist = {"choice": dist}
    if not isinstance(dist, dict):
        raise SpaceError(f"{where} must be a list of choices or a mapping with one of "
                         f"{', '.join(KINDS)}")
    kinds = [k for k in dist if k in KINDS]
    extra = set(dist) - set(KINDS) - {"when", "step"}
    if len(kinds) != 1 or extra:
        raise SpaceError(f"{where} must have exactly one of {', '.join(KINDS)} "
                         f"(plus optional when, step), got {', '.join(map(str, dist))}")
    kind, args = kinds[0], dist[kinds[0]]
    value_type = key_type(key)
    if kind == "choice":
        args = _levels(key, args, f"{where}.choice")
    else:
        if kind != "int" and value_type is not float:
            raise SpaceError(f"{where}.{kind}: {key} takes {value_type.__name__} values; use "
                             "choice" + (" or int" if value_type is int else ""))
        if kind == "int" and value_type not in (int, float):
            raise SpaceError(f"{where}.int: {key} takes {value_type.__name__} values; use choice")
        if not isinstance(args, list) or len(args) != 2:
            raise SpaceError(f"{where}.{kind} must be [low, high], got {short(args)}")
        args = [_number(a, f"{where}.{kind} bounds", integer=kind == "int") for a in args]
        if not args[0] < args[1]:
            raise SpaceError(f"{where}.{kind} must be [low, high] with low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise SpaceError(f"{where}.loguniform needs low > 0, got {args}")
    if "step" in dist and kind != "int":
        raise SpaceError(f"{where}.step applies to int parameters only")
    step = _int(dist.get("step", 1), f"{where}.step", 1)
    when = _expr(dist["when"], f"{where}.when") if dist.get("when") is not None else None
    return Param(key, kind, args, when, step)


def parse_ablation(raw: dict, base: dict) -> Ablation:
    """`raw` is the experiment file's ablation section, `base` the nested base config."""
    # left out: the base configuration alone over the seeds (a seeded confirmation of a winner);
    # given, it must name a factor (an empty or mis-indented list is no confirmation)
    factors = raw.get("factors", {})
    if not isinstance(factors, dict) or ("factors" in raw and not factors):
        raise SpaceError("ablation.factors must map config keys to lists of values (mode: "
                         "ablation), or be left out to repeat the base configuration over seeds")
    design = raw.get("design", "one-at-a-time")
    if design not in ("one-at-a-time", "crossed"):
        raise SpaceError(f"ablation.design={short(design)} is not one of one-at-a-time, crossed")
    baseline = raw.get("baseline") or {}
    if not isinstance(baseline, dict):
        raise SpaceError("ablation.baseline must map ablation factors to their baseline level")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(_int(seeds, "ablation.seeds", 1)))
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise SpaceError(f"ablation.seeds must be a count or a non-empty list of integers >= 0, "
                         f"got {short(seeds)}")
    if len(set(seeds)) != len(seeds):  # a seed run twice is counted twice: a false n
        raise SpaceError(f"ablation.seeds lists a seed twice: {seeds}")
    budgets = raw.get("budgets") or []
    if not isinstance(budgets, list) or (budgets and (len(budgets) < 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in budgets))):
        raise SpaceError(f"ablation.budgets must be a list of at least two epoch counts >= 1, "
                         f"got {short(budgets)}")
    if len(set(budgets)) != len(budgets):
        raise SpaceError(f"ablation.budgets lists a budget twice: {budgets}")
    if budgets and not factors:
        raise SpaceError("ablation.budgets asks whether effects hold as training lengthens: it "
                         "needs ablation.factors")
    if budgets and "train.epochs" in factors:
        raise SpaceError("train.epochs cannot be an ablation factor when ablation.budgets is "
                         "given: the budgets are the epochs")
    min_effect = _number(raw.get("min_effect", 0.01), "ablation.min_effect", integer=False)
    if not 0 < min_effect < 1:
        raise SpaceError(f"ablation.min_effect is a val_acc difference in (0, 1), e.g. 0.01 for "
                         f"one point, got {min_effect}")
    flat_base = Config.from_dict(base).flat()
    levels, chosen = {}, {}
    for key, values in factors.items():
        where = f"ablation.factors.{key}"
        _check_key(key, where)
        levels[key] = _levels(key, values, where)
        if len(levels[key]) < 2:
            raise SpaceError(f"{where} needs at least two levels to compare, got {levels[key]}")
        # baseline: stated, else the base config's value when it is a level, else the first level
        if key in baseline:
            chosen[key] = _coerced(key, baseline[key], f"ablation.baseline.{key}")
        else:
            chosen[key] = flat_base[key] if flat_base[key] in levels[key] else levels[key][0]
        if chosen[key] not in levels[key]:
            raise SpaceError(f"ablation.baseline.{key}={chosen[key]!r} is not one of "
                             f"{levels[key]}")
    for key in baseline:
        if key not in factors:
            raise SpaceError(f"ablation.baseline.{key} is not an ablation factor")
    if design == "crossed":
        combos = [dict(zip(levels, vs)) for vs in itertools.product(*levels.values())]
    else:
        combos = [dict(chosen)] + [{**chosen, k: v} for k, vs in levels.items()
                                   for v in vs if v != chosen[k]]
    cells = []
    for combo in combos:
        changed = {k: v for k, v in combo.items() if v != chosen[k]}
        name = ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "baseline"
        cells.append(Cell(name, combo))
    return Ablation(cells, seeds, design, levels, sorted(budgets), min_effect)


def validate_trials(design: Search | Ablation, base: dict, draws: int = 64) -> None:
    """Try the space: random draws (search) or every cell (ablation) must be configs the trainer
    accepts. Catches what per-key checks cannot: bad combinations."""
    if isinstance(design, Ablation):
        for cell in design.cells:
            for budget in design.budgets or [None]:
                epochs = {"train.epochs": budget} if budget else {}
                _validate(base, {**cell.overrides, **epochs}, f"ablation cell '{cell.name}'"
                          + (f" at {budget} epochs" if budget else ""))
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(draws):
        try:
            values = design.suggest(study.ask())
        except ExprError as e:
            raise SpaceError(str(e)) from None
        _validate(base, values, "search.space draw " +
                  ", ".join(f"{k}={v}" for k, v in values.items()))


def _validate(base: dict, overrides: dict, what: str) -> None:
    try:
        Config.from_dict(apply_overrides(base, overrides))
    except ConfigError as e:
        raise SpaceError(f"{what}: {e} (narrow the space or add a search.constraints entry)") \
            from None


def _levels(key: str, values, where: str) -> list:
    """A choice list or ablation levels, each as the config will hold it, none twice: a level
    listed twice ([1, 1, 2], or [0.001, '1e-3']) would be counted twice."""
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where} must be a non-empty list of values, got {short(values)}")
    coerced = [_coerced(key, v, where) for v in values]
    twice = [v for i, v in enumerate(coerced) if v in coerced[:i]]
    if twice:
        raise SpaceError(f"{where} lists {twice[0]!r} twice (as the config reads it): {values}")
    return coerced


def _coerced(key: str, value, where: str):
    try:
        return coerce(key, value)
    except ConfigError as e:
        raise SpaceError(f"{where}: {e}") from None


def _number(value, where: str, integer: bool):
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value != value or value in (float("inf"),
                                                                         float("-inf")):
        kind = "an integer" if integer else "a finite number"
        raise SpaceError(f"{where}: expected {kind}, got {short(value)}")
    return value


def _int(v, key: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SpaceError(f"{key} must be an integer >= {lo}, got {short(v)}")
    return v


def _expr(text, where: str) -> Expr:
    try:
        return Expr(text, where)
    except ExprError as e:
        raise SpaceError(str(e)) from None


def _check_key(key, where: str) -> None:
    if key not in KEYS:
        raise SpaceError(f"{where}: '{key}' is not a config key (e.g. model.depth, train.lr)")
