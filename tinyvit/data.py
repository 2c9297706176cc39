"""Data: decode once to uint8 tensors, keep them on the training device, augment in batches.

Three sources share one interface, `load_arrays(cfg) -> Arrays`:
- `cifar10`: torchvision's CIFAR10, downloaded into `data.root` (default `<cache_dir>/cifar10`);
- `imagefolder`: `data.root/train/<class>/*` and `data.root/test/<class>/*` (PNG or JPEG), or
  a tar archive of such a folder (unpacked once into the cache);
- `synthetic`: a generated, learnable 10-class data set for tests and smoke runs.
The decoded arrays are cached as one `.pt` file per source, so every run after the first starts
without decoding a single image. Per-sample Python transforms (the seed's DataLoader) cost more
than the model on a small CPU, so augmentation runs on whole batches of device tensors instead.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import DataConfig


class DataError(ValueError):
    """A data source cannot be read; the message says where it looked and what to do."""


@dataclass
class Arrays:
    train_x: torch.Tensor  # uint8 [N, 3, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]


def load_arrays(cfg: DataConfig) -> Arrays:
    path = cache_path(cfg)
    if path.exists():
        return Arrays(**torch.load(path, weights_only=True))
    arrays = {"cifar10": _cifar10, "imagefolder": _imagefolder, "synthetic": _synthetic}[cfg.source](cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent trials may race: rename is atomic
    torch.save(vars(arrays), tmp)
    tmp.replace(path)
    return arrays


def cache_path(cfg: DataConfig) -> Path:
    """One cache file per source and location; the synthetic sizes are part of its identity."""
    if cfg.source == "synthetic":
        key = f"synthetic-{cfg.synthetic_train}-{cfg.synthetic_test}"
    else:
        key = f"{cfg.source}-{_root(cfg).resolve()}"
    return Path(cfg.cache_dir).expanduser() / f"{cfg.source}-{_digest(key)}.pt"


def _digest(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _root(cfg: DataConfig) -> Path:
    return Path(cfg.root or Path(cfg.cache_dir) / "cifar10").expanduser()


def _cifar10(cfg: DataConfig) -> Arrays:
    from torchvision.datasets import CIFAR10

    root = _root(cfg)
    try:
        train, test = (CIFAR10(root, train=t, download=True) for t in (True, False))
    except Exception as e:  # offline: URLError, socket timeouts, partial archives
        raise DataError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(e).__name__}: {e}); "
            "set data.root to a folder holding cifar-10-batches-py, or use "
            "data.source=imagefolder with data.root=<folder with train/ and test/>") from None
    as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return Arrays(as_tensor(train.data), torch.tensor(train.targets), as_tensor(test.data),
                  torch.tensor(test.targets), list(train.classes))


def _imagefolder(cfg: DataConfig) -> Arrays:
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = _root(cfg)
    if root.is_file():
        root = _extract(root, Path(cfg.cache_dir).expanduser())
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data.root={root} has no '{split}' folder (expected "
                            f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg)")
    out = {}
    for split in ("train", "test"):
        folder = ImageFolder(root / split, loader=lambda p: p)  # we decode ourselves, faster
        images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in folder.samples]
        if len({im.shape for im in images}) != 1:
            raise DataError(f"images under {root / split} differ in size; expected one size")
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        out[split] = (x, torch.tensor(folder.targets), folder.classes)
    if out["train"][2] != out["test"][2]:
        raise DataError(f"{root}/train and {root}/test hold different class folders")
    return Arrays(*out["train"][:2], *out["test"][:2], out["train"][2])


def _extract(archive: Path, cache_dir: Path) -> Path:
    """An archive of the image folder (e.g. the shared cifar10-jpeg.tar.gz) is unpacked once
    into the cache; the folder holding train/ and test/ is returned."""
    if not tarfile.is_tarfile(archive):
        raise DataError(f"data.root={archive} is a file but not a tar archive of train/ and test/")
    dest = cache_dir / f"{archive.name.split('.')[0]}-{_digest(str(archive.resolve()))}"
    if not dest.is_dir():
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.replace(dest)
    found = [p.parent for p in dest.rglob("train") if (p.parent / "test").is_dir()]
    if not found:
        raise DataError(f"archive {archive} holds no folder with train/ and test/ inside")
    return min(found, key=lambda p: len(p.parts))


def _synthetic(cfg: DataConfig) -> Arrays:
    """Ten classes, each a fixed smooth colour pattern, seen through random shifts, contrast and
    noise: learnable by a tiny ViT in an epoch or two, but not by a constant guess."""
    g = torch.Generator().manual_seed(0)
    templates = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear")

    def sample(n):
        y = torch.arange(n) % 10
        x = templates[y] * (0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g))
        shifts = torch.randint(-3, 4, (n, 2), generator=g)
        x = torch.stack([im.roll(tuple(s.tolist()), dims=(1, 2)) for im, s in zip(x, shifts)])
        x = x + 0.15 * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return Arrays(*sample(cfg.synthetic_train), *sample(cfg.synthetic_test),
                  [f"class{i}" for i in range(10)])


@dataclass
class Splits:
    """Train / val / test on the device, still uint8; `mean`/`std` come from train alone."""
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    mean: torch.Tensor  # [1, 3, 1, 1], in [0, 1] pixel units
    std: torch.Tensor

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - self.mean) / self.std


def split(arrays: Arrays, cfg: DataConfig, device: torch.device) -> Splits:
    n = len(arrays.train_y)
    if cfg.val_size >= n:
        raise DataError(f"data.val_size={cfg.val_size} leaves no training images out of {n}")
    # the split has its own seed so that every trial of a study validates on the same images
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val, train = order[: cfg.val_size], order[cfg.val_size:]
    if cfg.subset is not None:
        train = train[: cfg.subset]
    to = lambda x, y, i: (x[i].to(device), y[i].to(device))  # noqa: E731
    train_x = arrays.train_x[train].float() / 255
    return Splits(to(arrays.train_x, arrays.train_y, train), to(arrays.train_x, arrays.train_y, val),
                  (arrays.test_x.to(device), arrays.test_y.to(device)),
                  train_x.mean(dim=(0, 2, 3)).view(1, 3, 1, 1).to(device),
                  train_x.std(dim=(0, 2, 3)).view(1, 3, 1, 1).to(device))


class BatchAugment:
    """Random translation, horizontal flip and optional MixUp/CutMix on a whole batch at once."""

    def __init__(self, cfg: DataConfig, num_classes: int):
        self.pad, self.flip = cfg.crop_padding, cfg.flip
        self.mix = None
        if cfg.mixup or cfg.cutmix:
            # imported here: torchvision pulls in torch._dynamo (~2 s), which every trial process
            # and study driver would otherwise pay before its first step
            from torchvision.transforms import v2
            mixers = [mixer(alpha=alpha, num_classes=num_classes)
                      for mixer, alpha in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix))
                      if alpha > 0]
            self.mix = v2.RandomChoice(mixers)

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        """x: normalized float [B, 3, H, W]; returns (x, y) with y soft labels when mixing."""
        if self.pad:
            x = self.translate(x)
        if self.flip:
            flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        if self.mix is not None:
            x, y = self.mix(x, y)
        return x, y

    def translate(self, x):
        # torchvision's RandomCrop draws one crop per call, i.e. per batch; a per-sample crop is
        # one gather from the padded batch. Zero padding is the mean colour after normalizing.
        B, _, H, W = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2, B, 1, 1, 1), device=x.device)
        rows = torch.arange(H, device=x.device).view(1, 1, H, 1) + dy
        cols = torch.arange(W, device=x.device).view(1, 1, 1, W) + dx
        b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
        c = torch.arange(3, device=x.device).view(1, 3, 1, 1)
        return padded[b, c, rows, cols]
