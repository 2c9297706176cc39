"""The study's table of trials (Parquet and CSV) and its best configuration (YAML)."""
from __future__ import annotations

import pandas as pd
import yaml
from ray.tune import ExperimentAnalysis

from tinyvit.config import Config

from .spec import Spec
from .trainable import trial_config, trial_status


def trial_table(spec: Spec, cells: dict) -> tuple[pd.DataFrame, dict[str, Config]]:
    """One row per trial: config columns, final and best metrics, budget, status, wall time.
    Read back from Ray's own experiment state, so it also covers a resumed study."""
    analysis = ExperimentAnalysis(str(spec.path))
    rows, configs = [], {}
    for trial in analysis.trials:
        cfg = configs[trial.trial_id] = trial_config(spec.base, trial.config, cells)
        last = trial.last_result or {}
        history = analysis.trial_dataframes.get(trial.trial_id)
        budget = int(last.get("epoch", 0))
        status = ("errored" if trial.status == "ERROR" else
                  trial_status(budget, cfg.train.epochs))
        best = history["val_acc"].max() if history is not None and "val_acc" in history else None
        rows.append({"trial_id": trial.trial_id, "cell": trial.config.get("cell"),
                     "status": status, "budget": budget, "max_epochs": cfg.train.epochs,
                     "val_acc": last.get("val_acc"), "best_val_acc": best,
                     "test_acc": last.get("test_acc"), "params": last.get("params"),
                     "images_per_sec": last.get("images_per_sec"),
                     "wall_s": last.get("time_total_s"), **cfg.flat()})
    table = pd.DataFrame(rows)
    if spec.mode == "search":
        table = table.drop(columns="cell")
    return table.sort_values("trial_id", ignore_index=True), configs


def write_results(spec: Spec, cells: dict) -> pd.DataFrame:
    table, configs = trial_table(spec, cells)
    table.to_parquet(spec.path / "trials.parquet", index=False)
    table.to_csv(spec.path / "trials.csv", index=False)
    best = full_budget(table).sort_values("val_acc", ascending=False).head(1)
    if len(best):
        cfg = configs[best["trial_id"].iloc[0]]
        (spec.path / "best_config.yaml").write_text(
            f"# best full-budget trial of study '{spec.name}' by val_acc "
            f"({best['val_acc'].iloc[0]:.4f}); trial {best['trial_id'].iloc[0]}\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return table


def full_budget(table: pd.DataFrame) -> pd.DataFrame:
    """Only these accuracies are final: early-stopped ones are truncated, never compared."""
    return table[(table["status"] == "completed") & (table["budget"] == table["max_epochs"])]


def summarize(spec: Spec, table: pd.DataFrame, uri: str) -> str:
    counts = table["status"].value_counts().to_dict()
    lines = [f"\nstudy {spec.name}: {len(table)} trials "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    top = full_budget(table).sort_values("val_acc", ascending=False).head(5)
    if len(top):
        cols = (["cell"] if "cell" in top else []) + [c for c in spec.searched if c in top] + \
               ["val_acc", "test_acc", "params", "wall_s"]
        lines += ["best full-budget trials by val_acc (test_acc shown, never used to choose):",
                  top[["trial_id", *dict.fromkeys(cols)]].to_string(index=False, float_format="%.4f")]
    lines += [f"table     {spec.path / 'trials.parquet'} (and .csv)",
              f"best      {spec.path / 'best_config.yaml'}",
              f"mlflow ui --backend-store-uri {uri}"]
    return "\n".join(lines)
