"""The study runner under load: many short trials at once on a two-node cluster, logging to an
MLflow server. Does every result reach MLflow exactly once, what does the framework cost per
trial, and does the driver keep its memory and its pace?

    python bench/scale.py [--trials 1000] [--concurrent 8] [--epochs 3] [--keep DIR]

It starts, in a working folder (a temporary one unless --keep), a two-node local Ray cluster
(`ray start --head` and `ray start --address`, each with its own --temp-dir and half of
--concurrent logical CPUs, token authentication as the README's recipe), an `mlflow server` on
loopback with a SQLite store, then drives `python -m study.run FILE --address ... --tracking-uri
...` as a subprocess: an ablation of --trials trials (2 cells x trials/2 seeds) of a tiny model
on synthetic data, --epochs epochs each, 1 CPU and 1 thread per trial, --concurrent at once. It
stops only the processes it started.

What it reports, and how each figure is defined:

- runs and points: what Ray holds is the truth. Expected runs: one per trial in Ray's study
  folder; expected points: per trial, every (metric, epoch) that the MLflow contract logs
  (`contract.EPOCH_METRICS`, `FINAL_METRICS`, `PARAM_COUNT` at step 0) found in the trial's
  `result.json`. Found: MLflow's trial runs (`tags.kind = 'trial'`) and every point of their
  metric histories, read back through the server. Duplicated runs: runs beyond the first per
  `trial_id`; duplicated points: points beyond the first per (run, metric, step); value
  mismatches: a found point whose value is not Ray's.
- framework cost per trial = (W x S - E) / N, where W is the driver's wall time (command to
  exit), S the concurrent slots, E the trainings' own time (every trial's `epoch_seconds`
  summed: its training and validation passes, as the trainer times them) and N the trials:
  the slot time per trial spent on anything but training (process and cluster start-up,
  scheduling, data hand-over, checkpoints, reporting, MLflow, the test pass, the end). Also
  its steady-state part, the same with W replaced by the span from the first epoch's start to
  the last trial's end (1-s resolution: Ray's result timestamps); the part of it spent inside
  the trial processes (Tune's `time_total_s` beyond the epochs); and plain W / N.
- the framework's cost in core time: in the same steady-state span, the CPU time (user +
  system) of the driver, the MLflow server, the cluster's trial processes and Ray's other
  processes, each with its descendants (sampled every 2 s), less the trainings' own CPU time
  (every epoch's `cpu_seconds`), per trial. Wall-clock slot time charges the framework for
  the cores it takes from the trials: with more slots than cores (8 on 2 here) a CPU-second
  of the driver or the server costs several slot-seconds. Also the rest of the machine's busy
  time (this script's sampling among it) and its idle time, per trial.
- driver memory: the RSS of the `study.run` process alone (no children), sampled every 0.5 s;
  its peak, and its growth per 100 trials: the slope of a least-squares line of RSS against
  trials finished (from each trial's last result timestamp), over the samples taken after
  --warmup-trials had finished and before the last one did.
- driver stall: the longest step of Tune's loop, from the line study/progress.py prints at the
  study's end.

Targets: every run and every point present, no duplicate, the driver's memory flat after
warm-up (growth under 1 MiB per 100 trials), framework cost under 0.5 s per trial at 8
concurrent (in slot time and in core time).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the tests' helpers for local clusters

import contract as c  # noqa: E402
from study.progress import DRIVER_LINE  # noqa: E402
from studyutil import cluster_processes, free_port, stop_ray  # noqa: E402

BIN = Path(sys.executable).parent  # the ray and mlflow of the Python that runs this
NAME = "scale"
FLAT_MIB_PER_100 = 1.0
COST_TARGET_S = 0.5


def study_file(folder: Path, args) -> Path:
    d = {"name": NAME, "mode": "ablation", "storage": str(folder / "runs"),
         "model": {"embed_dim": 32, "depth": 1, "heads": 2, "patch_size": 8},
         "data": {"source": "synthetic", "synthetic_train": args.train_images,
                  "synthetic_test": 200, "val_size": 200, "cache_dir": str(folder / "cache")},
         "train": {"epochs": args.epochs, "batch_size": 100, "warmup_epochs": 0.5,
                   "threads": 1},
         "ablation": {"factors": {"model.pos_embedding": ["learned", "none"]},
                      "seeds": args.trials // 2},
         "scheduler": {"type": "none"},
         "resources": {"cpu": 1, "max_concurrent": args.concurrent},
         "mlflow": {"report": False}}
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


class Cluster:
    """Two `ray start` nodes of this machine, each in its own temp dir: stopped alone, never
    with `ray stop`, which would stop every Ray process of the machine."""

    def __init__(self, folder: Path, cpus: tuple[int, int]):
        home = folder / "home"  # the head's token, as the README's recipe obtains it
        env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
        token = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
        self.address = f"127.0.0.1:{free_port()}"
        # short: Ray's socket paths under a temp dir must fit in 107 characters
        self.temp_dirs = [tempfile.mkdtemp(prefix="ray-") for _ in cpus]
        node_args = [["--head", f"--port={self.address.split(':')[1]}"],
                     [f"--address={self.address}"]]
        for args, temp_dir, n in zip(node_args, self.temp_dirs, cpus):
            r = subprocess.run([str(BIN / "ray"), "start", *args, f"--temp-dir={temp_dir}",
                                f"--num-cpus={n}", "--num-gpus=0", "--object-store-memory",
                                str(300 * 2**20)], env=self.env, capture_output=True, text=True)
            if r.returncode:
                self.stop()
                sys.exit(f"ray start {' '.join(args)} failed:\n{r.stderr[-3000:]}")

    def stop(self) -> None:
        for d in self.temp_dirs:
            stop_ray(d)
            shutil.rmtree(d, ignore_errors=True)


class MlflowServer:
    def __init__(self, folder: Path):
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
             self.uri.rsplit(":", 1)[1], "--backend-store-uri",
             f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
             str(folder / "mlartifacts"), "--workers", "1"],
            start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=open(folder / "mlflow-server.log", "w"))
        end = time.time() + 300  # minutes on a busy 2-core machine
        while not self.healthy():
            if time.time() > end or self.proc.poll() is not None:
                self.stop()
                sys.exit(f"mlflow server did not answer; see {folder / 'mlflow-server.log'}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


class CpuLedger:
    """The CPU time (user + system, in core-seconds) each part of the study has used so far:
    the driver, the MLflow server, the cluster's worker processes (where trials run: Ray names
    them `ray::...`) and its other processes (Ray's daemons and agents), each with its
    descendants; and the whole machine's busy time. A process that exits keeps what it used."""

    PARTS = ("driver", "mlflow server", "trial processes", "ray daemons")

    def __init__(self, driver: int, server: int, temp_dirs: list[str]):
        self.roots = {"driver": [driver], "mlflow server": [server]}
        self.temp_dirs, self.used, self.rows = temp_dirs, {}, []

    def _members(self):
        for part, pids in self.roots.items():
            for pid in pids:
                try:
                    me = psutil.Process(pid)
                    yield from ((part, p) for p in [me, *me.children(recursive=True)])
                except psutil.NoSuchProcess:
                    pass
        for p in cluster_processes(*self.temp_dirs):
            try:
                yield ("trial processes" if p.name().startswith("ray::") else "ray daemons"), p
            except psutil.NoSuchProcess:
                pass

    def sample(self) -> None:
        for part, p in self._members():
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self.used[p.pid, p.create_time()] = (part, t.user + t.system)
            except psutil.NoSuchProcess:
                pass
        busy = psutil.cpu_times()
        total = {part: 0.0 for part in self.PARTS}
        for part, seconds in self.used.values():
            total[part] += seconds
        self.rows.append((time.time(), total, sum(busy) - busy.idle - busy.iowait))

    def between(self, t0: float, t1: float) -> tuple[float, dict, float]:
        """(seconds, {part: core-seconds}, the machine's busy core-seconds) from the sample
        nearest t0 to the one nearest t1."""
        a, b = (min(self.rows, key=lambda row: abs(row[0] - t)) for t in (t0, t1))
        return b[0] - a[0], {k: b[1][k] - a[1][k] for k in self.PARTS}, b[2] - a[2]


def drive(path: Path, cluster: Cluster, server: "MlflowServer",
          log: Path) -> tuple[float, list, CpuLedger]:
    """The study's wall time, [(time, driver RSS in bytes)] every 0.5 s, and the CPU its parts
    used, sampled every 2 s."""
    samples, start = [], time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "study.run", str(path), "--address",
                                 cluster.address, "--tracking-uri", server.uri], cwd=REPO,
                                env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
        me = psutil.Process(proc.pid)
        cpu = CpuLedger(proc.pid, server.proc.pid, cluster.temp_dirs)
        while proc.poll() is None:
            try:
                samples.append((time.time(), me.memory_info().rss))
                if len(samples) % 4 == 1:
                    cpu.sample()
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
    wall = time.time() - start
    if proc.wait():
        sys.exit(f"study.run exited with {proc.returncode}; its output: {log}")
    return wall, samples, cpu


