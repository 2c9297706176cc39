"""Experiment files: validation, spaces, grids, and bad input refused before Ray starts."""
from pathlib import Path

import optuna
import pytest
import yaml

from study.spec import SpecError, parse_plan

REPO = Path(__file__).resolve().parents[1]


def spec_dict(tmp_path, **extra) -> dict:
    d = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    d["storage"] = str(tmp_path / "runs")
    d["data"]["cache_dir"] = str(tmp_path / "cache")
    d.update(extra)
    return d


def test_shipped_experiment_files_are_valid():
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        parse_plan(yaml.safe_load(path.read_text()))


def test_constraints_filter_choices_and_conditions_gate_parameters(tmp_path):
    d = spec_dict(tmp_path)
    d["model"]["embed_dim"] = 48
    d["search"]["space"] = {
        "model.heads": {"choice": [2, 3, 4, 5, 6, 8]},  # 5 does not divide 48
        "model.pos_embedding": {"choice": ["learned", "rope2d"]},
        "model.rope_base": {"loguniform": [10, 1000], "when": "model.pos_embedding == 'rope2d'"},
    }
    d["search"]["constraints"] = [
        "model.embed_dim % model.heads == 0",
        "model.pos_embedding != 'rope2d' or (model.embed_dim // model.heads) % 4 == 0"]
    spec = parse_plan(d)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_heads, seen_rope = set(), 0
    for _ in range(60):
        v = spec.design.suggest(study.ask())
        seen_heads.add(v["model.heads"])
        assert 48 % v["model.heads"] == 0  # the first constraint removed 5
        if v["model.pos_embedding"] == "rope2d":
            seen_rope += 1
            # the second removed rope2d where heads is 8 (6 channels a head: no pair per axis)
            assert (48 // v["model.heads"]) % 4 == 0 and "model.rope_base" in v
        else:
            assert "model.rope_base" not in v
    assert seen_heads == {2, 3, 4, 6, 8} and seen_rope > 0


def test_ablation_grids(tmp_path):
    d = spec_dict(tmp_path, mode="ablation", search=None)
    d["ablation"] = {"factors": {"model.pos_embedding": ["learned", "rope2d", "none"],
                                 "model.depth": [1, 2]}, "seeds": 3}
    spec = parse_plan(d)
    names = [c.name for c in spec.design.cells]
    # base depth is 2, so depth's baseline is 2 (the base's level), pos_embedding's is 'learned'
    assert names == ["baseline", "model.pos_embedding=rope2d", "model.pos_embedding=none",
                     "model.depth=1"]
    assert spec.design.trial_count() == 4 * 3
    d["ablation"]["design"] = "crossed"
    crossed = parse_plan(d)
    assert len(crossed.design.cells) == 6 and "baseline" in [c.name for c in crossed.design.cells]


@pytest.mark.parametrize("change, key", [
    ({"epochz": 3}, "epochz"),
    ({"train": {"epochs": "three"}}, "train.epochs"),
    ({"search": {"num_samples": 2, "space": {"model.depth": {"choice": []}}}}, "model.depth"),
    ({"search": {"num_samples": 2, "space": {"model.heads": {"choice": [3, 5]}},
                 "constraints": ["model.embed_dim % model.heads == 0"]}}, "model.heads"),
    ({"search": {"num_samples": 2, "space": {"model.heads": {"choice": [3, 5]}}}}, "model.heads"),
    ({"search": {"num_samples": 2, "space": {"model.depht": [1, 2]}}}, "model.depht"),
    ({"search": {"space": {"train.lr": {"loguniform": [0, 1]}}}}, "train.lr"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
    ({"resources": {"cpu": -1}}, "resources.cpu"),
])
def test_bad_files_are_refused_naming_the_key(tmp_path, change, key):
    d = spec_dict(tmp_path)
    d.update(change)
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        parse_plan(d)


def _write(tmp_path, d) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.parametrize("overrides, needle", [
    (["--set", "train.epochs=three"], "train.epochs"),
    (["--set", "data.source=imagefolder", "--set", "data.root=/no/such/folder"], "/no/such/folder"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--set", "search.space.model.depth.choice=[]"], "model.depth"),
])
def test_cli_refuses_bad_input_with_exit_2_before_anything_is_written(tmp_path, study_cli,
                                                                      overrides, needle):
    d = spec_dict(tmp_path)
    d["search"]["space"]["model.depth"] = {"choice": [1, 2]}
    r = study_cli(_write(tmp_path, d), *overrides)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, study_cli):
    r = study_cli(_write(tmp_path, spec_dict(tmp_path)), "--dry-run", "--set",
                  "search.num_samples=7")
    assert r.returncode == 0, r.stderr
    assert "7 trials" in r.stdout and str(tmp_path / "runs" / "smoke") in r.stdout
    assert "sqlite:///" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_resume_without_a_study_is_refused(tmp_path, study_cli):
    r = study_cli(_write(tmp_path, spec_dict(tmp_path)), "--resume")
    assert r.returncode == 2 and "--resume" in r.stderr


def test_multi_objective_search_needs_no_single_metric_scheduler(tmp_path):
    d = spec_dict(tmp_path)
    d["search"].update(metric=["val_acc", "params"], mode=["max", "min"])
    with pytest.raises(SpecError, match="scheduler.type=asha"):
        parse_plan(d)
    d["scheduler"] = {"type": "none"}
    spec = parse_plan(d)
    assert spec.design.metrics == ["val_acc", "params"] and spec.design.modes == ["max", "min"]


def test_base_names_another_studys_best_config(tmp_path):
    best = tmp_path / "best_config.yaml"
    best.write_text(yaml.safe_dump({"model": {"depth": 3, "patch_size": 8},
                                    "train": {"lr": 0.003}}))
    d = spec_dict(tmp_path, mode="ablation", search=None, base=str(best))
    d["ablation"] = {"factors": {"model.pos_embedding": ["learned", "none"]}, "seeds": 2}
    spec = parse_plan(d)
    assert spec.base["model"]["patch_size"] == 8 and spec.base["train"]["lr"] == 0.003
    assert spec.base["model"]["depth"] == 2  # the file's own sections win over the base
    d["base"] = str(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="missing.yaml"):
        parse_plan(d)
