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

runs = analysis.load_runs(TRACKING_URI, EXPERIMENT)
full = analysis.full_budget(runs)
factors = analysis.searched_factors(runs)
is_ablation = analysis.is_ablation(runs)
# a study still running may have no final accuracy yet: the sections below then say so
NO_FINAL = "No trial has run its full budget yet: no final accuracies to show."
display(Markdown(f"**Study `{EXPERIMENT}`** at `{TRACKING_URI}`: {len(runs)} trials, "
                 f"{len(full)} at full budget; searched: {', '.join(factors) or 'nothing'}."))

# %% [markdown]
# ## 1. The study at a glance

# %%
display(save_table(analysis.study_summary(runs).rename(EXPERIMENT), OUT, "summary"))
display(Markdown("Trials by budget (epochs completed) and status:"))
display(save_table(analysis.budgets(runs), OUT, "budgets"))
best = analysis.best_trials(runs, factors)
display(Markdown("Best configurations, by final val_acc among full-budget trials:"))
display(save_table(best, OUT, "best"))

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
# over the seeds both ran, Welch's t-test when seeds do not pair up.

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
              f"[{100 * row.diff_low:+.2f}, {100 * row.diff_high:+.2f}], {row.test} "
              f"p={row.p_value:.3f} (n={int(row.n_compared)}): {row.verdict}")
    display(save_figure(figures.ablation_forest(runs, effects), OUT, "ablation"))

# %% [markdown]
# ## 4. Learning curves
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
# ## 5. Accuracy against cost
# The Pareto front holds the trials no other trial beats on both accuracy and parameter count.

# %%
if full.empty:
    print(NO_FINAL)
elif full.n_params.isna().all():
    print("No trial logged its parameter count (metric `params`).")
else:
    front = save_table(analysis.pareto_front(runs), OUT, "pareto")
    display(front)
    display(save_figure(figures.cost_panels(runs, front, factors[0] if factors else None),
                        OUT, "cost"))

# %% [markdown]
# ## 6. Which factors mattered
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
# ## 7. Where the best model looks
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
