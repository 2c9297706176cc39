"""Data: decode once to uint8 tensors, keep them on the training device, augment in batches.

Three sources share one interface, `load_arrays(cfg) -> Arrays`:
- `cifar10`: torchvision's CIFAR10, downloaded into `data.root` (default `<cache_dir>/cifar10`);
- `imagefolder`: `data.root/train/<class>/*` and `data.root/test/<class>/*` (PNG or JPEG), or
  a tar archive of such a folder (unpacked once into the cache);
- `synthetic`: a generated, learnable 10-class data set for tests and smoke runs.
The decoded arrays are cached as one `.pt` file per source, keyed by its location and a cheap
fingerprint of its files, so every run after the first starts without decoding a single image
and a source changed in place is decoded afresh. Per-sample Python transforms (the seed's
DataLoader) cost more than the model on a small CPU, so augmentation runs on whole batches of
device tensors instead.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import stat
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import DataConfig


class DataError(ValueError):
    """A data source cannot be read; the message says where it looked and what to do."""


@dataclass
class ChannelStats:
    """Per-channel mean and (unbiased) std, in [0, 1] pixel units, of one training split, and
    the data keys that chose that split (data.val_size, data.split_seed, data.subset)."""
    mean: torch.Tensor  # [3]
    std: torch.Tensor
    split: tuple


@dataclass
class Arrays:
    train_x: torch.Tensor  # uint8 [N, 3, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    # the training split's statistics, computed once where the data is loaded and shipped with
    # it: a study's trials normalise with the driver's instead of each summing 45,000 images
    stats: ChannelStats | None = None

    def __reduce__(self):
        # pickled as numpy arrays, which pickle protocol 5 hands over as out-of-band buffers:
        # Ray's object store then gives every trial on a node the one shared copy, read-only,
        # where a pickled tensor would be a private copy per trial (and twice that while read)
        return _from_numpy, (self.train_x.numpy(), self.train_y.numpy(), self.test_x.numpy(),
                             self.test_y.numpy(), self.classes, self.stats)


def _from_numpy(train_x, train_y, test_x, test_y, classes, stats) -> Arrays:
    with warnings.catch_warnings():  # read-only buffers: nothing here writes into the data set
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tensors = [torch.from_numpy(a) for a in (train_x, train_y, test_x, test_y)]
    return Arrays(*tensors, classes, stats)


def load_arrays(cfg: DataConfig) -> Arrays:
    """The decoded data set (from its cache when there is one), with the statistics of the
    training split that `cfg` chooses."""
    arrays = _decoded(cfg)
    if cfg.val_size < len(arrays.train_y):  # else there is no training split: check_arrays says so
        arrays.stats = split_stats(arrays, cfg)
    return arrays


def _decoded(cfg: DataConfig) -> Arrays:
    path = cache_path(cfg)
    if path.exists():
        return Arrays(**torch.load(path, weights_only=True))
    arrays = {"cifar10": _cifar10, "imagefolder": _imagefolder, "synthetic": _synthetic}[cfg.source](cfg)
    if cfg.source == "cifar10":
        path = cache_path(cfg)  # the download has just made the folder that the key fingerprints
    # else the key from before decoding: a folder edited meanwhile is cached under a key that no
    # later load asks for, never under one that claims the edited contents
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent trials may race: rename is atomic
    torch.save({k: v for k, v in vars(arrays).items() if k != "stats"}, tmp)  # images only
    tmp.replace(path)
    if cfg.source != "synthetic":  # synthetic caches of other sizes are not stale
        _drop_stale(path)
    return arrays


def cache_path(cfg: DataConfig) -> Path:
    """One cache file per source, location and contents: a folder or archive that changed at
    the same path gets a new file, so a stale cache is never read. Synthetic: its sizes."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    if cfg.source == "synthetic":
        sizes = f"synthetic-{cfg.synthetic_train}-{cfg.synthetic_test}"
        return cache_dir / f"synthetic-{_digest(sizes)}.pt"
    root = _root(cfg).resolve()
    source = root / "cifar-10-batches-py" if cfg.source == "cifar10" else root
    return cache_dir / f"{cfg.source}-{_digest(f'{cfg.source}-{root}')}-{_fingerprint(source)}.pt"


