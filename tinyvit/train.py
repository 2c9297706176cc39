"""Train one TinyViT: AdamW, linear warmup then cosine, label smoothing, gradient clipping, and
optionally an exponential moving average (EMA) of the weights.

`fit(cfg, on_epoch=...)` calls back after every epoch with the epoch's metrics and a function that
returns a full checkpoint, so a study runner can report and checkpoint without this package knowing
it exists. `python -m tinyvit.train [config.yaml] [--set key=value ...]` runs one training.
"""
from __future__ import annotations

import argparse
import math
import pickle
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from .config import Config, ConfigError, load
from .data import Arrays, BatchAugment, DataError, check_arrays, load_arrays, split
from .model import TinyViT, count_params

OnEpoch = Callable[[dict, Callable[[], dict]], None]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; continuing would only produce NaN epochs."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or was saved by a configuration this run cannot continue."""


# What a run must share with the checkpoint it resumes. The model keys define the weights and the
# function they compute; the data keys choose the training and validation images (another split
# would validate on images the checkpoint trained on). Of train.*, the restored optimizer and
# scheduler silently keep the checkpoint's lr and weight_decay, its step count means another point
# of the schedule under another batch_size, and its restored RNG state makes seed a false label.
# The rest may differ: a larger train.epochs trains longer (the cosine continues from the step
# reached to the new end), and device, threads, evaluation, clipping or augmentation settings
# apply from the next step. Paths (data.root, data.cache_dir) may move.
RESUME_KEYS = ("data.source", "data.val_size", "data.split_seed", "data.subset",
               "data.synthetic_train", "data.synthetic_test",
               "train.lr", "train.weight_decay", "train.batch_size", "train.seed")


def fit(cfg: Config, arrays: Arrays | None = None, on_epoch: OnEpoch | None = None,
        resume: dict | None = None, progress: bool = False) -> dict:
    """Train `cfg` (from `resume`, a checkpoint dict, if given); returns the last epoch's metrics."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(tc.precision, device))
    data = split(arrays if arrays is not None else load_arrays(cfg.data), cfg.data, device)
    train_x, train_y = data.train
    batch_size = min(tc.batch_size, len(train_y))
    steps_per_epoch = len(train_y) // batch_size  # drop the ragged last batch: static shapes

    model = TinyViT(cfg.model).to(device)
    mode = compile_mode(tc.compile, device)
    forward = torch.compile(model, mode=mode) if mode else model
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr,
                                  fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        round(tc.warmup_epochs * steps_per_epoch), tc.epochs * steps_per_epoch, tc.min_lr / tc.lr))
    augment = BatchAugment(cfg.data, cfg.model.num_classes)
    # An EMA of the weights (and of the stem's BatchNorm statistics) averages out the last steps'
    # noise that a short schedule has no time to anneal; when on, it is what val and test score.
    ema = (AveragedModel(model, multi_avg_fn=ema_update(tc.ema), use_buffers=True)
           if tc.ema else None)
    scored = ema.module if ema is not None else forward
    channels_last = tc.channels_last and device.type == "cuda"

    start = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in resume["rng"]:
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
        if ema is not None and "ema" in resume:  # else the average starts from these weights
            ema.load_state_dict(resume["ema"])
        start = resume["epoch"] + 1

    def checkpoint() -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {"config": cfg.to_dict(), "epoch": epoch, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng, "mean": data.mean.flatten().tolist(),
                 "std": data.std.flatten().tolist()}
        return state if ema is None else {**state, "ema": ema.state_dict()}

    metrics = {}
    for epoch in range(start, tc.epochs + 1):
        t0, cpu0 = time.perf_counter(), time.process_time()
        model.train()
        # sums stay on the device: a .item() per step would sync the GPU every step
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        order = torch.randperm(len(train_y), device=device)
        steps = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{tc.epochs}", leave=False,
                     disable=not progress)
        for step in steps:
            idx = order[step * batch_size:(step + 1) * batch_size]
            x, y = augment(data.normalize(train_x[idx]), train_y[idx])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                logits = forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum()
            if step % 25 == 0 and not torch.isfinite(loss):  # checked every few steps: syncs
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch}, step {step}; lower train.lr "
                    f"(now {tc.lr}) or raise train.warmup_epochs / train.grad_clip")
        train_seconds = time.perf_counter() - t0
        train_loss = loss_sum.item() / steps_per_epoch
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"loss became {train_loss} in epoch {epoch}; lower train.lr "
                                   f"(now {tc.lr}) or raise train.warmup_epochs / train.grad_clip")
        val_loss, val_acc = evaluate(scored, data.val, data.normalize, tc.eval_batch_size, amp,
                                     tc.eval_flip)
        metrics = {"epoch": epoch, "train_loss": train_loss,
                   "train_acc": correct.item() / (steps_per_epoch * batch_size),
                   "val_loss": val_loss, "val_acc": val_acc,
                   "lr": optimizer.param_groups[0]["lr"],
                   "epoch_seconds": time.perf_counter() - t0,
                   # the process's CPU time in the epoch, every thread's: against epoch_seconds
                   # it shows a trial waiting for cores (bench/scale.py prices the framework so)
                   "cpu_seconds": time.process_time() - cpu0,
                   "images_per_sec": steps_per_epoch * batch_size / train_seconds,
                   "params": count_params(model)}
        if epoch == tc.epochs:  # test once, at the end: it is reported, never selected on
            metrics["test_loss"], metrics["test_acc"] = evaluate(
                scored, data.test, data.normalize, tc.eval_batch_size, amp, tc.eval_flip)
        if on_epoch:
            on_epoch(metrics, checkpoint)
    return metrics


@torch.inference_mode()
def evaluate(forward, split_xy, normalize, batch_size, amp, flip=False) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy over a split. With `flip`, the logits of
    each image and of its mirror are averaged: training flips images, so the model has learned
    both views, and two views vote better than one (airbench's test-time augmentation)."""
    if isinstance(forward, torch.nn.Module):
        forward.eval()
    x, y = split_xy
    if len(y) == 0:
        return float("nan"), float("nan")
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        batch = normalize(x[i:i + batch_size])
        with amp:
            logits = forward(batch).float()
            if flip:  # cloned first: a CUDA-graph replay reuses its output buffer
                logits = (logits.clone() + forward(batch.flip(3)).float()) / 2
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    return loss / len(y), correct / len(y)