def ray_trials(study: Path) -> dict[str, list[dict]]:
    """{trial_id: its results}, as Ray recorded them: every trial of its experiment state, and
    in the trial's folder one JSON line per reported epoch (result.json; none if it never
    reported)."""
    from ray.tune import ExperimentAnalysis

    trials = {}
    for trial in ExperimentAnalysis(str(study)).trials:
        path = Path(trial.path) / "result.json"
        lines = path.read_text().splitlines() if path.exists() else []
        trials[trial.trial_id] = [json.loads(x) for x in lines if x.strip()]
    return trials


def expected_points(results: list[dict]) -> dict[tuple[str, int], float]:
    points = {}
    for r in results:
        for key in (*c.EPOCH_METRICS, *c.FINAL_METRICS):
            if key in r:
                points[key, int(r["epoch"])] = float(r[key])
        if r["epoch"] == 1:
            points[c.PARAM_COUNT, 0] = float(r[c.PARAM_COUNT])
    return points


def mlflow_counts(uri: str, trials: dict[str, list[dict]]) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(NAME).experiment_id
    runs = client.search_runs([experiment], f"tags.{c.RUN_KIND} = '{c.TRIAL_RUN}'",
                              max_results=50000)
    per_trial = Counter(r.data.tags.get(c.TRIAL_ID) for r in runs)
    keys = (*c.EPOCH_METRICS, *c.FINAL_METRICS, c.PARAM_COUNT)

    def history(run):
        return run, [m for k in keys for m in client.get_metric_history(run.info.run_id, k)]

    expected = {t: expected_points(results) for t, results in trials.items()}
    found = points_dup = mismatched = missing = 0
    seen_trials = set()
    with ThreadPoolExecutor(8) as pool:
        for run, points in pool.map(history, runs):
            trial = run.data.tags.get(c.TRIAL_ID)
            found += len(points)
            steps = Counter((m.key, m.step) for m in points)
            points_dup += sum(n - 1 for n in steps.values())
            if trial in seen_trials or trial not in expected:
                continue  # a duplicated run's or a stray run's points are not counted twice
            seen_trials.add(trial)
            values = {(m.key, m.step): m.value for m in points}
            want = expected[trial]
            missing += sum(k not in values for k in want)
            mismatched += sum(k in values and values[k] != v for k, v in want.items())
    return {"runs": len(runs), "runs_dup": sum(n - 1 for n in per_trial.values()),
            "runs_missing": len(set(trials) - set(per_trial)),
            "runs_stray": len(set(per_trial) - set(trials)),
            "points_expected": sum(map(len, expected.values())), "points_found": found,
            "points_missing": missing, "points_dup": points_dup, "points_mismatched": mismatched}


