"""The figures of a study report. Means and intervals are drawn from the analysis tables, never
recomputed, so a figure always shows the numbers of the table beside it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from reports.analysis import BASELINE, METRIC, early_stopped, factor_levels, full_budget

STOPPED = dict(marker="X", color="0.55")  # early-stopped trials never share a final's look


def _intervals(ax, positions, table: pd.DataFrame, low="ci_low", high="ci_high", mean="mean",
               horizontal=False, **style):
    """Mean markers with 95% interval bars; a one-trial group gets the marker alone."""
    err = np.vstack([table[mean] - table[low], table[high] - table[mean]])
    err = np.nan_to_num(err.astype(float))
    style = dict(fmt="D", color="black", capsize=4, zorder=3) | style
    if horizontal:
        return ax.errorbar(table[mean], positions, xerr=err, **style)
    return ax.errorbar(positions, table[mean], yerr=err, **style)


def _label(value) -> str:
    """A level as a tick label: searched floats like 0.0018535918876696797 read as 0.00185."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _tilt_long_labels(ax, labels: list[str]):
    if max(map(len, labels), default=0) > 8:  # e.g. binned learning rates, crossed cells
        ax.tick_params(axis="x", labelrotation=20)


def factor_panels(runs: pd.DataFrame, factors: list[str], tables: pd.DataFrame) -> plt.Figure:
    """One row per factor: final val_acc of full-budget trials with the table's mean and interval
    (left), and apart from them the truncated val_acc of early-stopped trials (right)."""
    fig, axes = plt.subplots(len(factors), 2, figsize=(11, 3.2 * len(factors)), sharey=True,
                             squeeze=False)
    full, stopped = full_budget(runs), early_stopped(runs)
    for (left, right), factor in zip(axes, factors):
        levels = factor_levels(runs[factor]).map(_label)
        table = tables.loc[factor]
        order = [_label(v) for v in table.index]
        sns.stripplot(x=levels[full.index], y=full[METRIC], order=order, ax=left, alpha=0.6)
        _intervals(left, np.arange(len(order)), table, label="mean, 95% CI")
        left.set(xlabel=factor, ylabel="final val_acc", title="full budget")
        left.legend(loc="lower right", fontsize=8)
        if len(stopped):
            sns.stripplot(x=levels[stopped.index], y=stopped[METRIC], order=order, ax=right,
                          **STOPPED)
        else:
            right.text(0.5, 0.5, "no early-stopped trials", ha="center", transform=right.transAxes)
        right.set(xlabel=factor, ylabel="val_acc at stop",
                  title="early-stopped (truncated: not comparable)")
        for ax in (left, right):  # every level on both panels, even one with no trial there
            ax.set_xlim(-0.5, len(order) - 0.5)
            _tilt_long_labels(ax, order)
    fig.tight_layout()
    return fig


def ablation_forest(runs: pd.DataFrame, effects: pd.DataFrame) -> plt.Figure:
    """Each cell's seeds and mean with interval (left); its difference to the baseline with
    interval (right), where a bar crossing zero means no clear effect. An ablation without
    factors has its baseline alone: the left panel only."""
    cells = effects.index.tolist()
    y = np.arange(len(cells))
    compared = len(cells) > 1
    fig, axes = plt.subplots(1, 1 + compared, sharey=True, squeeze=False,
                             figsize=(11 if compared else 6, 1.5 + 0.5 * len(cells)))
    left = axes[0, 0]
    full = full_budget(runs)
    sns.stripplot(data=full[full.cell.isin(cells)], x=METRIC, y="cell", order=cells, ax=left,
                  alpha=0.5)
    _intervals(left, y, effects, horizontal=True)
    # each cell's band, top to bottom: one row alone would otherwise shrink to the seeds' jitter
    left.set(xlabel="final val_acc: seeds, mean and 95% CI", ylabel="",
             ylim=(len(cells) - 0.5, -0.5))
    if compared:
        right = axes[0, 1]
        if "diff" in effects:
            _intervals(right, y, effects, low="diff_low", high="diff_high", mean="diff",
                       horizontal=True)
        right.axvline(0, color="0.4", ls="--")
        right.set(xlabel="difference to baseline (95% CI)")
    fig.tight_layout()
    return fig


def ladder_effects(effects: pd.DataFrame) -> plt.Figure:
    """Each cell's difference to the baseline against the training budget, with its 95%
    t-interval: an effect that holds keeps its side of zero as the budget grows."""
    table = effects.drop(index=BASELINE, level="cell", errors="ignore").reset_index()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    budgets, cells = sorted(table.budget.unique()), table.cell.unique()
    for i, (cell, rows) in enumerate(table.groupby("cell", sort=False)):
        # cells side by side at each budget, so that their intervals do not hide each other
        x = np.array([budgets.index(b) for b in rows.budget]) + (i - (len(cells) - 1) / 2) * 0.06
        ax.errorbar(x, 100 * rows["diff"], capsize=4, marker="o", label=cell,
                    yerr=np.nan_to_num(100 * np.vstack([rows["diff"] - rows.diff_low,
                                                        rows.diff_high - rows["diff"]])))
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
    ax.set(xlabel="budget (epochs, each a whole training)",
           ylabel="val_acc difference to baseline (points)", title="effects across the budget "
           "ladder: mean over seeds, 95% CI")
    ax.legend(fontsize=8, loc="best")
    return fig


