import subprocess
import sys

import pytest

from tinyvit.config import KEYS, Config, ConfigError, load


def test_defaults_are_the_seed_model():
    flat = Config.from_dict({}).flat()
    assert flat["model.patch_size"] == 4 and flat["model.embed_dim"] == 64
    assert flat["model.depth"] == 4 and flat["model.heads"] == 4
    assert flat["model.pos_embedding"] == "learned" and flat["model.pool"] == "cls"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  depth: 6\ntrain:\n  lr: 0.001\n")
    cfg = load(path, ["train.lr=3e-4", "data.subset=1000", "train.compile=true"])
    assert cfg.model.depth == 6 and cfg.train.lr == 3e-4
    assert cfg.data.subset == 1000 and cfg.train.compile is True
    assert isinstance(Config.from_dict({"train": {"lr": 1}}).train.lr, float)
    # YAML 1.1 reads 3e-4 (no dot) as a string; a float key still takes it
    assert load(None, ["train.lr=3e-4", "data.subset=null"]).train.lr == 3e-4


def test_flat_keys_are_dotted_and_cover_every_field():
    flat = Config.from_dict({"model": {"depth": 3}}).flat()
    assert flat["model.depth"] == 3 and flat["train.eval_flip"] is False
    assert set(flat) == KEYS  # the keys --set and study search spaces accept


@pytest.mark.parametrize("d, key", [
    ({"model": {"depht": 6}}, "model.depht"),
    ({"modle": {}}, "modle"),
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"train": {"epochs": 2.5}}, "train.epochs"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"data": {"source": "imagenet"}}, "data.source"),
    ({"data": {"source": "imagefolder"}}, "data.root"),
    ({"train": {"compile": "yes"}}, "train.compile"),
    ({"model": {"dropout": 1.5}}, "model.dropout"),
    ({"model": {"pos_embedding": "sinusoidal2d", "embed_dim": 30, "heads": 2}}, "model.embed_dim"),
    ({"model": {"rope_base": 1}}, "model.rope_base"),
    ({"data": {"subset": 0}}, "data.subset"),
    ({"train": {"min_lr": 0.01}}, "train.min_lr"),  # above train.lr
    ({"train": {"grad_clip": -1}}, "train.grad_clip"),
    ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing"),
    ({"train": {"threads": 0}}, "train.threads"),
])
def test_bad_values_name_the_key(d, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config.from_dict(d)


def test_cli_bad_value_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "tinyvit.train", "--set", "model.heads=5"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model.heads" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_file_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinyvit.train", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope.yaml" in r.stderr
