import io
import socket
import tarfile

import pytest
import torch
from PIL import Image

from tinyvit.config import Config
from tinyvit.data import (Arrays, BatchAugment, DataError, cache_path, check_arrays, load_arrays,
                          split)


def _planted(n=20, size=32):
    return Arrays(torch.full((n, 3, size, size), 7, dtype=torch.uint8), torch.arange(n) % 10,
                  torch.full((10, 3, size, size), 9, dtype=torch.uint8), torch.arange(10),
                  [f"c{i}" for i in range(10)])


COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def _write_folder(root, fmt="png"):
    for split_name, n in (("train", 4), ("test", 2)):
        for cls, rgb in COLOURS.items():
            (root / split_name / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), rgb).save(root / split_name / cls / f"{i}.{fmt}")


def _folder_cfg(tmp_path, root):
    return Config.from_dict({"data": {"source": "imagefolder", "root": str(root),
                                      "cache_dir": str(tmp_path / "cache")}}).data


def _noise(seed=0):
    """An incompressible 32x32 RGB image as [H, W, 3] uint8 numpy."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g).numpy()


def _pack(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def test_synthetic_is_generated_then_read_from_its_cache(tiny_cfg):
    arrays = load_arrays(tiny_cfg.data)
    assert arrays.train_x.shape == (2000, 3, 32, 32) and arrays.train_x.dtype == torch.uint8
    assert arrays.test_x.shape == (500, 3, 32, 32)
    assert sorted(arrays.train_y.unique().tolist()) == list(range(10))
    # plant other tensors in the cache file: the next load returns them, so it read the cache
    planted = _planted()
    torch.save(vars(planted), cache_path(tiny_cfg.data))
    assert torch.equal(load_arrays(tiny_cfg.data).train_x, planted.train_x)
    tiny_cfg.data.synthetic_train = 1000  # other sizes, another cache entry: generated afresh
    assert load_arrays(tiny_cfg.data).train_x.shape == (1000, 3, 32, 32)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_imagefolder(tmp_path, fmt):
    _write_folder(tmp_path / "imgs", fmt)
    arrays = load_arrays(_folder_cfg(tmp_path, tmp_path / "imgs"))
    assert arrays.classes == ["cat", "dog", "emu"]
    assert arrays.train_x.shape == (12, 3, 32, 32) and arrays.test_x.shape == (6, 3, 32, 32)
    # the label index and the decoded colour agree: red images are class 0 ('cat')
    red = arrays.train_x[arrays.train_y == 0].float().mean(dim=(0, 2, 3))
    assert red[0] > 150 and red[1] < 80


def test_imagefolder_from_tar_archive(tmp_path):
    _write_folder(tmp_path / "pack" / "cifar")
    _pack(tmp_path / "pack" / "cifar", tmp_path / "imgs.tar.gz")
    assert load_arrays(_folder_cfg(tmp_path, tmp_path / "imgs.tar.gz")).train_x.shape == \
        (12, 3, 32, 32)


def test_folder_cache_is_read_and_a_changed_folder_is_decoded_afresh(tmp_path):
    _write_folder(tmp_path / "imgs")
    cfg = _folder_cfg(tmp_path, tmp_path / "imgs")
    assert load_arrays(cfg).train_x.shape == (12, 3, 32, 32)
    planted = _planted()
    torch.save(vars(planted), cache_path(cfg))  # the folder is unchanged: its cache is read
    assert torch.equal(load_arrays(cfg).train_x, planted.train_x)

    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "imgs" / "train" / "emu" / "new.png")
    assert load_arrays(cfg).train_x.shape == (13, 3, 32, 32)  # an added image
    # a replaced image: noise makes the file another size, whatever the clock's resolution
    noise = _noise()
    Image.fromarray(noise).save(tmp_path / "imgs" / "train" / "cat" / "0.png")
    arrays = load_arrays(cfg)
    assert torch.equal(arrays.train_x[0], torch.from_numpy(noise).permute(2, 0, 1))
    assert list((tmp_path / "cache").glob("*.pt")) == [cache_path(cfg)]  # earlier copies removed


def test_rewritten_archive_is_unpacked_and_decoded_afresh(tmp_path):
    _write_folder(tmp_path / "pack" / "cifar")
    archive = tmp_path / "imgs.tar.gz"
    _pack(tmp_path / "pack" / "cifar", archive)
    cfg = _folder_cfg(tmp_path, archive)
    assert load_arrays(cfg).test_x.shape == (6, 3, 32, 32)
    noise = _noise()
    Image.fromarray(noise).save(tmp_path / "pack" / "cifar" / "test" / "dog" / "new.png")
    _pack(tmp_path / "pack" / "cifar", archive)  # the same path, new contents
    arrays = load_arrays(cfg)
    assert arrays.test_x.shape == (7, 3, 32, 32)
    assert any(torch.equal(x, torch.from_numpy(noise).permute(2, 0, 1)) for x in arrays.test_x)
    # one unpacked folder and one decoded file remain: those of the archive as it is now
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == 1
    assert list((tmp_path / "cache").glob("*.pt")) == [cache_path(cfg)]


def test_imagefolder_missing_split_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}.*train"):
        load_arrays(_folder_cfg(tmp_path, tmp_path))


def test_cifar10_reads_a_premade_cache_without_touching_the_network(tmp_path):
    cfg = Config.from_dict({"data": {"source": "cifar10", "root": str(tmp_path / "absent"),
                                     "cache_dir": str(tmp_path / "cache")}})
    fake = _planted()
    cache_path(cfg.data).parent.mkdir(parents=True)
    torch.save(vars(fake), cache_path(cfg.data))
    arrays = load_arrays(cfg.data)
    assert torch.equal(arrays.test_x, fake.test_x) and arrays.classes == fake.classes
    assert not (tmp_path / "absent").exists()


def test_cifar10_cache_follows_its_batch_files(tmp_path):
    cfg = Config.from_dict({"data": {"source": "cifar10", "root": str(tmp_path / "c10"),
                                     "cache_dir": str(tmp_path / "cache")}}).data
    batches = tmp_path / "c10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"x" * 10)
    before = cache_path(cfg)
    assert cache_path(cfg) == before
    (batches / "data_batch_1").write_bytes(b"x" * 11)
    assert cache_path(cfg) != before


def test_cifar10_offline_names_the_folder_and_the_way_out(tmp_path):
    try:
        socket.getaddrinfo("www.cs.toronto.edu", 443)
        pytest.skip("online: this test is about the offline message")
    except OSError:
        pass
    cfg = Config.from_dict({"data": {"source": "cifar10", "cache_dir": str(tmp_path / "c")}})
    with pytest.raises(DataError, match="--set data.source=imagefolder --set data.root=PATH") as e:
        load_arrays(cfg.data)
    assert str(tmp_path / "c" / "cifar10") in str(e.value)


def test_split_is_seeded_disjoint_and_normalised_with_train_statistics(tiny_cfg):
    arrays = load_arrays(tiny_cfg.data)
    a = split(arrays, tiny_cfg.data, torch.device("cpu"))
    b = split(arrays, tiny_cfg.data, torch.device("cpu"))
    assert len(a.val[1]) == 500 and len(a.train[1]) == 1500
    assert torch.equal(a.val[0][:], b.val[0][:])
    train_rows = {bytes(x.numpy()) for x in a.train[0][:]}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val[0][:50])
    normalized = a.normalize(a.train[0][:])
    torch.testing.assert_close(normalized.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    tiny_cfg.data.subset = 300
    assert len(split(arrays, tiny_cfg.data, torch.device("cpu")).train[1]) == 300


def _augment(tiny_cfg, pad=0, flip=False, mixup=0.0, cutmix=0.0):
    d = tiny_cfg.data
    d.crop_padding, d.flip, d.mixup, d.cutmix = pad, flip, mixup, cutmix
    return BatchAugment(d, 10)


def test_flip_mirrors_some_images_and_keeps_the_others(tiny_cfg):
    torch.manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8), torch.arange(64) % 10
    out, labels = _augment(tiny_cfg, flip=True)(x, y)
    assert torch.equal(labels, y)
    kept = [torch.equal(o, im) for o, im in zip(out, x)]
    mirrored = [torch.equal(o, im.flip(-1)) for o, im in zip(out, x)]
    assert all(k or m for k, m in zip(kept, mirrored))
    assert any(kept) and any(mirrored)


def _shifted(im, dy, dx):
    """im moved down dy and right dx pixels, zeros where nothing moved in."""
    out = torch.zeros_like(im)
    H, W = im.shape[-2:]
    out[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        im[:, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def test_translation_shifts_each_image_by_at_most_the_padding(tiny_cfg):
    torch.manual_seed(0)
    p = 2
    x = torch.rand(64, 3, 8, 8) + 0.5  # no zeros: a zero in the output was filled in
    out, _ = _augment(tiny_cfg, pad=p)(x, torch.arange(64) % 10)
    shifts = []
    for o, im in zip(out, x):
        found = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                 if torch.equal(o, _shifted(im, dy, dx))]
        assert len(found) == 1, "each output is its input moved by one shift within the padding"
        shifts += found
    assert len(set(shifts)) > 1  # drawn per image, not once per batch


def _partners(labels, y):
    """For each row of soft labels: its own weight and the index of the image mixed into it."""
    own = labels[torch.arange(len(y)), y]
    other = labels.clone()
    other[torch.arange(len(y)), y] = 0
    return own, [int((y == c).nonzero()) for c in other.argmax(1)]


def test_mixup_blends_each_image_with_the_one_its_labels_name(tiny_cfg):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)  # one image per class names the partner
    out, labels = _augment(tiny_cfg, mixup=1.0)(x, y)
    torch.testing.assert_close(labels.sum(1), torch.ones(8))
    assert ((labels > 0).sum(1) == 2).all()  # soft: two classes in every row
    own, partner = _partners(labels, y)
    assert all(j != i for i, j in enumerate(partner))
    for i, j in enumerate(partner):
        torch.testing.assert_close(out[i], own[i] * x[i] + (1 - own[i]) * x[j])


def test_cutmix_pastes_a_patch_as_large_as_the_labels_say(tiny_cfg):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)  # every pixel tells which image it is from
    out, labels = _augment(tiny_cfg, cutmix=1.0)(x, y)
    torch.testing.assert_close(labels.sum(1), torch.ones(8))
    own, partner = _partners(labels, y)
    for i, j in enumerate(partner):
        from_own = (out[i] == x[i]).all(0)
        from_partner = (out[i] == x[j]).all(0)
        assert (from_own | from_partner).all()  # no pixel is new or from a third image
        assert from_own.float().mean().item() == pytest.approx(own[i].item(), abs=1e-6)


def _png_bytes(rgb=(10, 20, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, "png")
    return buf.getvalue()


@pytest.mark.parametrize("split_name", ["train", "test"])
def test_empty_class_folder_is_refused(tmp_path, split_name):
    _write_folder(tmp_path / "imgs")
    dog = tmp_path / "imgs" / split_name / "dog"
    for f in dog.iterdir():
        f.unlink()
    (dog / "notes.txt").write_text("not an image")  # a file, but not an image
    with pytest.raises(DataError, match=f"class folder {dog} holds no images"):
        load_arrays(_folder_cfg(tmp_path, tmp_path / "imgs"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_refused_by_name(tmp_path, damage):
    _write_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "train" / "emu" / "1.png"
    Image.fromarray(_noise()).save(bad)  # incompressible: a cut falls inside the pixel data
    data = bad.read_bytes()
    bad.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match=f"image {bad} cannot be decoded"):
        load_arrays(_folder_cfg(tmp_path, tmp_path / "imgs"))


def _no_unpacked_folder_left(cache):
    return not cache.exists() or not [d for d in cache.iterdir() if d.is_dir()]


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "header"])
def test_damaged_archive_is_refused_and_leaves_nothing_unpacked(tmp_path, damage):
    folder = tmp_path / "pack" / "cifar"
    _write_folder(folder)
    for i in range(4):  # incompressible images: the archive is long enough to cut into
        Image.fromarray(_noise(i)).save(folder / "train" / "cat" / f"noise{i}.png")
    archive = tmp_path / "imgs.tar.gz"
    # stored, not deflated, so that the tar bytes can be found; GNU tar's own format
    with tarfile.open(archive, "w:gz", compresslevel=0, format=tarfile.GNU_FORMAT) as tar:
        tar.add(folder, arcname="cifar")
    data = bytearray(archive.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "corrupted":  # bytes flipped in the middle of the stream
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    else:  # one member's header damaged: tarfile ends the archive there without a word,
        at = data.index(b"cifar/train/dog/1.png")  # only gzip's checksum can tell
        data[at] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"archive {archive} cannot be unpacked"):
        load_arrays(_folder_cfg(tmp_path, archive))
    assert _no_unpacked_folder_left(tmp_path / "cache")


def _archive_with(tmp_path, info, data=b""):
    """The tiny image folder as a tar archive, with `info` as its last member."""
    _write_folder(tmp_path / "pack" / "cifar")
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "pack" / "cifar", arcname="cifar")  # good members first: then cleanup
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return archive


def _link(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("../outside.png"),
    _link("cifar/train/cat/link.png", "../../../../outside.png"),
    _link("cifar/train/cat/link.png", "/outside.png"),
], ids=["parent", "link-out", "absolute-link"])
def test_archive_member_escaping_its_folder_is_refused_by_name(tmp_path, member):
    archive = _archive_with(tmp_path, member, _png_bytes() if member.isfile() else b"")
    with pytest.raises(DataError, match=f"archive {archive} holds member '{member.name}'"):
        load_arrays(_folder_cfg(tmp_path, archive))
    assert not list(tmp_path.rglob("outside.png"))
    assert _no_unpacked_folder_left(tmp_path / "cache")


def test_archive_member_with_an_absolute_name_lands_inside_its_folder(tmp_path):
    # like GNU tar, tarfile's "data" filter drops the leading '/' rather than refusing the member
    outside = tmp_path / "outside.png"
    archive = _archive_with(tmp_path, tarfile.TarInfo(str(outside)), _png_bytes())
    assert load_arrays(_folder_cfg(tmp_path, archive)).train_x.shape == (12, 3, 32, 32)
    assert not outside.exists()
    assert list((tmp_path / "cache").rglob("outside.png"))  # unpacked, but under the cache


def _arrays(n_train=20, size=32, classes=10, labels=None):
    train_y = torch.arange(n_train) % classes if labels is None else labels
    return Arrays(torch.zeros(n_train, 3, size, size, dtype=torch.uint8), train_y,
                  torch.zeros(5, 3, size, size, dtype=torch.uint8), torch.arange(5) % classes,
                  [f"c{i}" for i in range(classes)])


def test_check_arrays_accepts_data_that_fits():
    check_arrays(_arrays(), image_size=32, num_classes=10, val_size=19)
    check_arrays(_arrays(classes=3), image_size=32, num_classes=10, val_size=0)  # fewer is fine


def test_check_arrays_refuses_what_does_not_fit():
    with pytest.raises(DataError, match="images are 28x28 but model.image_size=32"):
        check_arrays(_arrays(size=28), image_size=32, num_classes=10, val_size=0)
    with pytest.raises(DataError, match=r"data has 12 classes \(c0, .*\) but model.num_classes=10"):
        check_arrays(_arrays(classes=12), image_size=32, num_classes=10, val_size=0)
    bad_labels = torch.arange(20) % 10
    bad_labels[3] = 10
    with pytest.raises(DataError, match="train labels span 0..10 but model.num_classes=10"):
        check_arrays(_arrays(labels=bad_labels), image_size=32, num_classes=10, val_size=0)
    bad_labels[3] = -1
    with pytest.raises(DataError, match="train labels span -1..9"):
        check_arrays(_arrays(labels=bad_labels), image_size=32, num_classes=10, val_size=0)
    with pytest.raises(DataError, match="data.val_size=20 leaves no training images out of 20"):
        check_arrays(_arrays(), image_size=32, num_classes=10, val_size=20)


def test_channel_stats_match_the_float_copy_they_avoid():
    from tinyvit.data import channel_stats
    x = torch.randint(0, 256, (1000, 3, 8, 8), dtype=torch.uint8)
    x[:, 1] //= 4  # channels that differ, so a mix-up of axes shows
    mean, std = channel_stats(x, chunk=333)  # chunks that do not divide the set
    f = x.float() / 255
    torch.testing.assert_close(mean, f.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(std, f.std(dim=(0, 2, 3)))
