"""python -m study.run EXPERIMENT.yaml [--set key=value ...] [--dry-run] [--resume]

Runs a study on a Ray cluster (a local one unless --address or RAY_ADDRESS names one): Optuna's
TPE through Ray Tune's OptunaSearch (mode: search) or a seeded grid (mode: ablation), ASHA
optionally stopping weak trials, every trial an MLflow run. Everything is validated before Ray
starts; a bad file exits with code 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from tinyvit.config import Config, ConfigError
from tinyvit.data import DataError, load_arrays

from .results import summarize, write_results
from .spec import Spec, SpecError, check_tracking_uri, load_spec, resolve_tracking_uri

# a study's data set is decoded once, by the driver, and shipped to every trial: these keys
# name the data set itself, so they cannot vary between trials of one study
FIXED_KEYS = ("data.source", "data.root", "data.cache_dir", "data.synthetic_train",
              "data.synthetic_test")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.split("\n")[2])
    ap.add_argument("experiment", help="experiment YAML file, e.g. experiments/ablation.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any key of the file, e.g. --set train.epochs=1 (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted study: finished trials are kept, unfinished "
                         "ones continue from their last checkpoint")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="join a running Ray cluster (default: $RAY_ADDRESS, else start a "
                         "local one)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                    "else the file's mlflow.tracking_uri, else sqlite in the study folder)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        spec = load_spec(args.experiment, args.set)
        for key in FIXED_KEYS:
            if key in spec.searched:
                raise SpecError(f"{key} cannot be searched or ablated: a study has one data set")
        uri = resolve_tracking_uri(args.tracking_uri, spec)
        check_tracking_uri(uri)
        _check_storage(spec, args.resume)
        arrays = load_arrays(Config.from_dict(spec.base).data)
    except (SpecError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan(spec, uri, args.address), flush=True)
    if args.dry_run:
        return 0

    from .tuner import run_study  # Ray is imported only once the file is known to be good

    cells = run_study(spec, uri, arrays, args.address, args.resume, t0)
    table = write_results(spec, cells)
    print(summarize(spec, table, uri))
    return 0


def _check_storage(spec: Spec, resume: bool) -> None:
    state = spec.path / "tuner.pkl"
    if resume and not state.exists():
        raise SpecError(f"--resume: no study to resume at {spec.path} (storage/name of the file)")
    if not resume and state.exists():
        raise SpecError(f"study '{spec.name}' already has results at {spec.path}; continue it "
                        "with --resume, or choose another name (--set name=...) or storage")


def plan(spec: Spec, uri: str, address: str | None) -> str:
    r = spec.resources
    lines = [f"study     {spec.name} ({spec.mode}), {spec.trial_count()} trials of up to "
             f"{spec.base.get('train', {}).get('epochs', Config().train.epochs)} epochs"]
    if spec.mode == "search":
        lines.append(f"search    Optuna TPE (seed {spec.search['seed']}) over "
                     f"{', '.join(spec.searched)}; objective "
                     + ", ".join(f"{m} ({o})" for m, o in zip(spec.metrics, spec.modes)))
    else:
        lines.append(f"ablation  {len(spec.space)} cells ({spec.ablation['design']}) x seeds "
                     f"{spec.ablation['seeds']}: " + "; ".join(c.name for c in spec.space))
    sched = spec.scheduler
    lines += [
        "scheduler " + ("none (every trial runs its full budget)" if sched["type"] == "none" else
                        f"ASHA, grace period {sched['grace_period']} epochs, reduction factor "
                        f"{sched['reduction_factor']}"),
        f"resources {r['cpu']} CPU, {r['gpu']} GPU per trial; at most {r['max_concurrent']} at "
        f"once; retries {spec.max_failures}; Ray at {address or 'a new local cluster'}",
        f"results   {spec.path}",
        f"mlflow    {uri} (experiment '{spec.experiment}')",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
