"""Real studies on real Ray clusters, logging to real MLflow stores: the product end to end."""
import os
import re
import shlex
import signal
import subprocess
import time

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.tune import ExperimentAnalysis

from studyutil import (REPO, env_snapshot_every_second, env_without_tracking, experiment,
                       kill_tree, run, sqlite_store, start, trial_results, wait_for, write)
from study.progress import DRIVER_LINE
from tinyvit.config import load

# what every run's git_commit tag must be: the checkout's commit, not the "unknown" fallback
HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                      check=True).stdout.strip()


def runs_of(uri: str, name: str) -> pd.DataFrame:
    """The study's runs as one row each: status, tags.*, params.*, metrics.* (last values)."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(name).experiment_id
    return pd.DataFrame([{"run_id": r.info.run_id, "status": r.info.status,
                          **{f"tags.{k}": v for k, v in r.data.tags.items()},
                          **{f"params.{k}": v for k, v in r.data.params.items()},
                          **{f"metrics.{k}": v for k, v in r.data.metrics.items()}}
                         for r in client.search_runs([experiment_id], max_results=1000)
                         if r.data.tags.get("kind") == "trial"])  # not the study's parent run


def steps(client, run_id, metric="val_acc") -> list[int]:
    """Every logged step, repeats kept: an epoch logged twice shows up twice."""
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def plan_uri(out: str) -> str:
    """The tracking URI the driver chose, from its plan line `mlflow    URI (experiment ...)`."""
    return re.search(r"^mlflow +(\S+) \(experiment", out, re.M).group(1)


def snapshot(folder) -> dict:
    """Every file and folder under `folder` with its size and modification time."""
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.mark.study
def test_smoke_study_its_report_and_an_ablation_around_its_best_config(tmp_path, mlflow_schema,
                                                                        ray_head, study_cli,
                                                                        monkeypatch):
    """`python -m study.run experiments/smoke.yaml` as a user runs it (only the folders moved),
    `reports.build` on what it logged, the refusal to run it again, then a second study built on
    its best_config.yaml, joining a running cluster through RAY_ADDRESS and logging where
    MLFLOW_TRACKING_URI points."""
    smoke = [REPO / "experiments" / "smoke.yaml", "--set", f"storage={tmp_path / 'runs'}",
             "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    out = run(*smoke, env=env_without_tracking())
    study = tmp_path / "runs" / "smoke"
    uri = f"sqlite:///{study / 'mlflow.db'}"
    assert plan_uri(out) == uri  # nothing names a store: the default one, in the study folder
    table = pd.read_parquet(study / "trials.parquet")
    assert len(table) == 4 and set(table["status"]) <= {"completed", "early-stopped"}
    assert pd.read_csv(study / "trials.csv").shape == table.shape
    # of Tune's loggers the JSON one alone: no CSV copy of each result, no TensorBoard files
    assert len(list(study.glob("*/result.json"))) == 4
    assert not [*study.glob("*/progress.csv"), *study.glob("*/events.out.tfevents.*")]
    # whatever ASHA stopped here (that depends on which trial reaches epoch 1 first), a trial is
    # completed exactly when it ran its whole budget, and only completed trials were tested
    completed = table["status"] == "completed"
    assert (completed == (table["budget"] == 2)).all() and (table["budget"] >= 1).all()
    assert (completed == table["test_acc"].notna()).all()
    winner = table[completed].sort_values("val_acc").iloc[-1]
    best_path = study / "best_config.yaml"
    best = load(best_path)  # the trainer accepts it as it is
    assert f"trial {winner['trial_id']}" in best_path.read_text().splitlines()[0]
    # the winner's whole config, but for a conditional key it did not sample (empty in the table)
    assert {k: v for k, v in best.flat().items() if v is not None and pd.notna(winner[k])} == \
        {k: winner[k] for k, v in best.flat().items() if v is not None and pd.notna(winner[k])}
    assert "best full-budget trials" in out and "mlflow ui --backend-store-uri" in out

    # the same command again is refused, and leaves the finished study as it was
    before = snapshot(study)
    again = start(*smoke, env=env_without_tracking())
    refusal = again.communicate(timeout=120)[0].splitlines()
    assert again.returncode == 2 and len(refusal) == 1, refusal
    assert refusal[0].startswith("error: ") and "--resume" in refusal[0]
    assert snapshot(study) == before

    runs = runs_of(uri, "smoke")
    assert len(runs) == 4 and sorted(runs["tags.trial_id"]) == sorted(table["trial_id"])
    client = MlflowClient(uri)
    for _, r in runs.iterrows():
        row = table[table["trial_id"] == r["tags.trial_id"]].iloc[0]
        assert r["tags.status"] == row["status"] and int(r["tags.budget"]) == row["budget"]
        assert r["tags.study"] == "smoke" and r["tags.mode"] == "search"
        assert r["tags.seed"] == "0" and r["tags.git_commit"] == HEAD
        assert r["params.model.pos_embedding"] == row["model.pos_embedding"]
        assert steps(client, r["run_id"]) == list(range(1, row["budget"] + 1))
        assert pd.notna(r["metrics.test_acc"]) == (row["status"] == "completed")
        has_ckpt = bool(client.list_artifacts(r["run_id"], "checkpoint"))
        assert has_ckpt == (row["status"] == "completed")

    # its report, built from MLflow alone at the study's end and attached to the study's run
    report = study / "report"
    assert (report / "report.html").stat().st_size > 10_000
    parent = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                "tags.kind = 'study'")
    assert len(parent) == 1 and "report/report.html" in [
        a.path for a in client.list_artifacts(parent[0].info.run_id, "report")]
    summary = pd.read_csv(report / "tables" / "summary.csv", index_col=0).iloc[:, 0]
    assert int(summary["trials"]) == 4
    assert int(summary["full-budget trials"]) == completed.sum()
    assert float(summary["best val_acc"]) == pytest.approx(winner["val_acc"])
    pngs = sorted((report / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"factors", "attention"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    # An ablation around the winner: its base is that best_config.yaml, its one other cell a
    # learning rate too small to learn anything. One trial at a time, so the baseline reaches
    # ASHA's first rung first and the tiny-lr trial, certainly worse, is certainly stopped there.
    # The file names a store that MLFLOW_TRACKING_URI overrides; RAY_ADDRESS names the cluster.
    file_uri, cli_uri = (f"sqlite:///{tmp_path / n}.db" for n in ("file", "cli"))
    env_uri = sqlite_store(mlflow_schema, tmp_path / "env.db")
    path = write(tmp_path, {
        "name": "around_best", "mode": "ablation", "base": str(best_path),
        "storage": str(tmp_path / "runs"), "mlflow": {"tracking_uri": file_uri, "report": False},
        "ablation": {"factors": {"train.lr": [best.train.lr, 1.0e-7]}},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "max_concurrent": 1}}, "around_best.yaml")
    # the rest of the tracking URI's precedence needs only the plan: the file's store beats the
    # default, --tracking-uri beats the environment
    plans = [study_cli(path, "--dry-run")]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    plans.append(study_cli(path, "--dry-run", "--tracking-uri", cli_uri))
    assert [p.returncode for p in plans] == [0, 0]
    assert [plan_uri(p.stdout) for p in plans] == [file_uri, cli_uri]
    env = {**env_without_tracking(), "MLFLOW_TRACKING_URI": env_uri}
    out = run(path, env={**env, "RAY_ADDRESS": ray_head.address})
    assert f"Ray at {ray_head.address}" in out and plan_uri(out) == env_uri
    ablation = tmp_path / "runs" / "around_best"
    assert not (tmp_path / "file.db").exists() and not (tmp_path / "cli.db").exists()
    assert not (ablation / "mlflow.db").exists()

    table = pd.read_parquet(ablation / "trials.parquet").set_index("cell")
    baseline, tiny = table.loc["baseline"], table.loc["train.lr=1e-07"]
    assert baseline["status"] == "completed" and pd.notna(baseline["test_acc"])
    assert tiny["status"] == "early-stopped" and tiny["budget"] == 1 < tiny["max_epochs"] == 2
    assert pd.isna(tiny["test_acc"])
    # the base's values make the baseline the smoke study's winner again: same config, same seed,
    # same metrics on CPU
    assert baseline["val_acc"] == winner["val_acc"]
    assert f"trial {baseline['trial_id']}" in \
        (ablation / "best_config.yaml").read_text().splitlines()[0]

    runs = runs_of(env_uri, "around_best").set_index("tags.cell")
    client = MlflowClient(env_uri)
    for cell, lr, status, budget in (("baseline", best.train.lr, "completed", 2),
                                     ("train.lr=1e-07", 1.0e-7, "early-stopped", 1)):
        r = runs.loc[cell]
        # threads: null in a best_config.yaml means the trial's CPUs, not every core of the node
        assert {k: r[f"params.{k}"] for k in best.flat()} == \
            {k: str(v) for k, v in {**best.flat(), "train.lr": lr, "train.threads": 1}.items()}
        assert r["tags.status"] == status and r["tags.budget"] == str(budget)
        assert r["tags.node"] == ray_head.node and r["tags.git_commit"] == HEAD
        assert steps(client, r["run_id"]) == list(range(1, budget + 1))
        assert pd.notna(r["metrics.test_acc"]) == (status == "completed")


PROGRESS = re.compile(r"progress  (\d+) of (\d+) trials finished \((\d+) errored\), (\d+) running, "
                      r"(\d+) pending; (?:(\d+)h)?(?:(\d+)m)?(\d+)s elapsed(?:, (.*))?")


def assert_progress_shown(out: str, total: int, errored: int, wall: float) -> None:
    """The driver's progress lines (every 30 s, as soon as the first trial has ended: the first
    ETA, and at the study's end) and its closing line on the longest loop step."""
    lines = [m for m in map(PROGRESS.fullmatch, out.splitlines()) if m]
    assert len(lines) >= 2, out[-4000:]
    counts = [tuple(int(x) for x in m.groups()[:5]) for m in lines]
    for finished, n, failed, running, pending in counts:
        assert n == total and finished + running + pending == total and running <= 2, counts
        assert failed <= finished
    assert [c[0] for c in counts] == sorted(c[0] for c in counts), counts
    for (finished, *_), m in zip(counts[:-1], lines):  # an ETA once a trial has ended
        assert m[9].startswith("about ") if finished else m[9] == "no ETA before a trial ends"
    assert lines[-1][9] is None  # nothing to go
    assert any(1 <= c[0] < total for c in counts[:-1]), counts  # printed when the first ended
    assert counts[-1] == (total, total, errored, 0, 0), counts
    for m in lines:
        h, mins, sec = (int(x or 0) for x in m.groups()[5:8])
        assert 0 <= 3600 * h + 60 * mins + sec <= wall + 1, m[0]

    ends = [m for m in map(DRIVER_LINE.fullmatch, out.splitlines()) if m]
    assert len(ends) == 1, out[-4000:]
    longest, at, steps, _, pause, trials, seconds = ends[0].groups()
    longest, at, steps, pause, trials, seconds = map(float, (longest, at, steps, pause, trials,
                                                             seconds))
    assert trials == total and 0 < seconds < wall
    assert 1 <= at <= steps and steps >= total  # a step per trial's start, result and end at least
    assert 0 < longest < seconds and 0 <= pause < seconds