def expected_best(table: pd.DataFrame) -> plt.Figure:
    """Expected best val_acc against the number of trials, +- one standard deviation."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(table.trials, table.expected_best, marker="o", color="black")
    ax.fill_between(table.trials, table.expected_best - table.sd,
                    table.expected_best + table.sd, alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trials", ylabel="expected best val_acc",
           title="expected best of n full-budget trials (Dodge et al., 2019), +- 1 sd")
    return fig


def curves(table: pd.DataFrame, title: str, order: list[str] | None = None) -> plt.Figure:
    """val_acc per epoch for each group (legend in `order`), with the interval over its seeds
    as a band."""
    groups = order or list(dict.fromkeys(table.group))
    palette = sns.color_palette(n_colors=len(groups))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sns.lineplot(data=table, x="epoch", y="mean", hue="group", hue_order=groups,
                 palette=palette, marker="o", ax=ax)
    for group, color in zip(groups, palette):
        g = table[table.group == group]
        ax.fill_between(g.epoch, g.ci_low, g.ci_high, color=color, alpha=0.2, linewidth=0)
    ax.set(ylabel="val_acc", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return fig


def cost_panels(runs: pd.DataFrame, front: pd.DataFrame, hue: str | None) -> plt.Figure:
    """Final val_acc against parameter count, with the Pareto front, and against throughput."""
    full = full_budget(runs)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    sns.scatterplot(data=full, x="n_params", y=METRIC, hue=hue, ax=a)
    a.plot(front.n_params, front[METRIC], drawstyle="steps-post", color="black", lw=1,
           label="Pareto front")
    a.legend(title=hue, fontsize=8)
    a.set(xlabel="parameters", ylabel="final val_acc")
    sns.scatterplot(data=full, x="images_per_sec", y=METRIC, hue=hue, ax=b, legend=False)
    b.set(xlabel="training images/s (median over epochs)")
    fig.tight_layout()
    return fig


def importance_bars(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.45 * len(table)))
    sns.barplot(data=table, x="importance", y="factor", ax=ax, color="C0")
    ax.set(xlabel="fANOVA importance for val_acc (share of variance)", ylabel="")
    return fig


def attention_grid(images, maps, titles: list[str]) -> plt.Figure:
    """Rows: test images; columns: the image, then each layer's CLS attention (mean over heads)
    laid over it. images: uint8 [B, 3, H, W]; maps: [depth, B, heads, grid, grid]."""
    per_layer = maps.mean(dim=2)
    depth, n = per_layer.shape[:2]
    size = images.shape[-1]
    fig, axes = plt.subplots(n, depth + 1, figsize=(1.8 * (depth + 1), 1.9 * n), squeeze=False)
    for i, row in enumerate(axes):
        image = images[i].permute(1, 2, 0).numpy()
        row[0].imshow(image)
        row[0].set_title(titles[i], fontsize=8)
        for layer, ax in enumerate(row[1:]):
            ax.imshow(image)
            ax.imshow(per_layer[layer, i].numpy(), cmap="inferno", alpha=0.6,
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="bilinear")
            if i == 0:
                ax.set_title(f"layer {layer + 1}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def side_by_side(table: pd.DataFrame, x: str, hue: str, xlabel: str) -> plt.Figure:
    """Means with intervals for each level of x, one dodged series per hue (study)."""
    labels = table[x].map(_label)
    numbers = pd.to_numeric(table[x], errors="coerce")  # studies may list levels differently
    ordered = labels[numbers.sort_values(kind="stable").index] if numbers.notna().all() else labels
    levels = list(dict.fromkeys(ordered))
    series = list(dict.fromkeys(table[hue]))
    width = 0.6 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(levels)), 4))
    for i, (name, color) in enumerate(zip(series, sns.color_palette(n_colors=len(series)))):
        mine = table[hue] == name
        shift = (i - (len(series) - 1) / 2) * width
        _intervals(ax, [levels.index(v) + shift for v in labels[mine]], table[mine],
                   color=color, label=name)
    ax.set_xticks(range(len(levels)), levels)
    ax.set_xlim(-0.5, len(levels) - 0.5)
    _tilt_long_labels(ax, levels)
    ax.set(xlabel=xlabel, ylabel="final val_acc (mean, 95% CI)")
    ax.legend(fontsize=8)
    return fig
