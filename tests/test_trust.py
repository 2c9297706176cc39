"""A study's answers are trustworthy: nothing from the file runs as code, nothing is counted twice
or silently replaced, nothing of another study is touched, and what cannot run is refused."""
import math
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.expr import Expr, ExprError
from study.results import ranked
from study.spec import SpecError, parse_plan
from studyutil import REPO, env_without_tracking, experiment, write


def plan_of(tmp_path, **sections):
    return parse_plan(experiment(tmp_path, **sections))


def cli(*args, timeout=120, **env):
    """`python -m study.run ARGS` as a new process (the study_cli fixture runs it in this one)."""
    return subprocess.run([sys.executable, "-m", "study.run", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**env_without_tracking(), **env})


def refused(r, needle):
    """Exit 2, one line on stderr naming `needle`, no traceback."""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr


# -- 1. the expression language ------------------------------------------------------------------

@pytest.mark.parametrize("text, values, expected", [
    ("model.embed_dim % model.heads == 0", {"model.embed_dim": 48, "model.heads": 5}, False),
    ("model.embed_dim // model.heads % 4 == 0", {"model.embed_dim": 64, "model.heads": 4}, True),
    ("model.pos_embedding in ['rope2d', 'learned']", {"model.pos_embedding": "none"}, False),
    ("model.pos_embedding not in ['none']", {"model.pos_embedding": "rope2d"}, True),
    ("not (model.depth > 2 and model.heads < 4) or train.lr * 2 <= 0.01",
     {"model.depth": 3, "model.heads": 2, "train.lr": 0.004}, True),
    ("1 < model.depth <= 4", {"model.depth": 5}, False),
    ("-model.depth + 1 < 0 and data.flip == true", {"model.depth": 2, "data.flip": True}, True),
])
def test_admitted_expressions_compute_what_they_say(text, values, expected):
    expr = Expr(text, "search.constraints[0]")
    assert expr(values) is expected
    assert set(expr.keys) <= set(values)


@pytest.mark.parametrize("text", [
    "().__class__.__base__.__subclasses__()",
    "__import__('os').system('true')",
    "model.heads.__class__",
    "len([1]) > 0",
    "model.depth ** 99999999 > 1",
    "[x for x in [1]] == [1]",
    "(lambda: 1)() == 1",
    "os.system == 1",
    "model.depth if 1 else 2",
    "{'a': 1}['a'] == 1",
    "model.depth in model.heads",
])
def test_anything_outside_the_language_is_refused(text):
    with pytest.raises(ExprError, match="does not allow"):
        Expr(text, "search.constraints[0]")


@pytest.mark.parametrize("text, values, needle", [
    ("model.embed_dim % model.heads == 0", {"model.embed_dim": 64, "model.heads": 0}, "modulo"),
    ("model.pos_embedding > 3", {"model.pos_embedding": "rope2d"}, "compare"),
    ("model.heads == '4'", {"model.heads": 4}, "compare"),
    ("model.depth + 1", {"model.depth": 2}, "true or false"),
    ("model.pos_embedding * 100000000 == 1", {"model.pos_embedding": "x"}, "numbers"),
])
def test_errors_inside_an_admitted_expression_are_one_line(text, values, needle):
    with pytest.raises(ExprError, match=needle) as e:
        Expr(text, "search.constraints[0]")(values)
    assert "\n" not in str(e.value) and text in str(e.value)


def test_an_exploit_in_an_experiment_file_runs_nothing_even_in_a_dry_run(tmp_path, study_cli):
    marker = tmp_path / "pwned"
    exploit = ("[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close']"
               f"[0].__init__.__globals__['system']('touch {marker}') == 0")
    d = experiment(tmp_path)
    d["search"]["constraints"] = [exploit]
    r = study_cli(write(tmp_path, d), "--dry-run")
    refused(r, "search.constraints[0]")
    assert not marker.exists()
    d["search"]["constraints"] = []
    d["search"]["space"]["train.lr"]["when"] = f"__import__('os').system('touch {marker}') == 0"
    refused(study_cli(write(tmp_path, d), "--dry-run"), "search.space.train.lr.when")
    assert not marker.exists()


def test_an_expression_that_fails_on_sampled_values_is_refused_before_ray(tmp_path):
    d = experiment(tmp_path)
    d["search"]["space"]["model.heads"] = {"choice": [0, 1, 2]}
    d["search"]["constraints"] = ["model.embed_dim % model.heads == 0"]
    with pytest.raises(SpecError, match="modulo"):
        parse_plan(d)


# -- 2. no silent wrong result ---------------------------------------------------------------------

