"""A tracking server that dies under a running study: a real `mlflow server` killed (SIGKILL to
its process group) while trials train, then started again on the same port and SQLite store, or
never. MLflow must end up holding exactly what Ray holds: one run per trial, one point per
(metric, step), read back against the trials' result.json files."""
import http.client
import json
import shlex
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

import contract as c
from studyutil import (REPO, env_snapshot_every_second, env_without_tracking, experiment, run,
                       start, trial_results, wait_for, write)


def small_study(tmp_path, name: str) -> dict:
    d = experiment(tmp_path, name=name, scheduler={"type": "none"})
    d["search"]["num_samples"] = 2
    return d


def first_epoch_logged(uri: str, name: str):
    """Runs of the experiment `name` with a val_acc logged (none before the experiment is)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    return found and client.search_runs([found.experiment_id], "metrics.val_acc > -1")


def assert_mlflow_holds_what_ray_holds(uri: str, name: str, study) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parents = [r for r in runs if r.data.tags[c.RUN_KIND] == c.STUDY_RUN]
    trials = {r.data.tags[c.TRIAL_ID]: r for r in runs if r.data.tags[c.RUN_KIND] == c.TRIAL_RUN}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == len(runs) - 1  # one run per trial id
    ray = {rows[0]["trial_id"]: rows for rows in trial_results(study).values()}
    assert sorted(trials) == sorted(ray)
    table = pd.read_csv(study / "trials.csv").set_index("trial_id")
    for trial_id, rows in ray.items():
        run, row = trials[trial_id], table.loc[trial_id]
        assert run.data.tags[c.PARENT] == parents[0].info.run_id
        assert run.data.tags[c.STATUS] == row[c.STATUS] == c.COMPLETED
        assert run.data.tags[c.BUDGET] == str(row[c.BUDGET]) and run.info.status == "FINISHED"
        for key in (*c.EPOCH_METRICS, *c.FINAL_METRICS, c.PARAM_COUNT):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                                 key))
            step = 0 if key == c.PARAM_COUNT else None
            assert logged == sorted((r["epoch"] if step is None else step, r[key])
                                    for r in rows if key in r and (step is None
                                                                   or r["epoch"] == 1)), key
        assert [a.path for a in client.list_artifacts(run.info.run_id, c.CHECKPOINT_DIR)] == \
            [c.CHECKPOINT]


@pytest.mark.study
def test_a_server_down_mid_study_holds_results_back_and_gets_them_all(tmp_path, mlflow_process,
                                                                    ray_head):
    server = mlflow_process.start()
    d = small_study(tmp_path, "outage")
    d["train"]["epochs"] = 3
    # the driver waits for the server at the study's end as long as a busy machine needs to
    # start one (over a minute seen)
    driver = start(write(tmp_path, d), "--tracking-uri", server.uri, "--mlflow-wait", "300",
                   "--address", ray_head.address, env=env_snapshot_every_second())
    study = tmp_path / "runs" / "outage"
    wait_for(lambda: first_epoch_logged(server.uri, "outage"), what="an epoch in MLflow")
    server.stop(signal.SIGKILL)

    def results() -> int:
        return sum(len(rows) for rows in trial_results(study).values())
    at_kill = results()
    wait_for(lambda: results() > at_kill, what="trials training on without MLflow")
    server.start()
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out[-4000:]
    assert "is not answering" in out and "answers again" in out and "missed" not in out, out
    assert_mlflow_holds_what_ray_holds(server.uri, "outage", study)
    assert "registry  outage version 1" in out


@pytest.mark.study
def test_a_server_gone_for_good_ends_the_study_and_one_command_replays_it(tmp_path,
                                                                          mlflow_process,
                                                                          ray_head):
    server = mlflow_process.start()
    path = write(tmp_path, small_study(tmp_path, "gone"))
    driver = start(path, "--tracking-uri", server.uri, "--mlflow-wait", "2",
                   "--address", ray_head.address, env=env_without_tracking())
    study = tmp_path / "runs" / "gone"
    wait_for(lambda: first_epoch_logged(server.uri, "gone"), what="an epoch in MLflow")
    server.stop(signal.SIGKILL)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out[-4000:]
    # Ray's results stand: the table and the best config, from Ray's own state
    assert len(pd.read_csv(study / "trials.csv")) == 2 and (study / "best_config.yaml").exists()
    missed = [line for line in out.splitlines() if line.startswith("mlflow    missed ")]
    assert len(missed) == 1 and int(missed[0].split()[2]) > 0, out[-4000:]
    assert "publish   skipped" in out and "registry" not in out
    command = shlex.split(missed[0].split("replay them into MLflow with: ")[1])
    assert command[:3] == ["python", "-m", "study.run"] and command[-1] == "--sync-mlflow"

    server.start()
    replays = [subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=env_without_tracking())
               for _ in range(2)]
    assert [r.returncode for r in replays] == [0, 0], replays[0].stdout + replays[0].stderr
    first, again = (r.stdout for r in replays)
    assert "registry  gone version 1" in first and "(0 missing points" not in first
    assert "(0 missing points written)" in again and "in MLflow already" in again
    assert_mlflow_holds_what_ray_holds(server.uri, "gone", study)
    assert len(MlflowClient(server.uri).search_model_versions("name = 'gone'")) == 1


class AnswerLosingProxy(ThreadingHTTPServer):
    """A real HTTP hop in front of the tracking server that forwards every request, but answers
    the first run creations according to `fates`, one each in order: "lost", forwarded and the
    run created, then hung up on without an answer (a network cut on the way back: the client
    cannot tell whether the run exists); "late", held until the client's retry of that creation
    (the same trial, or the study's run) has gone through after it gave up waiting, then
    forwarded unanswered (a slow server: the first creation still lands, a second run of the
    same trial). Held by whose run it is: another trial's creation landing meanwhile must not
    release it before the retry, or the retry would find it and the fates would go to other
    creations than the test means."""

    def __init__(self, upstream: str, fates: list[str]):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.fates = (host, int(port)), list(fates)
        self.unanswered, self.held, self._lock = [], [], threading.Lock()
        super().__init__(("127.0.0.1", 0), _Forward)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @staticmethod
    def whose(body: bytes) -> str | None:
        """The trial id a run creation tags, None for the study's run."""
        tags = json.loads(body or b"{}").get("tags", [])
        return next((t["value"] for t in tags if t["key"] == c.TRIAL_ID), None)

    def fate(self, path: str) -> str | None:
        if not path.endswith("/runs/create"):
            return None
        with self._lock:
            return self.fates.pop(0) if self.fates else None


class _Forward(BaseHTTPRequestHandler):
    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fate = self.server.fate(self.path)
        if fate == "late":
            released = threading.Event()
            self.server.held.append((self.server.whose(body), released))
            released.wait(timeout=120)
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        upstream.request(self.command, self.path, body, headers)
        answer = upstream.getresponse()
        payload = answer.read()
        if self.path.endswith("/runs/create") and fate != "late":
            for whose, released in self.server.held:  # the retry went through: the late one
                if whose == self.server.whose(body):  # lands now
                    released.set()
        if fate is not None:  # created; the client never hears of it
            self.server.unanswered.append((fate, payload))
            self.close_connection = True
            return
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args):  # quiet
        pass