def ema_update(decay: float):
    """AveragedModel's update for an EMA whose decay warms up as min(decay, (1 + n) / (10 + n)),
    n the updates so far (TensorFlow's ExponentialMovingAverage): a plain 0.999 average still
    holds half of its first steps' weights after 700 steps (two epochs at batch 128), so early
    evaluations, and ASHA's rungs, would score a lagging model."""
    @torch.no_grad()
    def update(averaged: list, current: list, n: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # BatchNorm's step counters: the latest
            torch._foreach_copy_(averaged, current)
            return
        step_decay = torch.clamp((1 + n) / (10 + n), max=decay)  # a tensor: no sync on a GPU
        torch._foreach_lerp_(averaged, current, 1 - step_decay)
    return update


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # decay the weight matrices only: decaying norms, biases and position/CLS tables hurts ViTs
    no_decay = lambda n, p: p.ndim < 2 or n in ("pos_embed", "cls_token")  # noqa: E731
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def compile_mode(flag: bool | None, device: torch.device) -> str | None:
    """torch.compile's mode, or None to run eagerly. A model this small leaves a GPU waiting on
    kernel launches: CUDA graphs ("reduce-overhead") measured 2.0-2.1x eager img/s at batch 256
    on an H100, where compile's default mode gave 0.7-1.1x (bench/RESULTS.md). On the 2-core CPU
    it gained ~3% (1.65x against 1.60x the seed pipeline), so there it runs only when asked."""
    if flag is False or (flag is None and device.type != "cuda"):
        return None
    return "reduce-overhead" if device.type == "cuda" else "default"


def use_bf16(precision: str, device: torch.device) -> bool:
    # measured on the 2-core CPU: bf16 autocast is ~35% slower than fp32, so auto means GPU only
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def save_checkpoint(state: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # a kill mid-write must not leave a torn checkpoint
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, cfg: Config | None = None) -> dict:
    """Read a checkpoint of `fit`; with `cfg`, refuse one that run cannot continue (RESUME_KEYS)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # a torn or foreign file surfaces as any of these, depending on where torch.load trips
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) else "truncated or not a torch.save file"
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {why}); "
                              "move it away to start afresh") from None
    keys = ("config", "epoch", "model", "optimizer", "scheduler", "rng")
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise CheckpointError(f"checkpoint {path} is not a tinyvit checkpoint (expected a dict "
                              f"with {', '.join(keys)})")
    if cfg is not None:
        saved = {f"{s}.{k}": v for s, sec in state["config"].items() for k, v in sec.items()}
        run = cfg.flat()
        differ = [k for k in run if (k.startswith("model.") or k in RESUME_KEYS)
                  and saved.get(k) != run[k]]
        if differ:
            was = ", ".join(f"{k}={saved.get(k)}" for k in differ)
            now = ", ".join(f"{k}={run[k]}" for k in differ)
            raise CheckpointError(f"checkpoint {path} was saved for {was}; this run has {now}")
    return state


def scored_weights(state: dict) -> dict:
    """The weights a checkpoint's val and test metrics were scored with: its EMA's when it kept
    one (train.ema), else the trained model's; what a registered model or a report should load."""
    if "ema" not in state:
        return state["model"]
    return {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}


def format_epoch(m: dict, epochs: int) -> str:
    line = (f"epoch {m['epoch']:>3}/{epochs}  train_loss {m['train_loss']:.4f}  "
            f"train_acc {m['train_acc']:.4f}  val_loss {m['val_loss']:.4f}  "
            f"val_acc {m['val_acc']:.4f}  lr {m['lr']:.2e}  {m['epoch_seconds']:.1f}s  "
            f"{m['images_per_sec']:.0f} img/s")
    return line + (f"  test_acc {m['test_acc']:.4f}" if "test_acc" in m else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyvit.train", description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help="YAML file with model/data/train sections")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key, e.g. --set model.depth=6 (repeatable)")
    ap.add_argument("--checkpoint", help="save a checkpoint here after every epoch")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint if present")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config, args.set)
        resume = None
        if args.resume:
            if not args.checkpoint:
                raise ConfigError("--resume needs --checkpoint PATH")
            if Path(args.checkpoint).exists():
                resume = load_checkpoint(args.checkpoint, cfg)
        arrays = load_arrays(cfg.data)
        check_arrays(arrays, cfg.model.image_size, cfg.model.num_classes, cfg.data.val_size)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"TinyViT {count_params(TinyViT(cfg.model)):,} params | " +
          " ".join(f"{k}={v}" for k, v in cfg.flat().items()), flush=True)

    def on_epoch(metrics, checkpoint):
        tqdm.write(format_epoch(metrics, cfg.train.epochs))
        if args.checkpoint:
            save_checkpoint(checkpoint(), args.checkpoint)

    try:
        fit(cfg, arrays, on_epoch, resume=resume, progress=sys.stderr.isatty())
    except (TrainingDiverged, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