@pytest.mark.parametrize("ablation, needle", [
    ({"factors": {"model.depth": [1, 2]}, "seeds": [0, 0]}, "seed twice"),
    ({"factors": {"model.depth": [1, 1, 2]}}, "lists 1 twice"),
    ({"factors": {"train.lr": [0.001, "1e-3"]}}, "lists 0.001 twice"),
    ({"factors": {"model.pos_embedding": ["rope2d", "rope2d"]}}, "twice"),
    ({"factors": {"model.depth": [1, 2]}, "seeds": True}, "ablation.seeds"),
    ({"factors": {"model.depth": [1, 2]}, "seeds": [0, True]}, "ablation.seeds"),
    ({"factors": {"model.depth": True}}, "ablation.factors.model.depth"),
    ({"factors": {"model.depth": [True, 2]}}, "model.depth must be int"),
    ({"factors": {"model.depth": [2]}}, "at least two levels"),
])
def test_repeated_levels_and_seeds_are_refused_not_counted_twice(tmp_path, ablation, needle):
    with pytest.raises(SpecError, match=needle):
        plan_of(tmp_path, mode="ablation", search=None, ablation=ablation)


def test_an_ablation_without_factors_repeats_the_base_configuration_over_its_seeds(tmp_path):
    plan = plan_of(tmp_path, mode="ablation", search=None, ablation={"seeds": [3, 5]})
    assert [(c.name, c.overrides) for c in plan.design.cells] == [("baseline", {})]
    assert plan.design.trial_count() == 2 and plan.design.searched == []
    for factors in (["model.depth"], [], {}, None):  # given, it must name a factor
        with pytest.raises(SpecError, match="ablation.factors must map config keys"):
            plan_of(tmp_path, mode="ablation", search=None, ablation={"factors": factors})
    with pytest.raises(SpecError, match="ablation.budgets .* needs ablation.factors"):
        plan_of(tmp_path, mode="ablation", search=None, ablation={"budgets": [1, 2]})


def test_numbers_yaml_reads_as_strings_are_levels_and_bounds(tmp_path):
    plan = plan_of(tmp_path, mode="ablation", search=None,
                   ablation={"factors": {"train.lr": ["1e-3", "3e-3"]}, "seeds": 2})
    assert [c.overrides["train.lr"] for c in plan.design.cells] == [0.001, 0.003]
    d = yaml.safe_load("space: {train.lr: {loguniform: [1e-4, 1e-2]}}")  # YAML 1.1: strings
    assert d["space"]["train.lr"]["loguniform"] == ["1e-4", "1e-2"]
    d = experiment(tmp_path)
    d["search"]["space"]["train.lr"] = {"loguniform": ["1e-4", "1e-2"]}
    assert parse_plan(d).design.params["train.lr"].args == [1e-4, 1e-2]


def test_a_condition_on_a_key_searched_later_is_refused(tmp_path):
    d = experiment(tmp_path)
    d["search"]["space"] = {
        "model.rope_base": {"loguniform": [10, 1000], "when": "model.pos_embedding == 'rope2d'"},
        "model.pos_embedding": {"choice": ["learned", "rope2d"]}}
    d["search"]["constraints"] = []
    with pytest.raises(SpecError, match="model.pos_embedding, which is searched after it"):
        parse_plan(d)
    d["search"]["space"] = dict(reversed(list(d["search"]["space"].items())))
    parse_plan(d)  # in dependency order it is honoured


@pytest.mark.parametrize("key, values", [
    ("data.val_size", [500, 1000]), ("data.split_seed", [0, 1]), ("data.source", ["synthetic"]),
    ("data.synthetic_train", [1000, 2000]), ("model.image_size", [32, 64]),
])
def test_what_trials_are_compared_on_cannot_vary(tmp_path, key, values):
    d = experiment(tmp_path)
    d["search"]["space"][key] = {"choice": values}
    with pytest.raises(SpecError, match=f"{key} cannot be searched or ablated"):
        parse_plan(d)


def test_a_study_needs_a_validation_set_and_never_ranks_nan(tmp_path):
    d = experiment(tmp_path)
    d["data"]["val_size"] = 0
    with pytest.raises(SpecError, match="data.val_size must be > 0"):
        parse_plan(d)
    table = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": "completed", "budget": 2,
                          "max_epochs": 2, "val_acc": [math.nan, 0.3, 0.5]})
    assert list(ranked(table)["trial_id"]) == ["c", "b"]
    assert ranked(table.assign(status="early-stopped")).empty  # none final: none ranked


