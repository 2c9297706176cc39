import subprocess
import sys

import pytest
import torch

from tinyvit.config import Config
from tinyvit.train import TrainingDiverged, fit, load_checkpoint, save_checkpoint


def test_short_run_beats_chance_and_reports_every_epoch(tiny_cfg):
    seen = []
    final = fit(tiny_cfg, on_epoch=lambda m, ckpt: seen.append(m))
    assert [m["epoch"] for m in seen] == [1, 2]
    assert final["val_acc"] > 0.3 and final["test_acc"] > 0.3  # chance is 0.1
    assert set(seen[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr",
                            "epoch_seconds", "images_per_sec"}
    assert "test_acc" not in seen[0]  # the test set is touched once, after the last epoch


def test_same_seed_same_metrics(tiny_cfg):
    tiny_cfg.train.epochs = 1
    a, b = fit(tiny_cfg), fit(tiny_cfg)
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    tiny_cfg.train.seed = 1
    assert fit(tiny_cfg)["train_loss"] != a["train_loss"]


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny, tmp_path):
    tiny["train"]["epochs"] = 3
    tiny["data"]["cutmix"] = 1.0  # the mixing RNG must be restored too
    cfg = Config.from_dict(tiny)
    full = []
    fit(cfg, on_epoch=lambda m, ckpt: full.append(m))

    path = tmp_path / "ckpt.pt"
    first = []

    def stop_after_two(m, ckpt):
        first.append(m)
        save_checkpoint(ckpt(), path)
        if m["epoch"] == 2:
            raise KeyboardInterrupt  # the process dies here

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, on_epoch=stop_after_two)
    state = load_checkpoint(path)  # weights_only=True inside
    assert state["epoch"] == 2
    rest = []
    fit(cfg, on_epoch=lambda m, ckpt: rest.append(m), resume=state)
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[m[k] for k in keys] for m in first + rest] == [[m[k] for k in keys] for m in full]


def test_nan_loss_stops_with_a_clear_error(tiny_cfg):
    tiny_cfg.train.lr, tiny_cfg.train.grad_clip = 1e30, 0.0
    with pytest.raises(TrainingDiverged, match="train.lr"):
        fit(tiny_cfg)


def test_cli_trains_and_checkpoints(tiny, tmp_path):
    args = [f"--set=data.cache_dir={tmp_path / 'cache'}", "--set=train.epochs=1",
            "--set=model.depth=1", "--set=model.embed_dim=32", "--set=data.source=synthetic",
            "--set=data.synthetic_train=1000", "--set=data.val_size=200",
            f"--checkpoint={tmp_path / 'c.pt'}"]
    r = subprocess.run([sys.executable, "-m", "tinyvit.train", *args], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "epoch   1/1" in r.stdout and "test_acc" in r.stdout
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"]["model"]["depth"] == 1


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror(tiny_cfg):
    from tinyvit.model import TinyViT
    from tinyvit.train import evaluate
    torch.manual_seed(0)
    model = TinyViT(tiny_cfg.model).eval()
    x, y = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,))
    normalize = lambda t: t.float() / 255  # noqa: E731
    amp = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        logits = (model(normalize(x)) + model(normalize(x).flip(3))) / 2
    loss, acc = evaluate(model, (x, y), normalize, 16, amp, flip=True)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == (logits.argmax(1) == y).sum().item() / len(y)
    assert evaluate(model, (x, y), normalize, 16, amp)[0] != pytest.approx(loss)