@pytest.mark.study
def test_runs_created_whose_answers_were_lost_or_late_are_one_run_each(tmp_path, mlflow_server,
                                                                      ray_head):
    """The study's run and a trial's run are each created once after the driver gave up on the
    creation (a timeout), and again by its retry: the study ends with the extra runs deleted.
    Then the retried creations, and the other trial's, are made without the answer reaching the
    driver: its retries find those runs instead of adding more."""
    timeout_s = 4  # the driver's wait for an answer (30 s by default)
    proxy = AnswerLosingProxy(mlflow_server, ["late", "lost", "late", "lost", "lost"])
    try:
        out = run(write(tmp_path, small_study(tmp_path, "lost")), "--tracking-uri", proxy.uri,
                  "--address", ray_head.address,
                  env={**env_without_tracking(), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)})
    finally:
        proxy.shutdown()
    assert sorted(fate for fate, _ in proxy.unanswered) == ["late", "late", "lost", "lost", "lost"]
    assert "is not answering" in out and "answers again" in out
    assert_mlflow_holds_what_ray_holds(mlflow_server, "lost", tmp_path / "runs" / "lost")
    client = MlflowClient(mlflow_server)
    deleted = client.search_runs([client.get_experiment_by_name("lost").experiment_id],
                                 run_view_type=ViewType.DELETED_ONLY)
    # one of each, or more where a busy server made the driver give up on other creations too
    assert {r.data.tags[c.RUN_KIND] for r in deleted} == {c.STUDY_RUN, c.TRIAL_RUN}