def test_resume_refuses_an_edited_experiment_naming_the_keys(tmp_path, study_cli):
    d = experiment(tmp_path, name="edited")
    plan_dir = tmp_path / "runs" / "edited"
    plan_dir.mkdir(parents=True)
    (plan_dir / "tuner.pkl").write_bytes(b"")  # a study that started: Ray's state is here
    (plan_dir / "study.yaml").write_text(yaml.safe_dump(
        {"study_id": "abc", "experiment": d}))
    path = write(tmp_path, d)
    r = study_cli(path, "--resume", "--set", "train.lr=0.01", "--set", "search.num_samples=9")
    refused(r, "search.num_samples, train.lr")
    d["train"]["epochs"] = 5
    refused(study_cli(write(tmp_path, d, "edited.yaml"), "--resume"), "in train.epochs")
    r = study_cli(path, "--resume", "--dry-run")  # unchanged: accepted (and nothing run)
    assert r.returncode == 0, r.stderr
    with pytest.raises(SystemExit) as e:  # a replay is no plan to print: argparse's refusal
        study_cli(path, "--sync-mlflow", "--dry-run")
    assert e.value.code == 2


@pytest.mark.xdist_group("search_study")
def test_a_study_touches_only_its_own_runs_and_a_strange_name_works(search_study):
    """One real study whose name has quotes and spaces, logging into a store that already holds
    a run of an earlier study with the same name and folder: that run survives, the report
    counts this study alone, and a conditional key a trial did not sample is logged nowhere."""
    name, uri = search_study.name, search_study.uri
    client = MlflowClient(uri)
    runs = client.search_runs([search_study.experiment_id])
    assert client.get_run(search_study.earlier).info.lifecycle_stage == "active"
    mine = [r for r in runs if r.data.tags["study_id"] != "earlier"]
    assert len({r.data.tags["study_id"] for r in mine}) == 1
    mine = [r for r in mine if r.data.tags["kind"] == "trial"]
    assert len(mine) == 3
    table = pd.read_parquet(search_study.folder / "trials.parquet")
    for r in mine:
        row = table[table["trial_id"] == r.data.tags["trial_id"]].iloc[0]
        rope = r.data.params["model.pos_embedding"] == "rope2d"
        assert ("model.rope_base" in r.data.params) == rope
        assert pd.isna(row["model.rope_base"]) != rope
        assert r.data.tags["sampled"].split(",") == (
            ["model.pos_embedding", "model.rope_base", "train.lr"] if rope
            else ["model.pos_embedding", "train.lr"])
    assert table["model.pos_embedding"].nunique() == 2  # seed 24 samples both: both cases seen

    from reports.analysis import load_runs, study_summary
    loaded = load_runs(uri, name)
    assert sorted(loaded["trial_id"]) == sorted(table["trial_id"])
    summary = study_summary(loaded)
    assert summary["trials"] == 3 and summary["runs of earlier studies of this name (left out)"] == 1


# -- 3. what cannot run fails before any trial -------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ({"name": 5}, "name must be"),
    ({"name": ".."}, "name must be"),
    ({"storage": 5}, "storage must be"),
    ({"base": 5}, "base must be"),
    ({"mlflow": {"tracking_uri": 5}}, "mlflow.tracking_uri"),
    ({"mlflow": {"experiment": 5}}, "mlflow.experiment"),
    ({"mode": "ablation"}, "search is given but mode is ablation"),
    ({"train": {"lr": float("nan")}}, "train.lr must be a finite number"),
    ({"train": {"lr": float("inf")}}, "train.lr must be a finite number"),
    ({"model": {"drop_path": ".nan"}}, "model.drop_path"),
    ({"scheduler": {"type": "asha", "grace_period": 3}}, "grace_period=3 is above train.epochs=2"),
    ({"resources": {"gpu": float("inf")}}, "resources.gpu"),
    ({"resources": {"gpu": 1.5}}, "whole GPUs"),
    ({"train": {"device": "cuda"}}, "train.device=cuda needs resources.gpu"),
    ({"search": {"space": {"model.depth": {"int": [1, 3], "step": 0}}}}, "step must be an integer >= 1"),
    ({"search": {"space": {"model.depth": {"int": [1, 3], "step": True}}}}, "step"),
    ({"search": {"space": {"train.lr": {"uniform": [0, float("inf")]}}}}, "bounds: expected a finite number"),
    ({"search": {"space": {"model.depth": {"uniform": [1, 3]}}}}, "takes int values"),
    ({"search": {"space": {"model.pool": {"int": [1, 3]}}}}, "takes str values"),
    ({"search": {"space": {"model.depth": [1, 1, 2]}}}, "lists 1 twice"),
    ({"search": {"space": {"model.depth": [1, 2]}, "metric": ["val_acc", "val_acc"],
                 "mode": ["max", "max"]}, "scheduler": {"type": "none"}}, "metric twice"),
    ({"search": {"space": [1, 2]}}, "search.space must map"),
    ({"search": {"space": {"model.depth": [1, 2]}, "constraints": "model.depth > 1"}},
     "constraints must be a list"),
])
def test_bad_values_anywhere_are_one_line_refusals(tmp_path, change, needle):
    d = experiment(tmp_path)
    d["search"]["constraints"] = []  # the smoke file's name keys that some cases do not search
    for key, value in change.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) and isinstance(d.get(key), dict) \
            else value
    with pytest.raises(SpecError, match=needle.replace(".", r"\.").replace("(", r"\(")) as e:
        parse_plan(d)
    assert "\n" not in str(e.value)


