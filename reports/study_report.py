# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Study report
# What each searched factor did to accuracy, and how sure we can be. Rebuilt from the study's
# MLflow runs by `python -m reports.build --experiment NAME`; edit this file, not the notebook.
#
# Accuracy is the final `val_acc` of trials that ran their full budget. `test_acc` is shown
# beside it, never used to choose. Intervals are 95% t-intervals.

# %% tags=["parameters"]
EXPERIMENT = "smoke"
TRACKING_URI = "sqlite:///runs/smoke/mlflow.db"  # the study runner's default store
OUT = "reports/out/smoke"

# %%
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from reports import analysis, figures
from reports.outputs import save_figure, save_table

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.width", 140)

all_runs = analysis.load_runs(TRACKING_URI, EXPERIMENT)
ladder = analysis.budget_ladder(all_runs)
# a budget ladder trains every cell at several budgets: one budget's final accuracies are
# never mixed with another's, so every section but the ladder's own reads the longest one
runs = analysis.at_budget(all_runs, ladder[-1]) if len(ladder) > 1 else all_runs
full = analysis.full_budget(runs)
factors = analysis.searched_factors(runs)
is_ablation = analysis.is_ablation(runs)
# a study still running may have no final accuracy yet: the sections below then say so
NO_FINAL = "No trial has run its full budget yet: no final accuracies to show."
display(Markdown(f"**Study `{EXPERIMENT}`** at `{TRACKING_URI}`: {len(all_runs)} trials, "
                 f"{len(analysis.full_budget(all_runs))} at full budget; searched: "
                 f"{', '.join(factors) or 'nothing'}."))
if len(ladder) > 1:
    display(Markdown(f"A budget ladder of {ladder} epochs: sections 2, 3 and 6-9 show the "
                     f"longest, {ladder[-1]} epochs ({len(runs)} trials); section 4 compares "
                     "the budgets."))

# %% [markdown]
# ## 1. The study at a glance

# %%
display(save_table(analysis.study_summary(all_runs).rename(EXPERIMENT), OUT, "summary"))
display(Markdown("Trials by budget (epochs completed) and status:"))
display(save_table(analysis.budgets(all_runs), OUT, "budgets"))
best = analysis.best_trials(runs, factors)
display(Markdown("Best configurations, by final val_acc among full-budget trials (by the mean "
                 "over its trials where a configuration ran several times):"))
display(save_table(best, OUT, "best"))
seed_table = analysis.configuration_seeds(runs, factors)
if not is_ablation and len(seed_table):
    display(Markdown("Each configuration's seeds (`search.repeats`): the searcher was told "
                     "their mean."))
    display(save_table(seed_table, OUT, "seeds"))

# %% [markdown]
# ## 2. Accuracy against each searched factor
# Left: final accuracies of full-budget trials, with the mean and its interval. Right:
# early-stopped trials, whose accuracy at the stop is truncated and so never averaged in.
# For a search, a level's mean is over all the other factors' values it was tried with.

# %%
if not factors:
    print("The runs carry no `searched` tag naming a factor: nothing to compare.")
elif full.empty:
    print(NO_FINAL)
else:
    tables = save_table(analysis.factor_tables(runs, factors), OUT, "factors")
    display(tables)
    display(save_figure(figures.factor_panels(runs, factors, tables), OUT, "factors"))

# %% [markdown]
# ## 3. Ablation effects
# Each cell's val_acc over seeds, and its difference to the baseline cell: a paired t-test
# over the seeds both ran (Welch's t-test when seeds do not pair up), a percentile bootstrap
# interval of the same difference, and the probability of improvement: the share of seeds on
# which the cell beat the baseline. Last, how many seeds would resolve the smallest difference
# the study cares about (`ablation.min_effect`) at the spread these seeds showed.

# %%
if not is_ablation:
    print("Not an ablation study: no cells to compare.")
elif full.empty:
    print(NO_FINAL)
else:
    effects = save_table(analysis.ablation_effects(runs), OUT, "ablation")
    display(effects)
    for cell, row in effects.drop(index=analysis.BASELINE, errors="ignore").iterrows():
        if pd.isna(row.get("diff_low")):
            print(f"{cell}: {row.verdict}")
            continue
        print(f"{cell}: {100 * row['diff']:+.2f} points of val_acc vs baseline, 95% CI "
              f"[{100 * row.diff_low:+.2f}, {100 * row.diff_high:+.2f}] ({row.test}, "
              f"p={row.p_value:.3f}), bootstrap [{100 * row.boot_low:+.2f}, "
              f"{100 * row.boot_high:+.2f}], P(improvement) {row.p_improve:.2f} "
              f"(n={int(row.n_compared)}): {row.verdict}")
    display(save_figure(figures.ablation_forest(runs, effects), OUT, "ablation"))
    min_effect = analysis.min_effect(runs)
    need = analysis.seeds_needed(effects, min_effect or 0)
    seeds = runs["train.seed"].nunique()
    if min_effect is None:
        print("Seeds needed: the runs record no ablation.min_effect to size the study for.")
    elif need["n"] is None:
        print(f"Seeds needed: no paired differences to measure the spread with (seeds: {seeds}).")
    else:
        print(f"Seeds needed: to resolve a difference of {100 * min_effect:.2f} points of val_acc "
              f"(ablation.min_effect) at the observed spread of paired differences (sd "
              f"{100 * need['sd']:.2f} points, pooled over cells), a paired t-test at 95% with "
              f"80% power needs {need['n']} seeds per cell; this study ran {seeds}.")

