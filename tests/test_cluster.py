"""The README's cluster recipe on one machine: a head and a worker node started by `ray start`
with token authentication, a study driven from a shell that has the head's token, and the same
study refused in one line from a shell that has not."""
import os
import shutil
import subprocess
import sys
import tempfile

import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from mlflow.tracking import MlflowClient

from studyutil import RAY, REPO, free_port, run, sqlite_store, stop_ray

AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def shell(**extra) -> dict:
    """A user's shell: no cluster or tracking server named, no Ray token unless given."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", *AUTH)}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.fixture
def cluster(tmp_path):
    """(address, token) of a two-node cluster, 1 CPU per node, token auth on."""
    # the token as the README obtains it on the head (kept in $HOME/.ray/auth_token there)
    home = tmp_path / "head-home"
    token = subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, text=True,
                           check=True, env=shell(HOME=str(home))).stdout
    assert token and token == (home / ".ray" / "auth_token").read_text()
    env = shell(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # the cluster's own folder, so that it can be stopped alone; short: Ray's socket paths
    # under it must fit in 107 characters
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    address = f"127.0.0.1:{free_port()}"
    try:
        for args in (["--head", f"--port={address.split(':')[1]}", f"--temp-dir={temp_dir}"],
                     [f"--address={address}"]):
            r = subprocess.run([RAY, "start", *args, "--num-cpus=1"], env=env,
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
        yield address, token
    finally:
        stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.study
def test_the_readme_cluster_recipe_with_token_auth(tmp_path, cluster, mlflow_schema):
    address, token = cluster
    sqlite_store(mlflow_schema, tmp_path / "runs" / "smoke" / "mlflow.db")  # its default store

    def study(folder):
        return ["experiments/smoke.yaml", "--address", address, "--set", "search.num_samples=2",
                "--set", "scheduler.type=none", "--set", "train.epochs=1",
                "--set", "mlflow.report=false", "--set", "search.metric=[val_acc,params]",
                "--set", "search.mode=[max,min]",
                "--set", f"storage={tmp_path / folder}",
                "--set", f"data.cache_dir={tmp_path / folder / 'cache'}"]

    # from a shell without the token, started first: it is refused while the study runs
    refused = subprocess.Popen([sys.executable, "-m", "study.run", *study("refused")], cwd=REPO,
                               env=shell(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)

    run(*study("runs"), env=shell(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
    refused.wait(timeout=120)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'smoke' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                              "tags.kind = 'trial'")
    assert [r.data.tags["status"] for r in runs] == ["completed", "completed"]
    # each node has 1 CPU and a trial takes 1: the two trials at once ran one on each node
    nodes = {r.data.tags["node"] for r in runs}
    assert len(nodes) == 2 and "" not in nodes, nodes

    # the most accurate and the smallest model at once, through Tune (which takes a single
    # metric) into Optuna's multi-objective TPE, told both values of each trial
    study = tmp_path / "runs" / "smoke"
    table = pd.read_parquet(study / "trials.parquet").set_index("trial_id")
    storage = JournalStorage(JournalFileBackend(str(study / "optuna.log")))
    optuna_study = optuna.load_study(study_name="smoke", storage=storage)
    assert optuna_study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                       optuna.study.StudyDirection.MINIMIZE]
    told = [tuple(t.values) for t in optuna_study.trials
            if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(told) == sorted(zip(table["val_acc"], table["params"]))
    for r in runs:
        row = table.loc[r.data.tags["trial_id"]]
        assert (r.data.metrics["val_acc"], r.data.metrics["params"]) == \
            (row["val_acc"], row["params"])

    stderr = refused.stderr.read()
    assert refused.returncode == 2, stderr[-3000:]
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.startswith(f"error: --address {address}: the cluster refused"), stderr
    assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in stderr, stderr
    assert not (tmp_path / "refused" / "smoke").exists()  # refused before the study folder
