"""python -m study.run EXPERIMENT.yaml [--set key=value ...] [--dry-run] [--resume]

Runs a study on a Ray cluster (a local one unless --address or RAY_ADDRESS names one): Optuna's
TPE through Ray Tune's OptunaSearch (mode: search) or a seeded grid (mode: ablation), ASHA
optionally stopping weak trials, every trial an MLflow run. Everything is validated before Ray
starts; a bad file exits with code 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

from tinyvit.config import ConfigError
from tinyvit.data import DataError, check_arrays, load_arrays

from .results import summarize, write_results
from .spec import SpecError, check_tracking_uri, load_plan, resolve_tracking_uri, study_id


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
        plan = load_plan(args.experiment, args.set)
        uri = resolve_tracking_uri(args.tracking_uri, plan)
        check_tracking_uri(uri)
        identity = study_id(plan, args.resume)
        config = plan.config
        arrays = load_arrays(config.data)
        check_arrays(arrays, config.model.image_size, config.model.num_classes,
                     config.data.val_size)
    except (SpecError, ConfigError, DataError) as e:
        return _refuse(e)
    print(plan.describe(uri, args.address), flush=True)
    if args.dry_run:
        return 0

    from .tuner import run_study  # Ray is imported only once the file is known to be good

    try:
        run_study(plan, uri, arrays, args.address, identity, args.resume, t0)
    except SpecError as e:  # what the cluster can never run: refused before any trial
        return _refuse(e)
    table = write_results(plan)
    print(summarize(plan, table, uri), flush=True)
    print("\n".join(publish_results(plan, uri, identity, table)))
    return 0


def publish_results(plan, uri: str, identity: str, table) -> list[str]:
    """The report (built headless from MLflow) and the best model, into MLflow."""
    from .results import ranked
    from .tracking import publish

    report, lines = None, []
    if plan.report:
        from reports.build import build

        try:
            report = build([plan.experiment], uri, plan.path / "report")
        except Exception as e:  # noqa: BLE001  the study's results stand without their report
            last = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [""]
            lines.append(f"report    not built ({type(e).__name__}: {last[-1][:200]}); "
                         f"the executed notebook says where: {plan.path / 'report'}")
    best = ranked(table, plan.design.searched).head(1)["trial_id"].tolist()
    return lines + publish(plan, uri, identity, best[0] if best else None, report)


def _refuse(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
