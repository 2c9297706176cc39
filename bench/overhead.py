"""What the study framework costs on top of training.

    python bench/overhead.py [--trials 8] [--epochs 3] [--train-images 6000]

Runs the same trainings twice: as a study through `python -m study.run` (Ray Tune, Optuna's
grid-free ablation path, MLflow logging, checkpoints every epoch) with 2 concurrent 1-CPU trials,
and back to back without Ray, Optuna or MLflow in 2 plain processes of 1 thread each (the same
parallelism). Prints both wall times, the overhead, the time from the command to the first trial
training (its first epoch's start, from the epoch's MLflow timestamp, which has 1-s resolution),
and where the overhead goes: the trainings' own epoch time in each path (contention from the
framework's processes shows there) against everything else (start-up, trial hand-offs).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def study_file(folder: Path, args) -> tuple[Path, dict]:
    seeds = list(range(args.trials // 2))
    d = {"name": "overhead", "mode": "ablation", "storage": str(folder / "runs"),
         "model": {"embed_dim": 64, "depth": 2, "heads": 4},
         "data": {"source": "synthetic", "synthetic_train": args.train_images,
                  "synthetic_test": 1000, "val_size": 1000, "cache_dir": str(folder / "cache")},
         "train": {"epochs": args.epochs, "batch_size": 128, "threads": 1},
         "ablation": {"factors": {"model.pos_embedding": ["learned", "rope2d"]}, "seeds": seeds},
         "scheduler": {"type": "none"},
         "resources": {"cpu": 1, "max_concurrent": 2}}
    path = folder / "overhead.yaml"
    path.write_text(yaml.safe_dump(d))
    return path, d


def train_one(overrides: dict) -> float:
    """The training's summed epoch seconds, as the study's trials report them."""
    from tinyvit.config import Config
    from tinyvit.train import fit
    seconds = []
    fit(Config.from_dict(overrides), on_epoch=lambda m, _: seconds.append(m["epoch_seconds"]))
    return sum(seconds)


def back_to_back(d: dict) -> tuple[float, float]:
    from tinyvit.config import apply_overrides
    configs = [apply_overrides(d, {"model.pos_embedding": pos, "train.seed": seed})
               for pos in d["ablation"]["factors"]["model.pos_embedding"]
               for seed in d["ablation"]["seeds"]]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:  # two 1-thread workers, like the study's
        epochs = pool.map(train_one, configs, chunksize=1)
    return time.perf_counter() - t0, sum(epochs)


def through_study(path: Path, folder: Path) -> tuple[float, float, float]:
    from mlflow.tracking import MlflowClient
    start = time.time()
    subprocess.run([sys.executable, "-m", "study.run", str(path)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.time() - start
    client = MlflowClient(f"sqlite:///{folder / 'runs' / 'overhead' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("overhead")
    epochs = [client.get_metric_history(r.info.run_id, "epoch_seconds")
              for r in client.search_runs([exp.experiment_id])]
    first = min(h[0].timestamp / 1000 - h[0].value for h in epochs)  # first epoch's start
    return wall, first - start, sum(m.value for h in epochs for m in h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=6000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, d = study_file(folder, args)
        from tinyvit.config import Config
        from tinyvit.data import load_arrays
        # both runs find the synthetic data set already cached, as every later study does
        load_arrays(Config.from_dict({k: d[k] for k in ("model", "data", "train")}).data)
        plain, plain_epochs = back_to_back(d)
        study, first, study_epochs = through_study(path, folder)
    print(f"{args.trials} trainings of {args.epochs} epochs, 2 at a time")
    print(f"back to back, no framework: {plain:7.1f} s  (epochs {plain_epochs:.1f} s summed)")
    print(f"through study.run:          {study:7.1f} s  (epochs {study_epochs:.1f} s summed; "
          f"overhead {study / plain - 1:+.1%}, {study - plain:+.1f} s)")
    print(f"command to first training:  {first:7.1f} s")


if __name__ == "__main__":
    main()