# %% [markdown]
# ## 4. Do the effects hold as training lengthens?
# With a budget ladder (`ablation.budgets`), every cell trained at several budgets, each a whole
# training. Each effect is drawn against the budget with its 95% interval; an effect holds when
# its sign is the same at every budget and every shorter budget's difference lies inside the
# longest budget's interval.

# %%
if not is_ablation or len(ladder) < 2:
    print("No budget ladder: every trial had the same budget.")
else:
    by_budget = analysis.budget_effects(all_runs)
    display(save_table(by_budget, OUT, "ladder")[["n", "mean", "diff", "diff_low", "diff_high",
                                                  "p_improve", "verdict"]])
    display(save_figure(figures.ladder_effects(by_budget), OUT, "ladder"))
    holds = analysis.effect_holds(by_budget)
    display(save_table(holds, OUT, "ladder_holds"))
    for factor, line in save_table(analysis.factor_holds(holds), OUT, "ladder_factors")[
            "across the budget ladder"].items():
        print(f"{factor}: {line}")

# %% [markdown]
# ## 5. Would more trials help, and did ASHA's rungs rank well?
# For a search: the expected best val_acc of n trials drawn from this study's full-budget
# trials (Dodge et al., 2019); a curve still rising at the last trial says more would likely
# help. With ASHA, the survivors are no random draw, so the curve is optimistic. Then, for each
# ASHA rung, Spearman's rho between the rung's val_acc and the final val_acc of the trials that
# reached the full budget, with a 95% bootstrap interval over those trials.

# %%
if is_ablation:
    print("An ablation: every cell ran; no search to extend.")
elif full.empty:
    print(NO_FINAL)
else:
    curve = save_table(analysis.expected_best(runs), OUT, "expected_best")
    display(save_figure(figures.expected_best(curve), OUT, "expected_best"))
    half = curve.iloc[(len(curve) - 1) // 2]
    last = curve.iloc[-1]
    print(f"Expected best val_acc: {last.expected_best:.4f} with {int(last.trials)} trials, "
          f"{half.expected_best:.4f} with {int(half.trials)}: the last doubling gained "
          f"{100 * (last.expected_best - half.expected_best):.2f} points.")
    rungs = save_table(analysis.rung_agreement(
        runs, analysis.load_history(TRACKING_URI, full.run_id)), OUT, "rungs")
    if rungs.empty:
        print("No ASHA rungs: every trial ran its full budget.")
    else:
        display(rungs)
        for row in rungs.itertuples():
            if row.warning:
                print(row.warning)

# %% [markdown]
# ## 6. Learning curves
# val_acc per epoch of the best trials, and of each ablation cell averaged over its seeds.

# %%
if full.empty:
    print(NO_FINAL)
else:
    history = analysis.load_history(TRACKING_URI, full.run_id)
    top = best.set_index("run_id")
    labels = top.trial + top[analysis.METRIC].map(" ({:.3f})".format)
    display(save_figure(figures.curves(analysis.learning_curves(history, labels),
                                       "best trials", order=labels.tolist()), OUT, "curves_best"))
    if is_ablation:
        cell_curves = analysis.learning_curves(history, full.set_index("run_id").cell)
        save_table(cell_curves, OUT, "curves_cells")
        display(save_figure(figures.curves(cell_curves, "ablation cells: mean over seeds, 95% CI"),
                            OUT, "curves_cells"))

# %% [markdown]
# ## 7. Accuracy against cost
# The Pareto front holds the trials no other trial beats on both accuracy and parameter count.

# %%
if full.empty:
    print(NO_FINAL)
elif "n_params" not in full or full.n_params.isna().all():
    print("No trial logged its parameter count (metric `params`).")
else:
    front = save_table(analysis.pareto_front(runs), OUT, "pareto")
    display(front)
    display(save_figure(figures.cost_panels(runs, front, factors[0] if factors else None),
                        OUT, "cost"))

# %% [markdown]
# ## 8. Which factors mattered
# fANOVA (optuna, seed 0) over the full-budget trials: the share of val_acc's variance a
# random forest attributes to each factor. It ranks factors; it says nothing about direction.

# %%
importance = save_table(analysis.importances(runs, factors), OUT, "importance")
if len(importance):
    display(importance)
    display(save_figure(figures.importance_bars(importance), OUT, "importance"))
else:
    print(f"Too few trials to rank factors: {len(full)} full-budget trials, where a forest "
          f"that does not fit noise needs at least {analysis.MIN_IMPORTANCE_TRIALS} whose "
          "val_acc varies.")

# %% [markdown]
# ## 9. Where the best model looks
# CLS-token attention (mean over heads) of the best trial's checkpoint, layer by layer, over the
# first test images; titles read `true -> predicted`.

# %%
if best.empty:
    print(NO_FINAL)
elif (checkpoint := analysis.download_checkpoint(TRACKING_URI, best.run_id[0])) is None:
    print(f"The best trial, {best.trial[0]}, logged no {analysis.CHECKPOINT}: no attention maps.")
else:
    from reports import attention  # torch is loaded only for this section
    from tinyvit.data import DataError

    try:
        images, maps, titles = attention.attention_on_test_images(checkpoint)
        display(save_figure(figures.attention_grid(images, maps, titles), OUT, "attention"))
    except DataError as e:  # e.g. CIFAR-10 is not on this machine
        print(f"The trial's test images cannot be read here: {e}")