def test_aliases_that_expand_without_bound_are_refused_in_bounded_memory(tmp_path, study_cli):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nname: bomb\n")
    # the bomb in a process of its own: were the bound gone, it would take that process's
    # memory, not the test runner's
    refused(cli(path, "--dry-run"), "expands to more than")
    path.write_text("name: &n [*n]\n")  # an alias of itself
    refused(study_cli(path, "--dry-run"), "expands to more than")


def test_the_documented_dotted_set_reaches_the_search_space(tmp_path, study_cli):
    path = write(tmp_path, experiment(tmp_path))
    r = study_cli(path, "--dry-run", "--set", "search.space.model.depth.choice=[1,2]",
                  "--set", "search.space.train.weight_decay.loguniform=[1e-4, 1e-2]",
                  "--set", "search.space.model.rope_base.when=model.pos_embedding == 'rope2d'")
    assert r.returncode == 0, r.stderr
    assert "model.depth" in r.stdout and "train.weight_decay" in r.stdout


def test_what_the_cluster_can_never_provide_is_refused_before_any_trial(tmp_path, ray_head,
                                                                         study_cli):
    d = experiment(tmp_path)
    d["resources"] = {"cpu": 1, "gpu": 0.25}  # the shipped GPU study's setting, on no GPU
    r = cli(write(tmp_path, d), timeout=180, RAY_ADDRESS=ray_head.address)
    refused(r, "0.25 GPU")
    assert not (tmp_path / "runs").exists()  # no study folder, no MLflow store
    r = study_cli(write(tmp_path, d), "--address", "127.0.0.1:9")
    refused(r, "--address 127.0.0.1:9")


@pytest.mark.parametrize("section, values, needle", [
    ("data", {"val_size": 2000}, "leaves no training images"),
    ("data", {"source": "imagefolder", "root": "/nonexistent/folder"}, "/nonexistent/folder"),
    ("model", {"image_size": 64}, "32x32 but model.image_size=64"),
    ("model", {"num_classes": 5}, "10 classes"),
])
def test_data_that_cannot_train_is_refused_before_ray(tmp_path, study_cli, section, values,
                                                      needle):
    d = experiment(tmp_path)
    d[section].update(values)
    refused(study_cli(write(tmp_path, d)), needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("gpu, nodes, expected", [
    ("auto", [{"CPU": 8, "GPU": 2}, {"CPU": 8}], {"cpu": 1, "gpu": 0.25}),
    ("auto", [{"CPU": 2}], {"cpu": 1, "gpu": 0}),
    (0.5, [{"CPU": 2, "GPU": 1}], {"cpu": 1, "gpu": 0.5}),
    (0.25, [{"CPU": 2}], "no node of the cluster has them"),
    (1, [{"CPU": 1, "GPU": 0.5}], "no node of the cluster has them"),
])
def test_resources_adapt_to_the_cluster_or_are_refused(tmp_path, gpu, nodes, expected):
    from study.tuner import trial_resources
    plan = plan_of(tmp_path, resources={"cpu": 1, "gpu": gpu})
    if isinstance(expected, str):
        with pytest.raises(SpecError, match=expected):
            trial_resources(plan, nodes)
        return
    resources, note = trial_resources(plan, nodes)
    assert resources == expected
    assert ("auto ->" in note) == (gpu == "auto")


def test_cuda_asked_of_a_cluster_without_gpus_is_refused(tmp_path):
    from study.tuner import trial_resources
    d = experiment(tmp_path, resources={"cpu": 1, "gpu": "auto"})
    d["train"]["device"] = "cuda"
    with pytest.raises(SpecError, match="train.device=cuda but the cluster has no GPU"):
        trial_resources(parse_plan(d), [{"CPU": 2}])