@pytest.mark.study
def test_errors_are_recorded_and_killed_trials_resume_from_their_checkpoint_and_progress_is_shown(tmp_path,
                                                                             mlflow_schema,
                                                                             ray_head):
    """A trial whose loss turns NaN errors out (the study goes on); a trial whose process is
    killed is retried from its last checkpoint and finishes with one clean history; the driver
    says how far the study is all along."""
    # one retry: each retry of the NaN trial is a new trial process, whose imports alone take
    # ~8 s of CPU, failing the same way
    d = experiment(tmp_path, name="faults", mode="ablation", search=None,
                   scheduler={"type": "none"}, max_failures=1)
    d["train"].update(epochs=4, grad_clip=0.0)
    d["data"]["synthetic_train"] = 3000
    d["ablation"] = {"factors": {"train.lr": [0.002, 1.0e30]}, "seeds": [0]}
    study = tmp_path / "runs" / "faults"
    uri = sqlite_store(mlflow_schema, study / "mlflow.db")  # the study's default store
    began = time.monotonic()
    driver = start(write(tmp_path, d), "--address", ray_head.address,
                   env=env_snapshot_every_second())

    def healthy_trial_mid_run():
        for folder, results in trial_results(study).items():
            if results and "lr=1e+30" not in folder and 1 <= results[-1]["epoch"] < 4:
                return folder, results[-1]["pid"]
    try:
        victim, pid = wait_for(healthy_trial_mid_run, what="a trial mid-run")
        assert psutil.Process(pid).name().startswith("ray::")
        os.kill(pid, signal.SIGKILL)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.returncode is None:  # not left running on the shared cluster
            kill_tree(driver)
    assert driver.returncode == 0, out[-4000:]
    assert_progress_shown(out, total=2, errored=1, wall=time.monotonic() - began)

    table = pd.read_parquet(study / "trials.parquet")
    assert sorted(table["status"]) == ["completed", "errored"]
    assert set(table[table["status"] == "errored"]["cell"]) == {"train.lr=1e+30"}
    retried = [t for t in ExperimentAnalysis(str(study)).trials if t.trial_id in victim]
    assert retried[0].run_metadata.num_failures >= 1
    # From its checkpoint, not from scratch: Ray's rows for the victim hold every epoch once; the
    # first row from the new process restarted Ray's count since restore, one epoch after the
    # last row the killed process wrote (its last checkpoint). A retry from scratch would report
    # epoch 1 again.
    rows = trial_results(study)[victim]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    pids = [r["pid"] for r in rows]
    first_retried = next(i for i, p in enumerate(pids) if p != pid)
    assert set(pids[:first_retried]) == {pid} and pid not in pids[first_retried:]
    assert rows[first_retried]["iterations_since_restore"] == 1

    client = MlflowClient(uri)
    runs = runs_of(uri, "faults")
    assert len(runs) == 2  # the retried trial kept its run
    errored = runs[runs["tags.status"] == "errored"]
    assert len(errored) == 1 and (errored["status"] == "FAILED").all()
    assert errored["tags.error"].str.contains("TrainingDiverged").all()
    killed = runs[runs["tags.trial_id"] == retried[0].trial_id].iloc[0]
    assert killed["tags.status"] == "completed"
    # and MLflow saw each epoch once: the epoch the kill interrupted was never reported, so the
    # retry logs it for the first time
    assert steps(client, killed["run_id"]) == [1, 2, 3, 4]