def check_arrays(arrays: Arrays, image_size: int, num_classes: int, val_size: int) -> None:
    """The data must fit the model and the split it is given; say which way it does not before
    a single step is trained, rather than fail inside the model or train on wrong labels."""
    for name, x in (("train", arrays.train_x), ("test", arrays.test_x)):
        h, w = x.shape[-2:]
        if (h, w) != (image_size, image_size):
            raise DataError(f"{name} images are {h}x{w} but model.image_size={image_size}")
    if len(arrays.classes) > num_classes:
        names = ", ".join(arrays.classes[:5]) + (", ..." if len(arrays.classes) > 5 else "")
        raise DataError(f"data has {len(arrays.classes)} classes ({names}) "
                        f"but model.num_classes={num_classes}")
    _check_val_size(val_size, len(arrays.train_y))
    for name, y in (("train", arrays.train_y), ("test", arrays.test_y)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{name} labels span {y.min().item()}..{y.max().item()} but "
                            f"model.num_classes={num_classes} allows 0..{num_classes - 1}")


def _check_val_size(val_size: int, n: int) -> None:
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training images out of {n}")


def _digest(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _fingerprint(path: Path) -> str:
    """A cheap stand-in for the contents: an archive's size and mtime, or a folder's file paths,
    sizes and mtimes. Hashing the bytes would cost about as much as decoding them."""
    if path.is_file():
        st = path.stat()
        return _digest(f"{st.st_size}-{st.st_mtime_ns}")
    skip = len(str(path))  # relative paths: the folder's own is in the key already
    return _digest("\n".join(f"{p[skip:]}\0{st.st_size}\0{st.st_mtime_ns}"
                             for p, st in _files(path)))


def _files(folder: Path) -> list[tuple[str, os.stat_result]]:
    """Every file under `folder` and its stat, in torchvision ImageFolder's order (which fixes
    the split). Plain strings and one stat per file: this runs over 60k files on every load."""
    found = []
    for d, _, names in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(names):
            path = os.path.join(d, name)
            try:
                st = os.stat(path)
            except OSError:  # a link to nothing is no file
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((path, st))
    return found


def _drop_stale(keep: Path) -> None:
    """Remove the cache entries (named <kind>-<location>-<contents>) of a source's earlier
    contents, so that each change of a folder does not leave a full decoded copy behind."""
    location = keep.name.rsplit("-", 1)[0]
    for old in keep.parent.glob(f"{glob.escape(location)}-*"):
        if old != keep and not old.name.endswith(".tmp"):  # .tmp: another process's, in flight
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


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
            "point at a copy: --set data.source=imagefolder --set data.root=PATH (a folder "
            "with train/ and test/, or a .tar.gz of one), or --set data.root=DIR (a folder "
            "holding cifar-10-batches-py)") from None
    as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return Arrays(as_tensor(train.data), torch.tensor(train.targets), as_tensor(test.data),
                  torch.tensor(test.targets), list(train.classes))


# what torchvision's ImageFolder reads; other files (READMEs, .DS_Store) are not images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _imagefolder(cfg: DataConfig) -> Arrays:
    root = _root(cfg)
    if root.is_file():
        root = _extract(root, Path(cfg.cache_dir).expanduser())
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data.root={root} has no '{split}' folder (expected "
                            f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg)")
    (train_x, train_y, classes), (test_x, test_y, test_classes) = (
        _read_split(root / split) for split in ("train", "test"))
    if classes != test_classes:
        raise DataError(f"{root}/train and {root}/test hold different class folders")
    return Arrays(train_x, train_y, test_x, test_y, classes)


