"""GPU throughput of the trainer: what packs one GPU best when the model is tiny.

The seed model (208,074 parameters) at CIFAR-10 shape on random uint8 images (45,000 train,
5,000 val, as `data.val_size` carves them): the content does not change the speed. Parts:

- step: img/s of the trainer's own step (the loop of `tinyvit.train.fit`: batch augment,
  channels-last, autocast, label-smoothed cross-entropy, clipping, fused AdamW, the cosine
  schedule, the finiteness check every 25 steps) for fp32 / bf16, eager / `torch.compile`
  (mode default) / `mode="reduce-overhead"` (CUDA graphs), at several batch sizes. Each setting
  gets a fresh model; the first step (compilation) is timed apart, then a warm-up, then a
  fixed wall-clock window.
- fit: `tinyvit.train.fit` itself, two epochs, to check that the step loop measures what the
  trainer does (its second epoch's `images_per_sec`).
- concurrent: 1, 2 and 4 training processes on the one GPU, which is what Ray's fractional
  GPUs (`resources.gpu: 1, 0.5, 0.25`) do: each trial is a process with its own CUDA context.
  The processes warm up, meet at a barrier, then train over the same window; the aggregate is
  their images over the longest of their windows.

Settings run in order of importance (PLAN) until `--deadline` (a Unix time) would be passed; the
rest are recorded as skipped. Every result is a JSON line in `--out` and a row of the final table.

    python bench/gpu.py --out gpu.jsonl
    python bench/gpu.py --only step-compiled,concurrent-compiled --seconds 3
    python bench/gpu.py --cpu-smoke          # tiny sizes on the CPU: checks the script itself
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyvit  # noqa: E402,F401  first: its OpenMP setting must precede torch
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tinyvit.config import Config  # noqa: E402
from tinyvit.data import Arrays, BatchAugment, split  # noqa: E402
from tinyvit.model import TinyViT  # noqa: E402
from tinyvit.train import fit, param_groups, use_bf16, warmup_cosine  # noqa: E402

MODES = {"none": None, "default": "default", "reduce-overhead": "reduce-overhead"}


def setting(part, precision, compile, batch, procs=1, channels_last=True) -> dict:
    return dict(part=part, precision=precision, compile=compile, batch=batch, procs=procs,
                channels_last=channels_last)


# In order of importance: what runs out of time is skipped from the end. Eager first (cheap),
# then the trainer itself, concurrent processes at the study's default (eager bf16, batch 256),
# then compiled settings (the default mode only where it might win) and the combinations.
PLAN = [setting("step", p, "none", b) for p, b in
        [("fp32", 256), ("fp32", 512), ("fp32", 1024), ("bf16", 256), ("bf16", 512),
         ("bf16", 1024), ("bf16", 2048), ("bf16", 4096)]] + \
       [setting("step", "bf16", "none", 256, channels_last=False),
        setting("fit", "bf16", "none", 256)] + \
       [setting("concurrent", "bf16", "none", 256, n) for n in (1, 2, 4)] + \
       [setting("step", "bf16", m, b) for b in (256, 1024)
        for m in ("reduce-overhead", "default")] + \
       [setting("concurrent", "bf16", "none", 1024, n) for n in (2, 4)] + \
       [setting("step", "bf16", "reduce-overhead", b) for b in (512, 2048, 4096)] + \
       [setting("step", "fp32", "reduce-overhead", 512), setting("fit", "bf16", "default", 256)] + \
       [setting("concurrent", "bf16", "reduce-overhead", b, n) for b, n in
        ((256, 2), (256, 4), (1024, 2))]
SMOKE_PLAN = [setting("step", "fp32", "none", 32),
              setting("step", "bf16", "none", 32, channels_last=False),
              setting("fit", "bf16", "none", 256), setting("concurrent", "fp32", "none", 32, 2),
              setting("step", "fp32", "reduce-overhead", 32), setting("fit", "fp32", "default", 32)]


# a first guess of seconds per setting of each group, until one has run: warm-up and window
# take 2.5 s, starting processes and compiling the rest
FIRST_GUESS_S = {"step": 5, "fit": 10, "concurrent": 20, "step-compiled": 40,
                 "fit-compiled": 40, "concurrent-compiled": 60}


def group(s: dict) -> str:
    return s["part"] + ("-compiled" if s["compile"] != "none" else "")


def config(device: str, precision: str, batch: int, smoke: bool, channels_last=True) -> Config:
    model = {"embed_dim": 32, "depth": 1, "heads": 2} if smoke else {}  # else the seed model
    return Config.from_dict({
        "model": model,
        "data": {"source": "synthetic", "val_size": 200 if smoke else 5000},
        "train": {"device": device, "precision": precision, "batch_size": batch,
                  "channels_last": channels_last, "epochs": 2}})


def random_arrays(n_train: int, n_test: int, device: torch.device) -> Arrays:
    g = torch.Generator(device=device).manual_seed(0)
    img = lambda n: torch.randint(0, 256, (n, 3, 32, 32), generator=g, device=device,  # noqa: E731
                                  dtype=torch.uint8)
    lab = lambda n: torch.randint(0, 10, (n,), generator=g, device=device)  # noqa: E731
    return Arrays(img(n_train), lab(n_train), img(n_test), lab(n_test), [str(i) for i in range(10)])


def make_step(cfg: Config, arrays: Arrays, mode: str):
    """The training step of `tinyvit.train.fit`, with the compile mode as a parameter (fit
    compiles with the default mode). Returns step() -> images trained."""
    tc, device = cfg.train, torch.device(cfg.train.device)
    torch.manual_seed(tc.seed)
    data = split(arrays, cfg.data, device)
    train_x, train_y = data.train
    batch = tc.batch_size
    steps_per_epoch = len(train_y) // batch
    model = TinyViT(cfg.model).to(device)
    if MODES[mode]:
        torch._dynamo.reset()  # a fresh, static graph per setting (no automatic dynamic shapes)
    forward = torch.compile(model, mode=MODES[mode]) if MODES[mode] else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(tc.precision, device))
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr,
                                  fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        steps_per_epoch, 1000 * steps_per_epoch, 0.0))
    augment = BatchAugment(cfg.data, cfg.model.num_classes)
    channels_last = tc.channels_last and device.type == "cuda"
    state = {"step": 0, "order": None}
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)

    def step() -> int:
        nonlocal loss_sum, correct
        i = state["step"] % steps_per_epoch
        if i == 0:
            state["order"] = torch.randperm(len(train_y), device=device)
        idx = state["order"][i * batch:(i + 1) * batch]
        x, y = augment(data.normalize(train_x[idx]), train_y[idx])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        correct += (logits.argmax(1) == y).sum()
        if i % 25 == 0 and not torch.isfinite(loss):  # fit's check: a sync every 25 steps
            raise FloatingPointError(f"loss {loss.item()} at step {state['step']}")
        state["step"] += 1
        return batch

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device, seconds: float, chunk: int = 10) -> tuple[int, float]:
    """Images and seconds of whole chunks of steps until `seconds` have passed (GPU synced)."""
    sync(device)
    t0, images = time.perf_counter(), 0
    while True:
        for _ in range(chunk):
            images += step()
        if time.perf_counter() - t0 >= seconds:
            sync(device)
            return images, time.perf_counter() - t0


def warm(step, device, warmup_s: float) -> float:
    """Runs the first step (compilation, CUDA graph capture happen there and in the next few)
    and warm-up steps for `warmup_s`; returns the first step's seconds."""
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    timed(step, device, warmup_s, chunk=5)
    return first


def peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measure_step(args, precision, mode, batch, arrays, channels_last=True) -> dict:
    cfg = config(args.device, precision, batch, args.cpu_smoke, channels_last)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(cfg, arrays, mode)
    first = warm(step, device, args.warmup)
    images, seconds = timed(step, device, args.seconds)
    return {"img_per_s": images / seconds, "first_step_s": first, "peak_mb": peak_mb(device)}


def measure_fit(args, s, arrays) -> dict:
    """fit itself, 2 epochs: epoch 1 pays the warm-up (and compilation), epoch 2 is the trainer's
    img/s. fit compiles in the default mode (`train.compile`)."""
    cfg = config(args.device, s["precision"], s["batch"], args.cpu_smoke)
    cfg.train.compile = s["compile"] == "default"
    torch._dynamo.reset()
    seen = []
    fit(cfg, arrays, on_epoch=lambda m, ckpt: seen.append(m))
    return {"img_per_s": seen[-1]["images_per_sec"], "epoch_seconds": seen[-1]["epoch_seconds"]}


def worker(rank, s, args, barrier, results) -> None:
    """One of n concurrent trainings: own process, own CUDA context, like one Ray trial."""
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // s["procs"]))  # its share of CPUs
        device = torch.device(args.device)
        cfg = config(args.device, s["precision"], s["batch"], args.cpu_smoke)
        step = make_step(cfg, random_arrays(args.n_train, args.n_test, device), s["compile"])
        first = warm(step, device, args.warmup)
        barrier.wait(timeout=max(1.0, args.deadline - time.time()))
        images, seconds = timed(step, device, args.seconds)
        results.put({"rank": rank, "images": images, "seconds": seconds, "first_step_s": first,
                     "peak_mb": peak_mb(device)})
    except Exception as e:  # noqa: BLE001  reported in the table; the other workers go on
        barrier.abort()
        results.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})