@pytest.mark.study
def test_an_interrupted_study_says_so_and_publishes_nothing(tmp_path, mlflow_schema, ray_head):
    """Ctrl-C: Tune saves the study's state and returns; the driver names what is unfinished and
    how to continue it, and builds no report, publishes no model, claims no best config."""
    d = experiment(tmp_path, name="interrupted", scheduler={"type": "none"})
    d["train"]["epochs"] = 4
    d["data"]["synthetic_train"] = 3000
    d["mlflow"]["report"] = True
    study = tmp_path / "runs" / "interrupted"
    sqlite_store(mlflow_schema, study / "mlflow.db")
    driver = start(write(tmp_path, d), "--address", ray_head.address,
                   env=env_snapshot_every_second())
    try:
        wait_for(lambda: any(trial_results(study).values()), what="a trial's first epoch")
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.returncode is None:
            kill_tree(driver)
    assert driver.returncode == 130, out[-4000:]
    assert re.search(r"publish   not yet: the study was interrupted with [1-9]\d* of \d+ trials "
                     r"unfinished; continue it with --resume", out), out[-4000:]
    assert "best      none yet" in out and not (study / "best_config.yaml").exists()
    assert "report    " not in out and "model     " not in out
    # the progress line agrees: the trials Tune stopped at the interrupt are not finished
    finished, planned = map(int, re.findall(r"progress  (\d+) of (\d+) trials finished", out)[-1])
    unfinished = int(re.search(r"interrupted with (\d+) of", out).group(1))
    assert finished + unfinished == planned, out[-4000:]


