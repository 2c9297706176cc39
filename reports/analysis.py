"""The numbers of a study report: a study's MLflow runs in, pandas tables out.

The report notebooks only call these functions and draw what they return, so the tests can check
the very numbers a reader sees. Accuracy means final val_acc (the last epoch's); test_acc is shown
beside it but never used to rank or select anything.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scipy import stats

import contract as c
from contract import BASELINE, CHECKPOINT, STATUSES, full_budget

METRIC = c.OBJECTIVE
CONFIDENCE = 0.95
REQUIRED_TAGS = (c.STATUS, c.BUDGET, c.MAX_EPOCHS)
NUMERIC_TAGS = (c.BUDGET, c.MAX_EPOCHS, c.SEED)
MIN_IMPORTANCE_TRIALS = 8  # below this a random forest over the configs fits noise
MAX_LEVELS = 6  # a numeric factor with more distinct values is binned into quartiles

# the in-memory optuna studies below are scaffolding for the importance evaluator; their
# creation logs would only clutter the report
optuna.logging.set_verbosity(optuna.logging.WARNING)


class ReportError(Exception):
    """A study that cannot be reported on; the message names what is missing."""


def check_experiment(tracking_uri: str, experiment: str) -> None:
    """Fail fast, before a notebook kernel starts, on a study the report cannot read."""
    _search_runs(tracking_uri, experiment)


def load_runs(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per trial: tags, params (dotted keys, numbers where they look like numbers),
    latest metric values, and the per-epoch cost summed (compute_seconds) or typical
    (images_per_sec) over the whole metric history."""
    runs = _latest_instance(_search_runs(tracking_uri, experiment))
    df = pd.DataFrame([_row(run) for run in runs])
    df.attrs["earlier_runs_left_out"] = runs.left_out
    param_keys = sorted({key for run in runs for key in run.data.params})
    for col in [*param_keys, *NUMERIC_TAGS]:
        if col in df:
            df[col] = _numeric_if_possible(df[col])
    seconds = load_history(tracking_uri, df.run_id, "epoch_seconds").groupby("run_id")["value"]
    speed = load_history(tracking_uri, df.run_id, "images_per_sec").groupby("run_id")["value"]
    df["compute_seconds"] = df.run_id.map(seconds.sum()).fillna(0.0)
    # the median, not the last epoch: the first epoch pays for warm-up and compilation
    df["images_per_sec"] = df.run_id.map(speed.median())
    if "n_params" in df:  # a count, though MLflow stores every metric as a float
        df["n_params"] = df["n_params"].round().astype("Int64")
    return df.sort_values(["trial", "run_id"], ignore_index=True)


def load_history(tracking_uri: str, run_ids, metric: str = METRIC) -> pd.DataFrame:
    """Long table (run_id, epoch, value) of one metric's per-epoch history."""
    client = MlflowClient(tracking_uri)
    rows = [(run_id, m.step, m.timestamp, m.value)
            for run_id in run_ids for m in client.get_metric_history(run_id, metric)]
    history = pd.DataFrame(rows, columns=["run_id", "epoch", "timestamp", "value"])
    # a resumed trial may log an epoch twice: the later value is the one training went on from
    history = history.sort_values(["run_id", "epoch", "timestamp"]).drop_duplicates(
        ["run_id", "epoch"], keep="last")
    return history.drop(columns="timestamp").reset_index(drop=True)


def download_checkpoint(tracking_uri: str, run_id: str) -> Path | None:
    """The run's checkpoint as a local file, or None if the run logged none."""
    logged = [a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, "checkpoint")]
    if CHECKPOINT not in logged:
        return None
    return Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=CHECKPOINT, tracking_uri=tracking_uri))