def _read_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """folder/<class>/**/<image> -> uint8 [N, 3, H, W], labels, and the sorted class names."""
    import numpy as np
    from PIL import Image

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder} holds no class folders (expected {folder}/<class>/*.jpg)")
    listed = []
    for label, name in enumerate(classes):
        files = [Path(p) for p, _ in _files(folder / name)
                 if os.path.splitext(p)[1].lower() in IMAGE_SUFFIXES]
        if not files:  # a class the model is asked to learn but never shown
            raise DataError(f"class folder {folder / name} holds no images "
                            f"(expected {', '.join(IMAGE_SUFFIXES)} files)")
        listed += [(p, label) for p in files]
    images, labels = [], [label for _, label in listed]
    # the first decode of CIFAR-10 takes a minute or more on a small CPU: show it on a terminal
    for p, _ in tqdm(listed, desc=f"decoding {folder.name} (once, then cached)", unit="img",
                     disable=None, leave=False):
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "broken file"
            raise DataError(f"image {p} cannot be decoded ({e}); expected a readable "
                            "PNG or JPEG file") from None
    if len({im.shape for im in images}) != 1:
        raise DataError(f"images under {folder} differ in size; expected one size")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels), classes


def _extract(archive: Path, cache_dir: Path) -> Path:
    """An archive of the image folder (e.g. the shared cifar10-jpeg.tar.gz) is unpacked once
    into the cache, keyed like the decoded cache so that a rewritten archive is unpacked afresh;
    the folder holding train/ and test/ is returned."""
    if not tarfile.is_tarfile(archive):
        raise DataError(f"data.root={archive} is a file but not a tar archive of train/ and test/")
    location = _digest(str(archive.resolve()))
    dest = cache_dir / f"{archive.name.split('.')[0]}-{location}-{_fingerprint(archive)}"
    if not dest.is_dir():
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")  # refuses members that would land outside tmp
                # tarfile ends the archive quietly at a damaged header and never reads the
                # stream's trailer; reading to the end lets gzip, bz2 or xz check its checksum
                while tar.fileobj.read(1 << 20):
                    pass
            tmp.rename(dest)  # the folder appears complete or not at all
        except tarfile.FilterError as e:
            raise DataError(f"archive {archive} holds member {e.tarinfo.name!r}, which would land "
                            f"outside its folder or is a special file ({type(e).__name__}); "
                            "expected files and folders inside it") from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            if not dest.is_dir():  # else another process unpacked it first and the rename lost
                raise DataError(f"archive {archive} cannot be unpacked ({type(e).__name__}: {e}); "
                                "expected an intact tar archive of train/ and test/") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-unpacked stays in the cache
        _drop_stale(dest)
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


class Rows:
    """Rows `index` of `images`, gathered a batch at a time as they are read: a split of the
    training images that is no copy of them (a copy would be 138 MB of CIFAR-10 per trial)."""

    def __init__(self, images: torch.Tensor, index: torch.Tensor):
        self.images, self.index = images, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i) -> torch.Tensor:
        return self.images[self.index[i]]


@dataclass
class Splits:
    """Train / val / test on the device, still uint8; `mean`/`std` come from train alone."""
    train: tuple[Rows, torch.Tensor]
    val: tuple[Rows, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    mean: torch.Tensor  # [1, 3, 1, 1], in [0, 1] pixel units
    std: torch.Tensor

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - self.mean) / self.std


def split(arrays: Arrays, cfg: DataConfig, device: torch.device) -> Splits:
    train, val = _split_indices(len(arrays.train_y), cfg)
    stats = arrays.stats
    if stats is None or stats.split != _split_key(cfg):  # e.g. a trial of a searched data.subset
        stats = split_stats(arrays, cfg)
    images, labels = arrays.train_x.to(device), arrays.train_y.to(device)  # on a CPU: no copy

    def part(index):
        index = index.to(device)
        return Rows(images, index), labels[index]
    return Splits(part(train), part(val), (arrays.test_x.to(device), arrays.test_y.to(device)),
                  stats.mean.view(1, 3, 1, 1).to(device), stats.std.view(1, 3, 1, 1).to(device))


def split_stats(arrays: Arrays, cfg: DataConfig) -> ChannelStats:
    """The statistics of the training split that `cfg` chooses."""
    train, _ = _split_indices(len(arrays.train_y), cfg)
    return ChannelStats(*channel_stats(arrays.train_x, train), _split_key(cfg))


def _split_key(cfg: DataConfig) -> tuple:
    return cfg.val_size, cfg.split_seed, cfg.subset


def _split_indices(n: int, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into the training set."""
    _check_val_size(cfg.val_size, n)
    # the split has its own seed so that every trial of a study validates on the same images
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val, train = order[: cfg.val_size], order[cfg.val_size:]
    if cfg.subset is not None:
        train = train[: cfg.subset]
    return train, val


def channel_stats(x: torch.Tensor, index: torch.Tensor | None = None,
                  chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of uint8 images `x` (or of rows `index` of them) in
    [0, 1] units, summed in float64 a chunk at a time: a float copy of CIFAR-10's training split
    would be 0.55 GB. In place, one 100 MB chunk at a time: 2.6x faster than a fresh buffer per
    operation (3.6 against 9.3 s for 45,000 images on a loaded 2-core CPU), the same sums."""
    s1 = torch.zeros(3, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(3, dtype=torch.float64, device=x.device)
    n = len(x) if index is None else len(index)
    for i in range(0, n, chunk):
        rows = x[i:i + chunk] if index is None else x[index[i:i + chunk]]
        part = rows.to(torch.float64).div_(255)
        s1 += part.sum(dim=(0, 2, 3))
        s2 += part.mul_(part).sum(dim=(0, 2, 3))
    n *= x.shape[2] * x.shape[3]
    mean = s1 / n
    std = ((s2 - n * mean * mean) / (n - 1)).clamp_min(0).sqrt()
    return mean.float(), std.float()


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