def memory(samples: list, ends: list[float], warmup: int) -> dict:
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples]) / 2**20
    done = np.searchsorted(np.sort(ends), t, side="right")  # trials finished at each sample
    during = t <= max(ends)
    fit = during & (done >= warmup)
    out = {"peak": rss.max(), "peak_trials": rss[during].max() if during.any() else float("nan"),
           "fit_samples": int(fit.sum()), "growth": float("nan"), "fit_span": (0, 0)}
    if fit.sum() >= 10 and np.ptp(done[fit]) > 0:
        slope, _ = np.polyfit(done[fit], rss[fit], 1)
        out.update(growth=100 * slope, fit_span=(int(done[fit].min()), int(done[fit].max())),
                   at_warmup=float(np.median(rss[fit][:10])),
                   at_end=float(np.median(rss[fit][-10:])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=1000, help="an even number")
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=1000,
                    help="synthetic images; 200 of them are the validation split")
    ap.add_argument("--warmup-trials", type=int, default=100,
                    help="trials finished before the memory fit starts")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, Ray's "
                    "results, the MLflow store); default: a temporary folder, removed")
    args = ap.parse_args()
    if args.trials < 2 or args.trials % 2 or args.concurrent < 2:
        ap.error("--trials must be even and --concurrent at least 2")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = study_file(folder, args)
    half = args.concurrent // 2
    cluster = server = None
    try:
        cluster = Cluster(folder, (half, args.concurrent - half))
        server = MlflowServer(folder)
        wall, samples, cpu = drive(path, cluster, server, folder / "driver.log")
        trials = ray_trials(folder / "runs" / NAME)
        counts = mlflow_counts(server.uri, trials)
    finally:
        for part in (server, cluster):
            if part is not None:
                part.stop()
    log = (folder / "driver.log").read_text()
    report(args, wall, samples, cpu, trials, counts, log)
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


