"""The search and its budget: a trial ASHA stops reaches Optuna as pruned, not as complete, and
Optuna's study is kept beside the study in Optuna's own storage, which a resumed study's searcher
reads as the truth."""
import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from study.tuner import BudgetAwareOptuna


@pytest.mark.xdist_group("search_study")
def test_a_trial_asha_stops_is_pruned_in_optuna_with_its_epochs(search_study):
    # the search_study fixture: lr 2e-3, 2e-3, then 1e-7, one trial at a time, ASHA's rung at 2
    table = pd.read_parquet(search_study.folder / "trials.parquet").sort_values("train.lr")
    assert list(table["status"]) == ["early-stopped", "completed", "completed"]
    assert table["budget"].iloc[0] == 2

    storage = JournalStorage(JournalFileBackend(str(search_study.folder / "optuna.log")))
    trials = optuna.load_study(study_name=search_study.name, storage=storage).get_trials()
    by_lr = {t.params["train.lr"]: t for t in trials if t.params["train.lr"] == 1.0e-7}
    stopped = by_lr[1.0e-7]
    assert stopped.state == TrialState.PRUNED and stopped.number == 2  # after two finished
    row = table.iloc[0]
    assert sorted(stopped.intermediate_values) == [1, 2]  # the epochs it ran, each reported
    assert stopped.intermediate_values[2] == row["val_acc"] == stopped.value  # Optuna's rule
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and sorted(t.value for t in done) == sorted(table["val_acc"].iloc[1:])


def test_a_trial_optuna_finished_after_tunes_last_snapshot_is_not_told_again(tmp_path):
    # Optuna's journal is written as a trial ends, Tune's snapshot (with the searcher) every few
    # seconds: a driver killed between the two is resumed with a trial Tune runs again from its
    # last checkpoint but Optuna has finished. Its re-run epochs must not reach Optuna, which
    # refuses to update a finished trial (UpdateFinishedTrialError ended such a resumed study).
    def searcher():
        storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.log")))
        return BudgetAwareOptuna(space=learning_rate, metric="val_acc", mode="max", seed=0,
                                 study_name="s", storage=storage)
    driver = searcher()
    driver.suggest("a")
    driver.on_trial_result("a", {"val_acc": 0.3, "training_iteration": 1})
    driver.save(str(tmp_path / "searcher.pkl"))  # Tune's last snapshot
    driver.on_trial_result("a", {"val_acc": 0.4, "training_iteration": 2})
    driver.on_trial_complete("a", {"val_acc": 0.4})  # in the journal
    driver.suggest("b")  # asked of Optuna, and the driver is killed before Tune records it

    resumed = searcher()
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("a", {"val_acc": 0.45, "training_iteration": 2})  # the re-run epoch
    resumed.on_trial_complete("a", {"val_acc": 0.45, "seeds": {"val_acc_sd": 0.1}})
    told, lost = resumed._ot_study.get_trials()
    assert told.state == TrialState.COMPLETE and told.value == 0.4  # told once, as it first ended
    assert told.user_attrs == {}
    assert lost.state == TrialState.FAIL  # not running for ever
    assert resumed.suggest("c") is not None and len(resumed._ot_study.get_trials()) == 3


def learning_rate(trial) -> dict:
    return {"train.lr": trial.suggest_float("train.lr", 1e-3, 1e-2)}
