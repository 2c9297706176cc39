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
# # Studies side by side
# The same factors across studies, with the same rules as a single-study report: final
# `val_acc` of full-budget trials only, 95% t-intervals, `test_acc` shown but never chosen on.
# Rebuilt by `python -m reports.build --experiment A --experiment B`.

# %% tags=["parameters"]
EXPERIMENTS = ["smoke", "smoke-ablation"]
TRACKING_URI = "sqlite:///runs/smoke/mlflow.db"  # the study runner's default store
OUT = "reports/out/smoke_vs_smoke-ablation"

# %%
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from reports import analysis, figures
from reports.outputs import save_figure, save_table

sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.width", 140)

studies = {name: analysis.load_runs(TRACKING_URI, name) for name in EXPERIMENTS}
factors = {name: analysis.searched_factors(runs) for name, runs in studies.items()}

# %% [markdown]
# ## 1. The studies at a glance

# %%
summary = pd.concat({name: analysis.study_summary(runs) for name, runs in studies.items()},
                    axis=1)
display(save_table(summary, OUT, "summary"))
best = pd.concat([analysis.best_trials(runs, factors[name], k=3).assign(study=name)
                  for name, runs in studies.items()], ignore_index=True)
display(Markdown("The three best configurations of each study, by final val_acc:"))
display(save_table(best.set_index(["study", "trial"]), OUT, "best"))

# %% [markdown]
# ## 2. Each factor, study by study
# A factor's levels as each study saw them. Within a search a level's mean is over the other
# factors' values it met, so two studies can disagree because they searched different spaces.

# %%
tables = [analysis.factor_tables(studies[name], factors[name]).assign(study=name)
          for name in EXPERIMENTS if factors[name]]
if tables:
    tables = save_table(pd.concat(tables), OUT, "factors")
    for factor, table in tables.groupby(level="factor", sort=False):
        table = table.droplevel("factor").reset_index()
        display(Markdown(f"### `{factor}`"))
        display(table.set_index(["value", "study"]).sort_index())
        display(save_figure(figures.side_by_side(table, "value", "study", factor), OUT,
                            f"factor_{factor}"))
else:
    print("None of these studies names a searched factor.")

# %% [markdown]
# ## 3. Ablation effects, study by study

# %%
ablations = [name for name, runs in studies.items() if analysis.is_ablation(runs)]
effects = [analysis.ablation_effects(studies[name]).assign(study=name) for name in ablations]
effects = pd.concat(effects).reset_index() if effects else pd.DataFrame()
if effects.empty:
    print("None of these studies is an ablation with a full-budget trial.")
else:
    display(save_table(effects.set_index(["cell", "study"]), OUT, "ablation"))
    display(save_figure(figures.side_by_side(effects, "cell", "study", "cell"), OUT, "ablation"))

# %% [markdown]
# ## 4. Learning curves of each study's best trial

# %%
best_runs = [(name, analysis.best_trials(runs, k=1)) for name, runs in studies.items()]
labels = [pd.Series(f"{name}: {top.trial[0]}", index=top.run_id) for name, top in best_runs
          if len(top)]
if labels:
    labels = pd.concat(labels)
    curves = analysis.learning_curves(analysis.load_history(TRACKING_URI, labels.index), labels)
    save_table(curves, OUT, "curves_best")
    display(save_figure(figures.curves(curves, "best trial of each study"), OUT, "curves_best"))
else:
    print("No study has a full-budget trial.")
