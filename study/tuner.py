"""Ray Tune wiring: the cluster, the search algorithm, the scheduler, resources, failures, MLflow."""
from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray import tune
from ray.exceptions import AuthenticationError
from ray.tune import CheckpointConfig, FailureConfig, RunConfig
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch

from contract import MAX_EPOCHS

from .progress import Progress
from .spec import Plan, SpecError, record_start
from .trainable import run_trial

# resources.gpu: auto gives each trial this share of a GPU where the cluster has GPUs: a tiny
# ViT leaves most of a GPU idle, so several trials share one
AUTO_GPU_SHARE = 0.25
OPTUNA_JOURNAL = "optuna.log"  # the search's Optuna study, in the study folder
# Checkpoints kept per trial. Tune snapshots the experiment's state (every trial's record: ~22 KB
# a trial, 22 MB at 1,000) every ~10 s, and besides forces one whenever a trial has written this
# many checkpoints since the last, so that no snapshot names a checkpoint already deleted. With
# 2 that was a snapshot of all N trials per trial: the loop slowed as N grew (131 -> 35 trials a
# minute over a 1,000-trial study, bench/RESULTS.md). At 10, a trial of up to 10 epochs forces
# none (the same study held 111-136 a minute to the end) and a longer one one per 10 epochs,
# while a trial's disk stays bounded (a CIFAR-10 checkpoint of the seed's model is ~3 MB).
KEEP_CHECKPOINTS = 10


def run_study(plan: Plan, uri: str, arrays, address: str | None, identity: str, resume: bool,
              t0: float) -> None:
    """Join or start the cluster, check that it can run a trial (SpecError if it never can,
    before anything is written), then run every trial, logging to MLflow from the driver."""
    _connect(address)
    try:
        resources, note = trial_resources(plan, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    except SpecError:
        ray.shutdown()
        raise
    if note:
        print(note, flush=True)
    if not resume:
        record_start(plan, identity)
    # MLflow's import and its SQLite schema (~5 s here) are set up in a thread while Tune starts
    # and the first trial process imports torch; only the first trial's callback waits
    with ThreadPoolExecutor(1) as pool:
        experiment = pool.submit(_prepare_tracking, uri, plan)
        # the decoded data set travels through Ray's object store: no shared disk is assumed
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, arrays=arrays),
                                        resources)
        run_config = _run_config(plan, uri, identity, arrays, experiment, fresh=not resume)
        if resume:
            tuner = tune.Tuner.restore(str(plan.path), trainable, resume_unfinished=True)
            # Tune would call back the callbacks it pickled when the study started, built by
            # whatever version of this code started it; a resumed study reports through the ones
            # this driver built (Tune has no public way to pass them)
            tuner._local_tuner.get_run_config().callbacks = run_config.callbacks
        else:
            tuner = tune.Tuner(trainable, param_space=plan.design.param_space(),
                               tune_config=_tune_config(plan), run_config=run_config)
        print(f"ray       up after {time.perf_counter() - t0:.1f}s; "
              f"{'resuming' if resume else 'starting'} trials", flush=True)
        tuner.fit()


def trial_resources(plan: Plan, nodes: list[dict]) -> tuple[dict, str]:
    """A trial's {cpu, gpu} on this cluster (resolving gpu: auto) and a line saying what auto
    chose; SpecError when no node could ever run one trial (Ray would wait forever)."""
    cpu, gpu, note = plan.resources["cpu"], plan.resources["gpu"], ""
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if gpu == "auto":
        gpu = AUTO_GPU_SHARE if gpus else 0
        note = (f"resources gpu: auto -> {gpu} GPU per trial (the cluster has {gpus:g} GPUs)"
                if gpus else "resources gpu: auto -> no GPU in the cluster; trials train on CPUs")
    if plan.config.train.device == "cuda" and not gpu:
        raise SpecError("train.device=cuda but the cluster has no GPU; use train.device: auto")
    if not any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        have = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes)
        raise SpecError(f"resources: a trial needs {cpu:g} CPU and {gpu:g} GPU on one node, and "
                        f"no node of the cluster has them (nodes: {have}); lower resources.cpu "
                        "or set resources.gpu: 0 or auto")
    return {"cpu": cpu, "gpu": gpu}, note


