"""Real studies on real Ray clusters, logging to real MLflow stores: the product end to end."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from studyutil import (REPO, env_without_tracking, experiment, free_port, kill_tree, run, start,
                       trial_results, wait_for, write)
from tinyvit.config import load


def runs_of(uri: str, name: str) -> pd.DataFrame:
    """The study's runs as one row each: status, tags.*, params.*, metrics.* (last values)."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(name).experiment_id
    return pd.DataFrame([{"run_id": r.info.run_id, "status": r.info.status,
                          **{f"tags.{k}": v for k, v in r.data.tags.items()},
                          **{f"params.{k}": v for k, v in r.data.params.items()},
                          **{f"metrics.{k}": v for k, v in r.data.metrics.items()}}
                         for r in client.search_runs([experiment_id], max_results=1000)])


def steps(client, run_id, metric="val_acc") -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, metric)})


def test_smoke_study_end_to_end_and_its_report(tmp_path):
    """`python -m study.run experiments/smoke.yaml` as a user runs it (only the folders moved),
    then `reports.build` on what it logged."""
    out = run(REPO / "experiments" / "smoke.yaml", "--set", f"storage={tmp_path / 'runs'}",
              "--set", f"data.cache_dir={tmp_path / 'cache'}", env=env_without_tracking())
    study = tmp_path / "runs" / "smoke"
    table = pd.read_parquet(study / "trials.parquet")
    assert len(table) == 4 and set(table["status"]) <= {"completed", "early-stopped"}
    assert pd.read_csv(study / "trials.csv").shape == table.shape
    full = table[table["status"] == "completed"]
    assert len(full) >= 1 and (full["budget"] == 2).all() and full["test_acc"].notna().all()
    stopped = table[table["status"] == "early-stopped"]
    assert (stopped["budget"] < 2).all() and stopped["test_acc"].isna().all()
    best = load(study / "best_config.yaml")  # the trainer accepts it as it is
    winner = full.sort_values("val_acc").iloc[-1]
    assert best.model.patch_size == winner["model.patch_size"]
    assert "best full-budget trials" in out and "mlflow ui --backend-store-uri" in out

    uri = f"sqlite:///{study / 'mlflow.db'}"
    runs = runs_of(uri, "smoke")
    assert len(runs) == 4 and sorted(runs["tags.trial_id"]) == sorted(table["trial_id"])
    client = MlflowClient(uri)
    for _, r in runs.iterrows():
        row = table[table["trial_id"] == r["tags.trial_id"]].iloc[0]
        assert r["tags.status"] == row["status"] and int(r["tags.budget"]) == row["budget"]
        assert r["tags.study"] == "smoke" and r["tags.mode"] == "search"
        assert r["tags.seed"] == "0" and len(r["tags.git_commit"]) >= 7
        assert r["params.model.pos_embedding"] == row["model.pos_embedding"]
        assert steps(client, r["run_id"]) == list(range(1, row["budget"] + 1))
        has_ckpt = bool(client.list_artifacts(r["run_id"], "checkpoint"))
        assert has_ckpt == (row["status"] == "completed")

    # and its report, rebuilt from MLflow alone
    from reports.build import build
    out = build(["smoke"], uri, tmp_path / "report")
    assert (out / "report.html").stat().st_size > 10_000
    summary = pd.read_csv(out / "tables" / "summary.csv", index_col=0).iloc[:, 0]
    assert int(summary["trials"]) == 4
    assert int(summary["full-budget trials"]) == len(full)
    assert float(summary["best val_acc"]) == pytest.approx(winner["val_acc"])
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"factors", "attention"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_errors_are_recorded_and_killed_trials_resume_from_their_checkpoint(tmp_path):
    """A trial whose loss turns NaN errors out (the study goes on); a trial whose process is
    killed is retried from its last checkpoint and finishes with one clean history."""
    d = experiment(tmp_path, name="faults", mode="ablation", search=None,
                   scheduler={"type": "none"}, max_failures=2)
    d["train"].update(epochs=4, grad_clip=0.0)
    d["data"]["synthetic_train"] = 3000
    d["ablation"] = {"factors": {"train.lr": [0.002, 1.0e30]}, "seeds": [0, 1]}
    driver = start(write(tmp_path, d), env=env_without_tracking())
    study = tmp_path / "runs" / "faults"

    def healthy_trial_mid_run():
        for folder, results in trial_results(study).items():
            if results and "lr=1e+30" not in folder and 1 <= results[-1]["epoch"] < 4:
                return folder, results[-1]["pid"]
    victim, pid = wait_for(healthy_trial_mid_run, what="a trial mid-run")
    assert psutil.Process(pid).name().startswith("ray::")
    os.kill(pid, signal.SIGKILL)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out[-4000:]

    table = pd.read_parquet(study / "trials.parquet")
    assert sorted(table["status"]) == ["completed", "completed", "errored", "errored"]
    assert set(table[table["status"] == "errored"]["cell"]) == {"train.lr=1e+30"}
    retried = [t for t in ExperimentAnalysis(str(study)).trials if t.trial_id in victim]
    assert retried[0].run_metadata.num_failures >= 1

    uri = f"sqlite:///{study / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = runs_of(uri, "faults")
    assert len(runs) == 4  # the retried trial kept its run
    errored = runs[runs["tags.status"] == "errored"]
    assert len(errored) == 2 and (errored["status"] == "FAILED").all()
    assert errored["tags.error"].str.contains("TrainingDiverged").all()
    killed = runs[runs["tags.trial_id"] == retried[0].trial_id].iloc[0]
    assert killed["tags.status"] == "completed" and steps(client, killed["run_id"]) == [1, 2, 3, 4]