@pytest.mark.study
def test_killed_driver_resumes_without_rerunning_or_duplicating(tmp_path, mlflow_schema,
                                                                 study_cli):
    d = experiment(tmp_path, name="resume", scheduler={"type": "none"})
    d["train"]["epochs"] = 4
    d["data"]["synthetic_train"] = 3000
    path = write(tmp_path, d)
    study = tmp_path / "runs" / "resume"
    uri = sqlite_store(mlflow_schema, study / "mlflow.db")  # the study's default store
    # and its own local cluster, killed with it; Ray's snapshot every second, so that a finished
    # and a running trial are seen together in it
    driver = start(path, env=env_snapshot_every_second())

    # The trial folders under storage are Ray's synced copy of the driver's: their rows can run
    # ahead of the experiment state that --resume restores (a row written after the state was
    # saved, copied with it), so what is finished is what that state says.
    def ray_state() -> dict:
        try:
            return {t.trial_id: t for t in ExperimentAnalysis(str(study)).trials}
        except Exception:  # noqa: BLE001  a state file caught mid-copy: not yet
            return {}

    def one_done_one_midway():
        counts = [len(r) for r in trial_results(study).values()]
        return 4 in counts and any(1 <= n < 4 for n in counts) and any(
            t.status == "TERMINATED" for t in ray_state().values())
    try:
        wait_for(one_done_one_midway, what="a finished and a running trial")
    finally:
        kill_tree(driver)
    before = trial_results(study)
    # Tune pickled the driver's callbacks when the study started; make them what an earlier
    # version of this code would have left: objects without the attributes today's code reads
    state = cloudpickle.loads((study / "tuner.pkl").read_bytes())
    callbacks = state["_run_config"].callbacks
    assert {type(c).__name__ for c in callbacks} == {"MlflowTrials", "Progress",
                                                     "JsonLoggerCallback"}
    for callback in callbacks:
        callback.__dict__.clear()
    (study / "tuner.pkl").write_bytes(cloudpickle.dumps(state))
    # and as a driver killed while Tune copies its state into the study folder leaves it: empty.
    # Refused, naming Tune's own whole copy in its session folder.
    saved = sorted(study.glob("experiment_state-*.json"))[-1]
    saved.write_text("")
    refused = study_cli(path, "--resume")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    command = shlex.split(refused.stderr.split("Ray's own copy is whole: ")[1])
    assert command[0] == "cp" and command[2] == str(saved), command
    subprocess.run(command, check=True)
    restored = ray_state()  # the state the resume starts from
    done = [f for f, rows in before.items()
            if rows and restored[rows[0]["trial_id"]].status == "TERMINATED"]
    # a trial the state saw report goes on from its checkpoint; one whose rows all came after
    # the state was saved rightly starts again
    midway = [f for f, rows in before.items()
              if rows and f not in done and restored[rows[0]["trial_id"]].last_result]
    assert done and midway

    out = run(path, "--resume", env=env_without_tracking())
    after = trial_results(study)
    table = pd.read_parquet(study / "trials.parquet")
    assert len(table) == 4 and (table["status"] == "completed").all(), out[-3000:]
    for folder in done:  # finished trials were not run again
        assert after[folder] == before[folder]
    for folder in midway:  # unfinished trials went on from a checkpoint, not from scratch
        kept, new = after[folder][:len(before[folder])], after[folder][len(before[folder]):]
        assert kept == before[folder]
        assert new[0]["pid"] != kept[-1]["pid"] and new[0]["iterations_since_restore"] == 1
        # normally the epoch after the last recorded one; the same one again if the kill cut the
        # sync between the rows and the state they belong to
        assert 1 < new[0]["epoch"] <= kept[-1]["epoch"] + 1
        assert [r["epoch"] for r in new] == list(range(new[0]["epoch"], 5))

    client = MlflowClient(uri)
    runs = runs_of(uri, "resume")
    assert len(runs) == 4 and runs["tags.trial_id"].is_unique
    assert sorted(runs["tags.trial_id"]) == sorted(table["trial_id"])
    # MLflow is written as results arrive, ahead of the snapshot: an epoch logged after the last
    # recorded state is run again on resume and logged again. Honest is: every epoch present,
    # and an epoch logged twice carries the same value twice (the same checkpoint, re-run).
    for run_id in runs["run_id"]:
        logged = {}
        for m in client.get_metric_history(run_id, "val_acc"):
            logged.setdefault(m.step, []).append(m.value)
        assert sorted(logged) == [1, 2, 3, 4]
        assert all(len(v) <= 2 and len(set(v)) == 1 for v in logged.values()), logged
    finished = {before[f][0]["trial_id"] for f in done}
    for run_id in runs[runs["tags.trial_id"].isin(finished)]["run_id"]:
        assert steps(client, run_id) == [1, 2, 3, 4]  # finished before the kill: logged once
