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


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback with a SQLite store, in its own process group."""
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
