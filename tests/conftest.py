import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest

from studyutil import (RAY, env_without_tracking, experiment, free_port, run, sqlite_store,
                       stop_ray, wait_for, write)
from tinyvit.config import Config

# A model and data set small enough that a training epoch takes about a second on 2 CPU cores.
TINY = {
    "model": {"embed_dim": 32, "depth": 2, "heads": 2},
    "data": {"source": "synthetic", "synthetic_train": 2000, "synthetic_test": 500,
             "val_size": 500},
    "train": {"epochs": 2, "batch_size": 100, "lr": 2e-3, "warmup_epochs": 0.5, "threads": 1},
}


def pytest_collection_modifyitems(items):
    """Tests that run a real study (a minute or more each) start first: three at a time (-n 3),
    a long test started last would run on while the other workers idle."""
    items.sort(key=lambda item: item.get_closest_marker("study") is None)


@pytest.fixture
def tiny(tmp_path) -> dict:
    """The tiny config as a fresh nested dict, caching data under the test's own folder."""
    d = {k: dict(v) for k, v in TINY.items()}
    d["data"]["cache_dir"] = str(tmp_path / "cache")
    return d


@pytest.fixture
def tiny_cfg(tiny) -> Config:
    return Config.from_dict(tiny)


@pytest.fixture(scope="session")
def mlflow_schema(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, its schema made: MLflow's migrations cost a new store 4.3 s
    of CPU (measured; a copy 0.1 s), so the tests whose subject is not a new store's creation
    start from a copy (studyutil.sqlite_store)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    with closing(sqlite3.connect(path)) as db, db:
        # each copy then makes its own Default experiment, with its own artifact root
        db.execute("DELETE FROM experiments")
    return path


@pytest.fixture(scope="session")
def ray_head():
    """address and node (id) of a one-node Ray cluster, 2 CPUs, started by `ray start --head`
    once for the session: the studies whose subject is not the local cluster a driver starts by
    default join it (--address or RAY_ADDRESS) instead of starting and stopping one each. Its
    own temp dir keeps a plain `ray.init()` elsewhere on the machine from joining it and lets it
    be stopped alone; no token authentication (tests/test_cluster.py checks that)."""
    from ray._raylet import GcsClient

    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit 107 chars
    address = f"127.0.0.1:{free_port()}"
    # no idle workers prestarted, as a driver's own local cluster (study/tuner.py says why)
    env = {**env_without_tracking(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}
    try:
        r = subprocess.run([RAY, "start", "--head", f"--port={address.split(':')[1]}",
                            f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=false"],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        node = next(iter(GcsClient(address=address).get_all_node_info())).hex()
        yield SimpleNamespace(address=address, node=node)
    finally:
        stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def study_cli(monkeypatch, capfd):
    """`python -m study.run ARGS` run in this process, as a CompletedProcess (exit code, stdout,
    stderr). For what is refused or planned before Ray starts: a new interpreter would add only
    its imports, 7-8 s of CPU a call (measured); tests/test_study.py and the cluster tests check
    a refusal by a real process."""
    from study.outbox import CLIENT_ENV
    from study.run import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in CLIENT_ENV.items():  # what main sets for its MLflow client: undone after
        monkeypatch.setenv(key, value)
    capfd.readouterr()

    def call(*args) -> subprocess.CompletedProcess:
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call


@pytest.fixture(scope="session")
def search_study(tmp_path_factory, mlflow_schema, ray_head):
    """One real search that several tests read (a study costs about a minute here): a strange
    name, logged into a store that already holds a run of an earlier study of that name and
    folder, a conditional key, and ASHA stopping one trial. TPE's first draws are random with its
    seed, in the order of the written file's keys (sorted): seed 24 proposes lr 2e-3 (learned),
    2e-3 (rope2d), then 1e-7 (learned). One trial at a time, so the 1e-7 trial meets two
    finished ones at the epoch-2 rung and stops. Its readers carry xdist_group("search_study"),
    so that one worker builds it once."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("search")
    name = "it's a \"study\""
    d = experiment(tmp, name=name, scheduler={
        "type": "asha", "grace_period": 2, "reduction_factor": 2})
    d["search"] = {"num_samples": 3, "seed": 24, "space": {
        "train.lr": [0.002, 1.0e-7], "model.pos_embedding": ["learned", "rope2d"],
        "model.rope_base": {"loguniform": [10, 1000], "when": "model.pos_embedding == 'rope2d'"}}}
    d["train"]["epochs"] = 3
    d["resources"] = {"cpu": 1, "max_concurrent": 1}
    folder = tmp / "runs" / name
    uri = sqlite_store(mlflow_schema, tmp / "store.db")
    client = MlflowClient(uri)
    # its own artifact location: MLflow's default is ./mlruns of whatever folder runs the test
    experiment_id = client.create_experiment(name, (tmp / "artifacts").as_uri())
    earlier = client.create_run(experiment_id, run_name="00000000", tags={
        "study": name, "study_id": "earlier", "trial_id": "00000000", "results": str(folder),
        "status": "completed", "budget": "1", "max_epochs": "1"})
    client.log_metric(earlier.info.run_id, "val_acc", 0.99, step=1)
    run(write(tmp, d), "--tracking-uri", uri, "--address", ray_head.address,
        env=env_without_tracking())
    return SimpleNamespace(name=name, folder=folder, uri=uri, experiment_id=experiment_id,
                           earlier=earlier.info.run_id)


class MlflowServer:
    """A real `mlflow server` on loopback with a SQLite store, in its own process group: it can
    be killed and started again on the same port and store."""

    def __init__(self, folder, schema):
        self.folder, self.port, self.process = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.store = sqlite_store(schema, folder / "server.db")

    def start(self) -> "MlflowServer":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port),
             "--backend-store-uri", self.store,
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--workers", "1"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # without MLflow's job runner (GenAI scorer jobs: nothing here submits one), a second
            # process the server starts and waits for: measured 92 -> 37-51 s to healthy on a
            # loaded 2-core machine
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_for(self.healthy, timeout=180, what="mlflow server")  # a busy machine: 75 s seen
        return self

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200
        except OSError:
            return False

    def stop(self, sig=signal.SIGTERM) -> None:
        """The whole process group (SIGKILL: a crash, nothing flushed or answered); killed if
        a SIGTERM is not done in 30 s (a busy machine)."""
        if self.process is not None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            self.process = None


@pytest.fixture
def mlflow_process(tmp_path, mlflow_schema):
    """An `MlflowServer`, not yet started; stopped at the test's end."""
    server = MlflowServer(tmp_path, mlflow_schema)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(mlflow_process):
    """The URI of a running `MlflowServer`."""
    yield mlflow_process.start().uri
