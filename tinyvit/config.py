"""One typed config with three sections (model, data, train), validated in one place.

Keys are addressed with dots everywhere (YAML files, `--set` overrides, MLflow params, study
search spaces): `model.patch_size`, `data.source`, `train.lr`. `Config.from_dict` is the single
door every config goes through, so a bad value fails the same way for the trainer CLI and for the
study runner: a `ConfigError` whose message names the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

POS_EMBEDDINGS = ("learned", "sinusoidal", "sinusoidal2d", "rope2d", "none")
POOLS = ("cls", "mean", "seq")
STEMS = ("patch", "conv")
SOURCES = ("cifar10", "imagefolder", "synthetic")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key."""


@dataclass
class ModelConfig:
    image_size: int = 32
    num_classes: int = 10
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    pos_embedding: str = "learned"
    pool: str = "cls"
    stem: str = "patch"  # patch: one strided conv (the seed); conv: 3x3 stride-2 convs to the grid
    rope_base: float = 100.0  # rope2d only: the longest wavelength, in patches

    def validate(self) -> None:
        _positive(self, "image_size", "num_classes", "patch_size", "embed_dim", "depth", "heads")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.patch_size={self.patch_size} must divide model.image_size="
                              f"{self.image_size} (allowed: {_divisors(self.image_size)})")
        if self.embed_dim % self.heads:
            raise ConfigError(f"model.heads={self.heads} must divide model.embed_dim="
                              f"{self.embed_dim} (allowed: {_divisors(self.embed_dim)})")
        _choice(self, "pos_embedding", POS_EMBEDDINGS)
        _choice(self, "pool", POOLS)
        _choice(self, "stem", STEMS)
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)
                                    or self.embed_dim % (self.patch_size // 2)):
            raise ConfigError(f"model.stem=conv halves the image per conv: model.patch_size="
                              f"{self.patch_size} must be a power of 2 (>= 2) and model.embed_dim="
                              f"{self.embed_dim} a multiple of patch_size/2")
        if self.pos_embedding == "sinusoidal2d" and self.embed_dim % 4:
            raise ConfigError(f"model.embed_dim={self.embed_dim} must be a multiple of 4 for "
                              "model.pos_embedding=sinusoidal2d (sin and cos for each of 2 axes)")
        if self.pos_embedding == "rope2d" and (self.embed_dim // self.heads) % 4:
            raise ConfigError(f"model.embed_dim/model.heads={self.embed_dim // self.heads} must be "
                              "a multiple of 4 for model.pos_embedding=rope2d (a rotation pair "
                              "per axis)")
        if self.mlp_ratio <= 0 or self.rope_base <= 1:
            raise ConfigError("model.mlp_ratio must be > 0 and model.rope_base > 1")
        _fraction(self, "dropout", "attn_dropout", "drop_path")


@dataclass
class DataConfig:
    source: str = "cifar10"
    root: str | None = None  # cifar10: download folder; imagefolder: the train/ test/ folder
    cache_dir: str = "~/.cache/tinyvit"  # decoded uint8 arrays, one file per source
    val_size: int = 5000  # carved from train with split_seed; selection uses it, never test
    split_seed: int = 0
    subset: int | None = None  # train on the first N images of the (shuffled) train split
    synthetic_train: int = 5000  # synthetic source: images per split before the val carve-out
    synthetic_test: int = 1000
    crop_padding: int = 4  # random translation of up to this many pixels; 0 turns it off
    flip: bool = True
    mixup: float = 0.0  # Beta(alpha, alpha) of MixUp; 0 turns it off
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix; 0 turns it off

    def validate(self) -> None:
        _choice(self, "source", SOURCES)
        if self.source == "imagefolder" and not self.root:
            raise ConfigError("data.root is required for data.source=imagefolder "
                              "(a folder holding train/<class>/* and test/<class>/*)")
        if self.val_size < 0 or self.crop_padding < 0 or self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("data.val_size, data.crop_padding, data.mixup and data.cutmix "
                              "must be >= 0")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"data.subset must be a positive number of images, got {self.subset}")
        _positive(self, "synthetic_train", "synthetic_test")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    ema: float = 0.0  # per-step decay of an average of the weights that val/test score; 0: off
    seed: int = 0
    eval_batch_size: int = 1000
    eval_flip: bool = False  # score val/test on each image and its mirror, averaging the logits
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is slower there)
    compile: bool | None = None  # None: on CUDA only (CUDA graphs); see train.compile_mode
    channels_last: bool = True  # only matters on CUDA, where the patch conv prefers NHWC
    threads: int | None = None  # torch intra-op threads; None keeps torch's default

    def validate(self) -> None:
        _positive(self, "epochs", "batch_size", "eval_batch_size", "lr")
        _choice(self, "device", DEVICES)
        _choice(self, "precision", PRECISIONS)
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr must be in [0, train.lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay, train.warmup_epochs and train.grad_clip "
                              "must be >= 0")
        _fraction(self, "label_smoothing", "ema")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads must be >= 1, got {self.threads}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, d: dict | None) -> Config:
        d = d or {}
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a mapping with sections {SECTIONS}, got {d!r}")
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown section '{sorted(unknown)[0]}' (allowed: "
                              f"{', '.join(SECTIONS)})")
        cfg = cls(**{name: _build(SECTIONS[name], d.get(name) or {}, name) for name in SECTIONS})
        for name in SECTIONS:
            getattr(cfg, name).validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """{'model.patch_size': 4, ...}: the form of MLflow params and study search spaces."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
KEYS = {f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)}
MAX_YAML_VALUES = 100_000  # far above any real file; a few aliases can expand past billions


def key_type(key: str) -> type:
    """The type a config key holds (int for `int | None`)."""
    if key not in KEYS:
        raise ConfigError(f"'{key}' is not a config key (e.g. model.depth, train.lr)")
    section, name = key.split(".", 1)
    hint = typing.get_type_hints(SECTIONS[section])[name]
    return next(a for a in typing.get_args(hint) if a is not type(None)) \
        if isinstance(hint, types.UnionType) else hint


def coerce(key: str, value):
    """`value` as the type of config key `key` (what the Config would hold), or ConfigError:
    search-space choices and ablation levels go through the same door as config values."""
    key_type(key)
    section, name = key.split(".", 1)
    return _coerce(value, typing.get_type_hints(SECTIONS[section])[name], key)


def apply_overrides(base: dict, overrides: dict) -> dict:
    """A nested config (`base`, sections of keys) with dotted overrides applied: one trial's."""
    cfg = {s: dict(base.get(s) or {}) for s in SECTIONS}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        cfg[section][name] = value
    return cfg


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A YAML file (optional) then `key=value` overrides, validated into a Config."""
    d = read_yaml(path) if path else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(d, key, value)
    return Config.from_dict(d)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a mapping, got {type(d).__name__}")
    _bounded(d, path)
    return d


def _bounded(d: dict, path: Path) -> None:
    """YAML aliases share one object, so a short file can name billions of values (or itself):
    count values as every later walk would see them, and stop at MAX_YAML_VALUES."""
    stack, seen = [d], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{path} expands to more than {MAX_YAML_VALUES:,} values "
                              "(YAML aliases nested in aliases?); write the values out")
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            stack += value


def parse_override(item: str) -> tuple[str, object]:
    """'train.lr=1e-3' -> ('train.lr', 0.001); values are parsed as YAML scalars."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.epochs=3")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def set_dotted(d: dict, key: str, value) -> None:
    """Set `key` in nested `d`: at the top, `model.depth` is section model, key depth; below it
    a config key is one name, as in `search.space.model.depth.choice` of an experiment file."""
    parts = key.split(".")
    path = []
    while parts:
        joined = ".".join(parts[:2])
        take = 2 if path and joined in KEYS else 1
        path.append(".".join(parts[:take]))
        parts = parts[take:]
    *parents, leaf = path
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set '{key}': '{p}' is not a mapping")
    d[leaf] = value


def _build(cls, values: dict, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{section}.{key}' (allowed: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    """Accept what YAML and `--set` produce (an int for a float, 'null'), refuse the rest."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):  # `X | None`
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif hint is float and isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            number = None
    else:
        number = None
    if number is not None:
        if not math.isfinite(number):  # NaN passes every `<= 0` check: refuse it at the door
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key} must be {hint.__name__}, got {short(value)}")


def short(value) -> str:
    """repr for an error line: a pasted list of thousands of values stays one short line."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxdict = 8
_SHORT.maxstring = _SHORT.maxother = 60


def _positive(cfg, *names):
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ConfigError(f"{_section(cfg)}.{n} must be > 0, got {getattr(cfg, n)}")


def _fraction(cfg, *names):
    for n in names:
        if not 0 <= getattr(cfg, n) < 1:
            raise ConfigError(f"{_section(cfg)}.{n} must be in [0, 1), got {getattr(cfg, n)}")


def _choice(cfg, name, allowed):
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"{_section(cfg)}.{name}={getattr(cfg, name)!r} is not one of "
                          f"{', '.join(allowed)}")


def _section(cfg) -> str:
    return next(s for s, c in SECTIONS.items() if isinstance(cfg, c))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
