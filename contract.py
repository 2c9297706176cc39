"""The MLflow run contract between the study runner (`study/`) and the reports (`reports/`).

What one trial's run carries and what it means, in one place, so that the writer and the reader
cannot drift apart: tag names, status values, the full-budget rule, where the checkpoint is.
"""
from __future__ import annotations

# tags of every trial's run
STUDY = "study"  # the study's name
STUDY_ID = "study_id"  # one study instance: a rerun under the same name is another instance
MODE = "mode"  # search | ablation
TRIAL_ID = "trial_id"  # Ray's trial id: how a resumed study finds the run again
SEED = "seed"
CELL = "cell"  # ablation only: 'baseline' or 'model.depth=2'
SEARCHED = "searched"  # the study's searched or ablated keys, comma-separated
SAMPLED = "sampled"  # the searched keys this trial sampled (a conditional key may be absent)
BUDGET = "budget"  # epochs run
MAX_EPOCHS = "max_epochs"  # epochs the trial was configured for
STATUS = "status"
NODE = "node"
RESULTS = "results"  # the study's folder (Ray results, table, best config)
GIT_COMMIT = "git_commit"
ERROR = "error"  # errored trials: the last line of the traceback
MIN_EFFECT = "min_effect"  # ablation: the smallest val_acc difference the study cares about
REPEATS = "repeats"  # search: seeds trained per proposed configuration
RUNGS = "asha_rungs"  # search with ASHA: the epochs at which it compared trials, e.g. "1,2,4"

PARENT = "mlflow.parentRunId"  # MLflow's own nesting: every trial's run is a child of the study's
RUN_KIND = "kind"  # STUDY_RUN for the study's parent run, TRIAL_RUN for a trial's
STUDY_RUN, TRIAL_RUN = "study", "trial"
# MLflow 3 opens an experiment of this kind on its runs, not on the GenAI overview
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

# values of STATUS
COMPLETED, EARLY_STOPPED, ERRORED, RUNNING = "completed", "early-stopped", "errored", "running"
STATUSES = (COMPLETED, EARLY_STOPPED, ERRORED, RUNNING)

BASELINE = "baseline"  # the ablation cell every other cell is compared with
OBJECTIVE = "val_acc"  # what selects: never test_acc
PARAM_COUNT = "params"  # a metric: the model's parameter count, logged at step 0
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                 "images_per_sec")
FINAL_METRICS = ("test_loss", "test_acc")  # logged once, after the last epoch
CHECKPOINT_FILE = "model.pt"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"  # artifact path of a completed trial's model
MODEL = "model"  # the best trial's MLflow PyTorch model, logged under its run and registered
REPORT_DIR = "report"  # the study's report, attached to the parent run


def trial_status(budget: int, max_epochs: int) -> str:
    """A finished trial that ran fewer epochs than its budget was stopped early (ASHA)."""
    return COMPLETED if budget >= max_epochs else EARLY_STOPPED


def full_budget(table):
    """The rows (trials) whose accuracy is final: completed, every epoch run. Early-stopped
    accuracies are truncated and must never be ranked or averaged with these."""
    return table[(table[STATUS] == COMPLETED) & (table[BUDGET] == table[MAX_EPOCHS])]


def rankable(table):
    """The rows that may be called best: full-budget trials of the study's longest budget (a
    ladder's shorter trainings are no rivals of its longest)."""
    full = full_budget(table)
    return full[full[MAX_EPOCHS] == full[MAX_EPOCHS].max()]


def best_first(table, searched=()):
    """Rankable trials with a finite objective, best first: by the mean objective of their
    configuration (the trials that share their searched values: an ablation cell's seeds, or a
    configuration a search trained with several seeds), then by their own, so that a lucky seed
    never makes its configuration the best. Adds that mean and the configuration's trial count."""
    import pandas as pd

    rows = rankable(table)
    rows = rows[pd.to_numeric(rows[OBJECTIVE], errors="coerce").astype(float).abs() < float("inf")]
    # an ablation cell is a configuration, also in an ablation without factors (searched empty)
    keys = [k for k in searched if k in rows] or (
        [CELL] if CELL in rows and rows[CELL].notna().all() else [])
    group = rows.groupby(keys, dropna=False)[OBJECTIVE] if keys else None
    rows = rows.assign(config_val_acc=group.transform("mean") if keys else rows[OBJECTIVE],
                       config_trials=group.transform("size") if keys else 1)
    return rows.sort_values(["config_val_acc", OBJECTIVE], ascending=False, kind="stable")
