"""Helpers for the tests that run real studies: experiment files, drivers, trial folders."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def experiment(tmp_path, name="smoke", **sections) -> dict:
    """The shipped smoke study, stored under tmp_path, with sections replaced."""
    d = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    d.update(name=name, storage=str(tmp_path / "runs"))
    d["data"]["cache_dir"] = str(tmp_path / "cache")
    d["mlflow"] = {"report": False}  # a report build costs a study ~30 s: the tests that read one ask
    for key, value in sections.items():
        d[key] = value
    return d


def write(tmp_path, d, filename="study.yaml") -> Path:
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(d))
    return path


def start(*args, **kw) -> subprocess.Popen:
    """The driver in its own session, so that the test can kill it and all it started."""
    return subprocess.Popen([sys.executable, "-m", "study.run", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def run(*args, timeout=300, **kw) -> str:
    proc = start(*args, **kw)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and everything below it (its local Ray cluster and trial workers)."""
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.communicate()


def trial_results(study_dir: Path) -> dict[str, list[dict]]:
    """{trial folder: the results Ray wrote for it}, read the way Ray leaves them on disk."""
    out = {}
    for path in study_dir.glob("run_trial_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = lines
    return out


def wait_for(predicate, timeout=240, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without_tracking() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
