"""Search spaces (for Optuna through Ray Tune) and ablation grids, over dotted config keys.

A search space maps keys to distributions, each optionally conditional (`when`), plus constraints
between keys (`model.embed_dim % model.heads == 0`). Optuna refuses a parameter whose choices
change from trial to trial, so when a constraint removes some choices the parameter is suggested
under a name that carries the remaining choices (`model.heads[2,4]`): Optuna's own recipe for
dynamic spaces. Trials only ever see the clean dotted keys.
"""
from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import optuna

from tinyvit.config import KEYS, SECTIONS, Config, ConfigError

KINDS = ("choice", "int", "uniform", "loguniform")


class SpaceError(ValueError):
    pass


@dataclass
class Param:
    key: str
    kind: str
    args: list
    when: str | None = None
    step: int = 1

    def candidates(self) -> list:
        """The finite value list of a choice or int parameter (what constraints filter)."""
        if self.kind == "choice":
            return list(self.args)
        return list(range(self.args[0], self.args[1] + 1, self.step))


@dataclass
class Space:
    params: dict[str, Param]
    constraints: list[str]
    base: dict = field(default_factory=dict)  # flat base config: constraints may name fixed keys

    def suggest(self, trial) -> dict:
        """Optuna define-by-run: sample the parameters in file order, honouring `when` and the
        constraints; returns {dotted key: value} for the trial's config."""
        values = {}
        for p in self.params.values():
            if p.when and not _eval(p.when, {**self.base, **values}):
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
        # a constraint is checked on the last of its searched keys (parse_space makes sure that
        # one is a choice or an int); keys it names that are not searched come from the base
        ready = [c for c in self.constraints if p.key in _keys(c) and not any(
            k in self.params and k not in values and k != p.key for k in _keys(c))]
        return [v for v in p.candidates()
                if all(_eval(c, {**self.base, **values, p.key: v}) for c in ready)]


@dataclass
class Cell:
    name: str  # 'baseline' or 'model.pos_embedding=rope2d' or 'model.depth=2,model.pool=mean'
    overrides: dict


def parse_space(raw: dict, constraints: list, base: dict) -> Space:
    if not isinstance(raw, dict):
        raise SpaceError("search.space must map config keys to distributions")
    params = {}
    for key, dist in raw.items():
        where = f"search.space.{key}"
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
                             f"(plus optional when, step), got {', '.join(dist)}")
        kind, args = kinds[0], dist[kinds[0]]
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise SpaceError(f"{where}.choice must be a non-empty list")
        elif not (isinstance(args, list) and len(args) == 2
                  and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
                  and args[0] < args[1]):
            raise SpaceError(f"{where}.{kind} must be [low, high] with low < high, got {args!r}")
        elif kind == "int" and not all(isinstance(a, int) for a in args):
            raise SpaceError(f"{where}.int bounds must be integers, got {args!r}")
        elif kind == "loguniform" and args[0] <= 0:
            raise SpaceError(f"{where}.loguniform needs low > 0, got {args!r}")
        when = dist.get("when")
        if when is not None:
            _check_expr(when, f"{where}.when")
        params[key] = Param(key, kind, args, when, dist.get("step", 1))
    if not isinstance(constraints, list):
        raise SpaceError("search.constraints must be a list of expressions")
    for i, c in enumerate(constraints):
        _check_expr(c, f"search.constraints[{i}]")
        searched = [k for k in params if k in _keys(c)]
        if not searched or params[searched[-1]].kind not in ("choice", "int"):
            raise SpaceError(f"search.constraints[{i}]: the last searched key it names (in file "
                             "order) must be a choice or int parameter, which it then filters")
    return Space(params, list(constraints), base)


def parse_ablation(factors: dict, design: str, baseline: dict, base: dict) -> list[Cell]:
    if not isinstance(factors, dict):
        raise SpaceError("ablation.factors must map config keys to lists of values")
    if design not in ("one-at-a-time", "crossed"):
        raise SpaceError(f"ablation.design={design!r} is not one of one-at-a-time, crossed")
    flat_base = Config.from_dict(base).flat()
    chosen = {}
    for key, values in factors.items():
        _check_key(key, f"ablation.factors.{key}")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"ablation.factors.{key} must be a non-empty list of values")
        # baseline: stated, else the base config's value when it is a level, else the first level
        chosen[key] = baseline.get(key, flat_base[key] if flat_base[key] in values else values[0])
        if chosen[key] not in values:
            raise SpaceError(f"ablation.baseline.{key}={chosen[key]!r} is not one of {values}")
    for key in baseline:
        if key not in factors:
            raise SpaceError(f"ablation.baseline.{key} is not an ablation factor")
    if design == "crossed":
        combos = [dict(zip(factors, vs)) for vs in itertools.product(*factors.values())]
    else:
        combos = [dict(chosen)] + [{**chosen, k: v} for k, vs in factors.items()
                                   for v in vs if v != chosen[k]]
    cells = []
    for combo in combos:
        changed = {k: v for k, v in combo.items() if v != chosen[k]}
        name = ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "baseline"
        cells.append(Cell(name, combo))
    return cells


def sample_configs(spec, draws: int = 64) -> None:
    """Validate the space by trying it: random draws (search) or every cell (ablation) must be
    configs the trainer accepts. Catches what per-key checks cannot: bad combinations."""
    if spec.mode == "ablation":
        for cell in spec.space:
            _validate(spec.base, cell.overrides, f"ablation cell '{cell.name}'")
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(draws):
        values = spec.space.suggest(study.ask())
        _validate(spec.base, values, "search.space draw " +
                  ", ".join(f"{k}={v}" for k, v in values.items()))


def apply(base: dict, overrides: dict) -> dict:
    """Nested base config with dotted overrides applied (the config of one trial)."""
    cfg = {s: dict(base.get(s, {})) for s in SECTIONS}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        cfg[section][name] = value
    return cfg


def _validate(base: dict, overrides: dict, what: str) -> None:
    try:
        Config.from_dict(apply(base, overrides))
    except ConfigError as e:
        raise SpaceError(f"{what}: {e} (narrow the space or add a search.constraints entry)") \
            from None


def _check_key(key: str, where: str) -> None:
    if key not in KEYS:
        raise SpaceError(f"{where}: '{key}' is not a config key (e.g. model.depth, train.lr)")


def _check_expr(expr, where: str) -> None:
    if not isinstance(expr, str):
        raise SpaceError(f"{where} must be an expression string, got {expr!r}")
    try:
        keys = _keys(expr)
    except SyntaxError:
        raise SpaceError(f"{where}: '{expr}' is not a valid expression") from None
    for k in keys:
        if k not in KEYS:
            raise SpaceError(f"{where}: '{k}' is not a config key")


def _keys(expr: str) -> set[str]:
    return {f"{n.value.id}.{n.attr}" for n in ast.walk(ast.parse(expr, mode="eval"))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in SECTIONS}


def _eval(expr: str, flat: dict) -> bool:
    sections = {s: SimpleNamespace() for s in SECTIONS}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        setattr(sections[section], name, value)
    return bool(eval(expr, {"__builtins__": {}}, sections))  # noqa: S307 (the user's own file)
