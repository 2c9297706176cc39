"""search.repeats: every configuration Optuna proposes trains with several seeds, Optuna is told
their mean (with each seed's value and the spread), a seed that fails fails its configuration,
and the best configuration is the best mean, not the luckiest seed."""
import optuna
import pandas as pd
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from reports import analysis
from study.results import ranked
from study.spec import SpecError, parse_plan
from study.tuner import BudgetAwareOptuna, SeedRepeats
from studyutil import env_without_tracking, experiment, run, write


@pytest.mark.study
def test_each_configuration_trains_its_seeds_and_optuna_gets_their_mean(tmp_path, ray_head):
    d = experiment(tmp_path, name="repeats", scheduler={"type": "none"})
    d["search"] = {"num_samples": 2, "repeats": 2, "seed": 0,
                   "space": {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}}
    d["train"].update(epochs=1, seed=5)
    out = run(write(tmp_path, d), "--address", ray_head.address, env=env_without_tracking())
    assert "x 2 seeds each (the searcher sees their mean)" in out
    study = tmp_path / "runs" / "repeats"
    table = pd.read_parquet(study / "trials.parquet")
    groups = table.groupby("train.lr")
    assert len(table) == 4 and groups.ngroups == 2
    for _, seeds in groups:  # the base seed and the next, once each
        assert sorted(seeds["train.seed"]) == [5, 6]

    storage = JournalStorage(JournalFileBackend(str(study / "optuna.log")))
    trials = optuna.load_study(study_name="repeats", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        seeds = groups.get_group(t.params["train.lr"]).sort_values("train.seed")
        assert t.value == pytest.approx(seeds.val_acc.mean())
        assert t.user_attrs["val_acc_seeds"] == pytest.approx(list(seeds.val_acc))
        assert t.user_attrs["val_acc_sd"] == pytest.approx(seeds.val_acc.std())

    best_lr = groups.val_acc.mean().idxmax()  # the best mean, whichever seed was luckiest
    best = yaml.safe_load((study / "best_config.yaml").read_text())
    assert best["train"]["lr"] == pytest.approx(best_lr)

    runs = analysis.load_runs(f"sqlite:///{study / 'mlflow.db'}", "repeats")
    shown = analysis.configuration_seeds(runs, ["train.lr"])
    assert list(shown.seeds) == ["5, 6", "5, 6"] and (shown.n == 2).all()
    assert shown["mean"].iloc[0] == pytest.approx(groups.val_acc.mean().max())
    assert len(runs) == 4 and set(runs["train.seed"]) == {5, 6}


def test_the_best_configuration_is_the_best_mean_not_the_luckiest_seed():
    table = pd.DataFrame({"trial_id": list("abcd"), "model.depth": [2, 2, 4, 4],
                          "val_acc": [0.9, 0.1, 0.6, 0.6], "status": "completed", "budget": 1,
                          "max_epochs": 1})
    best = ranked(table, ["model.depth"])
    assert list(best.trial_id[:2]) == ["c", "d"] and best.config_val_acc.iloc[0] == 0.6
    assert list(best.config_trials) == [2] * 4
    assert list(ranked(table).trial_id) == ["a", "c", "d", "b"]  # no configuration: each alone
    # an ablation's cell is its configuration, also with no factors (a confirmation over seeds)
    cells = ranked(table.assign(cell=["baseline", "baseline", "x", "x"]))
    assert list(cells.trial_id[:2]) == ["c", "d"] and list(cells.config_trials) == [2] * 4
    confirm = ranked(table.assign(cell="baseline"))
    assert list(confirm.config_val_acc) == pytest.approx([0.55] * 4)
    assert list(confirm.config_trials) == [4] * 4


def space(trial) -> dict:
    return {"train.lr": trial.suggest_float("train.lr", 1e-3, 1e-2)}


def searcher(tmp_path):
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.log")))
    return SeedRepeats(BudgetAwareOptuna(space=space, metric="val_acc", mode="max", seed=0,
                                         study_name="s", storage=storage), repeat=2)


def test_a_failed_seed_fails_its_configuration_and_groups_survive_a_restore(tmp_path):
    repeats = searcher(tmp_path)
    first, second = repeats.suggest("a"), repeats.suggest("b")
    assert first["train.lr"] == second["train.lr"]  # one configuration, two seeds
    repeats.on_trial_complete("a", {"val_acc": 0.5})
    repeats.on_trial_complete("b", None, error=True)
    study = repeats.searcher._ot_study
    assert study.trials[0].state == TrialState.FAIL  # never the mean of the seed that ran

    repeats.suggest("c")
    repeats.on_trial_complete("c", {"val_acc": 0.4})
    repeats.save(str(tmp_path / "searcher.pkl"))  # the driver dies here, mid-configuration
    restored = searcher(tmp_path / "..")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("d")["train.lr"] == study.trials[1].params["train.lr"]
    restored.on_trial_complete("d", {"val_acc": 0.6})
    told = restored.searcher._ot_study.trials[1]
    assert told.state == TrialState.COMPLETE and told.value == pytest.approx(0.5)


@pytest.mark.parametrize("change, message", [
    ({"repeats": 0}, "search.repeats must be an integer >= 1"),
    ({"repeats": 2, "metric": ["val_acc", "params"], "mode": ["max", "min"]},
     "search.repeats needs a single search.metric"),
    ({"repeats": 2, "space": {"train.seed": [0, 1]}, "constraints": []},
     "search.repeats sets train.seed itself"),
])
def test_bad_repeats_are_refused_in_one_line(tmp_path, change, message):
    d = experiment(tmp_path, scheduler={"type": "none"})
    d["search"].update(change)
    with pytest.raises(SpecError, match=message):
        parse_plan(d)


def test_repeats_refuse_asha(tmp_path):
    d = experiment(tmp_path, scheduler={"type": "asha"})
    d["search"]["repeats"] = 2
    with pytest.raises(SpecError, match="scheduler.type=asha with search.repeats"):
        parse_plan(d)