def measure_concurrent(args, s) -> dict:
    n = s["procs"]
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, s, args, barrier, results)) for r in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=max(1.0, args.deadline - time.time() + 30)) for _ in procs]
    for p in procs:
        p.join()
    errors = [o["error"] for o in out if "error" in o]
    if errors:
        raise RuntimeError(errors[0])
    window = max(o["seconds"] for o in out)
    return {"img_per_s": sum(o["images"] for o in out) / window,
            "per_process": [round(o["images"] / o["seconds"]) for o in out],
            "first_step_s": max(o["first_step_s"] for o in out),
            "peak_mb": max(o["peak_mb"] or 0 for o in out) or None}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    info = {"part": "env", "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or "cpu", "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    emit(args, info)
    arrays = random_arrays(args.n_train, args.n_test, device)
    plan = SMOKE_PLAN if args.cpu_smoke else PLAN
    rows, cost = [], dict(FIRST_GUESS_S)  # then the seconds the group's last setting took
    for s in plan:
        if args.only and group(s) not in args.only:
            continue
        row = dict(s)
        if time.time() + cost[group(s)] > args.deadline:
            row["skipped"] = "deadline"
        else:
            t0 = time.time()
            try:
                if s["part"] == "step":
                    row.update(measure_step(args, s["precision"], s["compile"], s["batch"], arrays,
                                            s["channels_last"]))
                elif s["part"] == "fit":
                    row.update(measure_fit(args, s, arrays))
                else:
                    row.update(measure_concurrent(args, s))
            except Exception as e:  # noqa: BLE001  one failed setting must not lose the rest
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            cost[group(s)] = time.time() - t0
            row["wall_s"] = round(cost[group(s)], 1)
        emit(args, row)
        rows.append(row)
    return rows


def emit(args, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def table(rows: list[dict]) -> str:
    head = f"{'part':<10} {'prec':<5} {'compile':<16} {'batch':>5} {'procs':>5} " \
           f"{'img/s':>9} {'first step':>10} {'peak MB':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        notes = ["channels_last off"] if r.get("channels_last") is False else []
        if "per_process" in r:
            notes.append("per process " + ", ".join(f"{x:,}" for x in r["per_process"]))
        notes += [r[k] for k in ("error", "skipped") if k in r]
        note = "; ".join(notes)
        ips = f"{r['img_per_s']:,.0f}" if "img_per_s" in r else "-"
        first = f"{r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else "-"
        peak = f"{r['peak_mb']:,.0f}" if r.get("peak_mb") else "-"
        lines.append(f"{r['part']:<10} {r['precision']:<5} {r['compile']:<16} {r['batch']:>5} "
                     f"{r['procs']:>5} {ips:>9} {first:>10} {peak:>8}  {note}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("GPU_BENCH_OUT"),
                    help="append JSON lines here (default: $GPU_BENCH_OUT)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measured window per setting")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up after the first step, s")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time after which no setting starts (default: now + 270 s)")
    ap.add_argument("--only", type=lambda v: v.split(","), default=None,
                    help="comma list of groups to run: step, step-compiled, fit, fit-compiled, "
                         "concurrent, concurrent-compiled (default: all)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every code path on the CPU at tiny sizes (no GPU needed)")
    args = ap.parse_args()
    groups = {group(s) for s in PLAN}
    if args.only and set(args.only) - groups:
        print(f"error: --only {','.join(args.only)}: unknown group(s) "
              f"{','.join(sorted(set(args.only) - groups))} (expected {', '.join(sorted(groups))})",
              file=sys.stderr)
        return 2
    if args.deadline is None:
        args.deadline = time.time() + 270
    if args.cpu_smoke:
        args.device, args.n_train, args.n_test = "cpu", 1200, 200
        args.seconds, args.warmup = min(args.seconds, 0.5), min(args.warmup, 0.2)
    elif torch.cuda.is_available():
        args.device, args.n_train, args.n_test = "cuda", 50_000, 10_000
    else:
        print("no CUDA device visible: nothing to measure (--cpu-smoke checks the script)")
        return 0
    rows = run(args)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
