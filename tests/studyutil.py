"""Helpers for the tests that run real studies: experiment files, drivers, trial folders."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))  # the CLI of the Ray the tests import


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


def run(*args, timeout=600, **kw) -> str:
    # 600 s: the smoke study with its report took over 300 s on a 2-core machine at load 30
    proc = start(*args, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # not left running, holding a shared cluster's CPUs
        kill_tree(proc)
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and everything below it (its local Ray cluster and trial workers)."""
    kill(psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)])
    proc.communicate()


def kill(family) -> None:
    """SIGKILL these processes (those already gone are skipped) and wait until they are."""
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


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


def sqlite_store(schema: Path, path: Path) -> str:
    """The URI of a new, empty SQLite MLflow store at `path`: a copy of `schema` (the
    mlflow_schema fixture), so that MLflow's migrations run once per session, not once a store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(schema, path)
    return f"sqlite:///{path}"


def cluster_processes(*temp_dirs: str) -> set[psutil.Process]:
    """The processes of the Ray clusters started with these temp_dirs, and of no other: a
    cluster's daemons carry options into its temp_dir (`--log_dir=TEMP_DIR/session_...`); its
    worker processes are their children."""
    daemons = [p for p in psutil.process_iter(["cmdline"]) if any(
        a.startswith("--") and any(f"={d}" in a for d in temp_dirs)
        for a in p.info["cmdline"] or ())]
    family = set()
    for d in daemons:
        try:
            family |= {d, *d.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return family


def stop_ray(temp_dir: str) -> None:
    """`ray stop --force` for one cluster only: `ray stop` kills every Ray process on the
    machine, other tests' included."""
    kill(cluster_processes(temp_dir))


def env_without_tracking() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def env_snapshot_every_second() -> dict:
    """For a test that reads trial folders while the study runs: those folders are Ray's
    snapshot of the driver's state, saved every ~10 s by default (or when a trial has written
    as many checkpoints as it keeps); a few short epochs can end between two saves."""
    return {**env_without_tracking(), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
