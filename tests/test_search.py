"""The search and its budget: a trial ASHA stops reaches Optuna as pruned, not as complete, and
Optuna's study is kept beside the study in Optuna's own storage."""
import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState


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