def _search_runs(tracking_uri: str, experiment: str) -> list:
    if tracking_uri.startswith("sqlite:///"):
        # MLflow would silently create an empty database at a mistyped path
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ReportError(f"no MLflow database at {path}")
    client = MlflowClient(tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ReportError(f"no experiment named {experiment!r} at {tracking_uri}")
        runs, token = [], None
        while True:
            page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
            runs += page
            token = page.token
            if not token:
                break
    except MlflowException as e:
        raise ReportError(f"cannot read {tracking_uri}: {str(e).splitlines()[0]}") from None
    # a study's own parent run (the trials are its children) is no trial: only trials carry
    # the trial id
    runs = [r for r in runs if c.TRIAL_ID in r.data.tags]
    if not runs:
        raise ReportError(f"experiment {experiment!r} has no trial runs (tag {c.TRIAL_ID!r})")
    missing = [f"metric {METRIC!r}"] if not any(METRIC in r.data.metrics for r in runs) else []
    missing += [f"tag {t!r}" for t in REQUIRED_TAGS if not any(t in r.data.tags for r in runs)]
    if missing:
        raise ReportError(f"the runs of experiment {experiment!r} lack {', '.join(missing)}")
    return runs


class _Runs(list):
    left_out = 0


def _latest_instance(runs: list) -> _Runs:
    """A study rerun under the same name (or under another storage, into a shared server) is
    another instance: report the latest one alone, never a mix of both."""
    started = {}
    for run in runs:
        key = run.data.tags.get(c.STUDY_ID)
        started[key] = min(started.get(key, run.info.start_time), run.info.start_time)
    latest = max(started, key=lambda k: started[k])
    kept = _Runs(r for r in runs if r.data.tags.get(c.STUDY_ID) == latest)
    kept.left_out = len(runs) - len(kept)
    return kept


def _row(run) -> dict:
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    # the metric `params` is the parameter count: renamed so it cannot be read as a config
    metrics = {("n_params" if k == "params" else k): v for k, v in run.data.metrics.items()}
    # a trial is named by its id: run names say what a trial is, and two may say the same
    trial = run.data.tags.get(c.TRIAL_ID, run.info.run_name)
    return {"run_id": run.info.run_id, "trial": trial, **tags, **run.data.params, **metrics}


def _numeric_if_possible(col: pd.Series) -> pd.Series:
    """MLflow keeps params as strings; a column becomes numeric only if every value parses.
    Integers stay integers where a trial lacks the key (a conditional one): pandas would make
    them floats to hold the gap, and a reader would see depth 4.0."""
    converted = pd.to_numeric(col, errors="coerce")
    if converted.notna().sum() != col.notna().sum():
        return col
    integers = col.dropna().astype(str).str.fullmatch(r"[+-]?\d+").all()
    return converted.astype("Int64") if integers and converted.hasnans else converted


def early_stopped(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs.status == c.EARLY_STOPPED]


def is_ablation(runs: pd.DataFrame) -> bool:
    return "cell" in runs and (runs.get("mode") == "ablation").any()


def searched_factors(runs: pd.DataFrame) -> list[str]:
    """The config keys the study searched or ablated, in the runner's order. The seed is a
    replicate, not a factor, so it is left out even if a study listed it."""
    keys = runs.get("searched", pd.Series(dtype=str)).dropna().str.split(",").explode().str.strip()
    return [k for k in dict.fromkeys(keys) if k in runs and k != "train.seed"]


def study_summary(runs: pd.DataFrame) -> pd.Series:
    """The study at a glance, as one column (so several studies sit side by side)."""
    full = full_budget(runs)
    best = best_trials(runs, k=1)
    return pd.Series({
        "mode": ", ".join(sorted(runs["mode"].dropna().unique())) if "mode" in runs else "",
        "trials": len(runs),
        **{f"status: {s}": n for s, n in _status_counts(runs.status).items()},
        "full-budget trials": len(full),
        "runs of earlier studies of this name (left out)": runs.attrs.get(
            "earlier_runs_left_out", 0),
        "max epochs": ", ".join(str(int(e)) for e in sorted(runs.max_epochs.dropna().unique())),
        "compute hours (sum of epoch_seconds)": runs.compute_seconds.sum() / 3600,
        "best trial (by val_acc)": best.trial.iloc[0] if len(best) else "",
        "best val_acc": best[METRIC].iloc[0] if len(best) else np.nan,
        "its test_acc": best["test_acc"].iloc[0] if len(best) and "test_acc" in best else np.nan,
    }, dtype=object)


def _status_counts(status: pd.Series) -> pd.Series:
    """Every known status, even at zero, so that studies line up row for row."""
    counts = status.value_counts()
    return counts.reindex([*STATUSES, *sorted(set(counts.index) - set(STATUSES))], fill_value=0)


def budgets(runs: pd.DataFrame) -> pd.DataFrame:
    """How many trials stopped at each budget (epochs completed), per status."""
    return pd.crosstab(runs.budget, runs.status, margins=True, margins_name="all")


def best_trials(runs: pd.DataFrame, factors: list[str] = (), k: int = 5) -> pd.DataFrame:
    """The k best full-budget trials of the longest budget, ranked by their configuration's
    mean val_acc over its trials (contract.best_first), shown when a configuration ran more
    than once; ties go to the trial name so reruns agree."""
    ranked = c.best_first(runs.sort_values("trial"), factors)
    repeated = ["config_val_acc", "config_trials"] if (ranked.config_trials > 1).any() else []
    cols = ["trial", *factors, *repeated, METRIC, "test_acc", "n_params", "run_id"]
    return ranked[[col for col in cols if col in ranked]].head(k).reset_index(drop=True)


def configuration_seeds(runs: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """Per configuration a search trained with several seeds (search.repeats): its seeds, the
    val_acc of each, their mean and standard deviation, best mean first. Empty when every
    configuration ran once."""
    full = c.rankable(runs).dropna(subset=[METRIC])
    if not factors or full.empty or "train.seed" not in full or full.groupby(
            factors, dropna=False).size().max() < 2:
        return pd.DataFrame()
    full = full.sort_values("train.seed")
    table = full.groupby(factors, dropna=False).agg(
        seeds=("train.seed", lambda s: ", ".join(str(int(v)) for v in s)),
        val_acc_by_seed=(METRIC, lambda s: ", ".join(f"{v:.4f}" for v in s)),
        n=(METRIC, "size"), mean=(METRIC, "mean"), sd=(METRIC, "std"))
    return table.sort_values("mean", ascending=False)


def summarize(values) -> pd.DataFrame:
    """n, mean and 95% t-interval per group of a grouped Series: with a handful of seeds
    the normal interval would be too narrow."""
    table = values.agg(["count", "mean", "sem"]).rename(columns={"count": "n"})
    half = stats.t.ppf((1 + CONFIDENCE) / 2, table.n - 1) * table["sem"]
    return table.assign(ci_low=table["mean"] - half, ci_high=table["mean"] + half).drop(
        columns="sem")


def factor_levels(values: pd.Series) -> pd.Series:
    """The value itself, or its quartile bin for a finely searched number (like train.lr),
    so that every level holds several trials."""
    if not pd.api.types.is_numeric_dtype(values) or values.nunique() <= MAX_LEVELS:
        return values
    edges = values.quantile(np.linspace(0, 1, 5)).unique()
    labels = [f"{low:.3g} to {high:.3g}" for low, high in zip(edges[:-1], edges[1:])]
    return pd.cut(values, edges, labels=labels, include_lowest=True)


def factor_table(runs: pd.DataFrame, factor: str) -> pd.DataFrame:
    """Final val_acc per level of one factor over full-budget trials. Early-stopped trials are
    only counted: their truncated accuracies must never mix with final ones."""
    levels = factor_levels(runs[factor]).rename("value")
    full, stopped = full_budget(runs), early_stopped(runs)
    table = summarize(full[METRIC].groupby(levels[full.index], observed=True))
    table["best"] = full[METRIC].groupby(levels[full.index], observed=True).max()
    if "test_acc" in full:
        table["test_acc_mean"] = full["test_acc"].groupby(levels[full.index], observed=True).mean()
    stopped_n = stopped[METRIC].groupby(levels[stopped.index], observed=True).size()
    table = table.join(stopped_n.rename("n_early_stopped"), how="outer")
    table[["n", "n_early_stopped"]] = table[["n", "n_early_stopped"]].fillna(0).astype(int)
    return table.reset_index().assign(factor=factor).set_index(["factor", "value"])


def factor_tables(runs: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    return pd.concat([factor_table(runs, f) for f in factors]) if factors else pd.DataFrame()


def budget_ladder(runs: pd.DataFrame) -> list[int]:
    """The epoch budgets the study's full-budget trials ran: one, or an ablation's ladder."""
    return sorted(int(b) for b in full_budget(runs)[c.MAX_EPOCHS].dropna().unique())


def at_budget(runs: pd.DataFrame, epochs: int) -> pd.DataFrame:
    """The trials configured for `epochs`: one rung of a ladder, never mixed with another."""
    return runs[runs[c.MAX_EPOCHS] == epochs]


def ablation_effects(runs: pd.DataFrame) -> pd.DataFrame:
    """Per ablation cell: val_acc over seeds (mean, t-interval), its difference to the baseline
    cell with t- and bootstrap intervals, p-value and probability of improvement, and a plain
    verdict. `runs` must be of one budget (`at_budget`)."""
    full = full_budget(runs).dropna(subset=["cell", METRIC])
    cells = summarize(full.groupby("cell")[METRIC])
    if "test_acc" in full:
        cells["test_acc_mean"] = full.groupby("cell")["test_acc"].mean()
    base = full[full.cell == BASELINE]
    versus = pd.DataFrame([_versus_baseline(full[full.cell == c], base) for c in cells.index],
                          index=cells.index)
    # every column, even where no cell could be tested (one seed each): the notebook reads them
    versus = versus.reindex(columns=["test", "n_compared", "diff", "diff_low", "diff_high",
                                     "p_value", "boot_low", "boot_high", "p_improve", "diff_sd"])
    table = cells.join(versus)
    if "n_compared" in table:  # a count, missing on the baseline row
        table["n_compared"] = table["n_compared"].astype("Int64")
    table["verdict"] = [_verdict(cell, row) for cell, row in table.iterrows()]
    order = sorted(table.index, key=lambda c: (c != BASELINE, c))
    return table.loc[order]


def _versus_baseline(cell: pd.DataFrame, base: pd.DataFrame) -> dict:
    """Paired t-test over the seeds both cells ran (the same seed shares data order and init,
    so pairing removes that noise); Welch's t-test when seeds do not pair up. Beside it, a
    percentile bootstrap interval of the same difference (resampling seed pairs, or each cell's
    seeds) and the probability of improvement: the share of seed pairs (or of all pairs of one
    seed of each) where the cell beats the baseline, a tie counting half (Bouthillier et al.,
    2021). With 3 seeds the bootstrap has few distinct resamples: it is read beside the t
    interval, not instead of it."""
    if len(base) == 0 or cell.cell.iloc[0] == BASELINE:
        return {}
    pairs = cell.dropna(subset=["train.seed"]).merge(
        base.dropna(subset=["train.seed"]), on="train.seed", suffixes=("", "_base"))
    if len(pairs) >= 2:
        a, b = pairs[METRIC].to_numpy(), pairs[f"{METRIC}_base"].to_numpy()
        result, n, test = stats.ttest_rel(a, b), len(pairs), "paired t"
        boot = _bootstrap((a - b,), np.mean)
        wins, sd = np.sign(a - b), float(np.std(a - b, ddof=1))
    elif len(cell) >= 2 and len(base) >= 2:
        a, b = cell[METRIC].to_numpy(), base[METRIC].to_numpy()
        result, n, test = stats.ttest_ind(a, b, equal_var=False), min(len(a), len(b)), "Welch t"
        boot = _bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis))
        wins, sd = np.sign(a[:, None] - b[None, :]), np.nan
    else:
        return {"test": "none", "n_compared": min(len(cell), len(base)),
                "diff": cell[METRIC].mean() - base[METRIC].mean()}
    ci = result.confidence_interval(CONFIDENCE)
    return {"test": test, "n_compared": n, "diff": a.mean() - b.mean(),
            "diff_low": ci.low, "diff_high": ci.high, "p_value": result.pvalue,
            "boot_low": boot.low, "boot_high": boot.high,
            "p_improve": float(np.mean((wins + 1) / 2)), "diff_sd": sd}


def _bootstrap(samples: tuple, statistic, paired: bool = False):
    """scipy's percentile bootstrap at CONFIDENCE, seeded so a rebuilt report agrees. The
    percentile method, not BCa: BCa's jackknife is undefined on a few identical values."""
    with warnings.catch_warnings():  # all-equal samples: a zero-width interval is the answer
        warnings.simplefilter("ignore")
        return stats.bootstrap(samples, statistic, paired=paired, vectorized=not paired,
                               confidence_level=CONFIDENCE, method="percentile",
                               n_resamples=9999, random_state=0).confidence_interval


def _verdict(cell: str, row: pd.Series) -> str:
    if cell == BASELINE:
        return "baseline"
    if pd.isna(row.get("n_compared")):
        return "no baseline cell to compare with"
    if row.n_compared < 3:
        return f"too few seeds to tell (n={int(row.n_compared)} < 3)"
    if not row.diff_low > 0 and not row.diff_high < 0:
        return "too few seeds to tell: the interval spans zero"
    return "raises val_acc" if row["diff"] > 0 else "lowers val_acc"


def budget_effects(runs: pd.DataFrame) -> pd.DataFrame:
    """`ablation_effects` at every budget of a ladder, one table indexed by (cell, budget)."""
    table = pd.concat([ablation_effects(at_budget(runs, b)).assign(budget=b)
                       for b in budget_ladder(runs)]).reset_index(names="cell")
    table = table.sort_values(["cell", "budget"], key=lambda col: col.map(
        lambda v: (v != BASELINE, v) if col.name == "cell" else v))
    return table.set_index(["cell", "budget"])


def effect_holds(effects: pd.DataFrame) -> pd.DataFrame:
    """Per cell of a ladder (`budget_effects`): does its effect on val_acc keep its sign and its
    size as training lengthens? The sign holds when the mean difference has one sign at every
    budget; the size holds when every shorter budget's difference lies inside the longest
    budget's 95% interval. An effect whose interval spans zero at the longest budget is not
    claimed either way."""
    rows = []
    for cell, ladder in effects.drop(index=BASELINE, level="cell", errors="ignore").groupby(
            level="cell", sort=False):
        ladder = ladder.droplevel("cell").dropna(subset=["diff"]).sort_index()
        if ladder.empty:
            continue
        longest = ladder.iloc[-1]
        # "points at epochs": e.g. "-3.00 at 1, +2.00 at 4"
        diffs = ", ".join(f"{100 * d:+.2f} at {b}" for b, d in ladder["diff"].items())
        signs = set(np.sign(ladder["diff"]))
        resolved = longest.diff_low > 0 or longest.diff_high < 0
        size = bool(ladder["diff"].between(longest.diff_low, longest.diff_high).all())
        if len(signs) > 1:
            verdict = "does not hold: the sign flips"
        elif not resolved:
            verdict = f"unresolved at {ladder.index[-1]} epochs: the interval spans zero"
        elif size:
            verdict = "holds: same sign, and every budget's effect inside the longest one's CI"
        else:
            verdict = "sign holds, size does not: the effect changes with the budget"
        rows.append({"cell": cell, "factor": ",".join(k.split("=")[0] for k in cell.split(",")),
                     "budgets": len(ladder), "diff_by_budget": diffs,
                     "sign_holds": len(signs) == 1, "size_holds": size,
                     "resolved_at_longest": bool(resolved), "verdict": verdict})
    return pd.DataFrame(rows)


def factor_holds(holds: pd.DataFrame) -> pd.Series:
    """One line per factor: whether every one of its cells' effects holds across the ladder."""
    lines = {}
    for factor, cells in holds.groupby("factor", sort=False):
        held = cells[cells.verdict.str.startswith("holds")]
        if len(held) == len(cells):
            lines[factor] = f"every effect holds as training lengthens ({len(cells)} levels)"
        else:
            not_held = "; ".join(f"{r.cell.split('=', 1)[-1]}: {r.verdict}"
                                 for r in cells.itertuples() if r.cell not in set(held.cell))
            lines[factor] = f"{len(held)} of {len(cells)} effects hold; {not_held}"
    return pd.Series(lines, name="across the budget ladder", dtype=object)


def min_effect(runs: pd.DataFrame) -> float | None:
    """The ablation's `min_effect` as its runs recorded it (None for runs that predate it)."""
    values = runs.get(c.MIN_EFFECT, pd.Series(dtype=object)).dropna()
    return float(values.iloc[0]) if len(values) else None


def seeds_needed(effects: pd.DataFrame, min_effect: float, power: float = 0.8) -> dict:
    """Seeds per cell a paired t-test at 95% needs to detect a difference of `min_effect` with
    `power`, at the spread of paired differences this ablation observed (their standard
    deviation pooled over cells): the noncentral-t power of a two-sided test."""
    sd = effects["diff_sd"].dropna() if "diff_sd" in effects else pd.Series(dtype=float)
    if sd.empty:
        return {"sd": np.nan, "n": None}
    pooled = float(np.sqrt((sd ** 2).mean()))
    if pooled == 0:
        return {"sd": 0.0, "n": 2}
    for n in range(2, 10001):
        crit = stats.t.ppf((1 + CONFIDENCE) / 2, n - 1)
        shift = min_effect / pooled * np.sqrt(n)
        if stats.nct.sf(crit, n - 1, shift) + stats.nct.cdf(-crit, n - 1, shift) >= power:
            return {"sd": pooled, "n": n}
    return {"sd": pooled, "n": None}


def expected_best(runs: pd.DataFrame) -> pd.DataFrame:
    """Expected best val_acc of n trials drawn from this search's full-budget trials, n = 1..N,
    with its standard deviation (Dodge et al., 2019): P(the best of n is the i-th smallest of N)
    = (i/N)^n - ((i-1)/N)^n. A curve still rising at N says more trials would likely help."""
    values = np.sort(full_budget(runs)[METRIC].dropna().to_numpy(dtype=float))
    total, rank = len(values), np.arange(1, len(values) + 1)
    rows = []
    for n in range(1, total + 1):
        weight = (rank / total) ** n - ((rank - 1) / total) ** n
        mean = float(weight @ values)
        rows.append({"trials": n, "expected_best": mean,
                     "sd": float(np.sqrt(weight @ (values - mean) ** 2))})
    return pd.DataFrame(rows, columns=["trials", "expected_best", "sd"])


def rung_agreement(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """How well val_acc at each ASHA rung ranked the trials that went on to the full budget
    against their final val_acc: Spearman's rho with a 95% bootstrap interval over those
    trials, and a warning where the rung's ranking was a poor guide (rho below 0.5, or an
    interval reaching zero). Empty for a study without ASHA rungs."""
    rungs = runs.get(c.RUNGS, pd.Series(dtype=object)).dropna()
    full = full_budget(runs).dropna(subset=[METRIC]).set_index("run_id")
    rows = []
    for rung in sorted({int(r) for text in rungs for r in str(text).split(",") if r}):
        at = history[history.epoch == rung].set_index("run_id")["value"]
        x = at.reindex(full.index).to_numpy(dtype=float)
        y = full[METRIC].to_numpy(dtype=float)
        keep = np.isfinite(x)
        x, y, n = x[keep], y[keep], int(keep.sum())
        row = {"rung (epoch)": rung, "trials": n, "rho": np.nan, "rho_low": np.nan,
               "rho_high": np.nan}
        if n >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            # a resample that repeats one trial throughout has no ranking: no agreement (0)
            ci = _bootstrap((x, y), lambda u, v: np.nan_to_num(stats.spearmanr(u, v).statistic),
                            paired=True)
            row.update(rho=stats.spearmanr(x, y).statistic, rho_low=ci.low, rho_high=ci.high)
        row["warning"] = _rung_warning(row)
        rows.append(row)
    return pd.DataFrame(rows, columns=["rung (epoch)", "trials", "rho", "rho_low", "rho_high",
                                       "warning"])


def _rung_warning(row: dict) -> str:
    if np.isnan(row["rho"]):
        return f"too few trials reached the full budget to tell (n={row['trials']})"
    if row["rho"] < 0.5 or not row["rho_low"] > 0:
        return (f"WARNING: the ranking at epoch {row['rung (epoch)']} predicted the final one "
                "poorly; ASHA may have stopped trials that would have won")
    return ""


def learning_curves(history: pd.DataFrame, group_of: pd.Series) -> pd.DataFrame:
    """Mean val_acc per epoch and group (one trial, or the seeds of one cell), with t-interval.
    group_of maps run_id to its group; runs it does not name are left out."""
    grouped = history.assign(group=history.run_id.map(group_of)).dropna(subset=["group"])
    return summarize(grouped.groupby(["group", "epoch"])["value"]).reset_index()


def pareto_front(runs: pd.DataFrame, cost: str = "n_params") -> pd.DataFrame:
    """Full-budget trials that no other trial beats on both val_acc and cost: walking up the
    cost, a trial is on the front if it is more accurate than every cheaper one."""
    full = full_budget(runs).dropna(subset=[cost, METRIC]).sort_values(
        [cost, METRIC, "trial"], ascending=[True, False, True])
    better = full[METRIC] > full[METRIC].cummax().shift(fill_value=-np.inf)
    cols = [c for c in ["trial", cost, METRIC, "test_acc", "run_id"] if c in full]
    return full.loc[better, cols].reset_index(drop=True)


def importances(runs: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """fANOVA importance of each factor for val_acc over the full-budget trials: the share of
    val_acc's variance a random forest attributes to it. Empty when there are fewer than
    MIN_IMPORTANCE_TRIALS trials or val_acc never varied: the notebook says so instead."""
    full = full_budget(runs).dropna(subset=[METRIC])
    factors = [f for f in factors if full[f].notna().all()]  # fANOVA needs every key set
    if len(full) < MIN_IMPORTANCE_TRIALS or not factors or full[METRIC].nunique() < 2:
        return pd.DataFrame(columns=["factor", "importance"])
    distributions = {f: _distribution(full[f]) for f in factors}
    study = optuna.create_study(direction="maximize")
    study.add_trials([optuna.trial.create_trial(
        params={f: _plain(row[f], distributions[f]) for f in factors},
        distributions=distributions, value=row[METRIC]) for _, row in full.iterrows()])
    found = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    table = pd.DataFrame(list(found.items()), columns=["factor", "importance"])
    return table.sort_values(["importance", "factor"], ascending=[False, True], ignore_index=True)


def _distribution(values: pd.Series):
    if not pd.api.types.is_numeric_dtype(values):
        return optuna.distributions.CategoricalDistribution(sorted(values.astype(str).unique()))
    if (values == values.round()).all():
        return optuna.distributions.IntDistribution(int(values.min()), int(values.max()))
    return optuna.distributions.FloatDistribution(float(values.min()), float(values.max()))


def _plain(value, distribution):
    """Optuna checks values against their distribution with plain Python types."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return str(value)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return int(value)
    return float(value)
