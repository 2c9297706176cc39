"""Faults a study survives: a trial that stops reporting, a node that leaves the cluster."""
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from study.spec import SpecError, parse_plan
from studyutil import (REPO, env_snapshot_every_second, env_without_tracking, experiment, run,
                       start, trial_results, wait_for, write)
from test_study import runs_of, steps
from tinyvit.config import Config
from tinyvit.data import load_arrays

# seconds without a result: a tiny trial reports its first epoch ~5 s after it starts on an
# idle 2-core machine (~30 s at a load of 20: torch's first AdamW imports torch._dynamo), a
# 2048-wide one only after minutes
LIMIT = 40


def test_a_time_limit_that_is_no_number_of_seconds_is_refused_before_anything_runs(tmp_path):
    for bad in (0, -5, "soon", True, float("nan"), float("inf")):
        d = experiment(tmp_path, resources={"trial_timeout_s": bad})
        with pytest.raises(SpecError, match=r"^resources\.trial_timeout_s must be a number of "
                                            r"seconds > 0 \(or null: no limit\), got "):
            parse_plan(d)
    r = subprocess.run([sys.executable, "-m", "study.run", write(tmp_path, experiment(tmp_path)),
                        "--set", "resources.trial_timeout_s=0"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=env_without_tracking())
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: resources.trial_timeout_s must be")
    assert not (tmp_path / "runs").exists()
    assert parse_plan(experiment(tmp_path)).resources["trial_timeout_s"] is None  # no limit


@pytest.mark.study
def test_a_trial_without_results_is_stopped_at_its_time_limit_and_the_study_goes_on(tmp_path,
                                                                                  ray_head):
    """A trial whose epoch is far longer than resources.trial_timeout_s reports nothing, as a
    hung one would: its own watchdog stops it, and (max_failures: 0) it is errored in Ray and
    in MLflow with the why-line; the other trial completes, normalised with the statistics
    that the driver computed."""
    d = experiment(tmp_path, name="hang", mode="ablation", search=None,
                   scheduler={"type": "none"}, max_failures=0)
    d["resources"] = {"cpu": 1, "max_concurrent": 2, "trial_timeout_s": LIMIT}
    d["ablation"] = {"factors": {"model.embed_dim": [32, 2048]}}
    out = run(write(tmp_path, d), "--address", ray_head.address, env=env_without_tracking())
    assert f"stopped after {LIMIT}s without a result" in out  # the plan says so
    study = tmp_path / "runs" / "hang"

    table = pd.read_parquet(study / "trials.parquet").set_index("cell")
    assert table.loc["baseline", "status"] == "completed"
    assert table.loc["model.embed_dim=2048", "status"] == "errored"
    assert table.loc["model.embed_dim=2048", "budget"] == 0
    trials = {t.config["cell"]: t for t in ExperimentAnalysis(str(study)).trials}
    hung = trials["model.embed_dim=2048"]
    assert hung.status == "ERROR" and hung.run_metadata.num_failures == 1  # and not retried
    assert not [rows for folder, rows in trial_results(study).items()
                if hung.trial_id in folder and rows]  # it never reported
    why = re.compile(r"^study\.trainable\.TrialTimeout: trial exceeded resources\.trial_timeout_s"
                     rf"={LIMIT} \(no result for (\d+)s since it started\)$", re.M)
    error = (Path(hung.path) / "error.txt").read_text()
    assert error.count("Failure #") == 1  # Ray's record of each failure: this one only
    assert [int(s) >= LIMIT for s in why.findall(error)] == [True]

    uri = f"sqlite:///{study / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = runs_of(uri, "hang").set_index("tags.trial_id")
    assert len(runs) == 2
    stopped, done = runs.loc[hung.trial_id], runs.loc[trials["baseline"].trial_id]
    assert stopped["status"] == "FAILED" and stopped["tags.status"] == "errored"
    assert why.search(stopped["tags.error"]), stopped["tags.error"]
    assert done["status"] == "FINISHED" and done["tags.status"] == "completed"
    assert steps(client, done["run_id"]) == [1, 2]

    # the completed trial normalised with the statistics of the driver's arrays
    local = client.download_artifacts(done["run_id"], "checkpoint/model.pt", str(tmp_path))
    state = torch.load(local, weights_only=True)
    stats = load_arrays(Config.from_dict({k: d[k] for k in ("model", "data", "train")}).data).stats
    assert (state["mean"], state["std"]) == (stats.mean.tolist(), stats.std.tolist())


@pytest.mark.study
def test_a_node_that_leaves_mid_study_its_trial_continues_on_another(tmp_path):
    """Two nodes of one CPU each, two trials at once: the worker node is killed while its trial
    is between epochs. The trial goes on from its last checkpoint on the head (FailureConfig),
    the epoch count continuing, and MLflow ends with one completed run per trial."""
    from ray.cluster_utils import Cluster

    # the GCS calls a node dead after 3 missed health checks of 0.5 s (Ray's default: 5 of 3 s)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"health_check_period_ms": 500,
                                          "health_check_failure_threshold": 3}})
    try:
        worker = cluster.add_node(num_cpus=1)
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        d = experiment(tmp_path, name="leave", mode="ablation", search=None,
                       scheduler={"type": "none"}, max_failures=2)
        d["train"]["epochs"] = 4
        d["ablation"] = {"factors": {"train.lr": [0.002, 0.003, 0.004]}}
        d["resources"] = {"cpu": 1, "max_concurrent": 2}
        driver = start(write(tmp_path, d), "--address", cluster.address,
                       env=env_snapshot_every_second())
        study = tmp_path / "runs" / "leave"

        def trial_mid_run_on_the_worker():
            for folder, rows in trial_results(study).items():
                if rows and rows[-1]["node_id"] == worker_id and 1 <= rows[-1]["epoch"] < 4:
                    return folder, rows
        victim, before = wait_for(trial_mid_run_on_the_worker, what="a trial on the worker")
        cluster.remove_node(worker, allow_graceful=False)
        out, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, out[-4000:]
    finally:
        cluster.shutdown()

    table = pd.read_parquet(study / "trials.parquet")
    assert len(table) == 3 and (table["status"] == "completed").all(), out[-3000:]
    rows = trial_results(study)[victim]
    # every epoch once: after the loss the count goes on from the last checkpoint, on the head
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    moved = next(i for i, r in enumerate(rows) if r["node_id"] != worker_id)
    assert moved >= len(before) and {r["node_id"] for r in rows[moved:]} == {head_id}
    assert rows[moved]["iterations_since_restore"] == 1
    trial = next(t for t in ExperimentAnalysis(str(study)).trials if t.trial_id in victim)
    assert trial.run_metadata.num_failures >= 1

    uri = f"sqlite:///{study / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = runs_of(uri, "leave")
    assert len(runs) == 3 and runs["tags.trial_id"].is_unique
    assert (runs["status"] == "FINISHED").all() and (runs["tags.status"] == "completed").all()
    moved_run = runs[runs["tags.trial_id"] == trial.trial_id].iloc[0]
    assert moved_run["tags.node"] == head_id
    assert steps(client, moved_run["run_id"]) == [1, 2, 3, 4]
