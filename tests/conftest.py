import pytest

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