def report(args, wall, samples, cpu, trials, counts, log) -> None:
    results = [r for rs in trials.values() for r in rs]
    epochs = sum(r["epoch_seconds"] for r in results)
    inside = sum(rs[-1]["time_total_s"] for rs in trials.values() if rs) - epochs
    ends = [rs[-1]["timestamp"] for rs in trials.values() if rs]
    first = min(r["timestamp"] - r["epoch_seconds"] for r in results if r["epoch"] == 1)
    start = samples[0][0]
    n, slots = len(trials), args.concurrent
    cost = (wall * slots - epochs) / n
    steady = ((max(ends) - first) * slots - epochs) / n
    span, used, busy = cpu.between(first, max(ends))
    trained = sum(r.get("cpu_seconds", float("nan")) for r in results)
    used["trial processes"] -= trained  # beyond their epochs
    core_cost = sum(used.values()) / n
    cores = psutil.cpu_count()
    mem = memory(samples, ends, args.warmup_trials)
    stall = DRIVER_LINE.search(log)
    ok = {"all present": counts["runs_missing"] == counts["points_missing"] == 0
          and counts["runs"] - counts["runs_dup"] - counts["runs_stray"] == n == args.trials,
          "no duplicate": counts["runs_dup"] == counts["points_dup"] == 0,
          "memory flat": mem["growth"] < FLAT_MIB_PER_100 if mem["growth"] == mem["growth"]
          else None,
          f"cost < {COST_TARGET_S} s/trial in slot time": cost < COST_TARGET_S,
          "in core time": core_cost < COST_TARGET_S}
    statuses = Counter(c.trial_status(rs[-1]["epoch"], rs[-1][c.MAX_EPOCHS]) if rs else "no result"
                       for rs in trials.values())
    print(f"{n} trials in Ray ({args.trials} planned; {dict(statuses)}), {args.epochs} epochs, "
          f"{slots} concurrent on 2 nodes x {slots // 2}-{slots - slots // 2} CPUs")
    print(f"runs      {counts['runs']} found / {n} expected; missing {counts['runs_missing']}, "
          f"duplicated {counts['runs_dup']}, stray {counts['runs_stray']}")
    print(f"points    {counts['points_found']} found / {counts['points_expected']} expected; "
          f"missing {counts['points_missing']}, duplicated {counts['points_dup']}, value "
          f"mismatches {counts['points_mismatched']}")
    print(f"wall      {wall:.1f} s ({wall / n:.3f} s per trial); trainings' own time "
          f"{epochs:.1f} s summed ({epochs / n:.2f} s per trial)")
    print(f"cost      {cost:.3f} s per trial = ({wall:.1f} s x {slots} - {epochs:.1f} s) / {n}; "
          f"steady state {steady:.3f} s (command to first epoch {first - start:.1f} s, last "
          f"trial's end to exit {start + wall - max(ends):.1f} s)")
    print(f"          of which inside the trials' processes {inside / n:.3f} s per trial (Tune's "
          f"time_total_s beyond the epochs: set-up, checkpoints, reports, the test pass)")
    print(f"cpu       steady state, {span:.0f} s x {cores} cores = {span * cores:.0f} core-s; "
          f"per trial: trainings (their epochs' CPU) {trained / n:.3f}, the framework "
          f"{core_cost:.3f} core-s = " + " + ".join(f"{k} {v / n:.3f}" for k, v in used.items())
          + f" (trial processes beyond their epochs); the rest of the machine "
          f"{(busy - trained - sum(used.values())) / n:.3f}, idle {(span * cores - busy) / n:.3f}")
    growth = (f"{mem['growth']:+.2f} MiB per 100 trials over trials {mem['fit_span'][0]}-"
              f"{mem['fit_span'][1]} ({mem['at_warmup']:.0f} -> {mem['at_end']:.0f} MiB, "
              f"{mem['fit_samples']} samples)" if mem["growth"] == mem["growth"]
              else f"growth not measured: {mem['fit_samples']} samples after warm-up")
    print(f"driver    RSS peak {mem['peak']:.0f} MiB ({mem['peak_trials']:.0f} MiB while "
          f"trials ran); {growth}")
    print("driver    " + (f"longest loop step {stall[1]} s (step {stall[2]} of {stall[3]}, at "
                          f"{stall[4]}), longest pause between steps {stall[5]} s" if stall
                          else "no loop-step line in the driver's output"))
    slow = {}  # Ray Tune's own warnings of loop operations slower than 0.5 s, per operation
    for op, seconds in re.findall(r"The `([^`]+)` operation took ([\d.]+) s", log):
        count, top = slow.get(op, (0, 0.0))
        slow[op] = (count + 1, max(top, float(seconds)))
    print("tune      operations over 0.5 s: " + (", ".join(
        f"{op} {count}x (max {top:.2f} s)"
        for op, (count, top) in sorted(slow.items(), key=lambda x: -x[1][1])) or "none"))
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    print("targets   " + "; ".join(f"{k}: {verdict[v]}" for k, v in ok.items()))


if __name__ == "__main__":
    main()