def test_killed_driver_resumes_without_rerunning_or_duplicating(tmp_path):
    d = experiment(tmp_path, name="resume", scheduler={"type": "none"})
    d["train"]["epochs"] = 4
    d["data"]["synthetic_train"] = 3000
    path = write(tmp_path, d)
    study = tmp_path / "runs" / "resume"
    driver = start(path, env=env_without_tracking())

    def one_done_one_midway():
        results = trial_results(study)
        done = [f for f, r in results.items() if len(r) == 4]
        midway = [f for f, r in results.items() if 1 <= len(r) < 4]
        return (done, midway) if done and midway else None
    done, midway = wait_for(one_done_one_midway, what="a finished and a running trial")
    time.sleep(1.0)  # let the driver record both in its experiment state
    kill_tree(driver)
    before = {f: len(r) for f, r in trial_results(study).items()}

    out = run(path, "--resume", env=env_without_tracking())
    after = trial_results(study)
    table = pd.read_parquet(study / "trials.parquet")
    assert len(table) == 4 and (table["status"] == "completed").all(), out[-3000:]
    for folder in done:  # finished trials were not run again
        assert len(after[folder]) == before[folder] == 4
    for folder in midway:  # unfinished trials went on from a checkpoint, not from scratch
        assert after[folder][-1]["epoch"] == 4
        assert len(after[folder]) < before[folder] + 4

    uri = f"sqlite:///{study / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = runs_of(uri, "resume")
    assert len(runs) == 4 and runs["tags.trial_id"].is_unique
    assert sorted(runs["tags.trial_id"]) == sorted(table["trial_id"])
    for run_id in runs["run_id"]:
        assert steps(client, run_id) == [1, 2, 3, 4]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False
    try:
        wait_for(healthy, timeout=90, what="mlflow server")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_two_node_cluster_logging_to_an_mlflow_server(tmp_path, mlflow_server):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        d = experiment(tmp_path, name="cluster", scheduler={"type": "none"})
        d["search"]["num_samples"] = 2
        run(write(tmp_path, d), "--address", cluster.address, "--tracking-uri", mlflow_server,
            env=env_without_tracking())
    finally:
        cluster.shutdown()
    runs = runs_of(mlflow_server, "cluster")  # read back over HTTP
    assert len(runs) == 2 and (runs["tags.status"] == "completed").all()
    assert runs["tags.node"].nunique() == 2  # one trial on each node
    client = MlflowClient(mlflow_server)
    for run_id in runs["run_id"]:
        assert steps(client, run_id) == [1, 2]
        assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == \
            ["checkpoint/model.pt"]
    assert not (tmp_path / "runs" / "cluster" / "mlflow.db").exists()
