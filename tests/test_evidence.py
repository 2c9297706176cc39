"""What a study may claim, from a real SQLite MLflow store whose numbers the tests plant: effects
across a budget ladder (one that flips sign must not be reported as holding), bootstrap intervals
and the probability of improvement, the seeds a study would need, the expected best of n search
trials, and how well ASHA's rungs ranked the trials that reached the full budget."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from reports import analysis
from reports.build import build
from reports.readme import ablation_section
from study.spec import SpecError, parse_plan
from studyutil import env_without_tracking, experiment, run, write

# one worker builds this module's store and reports once (make test runs pytest -n 3)
pytestmark = pytest.mark.xdist_group("evidence")

SEEDS = (0, 1, 2, 3)
BUDGETS = (1, 2, 4)
# the cell's val_acc minus the baseline's, per budget and seed (the seeds pair up)
LADDER = {
    # worse at short budgets, better at the longest: must never be called an effect that holds
    "model.pos_embedding=none": {1: (-0.03, -0.04, -0.02, -0.03), 2: (-0.01, 0.0, -0.02, -0.01),
                                 4: (0.03, 0.02, 0.04, -0.01)},
    # two points better at every budget, spread 1 point: holds
    "model.pos_embedding=rope2d": {b: (0.01, 0.02, 0.03, 0.02) for b in BUDGETS},
}
# a search: final val_acc of the trials that reached the full 4 epochs, and their val_acc at
# ASHA's rungs: the ranking at epoch 1 is the final one reversed, at epoch 2 the final one
FINALS = (0.50, 0.55, 0.60, 0.62, 0.70, 0.71)
RUNG_1 = tuple(reversed(sorted(0.3 + f / 10 for f in FINALS)))
RUNG_2 = tuple(f - 0.1 for f in FINALS)


def baseline(budget: int, seed: int) -> float:
    return 0.5 + 0.05 * budget + 0.01 * seed


def log(client, experiment, trial, tags, params, history):
    run = client.create_run(experiment, run_name=trial, tags={
        "study": "s", "study_id": "s-1", "trial_id": trial, "status": "completed",
        "budget": str(len(history)), "max_epochs": str(len(history)), **tags})
    client.log_batch(run.info.run_id,
                     metrics=[Metric("val_acc", v, 0, e) for e, v in enumerate(history, 1)],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run.info.run_id, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evidence")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    ladder = client.create_experiment("ladder", (tmp / "artifacts").as_uri())
    for budget, seed in itertools.product(BUDGETS, SEEDS):
        for cell in ["baseline", *LADDER]:
            final = baseline(budget, seed) + (LADDER[cell][budget][seed] if cell in LADDER else 0)
            log(client, ladder, f"{cell} {seed} {budget}",
                {"mode": "ablation", "cell": cell, "seed": str(seed), "min_effect": "0.01",
                 "searched": "model.pos_embedding"},
                {"model.pos_embedding": cell.split("=")[-1] if "=" in cell else "learned",
                 "train.seed": seed, "train.epochs": budget},
                [final * 0.8] * (budget - 1) + [final])
    search = client.create_experiment("search", (tmp / "artifacts").as_uri())
    for i, (final, r1, r2) in enumerate(zip(FINALS, RUNG_1, RUNG_2)):
        log(client, search, f"t{i}", {"mode": "search", "searched": "train.lr",
                                      "asha_rungs": "1,2"},
            {"train.lr": 0.001 * (i + 1), "train.epochs": 4}, [r1, r2, final - 0.05, final])
    return uri


@pytest.fixture(scope="module")
def ladder_report(store, tmp_path_factory):
    return build(["ladder"], store, tmp_path_factory.mktemp("ladder") / "report")


@pytest.fixture(scope="module")
def search_report(store, tmp_path_factory):
    return build(["search"], store, tmp_path_factory.mktemp("search") / "report")


def table(out, name, **kw):
    return pd.read_csv(out / "tables" / f"{name}.csv", **kw)


def test_an_effect_that_flips_sign_with_the_budget_does_not_hold(ladder_report):
    holds = table(ladder_report, "ladder_holds").set_index("cell")
    flips, steady = holds.loc["model.pos_embedding=none"], holds.loc["model.pos_embedding=rope2d"]
    assert flips.verdict == "does not hold: the sign flips" and not flips.sign_holds
    assert steady.verdict.startswith("holds") and steady.sign_holds and steady.size_holds
    line = table(ladder_report, "ladder_factors", index_col=0).iloc[0, 0]
    assert line.startswith("1 of 2 effects hold") and "none: does not hold" in line


def test_the_ladder_gives_each_budgets_planted_difference(ladder_report):
    ladder = table(ladder_report, "ladder").set_index(["cell", "budget"])
    for cell, by_budget in LADDER.items():
        for budget, diffs in by_budget.items():
            row = ladder.loc[(cell, budget)]
            assert row.n == len(SEEDS)
            assert row["diff"] == pytest.approx(np.mean(diffs))
            assert row.diff_low < np.mean(diffs) < row.diff_high
    assert "does not hold: the sign flips" in (ladder_report / "report.html").read_text()


def test_other_sections_read_the_longest_budget_alone(ladder_report):
    effects = table(ladder_report, "ablation").set_index("cell")
    assert (effects.n == len(SEEDS)).all()  # 4 seeds at 4 epochs, not 12 runs of 3 budgets
    assert effects.loc["baseline", "mean"] == pytest.approx(np.mean([baseline(4, s)
                                                                     for s in SEEDS]))
    best = table(ladder_report, "best")
    assert best.trial[0].endswith(" 4")  # the best trial is one of the longest budget


def test_bootstrap_interval_and_probability_of_improvement(ladder_report):
    effects = table(ladder_report, "ablation").set_index("cell")
    for cell in LADDER:
        diffs = np.array(LADDER[cell][4])
        row = effects.loc[cell]
        # a percentile bootstrap of a mean lies within the observed differences, around it
        assert diffs.min() <= row.boot_low < diffs.mean() < row.boot_high <= diffs.max()
        assert row.p_improve == pytest.approx(np.mean(diffs > 0) + 0.5 * np.mean(diffs == 0))
        assert row.diff_sd == pytest.approx(np.std(diffs, ddof=1))
    assert effects.loc["model.pos_embedding=none", "p_improve"] == 0.75


def test_seeds_needed_matches_the_paired_t_tests_power_tables():
    # G*Power's sample sizes for a two-sided paired t-test at alpha 0.05 and 80% power:
    # 34 pairs for an effect half the spread, 10 for one equal to it
    for sd, n in ((0.02, 34), (0.01, 10)):
        assert analysis.seeds_needed(pd.DataFrame({"diff_sd": [sd, sd]}), 0.01)["n"] == n


def test_the_report_says_how_many_seeds_the_smallest_effect_needs(ladder_report):
    sds = [np.std(d[4], ddof=1) for d in LADDER.values()]
    expected = analysis.seeds_needed(pd.DataFrame({"diff_sd": sds}), 0.01)["n"]
    assert f"needs {expected} seeds per cell; this study ran {len(SEEDS)}" in (
        ladder_report / "report.html").read_text()


def test_expected_best_of_n_trials_equals_the_mean_best_of_all_draws(search_report):
    curve = table(search_report, "expected_best").set_index("trials")
    for n in (1, 2, 3):  # every ordered draw of n trials with replacement, counted
        draws = [max(d) for d in itertools.product(FINALS, repeat=n)]
        assert curve.loc[n, "expected_best"] == pytest.approx(np.mean(draws))
        assert curve.loc[n, "sd"] == pytest.approx(np.std(draws))
    assert len(curve) == len(FINALS)


def test_a_rung_whose_ranking_reversed_the_final_one_is_warned(search_report):
    rungs = table(search_report, "rungs", keep_default_na=False).set_index("rung (epoch)")
    assert rungs.loc[1, "rho"] == pytest.approx(-1) and rungs.loc[1, "warning"].startswith(
        "WARNING: the ranking at epoch 1")
    assert rungs.loc[2, "rho"] == pytest.approx(1) and rungs.loc[2, "warning"] == ""
    assert rungs.loc[2, "rho_low"] <= 1 and (rungs.trials == len(FINALS)).all()
    assert "WARNING: the ranking at epoch 1 predicted the final one poorly" in (
        search_report / "report.html").read_text()


def test_a_ladder_study_trains_every_cell_at_every_budget(tmp_path, ray_head):
    d = experiment(tmp_path, name="ladder", mode="ablation", scheduler={"type": "none"},
                   ablation={"factors": {"model.pos_embedding": ["learned", "none"]},
                             "seeds": [0], "budgets": [2, 1]})
    d.pop("search")
    out = run(write(tmp_path, d), "--address", ray_head.address, env=env_without_tracking())
    assert "4 trials of up to 2 epochs" in out and "x budgets [1, 2] epochs" in out
    study = tmp_path / "runs" / "ladder"
    table = pd.read_parquet(study / "trials.parquet")
    assert sorted(zip(table.cell, table["train.epochs"])) == [
        ("baseline", 1), ("baseline", 2), ("model.pos_embedding=none", 1),
        ("model.pos_embedding=none", 2)]
    assert (table.max_epochs == table["train.epochs"]).all() and (table.budget == table.max_epochs).all()
    assert (table.status == "completed").all()
    assert yaml.safe_load((study / "best_config.yaml").read_text())["train"]["epochs"] == 2
    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    names = {r.info.run_name for r in client.search_runs(
        [client.get_experiment_by_name("ladder").experiment_id], "tags.kind = 'trial'")}
    assert names == {f"{cell} seed 0 {b} epochs" for cell in ("baseline",
                     "model.pos_embedding=none") for b in (1, 2)}


@pytest.mark.parametrize("section, value, message", [
    ("budgets", [1], "at least two epoch counts"),
    ("budgets", [2, 2], "lists a budget twice"),
    ("budgets", [1, "2"], "at least two epoch counts >= 1"),
    ("budgets", [0, 1], "at least two epoch counts >= 1"),
    ("min_effect", 0, r"min_effect is a val_acc difference in \(0, 1\)"),
    ("min_effect", "big", "min_effect: expected a finite number"),
])
def test_bad_ladders_are_refused_in_one_line(tmp_path, section, value, message):
    d = experiment(tmp_path, mode="ablation", scheduler={"type": "none"},
                   ablation={"factors": {"model.pos_embedding": ["learned", "none"]},
                             section: value})
    d.pop("search")
    with pytest.raises(SpecError, match=message):
        parse_plan(d)


def test_a_ladder_refuses_asha_and_an_epochs_factor(tmp_path):
    d = experiment(tmp_path, mode="ablation", scheduler={"type": "asha"},
                   ablation={"factors": {"model.pos_embedding": ["learned", "none"]},
                             "budgets": [1, 2]})
    d.pop("search")
    with pytest.raises(SpecError, match="scheduler.type=asha with ablation.budgets"):
        parse_plan(d)
    d["scheduler"] = {"type": "none"}
    d["ablation"]["factors"] = {"train.epochs": [1, 2]}
    with pytest.raises(SpecError, match="train.epochs cannot be an ablation factor"):
        parse_plan(d)


def test_the_readme_results_carry_the_ladders_verdicts(ladder_report):
    text = ablation_section(ladder_report)
    assert "- `model.pos_embedding`: 1 of 2 effects hold" in text
    assert ("| model.pos_embedding=none | -3.00 at 1, -1.00 at 2, +2.00 at 4 | does not hold: "
            "the sign flips |") in text