def _connect(address: str | None) -> None:
    if address is None:
        # Ray prestarts one idle worker per CPU before any job exists, and trials never run in
        # those (their actors start workers of their own), so on a small machine the prestarted
        # ones only compete with the trials' first imports: measured here, first trial 18.5 ->
        # 13.8 s together with no dashboard, which ray[tune] alone cannot serve (ray[default])
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # a local cluster turns token authentication on by itself and warns that it did, on
        # every start: one stray line before every message a user should read
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
        # "local": a cluster of its own even where another runs on this machine; ray.init()
        # alone joins the one whose address the last `ray start` (or ray.cluster_utils) left
        # in Ray's temp folder, which is no promise that it is still the user's or has room
        ray.init(address="local", logging_level="WARNING", include_dashboard=False)
        return
    host, _, port = address.rpartition(":")
    if host and port.isdigit():  # ray.init waits minutes on an address where nothing listens
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise SpecError(f"--address {address}: nothing answers there ({e}); start the "
                            "cluster with `ray start --head` or leave --address out") from None
    # A cluster with token auth refuses a driver without its token, and ray.init retries that
    # for 20 s, each try a line on fd 2 (from C++). The port answered, so one try tells (Ray's
    # own setting of the count, for this call only, unless the user set it); what Ray writes to
    # fd 2 meanwhile is held back and shown only if the driver joins: a refusal is one line.
    wait = "RAY_gcs_server_port_wait_time_s"
    ours = wait not in os.environ
    os.environ.setdefault(wait, "1")
    stderr, held = os.dup(2), tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    try:
        ray.init(address=address, logging_level="WARNING")
        error = None
    except (ConnectionError, RuntimeError, ValueError, TimeoutError, AuthenticationError) as e:
        error = e
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)
        os.close(stderr)
        if ours:
            del os.environ[wait]
    with held:
        if error is None:
            held.seek(0)
            os.write(2, held.read())
            return
    # RAY_AUTH_MODE=token with no token anywhere: AuthenticationError from ray.init itself; a
    # token the head refuses, or none sent: a ConnectionError whose cause quotes the head's
    if any(isinstance(c, AuthenticationError) or "AuthenticationError" in str(c)
           for c in (error, error.__cause__)):
        raise SpecError(f"--address {address}: the cluster refused this driver's auth token "
                        "(missing or wrong); set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the "
                        "head's token (`ray get-auth-token` on the head)")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    raise SpecError(f"--address {address}: cannot join the Ray cluster ({first}); is "
                    "`ray start --head` running there?")


def _prepare_tracking(uri: str, plan: Plan) -> str:
    from .tracking import experiment_of, prepare_experiment  # imports mlflow, in the thread

    return prepare_experiment(uri, *experiment_of(uri, plan))


def _tune_config(plan: Plan) -> tune.TuneConfig:
    # metric and mode go to the searcher and the scheduler themselves: Tune's own copy does not
    # reach a searcher wrapped in its concurrency limiter, and Tune takes only one metric
    design = plan.design
    single = len(design.metrics) == 1
    objective = ({"metric": design.metrics[0], "mode": design.modes[0]} if single
                 else {"metric": design.metrics, "mode": design.modes})
    search_alg = None
    if design.mode == "search":
        # Optuna's own storage beside the study: optuna-dashboard opens it, and a resumed
        # study's sampler goes on with its whole history
        storage = JournalStorage(JournalFileBackend(str(plan.path / OPTUNA_JOURNAL)))
        search_alg = BudgetAwareOptuna(space=design.suggest, seed=design.seed,
                                       study_name=plan.name, storage=storage, **objective)
        if design.repeats > 1:
            search_alg = SeedRepeats(search_alg, repeat=design.repeats)
    scheduler = None
    if plan.scheduler["type"] == "asha":  # the plan makes sure the objective is single here
        scheduler = ASHAScheduler(time_attr="epoch", max_t=plan.epochs,
                                  grace_period=plan.scheduler["grace_period"],
                                  reduction_factor=plan.scheduler["reduction_factor"],
                                  **objective)
    # reuse_actors: a finished trial's worker process takes the next trial, so torch is imported
    # and the data set fetched from the object store once per worker, not once per trial
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler,
                           num_samples=design.trial_count() if search_alg else 1,
                           max_concurrent_trials=plan.resources["max_concurrent"],
                           reuse_actors=True)


