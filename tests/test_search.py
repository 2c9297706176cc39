"""The search and its budget: a trial ASHA stops reaches Optuna as pruned, not as complete, and
Optuna's study is kept beside the study in Optuna's own storage."""
import optuna
import pandas as pd
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from studyutil import env_without_tracking, experiment, run, write


def test_a_trial_asha_stops_is_pruned_in_optuna_with_its_epochs(tmp_path):
    # TPE's first draws are random with its seed: seed 6 proposes lr 2e-3, 2e-3, then 1e-7. One
    # trial at a time, so the 1e-7 trial meets two finished ones at the epoch-2 rung and stops.
    d = experiment(tmp_path, name="pruned", scheduler={
        "type": "asha", "grace_period": 2, "reduction_factor": 2})
    d["search"] = {"num_samples": 3, "seed": 6, "space": {"train.lr": [0.002, 1.0e-7]}}
    d["train"]["epochs"] = 3
    d["resources"] = {"cpu": 1, "max_concurrent": 1}
    run(write(tmp_path, d), env=env_without_tracking())
    study_dir = tmp_path / "runs" / "pruned"
    table = pd.read_parquet(study_dir / "trials.parquet").sort_values("train.lr")
    assert list(table["status"]) == ["early-stopped", "completed", "completed"]
    assert table["budget"].iloc[0] == 2

    storage = JournalStorage(JournalFileBackend(str(study_dir / "optuna.log")))
    trials = optuna.load_study(study_name="pruned", storage=storage).get_trials()
    by_lr = {t.params["train.lr"]: t for t in trials if t.params["train.lr"] == 1.0e-7}
    stopped = by_lr[1.0e-7]
    assert stopped.state == TrialState.PRUNED
    row = table.iloc[0]
    assert sorted(stopped.intermediate_values) == [1, 2]  # the epochs it ran, each reported
    assert stopped.intermediate_values[2] == row["val_acc"] == stopped.value  # Optuna's rule
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and sorted(t.value for t in done) == sorted(table["val_acc"].iloc[1:])
