"""The study's table of trials (Parquet and CSV) and its best configuration (YAML)."""
from __future__ import annotations

import pandas as pd
import yaml
from ray.tune import ExperimentAnalysis

import contract as c
from tinyvit.config import Config

from .spec import Plan

BEST_CONFIG = "best_config.yaml"  # in the study's folder: the best full-budget trial's config


def trial_table(plan: Plan) -> tuple[pd.DataFrame, dict[str, Config]]:
    """One row per trial: config columns, final and best metrics, budget, status, wall time.
    Read back from Ray's own experiment state, so it also covers a resumed study. A searched
    key that a trial did not sample (a conditional parameter) is empty in its row."""
    analysis = ExperimentAnalysis(str(plan.path))
    rows, configs = [], {}
    for trial in analysis.trials:
        cfg = configs[trial.trial_id] = plan.trial_config(trial.config)
        unsampled = set(plan.design.searched) - set(plan.sampled(trial.config))
        last = trial.last_result or {}
        history = analysis.trial_dataframes.get(trial.trial_id)
        budget = int(last.get("epoch", 0))
        # a trial a stopped driver left unfinished is running (--resume continues it), not
        # stopped early: only a trial Ray terminated can have been stopped by the scheduler
        status = (c.ERRORED if trial.status == "ERROR" else c.RUNNING if trial.status != "TERMINATED"
                  else c.trial_status(budget, cfg.train.epochs))
        best = history["val_acc"].max() if history is not None and "val_acc" in history else None
        values = {k: None if k in unsampled else v for k, v in cfg.flat().items()}
        rows.append({"trial_id": trial.trial_id, c.CELL: plan.design.cell(trial.config),
                     c.STATUS: status, c.BUDGET: budget, c.MAX_EPOCHS: cfg.train.epochs,
                     "val_acc": last.get("val_acc"), "best_val_acc": best,
                     "test_acc": last.get("test_acc"), "params": last.get("params"),
                     "images_per_sec": last.get("images_per_sec"),
                     "wall_s": last.get("time_total_s"), **values})
    table = pd.DataFrame(rows)
    if plan.design.mode == "search":
        table = table.drop(columns=c.CELL)
    return table.sort_values("trial_id", ignore_index=True), configs


def ranked(table: pd.DataFrame, searched=()) -> pd.DataFrame:
    """The trials that may be called best, best first (contract.best_first)."""
    return c.best_first(table, searched)


def write_results(plan: Plan) -> pd.DataFrame:
    table, configs = trial_table(plan)
    table.to_parquet(plan.path / "trials.parquet", index=False)
    table.to_csv(plan.path / "trials.csv", index=False)
    best, path = ranked(table, plan.design.searched).head(1), plan.path / BEST_CONFIG
    path.unlink(missing_ok=True)  # no best yet: no stale one either
    if len(best):
        cfg = configs[best["trial_id"].iloc[0]].to_dict()
        cfg["train"]["threads"] = None  # the study's CPUs per trial, not a property of the model
        path.write_text(
            f"# best full-budget trial of study '{plan.name}' by its configuration's mean val_acc "
            f"({best['config_val_acc'].iloc[0]:.4f} over {best['config_trials'].iloc[0]} "
            f"trials); trial {best['trial_id'].iloc[0]}, val_acc {best['val_acc'].iloc[0]:.4f}\n"
            + yaml.safe_dump(cfg, sort_keys=False))
    return table


def summarize(plan: Plan, table: pd.DataFrame, uri: str) -> str:
    counts = table[c.STATUS].value_counts().to_dict()
    lines = [f"\nstudy {plan.name}: {len(table)} trials "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    top = ranked(table, plan.design.searched).head(5)
    if len(top):
        repeated = ["config_val_acc", "config_trials"] if (top.config_trials > 1).any() else []
        cols = ([c.CELL] if c.CELL in top else []) + [k for k in plan.design.searched if k in top] \
            + repeated + ["val_acc", "test_acc", "params", "wall_s"]
        lines += ["best full-budget trials by val_acc" + (" of their configuration (its mean "
                  "over its trials)" if repeated else "") + " (test_acc shown, never used to "
                  "choose):",
                  top[["trial_id", *dict.fromkeys(cols)]].to_string(index=False, float_format="%.4f")]
    best = plan.path / BEST_CONFIG
    lines += [f"table     {plan.path / 'trials.parquet'} (and .csv)",
              f"best      {best}" if best.exists() else
              "best      none yet: no trial has run its full budget",
              f"mlflow ui --backend-store-uri {uri}",
              "          then the experiment's runs: 'Model training' at the UI's top left"]
    return "\n".join(lines)