class BudgetAwareOptuna(OptunaSearch):
    """OptunaSearch, but a trial the scheduler stopped before its last epoch reaches Optuna as
    PRUNED (with the epochs it reported as intermediate values), not as COMPLETE with a
    truncated accuracy: TPE then ranks it below completed trials by the step it reached, as it
    does for Optuna's own pruners, and importance reads completed full-budget trials only."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials:  # told already (see restore): Ray warns, no more
            return super().on_trial_complete(trial_id, result, error)
        stopped = result and not error and result.get("epoch", 0) < result.get(MAX_EPOCHS, 0)
        if not stopped:
            for key, value in (result or {}).get(SEEDS_KEY, {}).items():  # SeedRepeats' spread
                self._ot_trials[trial_id].set_user_attr(key, value)
            return super().on_trial_complete(trial_id, result, error)
        # the result the scheduler stopped on reaches the searcher here alone, not as a result
        self.on_trial_result(trial_id, result)
        # Optuna keeps the last intermediate value as a pruned trial's value, with its step
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        # Optuna's journal is written as a trial ends, Tune's snapshot (this searcher with it)
        # every few seconds: a driver killed between the two leaves a trial Optuna has finished
        # that Tune runs again from its last checkpoint. The journal is the truth: that trial is
        # finished here too, so its re-run epochs never reach Optuna, which refuses to update a
        # finished trial (UpdateFinishedTrialError, which ends the study).
        journal = self._ot_study.get_trials(deepcopy=False)
        finished = {t.number for t in journal if t.state.is_finished()}
        self._completed_trials |= {trial_id for trial_id, ot_trial in self._ot_trials.items()
                                   if ot_trial.number in finished}
        # and a trial asked of Optuna after that snapshot, which no restored trial runs: failed,
        # not left running in the journal (and in optuna-dashboard) for ever
        known = {ot_trial.number for ot_trial in self._ot_trials.values()}
        for t in journal:
            if t.state == TrialState.RUNNING and t.number not in known:
                self._ot_study.tell(t.number, state=TrialState.FAIL)


SEEDS_KEY = "seeds"


class SeedRepeats(Repeater):
    """Ray Tune's Repeater (every configuration trained with several seeds, the searcher told
    their mean), made strict and resumable:
    - a configuration with a seed that errored or reported no objective reaches Optuna as
      FAIL, where Repeater would average the other seeds as if they were all;
    - the seeds' values and their standard deviation go with the mean (Optuna user attrs);
    - its groups are saved with the searcher, so a resumed study finishes a half-run group
      (Repeater saves only the searcher it wraps)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs):
        group = self._trial_id_to_group[trial_id]
        value = (result or {}).get(self.searcher.metric)
        group.report(trial_id, float("nan") if value is None or kwargs.get("error") else value)
        if not group.finished_reporting():
            return
        scores = np.array(group.scores(), dtype=float)
        if not np.isfinite(scores).all():
            return self.searcher.on_trial_complete(group.primary_trial_id, None, error=True)
        self.searcher.on_trial_complete(group.primary_trial_id, {
            self.searcher.metric: float(scores.mean()),
            SEEDS_KEY: {f"{self.searcher.metric}_seeds": scores.tolist(),
                        f"{self.searcher.metric}_sd": float(scores.std(ddof=1))}})

    def save(self, checkpoint_path: str):
        self.searcher.save(checkpoint_path)
        searcher = Path(checkpoint_path).read_bytes()
        Path(checkpoint_path).write_bytes(pickle.dumps((searcher, self.get_state())))

    def restore(self, checkpoint_path: str):
        searcher, state = pickle.loads(Path(checkpoint_path).read_bytes())
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "searcher.pkl").write_bytes(searcher)
            self.searcher.restore(str(Path(folder) / "searcher.pkl"))
        self.set_state(state)


def _run_config(plan: Plan, uri: str, identity: str, arrays, experiment: Future,
                fresh: bool) -> RunConfig:
    from .tracking import MlflowTrials, dataset_input  # mlflow: waits for the thread's import

    # Of Tune's default loggers only the JSON one: each trial's result.json is what its results
    # are read from (the results table, --sync-mlflow, ExperimentAnalysis); the CSV copy and the
    # TensorBoard event files (MLflow shows the curves) cost the driver's loop a write each
    # per result
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    return RunConfig(name=plan.name, storage_path=str(plan.storage), verbose=1,
                     callbacks=[MlflowTrials(uri, plan, identity,
                                             dataset_input(plan.config, arrays), experiment,
                                             fresh),
                                Progress(), JsonLoggerCallback()],
                     failure_config=FailureConfig(max_failures=plan.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS))
