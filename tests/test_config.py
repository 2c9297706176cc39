import subprocess
import sys

import pytest

from tinyvit.config import Config, ConfigError, load


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
