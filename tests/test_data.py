import socket

import pytest
import torch
from PIL import Image

from tinyvit.config import Config
from tinyvit.data import Arrays, BatchAugment, DataError, cache_path, load_arrays, split


def test_synthetic_is_generated_then_cached(tiny_cfg):
    arrays = load_arrays(tiny_cfg.data)
    assert arrays.train_x.shape == (2000, 3, 32, 32) and arrays.train_x.dtype == torch.uint8
    assert arrays.test_x.shape == (500, 3, 32, 32)
    assert sorted(arrays.train_y.unique().tolist()) == list(range(10))
    assert cache_path(tiny_cfg.data).exists()
    again = load_arrays(tiny_cfg.data)
    assert torch.equal(again.train_x, arrays.train_x)


def _write_folder(root, fmt):
    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}
    for split_name, n in (("train", 4), ("test", 2)):
        for cls, rgb in colours.items():
            (root / split_name / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), rgb).save(root / split_name / cls / f"{i}.{fmt}")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_imagefolder(tmp_path, fmt):
    _write_folder(tmp_path / "imgs", fmt)
    cfg = Config.from_dict({"data": {"source": "imagefolder", "root": str(tmp_path / "imgs"),
                                     "cache_dir": str(tmp_path / "cache")}})
    arrays = load_arrays(cfg.data)
    assert arrays.classes == ["cat", "dog", "emu"]
    assert arrays.train_x.shape == (12, 3, 32, 32) and arrays.test_x.shape == (6, 3, 32, 32)
    # the label index and the decoded colour agree: red images are class 0 ('cat')
    red = arrays.train_x[arrays.train_y == 0].float().mean(dim=(0, 2, 3))
    assert red[0] > 150 and red[1] < 80


def test_imagefolder_from_tar_archive(tmp_path):
    import tarfile
    _write_folder(tmp_path / "pack" / "cifar", "png")
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "pack" / "cifar", arcname="cifar")
    cfg = Config.from_dict({"data": {"source": "imagefolder", "root": str(tmp_path / "imgs.tar.gz"),
                                     "cache_dir": str(tmp_path / "cache")}})
    assert load_arrays(cfg.data).train_x.shape == (12, 3, 32, 32)


def test_imagefolder_missing_split_says_where_it_looked(tmp_path):
    cfg = Config.from_dict({"data": {"source": "imagefolder", "root": str(tmp_path),
                                     "cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(DataError, match=f"{tmp_path}.*train"):
        load_arrays(cfg.data)


def test_cifar10_reads_a_premade_cache_without_touching_the_network(tmp_path):
    cfg = Config.from_dict({"data": {"source": "cifar10", "root": str(tmp_path / "absent"),
                                     "cache_dir": str(tmp_path / "cache")}})
    fake = Arrays(torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.arange(20) % 10,
                  torch.ones(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10),
                  [f"c{i}" for i in range(10)])
    cache_path(cfg.data).parent.mkdir(parents=True)
    torch.save(vars(fake), cache_path(cfg.data))
    arrays = load_arrays(cfg.data)
    assert torch.equal(arrays.test_x, fake.test_x) and arrays.classes == fake.classes
    assert not (tmp_path / "absent").exists()


def test_cifar10_offline_names_the_folder_and_the_way_out(tmp_path):
    try:
        socket.getaddrinfo("www.cs.toronto.edu", 443)
        pytest.skip("online: this test is about the offline message")
    except OSError:
        pass
    cfg = Config.from_dict({"data": {"source": "cifar10", "cache_dir": str(tmp_path / "c")}})
    with pytest.raises(DataError, match="data.root") as e:
        load_arrays(cfg.data)
    assert str(tmp_path / "c" / "cifar10") in str(e.value)


def test_split_is_seeded_disjoint_and_normalised_with_train_statistics(tiny_cfg):
    arrays = load_arrays(tiny_cfg.data)
    a = split(arrays, tiny_cfg.data, torch.device("cpu"))
    b = split(arrays, tiny_cfg.data, torch.device("cpu"))
    assert len(a.val[1]) == 500 and len(a.train[1]) == 1500
    assert torch.equal(a.val[0], b.val[0])
    train_rows = {bytes(x.numpy()) for x in a.train[0]}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val[0][:50])
    normalized = a.normalize(a.train[0])
    torch.testing.assert_close(normalized.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    tiny_cfg.data.subset = 300
    assert len(split(arrays, tiny_cfg.data, torch.device("cpu")).train[1]) == 300


def test_batch_augment_translates_flips_and_mixes(tiny_cfg):
    x = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).view(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    out, labels = BatchAugment(tiny_cfg.data, 10)(x, y)
    assert out.shape == x.shape and torch.equal(labels, y)
    assert not torch.equal(out, x)  # 4 samples all left untouched: 1 in 4 * 81 * 2 per sample
    tiny_cfg.data.crop_padding, tiny_cfg.data.flip, tiny_cfg.data.cutmix = 0, False, 1.0
    out, labels = BatchAugment(tiny_cfg.data, 10)(x, y)
    assert labels.shape == (4, 10)
    torch.testing.assert_close(labels.sum(1), torch.ones(4))
