"""Ray Tune wiring: the search algorithm, the scheduler, resources, failures and MLflow."""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import ray
from ray import tune
from ray.tune import CheckpointConfig, FailureConfig, RunConfig
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from .spec import Spec
from .trainable import run_trial


def run_study(spec: Spec, uri: str, arrays, address: str | None, resume: bool, t0: float):
    # MLflow's import and its SQLite schema (~5 s here) are set up in a thread while Ray and Tune
    # start and the first trial process imports torch; only the first trial's callback waits
    with ThreadPoolExecutor(1) as pool:
        experiment = pool.submit(_prepare_tracking, uri, spec)
        if address is None:
            _start_local_ray()
        else:
            ray.init(address=address, logging_level="WARNING")
        cells = {c.name: c.overrides for c in spec.space} if spec.mode == "ablation" else {}
        base = {s: dict(v) for s, v in spec.base.items()}
        # one intra-op thread per CPU the trial holds: more would fight the neighbouring trials
        base.setdefault("train", {}).setdefault("threads", max(1, int(spec.resources["cpu"])))
        # the decoded data set travels through Ray's object store: no shared disk is assumed
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, cells=cells, arrays=arrays),
            {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"]})
        if resume:  # the restored callback finds the experiment by name: let it exist first
            experiment.result()
            tuner = tune.Tuner.restore(str(spec.path), trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(trainable, param_space=_param_space(spec),
                               tune_config=_tune_config(spec),
                               run_config=_run_config(spec, uri, experiment, cells))
        print(f"ray       up after {time.perf_counter() - t0:.1f}s; "
              f"{'resuming' if resume else 'starting'} trials", flush=True)
        tuner.fit()
    return cells


def _start_local_ray() -> None:
    # Ray prestarts one idle worker per CPU before any job exists, and trials never run in those
    # (their actors start workers of their own), so on a small machine the prestarted ones only
    # compete with the trials' first imports: measured here, first trial 18.5 -> 13.8 s together
    # with no dashboard, which ray[tune] alone cannot serve anyway (it needs ray[default])
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    ray.init(logging_level="WARNING", include_dashboard=False)


def _prepare_tracking(uri: str, spec: Spec) -> str:
    from .tracking import experiment_of, prepare_experiment  # imports mlflow, in the thread

    return prepare_experiment(uri, *experiment_of(uri, spec))


def _param_space(spec: Spec) -> dict:
    if spec.mode == "search":
        return {}  # OptunaSearch's define-by-run function samples everything
    return {"cell": tune.grid_search([c.name for c in spec.space]),
            "train.seed": tune.grid_search(spec.ablation["seeds"])}


def _tune_config(spec: Spec) -> tune.TuneConfig:
    # metric and mode go to the searcher and the scheduler themselves: Tune's own copy does not
    # reach a searcher wrapped in its concurrency limiter, and Tune takes only one metric
    single = len(spec.metrics) == 1
    objective = ({"metric": spec.metrics[0], "mode": spec.modes[0]} if single
                 else {"metric": spec.metrics, "mode": spec.modes})
    search_alg, samples = None, 1
    if spec.mode == "search":
        search_alg = OptunaSearch(space=spec.space.suggest, seed=spec.search["seed"], **objective)
        samples = spec.search["num_samples"]
    scheduler = None
    if spec.scheduler["type"] == "asha":  # the spec makes sure the objective is single here
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.base["train"].get("epochs", 10),
                                  grace_period=spec.scheduler["grace_period"],
                                  reduction_factor=spec.scheduler["reduction_factor"],
                                  **objective)
    # reuse_actors: a finished trial's worker process takes the next trial, so torch is imported
    # and the data set fetched from the object store once per worker, not once per trial
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=samples,
                           max_concurrent_trials=spec.resources["max_concurrent"],
                           reuse_actors=True)


def _run_config(spec: Spec, uri: str, experiment: Future, cells: dict) -> RunConfig:
    from .tracking import MlflowTrials  # mlflow: waits for the thread's import, not its set-up

    # keeping 2 checkpoints per trial forces an experiment snapshot after each one, which is
    # what lets --resume continue exactly; Ray warns about that cost on every short epoch
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return RunConfig(name=spec.name, storage_path=str(spec.storage), verbose=1,
                     callbacks=[MlflowTrials(uri, spec, cells, experiment)],
                     failure_config=FailureConfig(max_failures=spec.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=2))
