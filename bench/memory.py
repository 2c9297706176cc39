"""Peak memory of a study's driver and of one trial process.

    python bench/memory.py --data PATH/cifar10-jpeg.tar.gz [--cache DIR] [--checkout DIR]

Runs `python -m study.run` on one trial of the seed model (the config's defaults: the full
training split of 45,000 images, 5,000 val) for one epoch, 1 trial at a time, on a local Ray
cluster, and samples /proc/PID/status of the driver and of the trial's process every 0.1 s.
Peak RSS is the kernel's own high-water mark (VmHWM). RSS counts private pages (RssAnon: this
process's own copies and buffers), shared memory (RssShmem: pages of Ray's object store that the
process reads, one copy per node whatever the number of trials reading them) and mapped files
(the libraries); the sampled peaks of the first two are printed apart. `--checkout` runs the
driver and trials of another checkout (another commit), so that a change is measured against
the code before it. Measured, not asserted: the figures are in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("VmHWM", "RssAnon", "RssShmem")
# the driver prints its own high-water mark as it exits: the last sample may precede its peak
DRIVER = ("import atexit, runpy, sys\n"
          "def hwm():\n"
          "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
          "    print('driver ' + line.strip(), flush=True)\n"
          "atexit.register(hwm)\n"
          "sys.argv = ['study.run', *sys.argv[1:]]\n"
          "runpy.run_module('study.run', run_name='__main__')\n")


def status(pid: int) -> dict[str, int]:
    """The FIELDS of /proc/PID/status in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) // 1024
    return out


def experiment(folder: Path, data: str, cache: str) -> Path:
    d = {"name": "memory", "mode": "search", "storage": str(folder / "runs"),
         "data": {"source": "imagefolder", "root": data, "cache_dir": cache},
         "train": {"epochs": 1},
         "search": {"num_samples": 1, "space": {"train.seed": [0]}},
         "scheduler": {"type": "none"}, "resources": {"cpu": 2, "max_concurrent": 1},
         "mlflow": {"report": False}}
    path = folder / "memory.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def measure(checkout: Path, path: Path) -> tuple[dict, dict, str]:
    """(driver peaks, trial peaks, the driver's output)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(path)], cwd=checkout, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, dict] = {}
    names: dict[int, str] = {}
    while driver.poll() is None:
        try:
            family = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(True)]
        except psutil.NoSuchProcess:
            break
        for p in family:
            try:
                names[p.pid] = p.name() if p.pid != driver.pid else "driver"
                now = status(p.pid)
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue
            seen = peaks.setdefault(p.pid, {})
            for key, value in now.items():
                seen[key] = max(seen.get(key, 0), value)
        time.sleep(0.1)
    out = driver.communicate()[0]
    if driver.returncode != 0:
        sys.exit(f"the study failed:\n{out[-6000:]}")
    hwm = next(line for line in out.splitlines() if line.startswith("driver VmHWM"))
    drv = {**peaks[driver.pid], "VmHWM": int(hwm.split()[2]) // 1024}
    # a function trainable's actor; the kernel keeps 15 characters of a process's name
    trials = [peaks[pid] for pid, name in names.items() if name.startswith("ray::Implicit")]
    if len(trials) != 1:
        sys.exit(f"expected one trial process, found {len(trials)}: {sorted(set(names.values()))}")
    return drv, trials[0], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 as an image-folder archive or folder")
    ap.add_argument("--cache", default="~/.cache/tinyvit", help="data.cache_dir")
    ap.add_argument("--checkout", default=str(REPO), help="the checkout whose code runs")
    args = ap.parse_args()
    checkout = Path(args.checkout).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        path = experiment(Path(tmp), str(Path(args.data).expanduser().resolve()),
                          str(Path(args.cache).expanduser().resolve()))
        driver, trial, _ = measure(checkout, path)
    print(f"checkout {checkout} ({commit})")
    for who, peaks in (("driver", driver), ("trial", trial)):
        print(f"{who:7} peak RSS {peaks['VmHWM']:5d} MiB   sampled peaks: private "
              f"{peaks.get('RssAnon', 0):5d} MiB, shared {peaks.get('RssShmem', 0):5d} MiB")


if __name__ == "__main__":
    main()
