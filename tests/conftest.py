import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from studyutil import free_port, wait_for
from tinyvit.config import Config

# A model and data set small enough that a training epoch takes about a second on 2 CPU cores.
TINY = {
    "model": {"embed_dim": 32, "depth": 2, "heads": 2},
    "data": {"source": "synthetic", "synthetic_train": 2000, "synthetic_test": 500,
             "val_size": 500},
    "train": {"epochs": 2, "batch_size": 100, "lr": 2e-3, "warmup_epochs": 0.5, "threads": 1},
}


@pytest.fixture
def tiny(tmp_path) -> dict:
    """The tiny config as a fresh nested dict, caching data under the test's own folder."""
    d = {k: dict(v) for k, v in TINY.items()}
    d["data"]["cache_dir"] = str(tmp_path / "cache")
    return d


@pytest.fixture
def tiny_cfg(tiny) -> Config:
    return Config.from_dict(tiny)


class MlflowServer:
    """A real `mlflow server` on loopback with a SQLite store, in its own process group: it can
    be killed and started again on the same port and store."""

    def __init__(self, folder):
        self.folder, self.port, self.process = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--workers", "1"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
def mlflow_process(tmp_path):
    """An `MlflowServer`, not yet started; stopped at the test's end."""
    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(mlflow_process):
    """The URI of a running `MlflowServer`."""
    yield mlflow_process.start().uri
