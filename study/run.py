"""python -m study.run EXPERIMENT.yaml [--set key=value ...] [--dry-run] [--resume | --sync-mlflow]

Runs a study on a Ray cluster (a local one unless --address or RAY_ADDRESS names one): Optuna's
TPE through Ray Tune's OptunaSearch (mode: search) or a seeded grid (mode: ablation), ASHA
optionally stopping weak trials, every trial an MLflow run. Everything is validated before Ray
starts; a bad file exits with code 2 and a one-line message. --sync-mlflow writes into MLflow
what it missed of a study's results (its tracking server was down), from Ray's own.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time

import contract as c
from tinyvit.config import ConfigError
from tinyvit.data import DataError, check_arrays, load_arrays

from .outbox import CLIENT_ENV
from .results import summarize, trial_table, write_results
from .spec import SpecError, check_tracking_uri, load_plan, resolve_tracking_uri, study_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.split("\n")[2])
    ap.add_argument("experiment", help="experiment YAML file, e.g. experiments/ablation.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any key of the file, e.g. --set train.epochs=1 (repeatable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate and print the plan only (with --resume: also that the study "
                         "can be continued as the file now stands)")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--resume", action="store_true",
                      help="continue an interrupted study: finished trials are kept, unfinished "
                           "ones continue from their last checkpoint")
    what.add_argument("--sync-mlflow", action="store_true",
                      help="write into MLflow what it misses of the study's results, read from "
                           "Ray's (a tracking server that was down), then publish the study's "
                           "report and model if they are missing; safe to repeat")
    ap.add_argument("--mlflow-wait", type=float, default=60, metavar="SECONDS",
                    help="at the study's end, wait until MLflow has every result, giving up "
                         "after this many seconds in which none went through (default 60)")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="join a running Ray cluster (default: $RAY_ADDRESS, else start a "
                         "local one)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                    "else the file's mlflow.tracking_uri, else sqlite in the study folder)")
    args = ap.parse_args(argv)
    if args.dry_run and args.sync_mlflow:
        ap.error("argument --dry-run: not allowed with argument --sync-mlflow")
    t0 = time.perf_counter()
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    try:
        if not args.mlflow_wait >= 0:
            raise SpecError(f"--mlflow-wait must be a number of seconds >= 0, got "
                            f"{args.mlflow_wait}")
        plan = load_plan(args.experiment, args.set)
        uri = resolve_tracking_uri(args.tracking_uri, plan)
        check_tracking_uri(uri)
        if args.sync_mlflow:
            identity = study_id(plan, True, "--sync-mlflow")
        else:
            identity = study_id(plan, args.resume)
        config = plan.config
        arrays = load_arrays(config.data)
        check_arrays(arrays, config.model.image_size, config.model.num_classes,
                     config.data.val_size)
    except (SpecError, ConfigError, DataError) as e:
        return _refuse(e)
    if args.sync_mlflow:
        return sync_mlflow(plan, uri, identity, arrays, args)
    print(plan.describe(uri, args.address), flush=True)
    if args.dry_run:
        return 0

    from .tuner import run_study  # Ray is imported only once the file is known to be good

    try:
        run_study(plan, uri, arrays, args.address, identity, args.resume, t0)
    except SpecError as e:  # what the cluster can never run: refused before any trial
        return _refuse(e)
    except BaseException:  # the driver's own end: MLflow gets what Tune's loop had queued
        from .tracking import finish

        finish(identity, args.mlflow_wait)
        raise
    table = write_results(plan)  # from Ray's own state, whatever MLflow has taken
    from .sync import ray_ops
    from .tracking import finish

    # a resumed study's driver may have been killed with results in its outbox: those are
    # written from Ray's state, after what this driver queued
    missed = finish(identity, args.mlflow_wait, ray_ops(plan)[0] if args.resume else [])
    print(summarize(plan, table, uri), flush=True)
    # Tune returns as well when it was interrupted (Ctrl-C): the trials it had not finished, and
    # those of a search it had not yet asked the searcher for (no row)
    planned = plan.design.trial_count()
    unfinished = int((table[c.STATUS] == c.RUNNING).sum()) + max(0, planned - len(table))
    if missed:
        print(missed_line(missed, uri, args))
        print("publish   skipped: the study's report and model wait for the replay above")
    elif unfinished:
        print(f"publish   not yet: the study was interrupted with {unfinished} of {planned} "
              "trials unfinished; continue it with --resume")
        return 130  # a shell's code for a command ended by Ctrl-C
    else:
        print("\n".join(publish_results(plan, uri, identity, table, args)))
    return 0


def sync_mlflow(plan, uri: str, identity: str, arrays, args) -> int:
    """Ray's results into MLflow (study/sync.py), then the study's end if it is over; exit
    code 1 while MLflow still misses something."""
    from .sync import sync

    missed, added, over = sync(plan, uri, identity, arrays, args.mlflow_wait)
    if missed:
        print(missed_line(missed, uri, args))
        return 1
    print(f"mlflow    {uri} holds study {plan.name} as Ray does ({added} missing points "
          "written)")
    if not over:
        print("publish   not yet: the study is unfinished; continue it with --resume")
        return 0
    print("\n".join(publish_results(plan, uri, identity, trial_table(plan)[0], args)))
    return 0


def missed_line(missed: int, uri: str, args) -> str:
    return (f"mlflow    missed {missed} operations ({uri} did not answer for "
            f"{args.mlflow_wait:g} s); Ray's results are complete; replay them into MLflow "
            f"with: {replay_command(uri, args)}")


def replay_command(uri: str, args) -> str:
    """The command that writes what MLflow missed (run from the same folder as this one)."""
    return shlex.join(["python", "-m", "study.run", args.experiment,
                       *(x for item in args.set for x in ("--set", item)),
                       "--tracking-uri", uri, "--sync-mlflow"])


def publish_results(plan, uri: str, identity: str, table, args) -> list[str]:
    """The report (built headless from MLflow) and the best model, into MLflow: what is not
    there already (a replay publishes what a study's end could not)."""
    from mlflow.exceptions import MlflowException

    from .results import ranked
    from .tracking import publish, published

    best = ranked(table, plan.design.searched).head(1)["trial_id"].tolist()
    best = best[0] if best else None
    report, lines = None, []
    try:
        has_report, has_model = published(plan, uri, identity, best)
        if (has_report or not plan.report) and has_model:
            return ["publish   the study's report and model are in MLflow already"]
        if plan.report and not has_report:
            from reports.build import build

            try:
                report = build([plan.experiment], uri, plan.path / "report")
            except Exception as e:  # noqa: BLE001  the study's results stand without it
                last = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [""]
                lines.append(f"report    not built ({type(e).__name__}: {last[-1][:200]}); "
                             f"the executed notebook says where: {plan.path / 'report'}")
        return lines + publish(plan, uri, identity, None if has_model else best, report)
    except (MlflowException, OSError) as e:  # a server gone at the last moment
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return lines + [f"publish   not finished ({first}); publish with: "
                        f"{replay_command(uri, args)}"]


def _refuse(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
