import contextlib
import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from conftest import TINY
from tinyvit.config import Config, ModelConfig
from tinyvit.data import ChannelStats, load_arrays, split
from tinyvit.model import TinyViT, count_params
from tinyvit.train import (CheckpointError, TrainingDiverged, evaluate, fit, load_checkpoint,
                           param_groups, save_checkpoint, scored_weights)


@contextlib.contextmanager
def hooked(register, hook):
    """A global torch hook (on every optimizer step or module forward) for the span of a block:
    it watches what the trainer really does without the trainer knowing."""
    handle = register(hook)
    try:
        yield
    finally:
        handle.remove()


class Enough(Exception):
    """Raised from a hook to end a training once it has shown what a test needs."""


def train_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyvit.train", *map(str, args)],
                          capture_output=True, text=True)


def test_weight_decay_falls_on_weight_matrices_only():
    model = TinyViT(ModelConfig(embed_dim=32, depth=2, heads=2, stem="conv"))  # with BatchNorm
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]}
              for g in param_groups(model, 0.05)}
    assert set(groups) == {0.05, 0.0}
    matrices = {f"{n}.weight" for n, m in model.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert groups[0.05] == matrices
    assert groups[0.0] == set(names.values()) - matrices
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
            "blocks.1.attn.qkv.bias", "head.bias", "patch_embed.1.weight",  # a BatchNorm
            "patch_embed.1.bias"} <= groups[0.0]


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror(tiny_cfg):
    torch.manual_seed(0)
    model = TinyViT(tiny_cfg.model).eval()
    x, y = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,))
    normalize = lambda t: t.float() / 255  # noqa: E731
    amp = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        logits = (model(normalize(x)) + model(normalize(x).flip(3))) / 2
    loss, acc = evaluate(model, (x, y), normalize, 16, amp, flip=True)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == (logits.argmax(1) == y).sum().item() / len(y)
    assert evaluate(model, (x, y), normalize, 16, amp)[0] != pytest.approx(loss)


def test_fit_hands_the_optimizer_those_groups(tiny_cfg):
    seen = []

    def first_step(opt, args, kwargs):
        seen.extend((g["weight_decay"], sum(p.numel() for p in g["params"]))
                    for g in opt.param_groups)
        raise Enough

    with hooked(register_optimizer_step_pre_hook, first_step), pytest.raises(Enough):
        fit(tiny_cfg)
    model = TinyViT(tiny_cfg.model)
    matrices = sum(m.weight.numel() for m in model.modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert sorted(seen) == [(0.0, count_params(model) - matrices), (0.05, matrices)]


def _grad_norms(cfg, steps=4) -> list[float]:
    """The total gradient norm the optimizer sees at each of the first `steps` steps."""
    norms = []

    def record(opt, args, kwargs):
        grads = [p.grad.flatten() for g in opt.param_groups for p in g["params"]]
        norms.append(torch.cat(grads).norm().item())
        if len(norms) == steps:
            raise Enough

    with hooked(register_optimizer_step_pre_hook, record), pytest.raises(Enough):
        fit(cfg)
    return norms


def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(tiny_cfg):
    bound = 0.05
    tiny_cfg.train.grad_clip = 0.0
    raw = _grad_norms(tiny_cfg)
    assert min(raw) > 2 * bound  # the real gradients are larger: the bound has work to do
    tiny_cfg.train.grad_clip = bound
    assert _grad_norms(tiny_cfg) == pytest.approx([bound] * 4, rel=1e-3)


def test_training_loss_is_label_smoothed_cross_entropy(tiny_cfg):
    smoothing = 0.25
    tiny_cfg.train.epochs, tiny_cfg.train.label_smoothing = 1, smoothing
    arrays = load_arrays(tiny_cfg.data)
    arrays.train_y = torch.zeros_like(arrays.train_y)  # one class: every step's target is known
    logits = []

    def record(module, args, output):
        if isinstance(module, TinyViT) and module.training:
            logits.append(output.detach())

    with hooked(register_module_forward_hook, record):
        final = fit(tiny_cfg, arrays)
    d, t = tiny_cfg.data, tiny_cfg.train
    assert len(logits) == (d.synthetic_train - d.val_size) // t.batch_size
    target = torch.zeros(len(logits[0]), dtype=torch.long)
    loss = lambda s: sum(F.cross_entropy(z, target, label_smoothing=s).item()  # noqa: E731
                         for z in logits) / len(logits)
    assert final["train_loss"] == pytest.approx(loss(smoothing), rel=1e-5)
    assert final["train_loss"] != pytest.approx(loss(0.0), rel=1e-2)


def test_lr_warms_up_linearly_then_follows_a_cosine_down_to_min_lr(tiny):
    lr, min_lr = 2e-3, 2e-4
    tiny["data"].update(synthetic_train=1000, val_size=200, synthetic_test=200)
    tiny["train"].update(epochs=3, lr=lr, min_lr=min_lr, warmup_epochs=1.0)
    per_epoch = (1000 - 200) // 100
    warmup, total = per_epoch, 3 * per_epoch

    def expected(step):  # the lr of optimizer step `step`, counted from 0
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / (total - warmup)
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2

    used, reported = [], []
    with hooked(register_optimizer_step_pre_hook,
                lambda opt, args, kwargs: used.append({g["lr"] for g in opt.param_groups})):
        fit(Config.from_dict(tiny), on_epoch=lambda m, ckpt: reported.append(m["lr"]))
    assert all(len(lrs) == 1 for lrs in used)  # both groups follow one schedule
    used = [lrs.pop() for lrs in used]
    assert used == pytest.approx([expected(s) for s in range(total)], rel=1e-6)
    assert used[0] == pytest.approx(lr / warmup) and used[warmup - 1] == pytest.approx(lr)
    assert used[warmup + (total - warmup) // 2] == pytest.approx((lr + min_lr) / 2)
    # an epoch reports the lr its next step would use; after the last one that is min_lr
    assert reported == pytest.approx([expected(e * per_epoch) for e in (1, 2, 3)], rel=1e-6)
    assert reported[-1] == pytest.approx(min_lr)


def test_fit_scores_val_and_test_with_the_mirror_on_the_seeded_split(tiny):
    tiny["train"].update(epochs=1, eval_flip=True)
    tiny["data"]["split_seed"] = 3
    cfg = Config.from_dict(tiny)
    states = []
    final = fit(cfg, on_epoch=lambda m, ckpt: states.append(ckpt()))
    model = TinyViT(cfg.model).eval()
    model.load_state_dict(states[-1]["model"])
    arrays = load_arrays(cfg.data)
    # the carve-out by hand: the first val_size of a split_seed permutation of train validate,
    # and the rest alone give the normalisation statistics
    n, n_val = cfg.data.synthetic_train, cfg.data.val_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    val, train = order[:n_val], order[n_val:]
    pixels = arrays.train_x[train].float() / 255
    mean = pixels.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    std = pixels.std(dim=(0, 2, 3)).view(1, 3, 1, 1)
    for name, x, y in (("val", arrays.train_x[val], arrays.train_y[val]),
                       ("test", arrays.test_x, arrays.test_y)):
        x = (x.float() / 255 - mean) / std
        with torch.no_grad():
            plain = model(x)
            logits = (plain + model(x.flip(3))) / 2
        # the same arithmetic on the same batch: equal to float rounding. A model this young
        # is nearly mirror-invariant, so the plain loss is only ~1e-4 (relative) away
        assert final[f"{name}_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=2e-6)
        assert final[f"{name}_loss"] != pytest.approx(F.cross_entropy(plain, y).item(), rel=2e-5)
        accuracy = (logits.argmax(1) == y).float().mean().item()
        assert final[f"{name}_acc"] == pytest.approx(accuracy, abs=1 / len(y))


def test_ema_averages_every_step_s_weights_and_is_what_val_and_test_score(tiny_cfg):
    tiny_cfg.train.epochs, tiny_cfg.train.batch_size, tiny_cfg.train.ema = 1, 15, 0.9
    weights, states = [], []

    def keep(optimizer, args, kwargs):
        weights.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    with hooked(register_optimizer_step_post_hook, keep):
        final = fit(tiny_cfg, on_epoch=lambda m, ckpt: states.append(ckpt()))
    # the first step's weights, then average = d average + (1 - d) weights, d warming up as
    # (1 + n) / (10 + n) for the n steps averaged so far, up to 0.9 (from n = 80)
    expected = weights[0]
    for n, w in enumerate(weights[1:], start=1):
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * x for e, x in zip(expected, w)]
    model = TinyViT(tiny_cfg.model).eval()
    groups = param_groups(model, tiny_cfg.train.weight_decay)  # the optimizer's order
    model.load_state_dict(scored_weights(states[-1]))
    averaged = [p for g in groups for p in g["params"]]
    assert len(weights) > 80
    for e, p in zip(expected, averaged):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, w) for p, w in zip(averaged, weights[-1]))

    data = split(load_arrays(tiny_cfg.data), tiny_cfg.data, torch.device("cpu"))
    for name in ("val", "test"):
        scored = evaluate(model, getattr(data, name), data.normalize, 1000,
                          contextlib.nullcontext())
        assert (final[f"{name}_loss"], final[f"{name}_acc"]) == pytest.approx(scored, rel=1e-6)
    model.load_state_dict(states[-1]["model"])  # the trained weights themselves score otherwise
    trained = evaluate(model, data.val, data.normalize, 1000, contextlib.nullcontext())
    assert final["val_loss"] != pytest.approx(trained[0], rel=1e-4)


def test_fit_normalises_with_the_statistics_that_come_with_the_data(tiny_cfg):
    """load_arrays computes the training split's statistics once (in a study, the driver) and
    they travel with the arrays: fit takes them as they are, computing none, and trains exactly
    as with statistics it computes itself."""
    tiny_cfg.train.epochs = 1
    arrays = load_arrays(tiny_cfg.data)

    def train(a):
        states = []
        metrics = fit(tiny_cfg, a, lambda m, state: states.append(state()))
        timing = ("epoch_seconds", "cpu_seconds", "images_per_sec")
        return ({k: v for k, v in metrics.items() if k not in timing},
                (states[-1]["mean"], states[-1]["std"]))

    shipped, used = train(arrays)
    assert used == (arrays.stats.mean.tolist(), arrays.stats.std.tolist())
    assert train(dataclasses.replace(arrays, stats=None)) == (shipped, used)  # computed by fit
    # statistics planted for the same split are the ones the training normalises with
    planted = ChannelStats(torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.1, 0.2, 0.3]),
                           arrays.stats.split)
    metrics, used = train(dataclasses.replace(arrays, stats=planted))
    assert used == (planted.mean.tolist(), planted.std.tolist())
    assert metrics["train_loss"] != shipped["train_loss"]
    # another split (a study may search data.subset) has statistics of its own
    tiny_cfg.data.subset = 300
    assert train(dataclasses.replace(arrays, stats=planted))[1] != used


def test_short_run_beats_chance_and_reports_every_epoch(tiny_cfg):
    seen = []
    final = fit(tiny_cfg, on_epoch=lambda m, ckpt: seen.append(m))
    assert [m["epoch"] for m in seen] == [1, 2]
    assert final["val_acc"] > 0.3 and final["test_acc"] > 0.3  # chance is 0.1
    assert set(seen[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr",
                            "epoch_seconds", "cpu_seconds", "images_per_sec"}
    # one thread trains (tiny: train.threads 1): the epoch's CPU time stays under its wall time
    # (well under where other processes take the cores), and is counted
    assert all(0 < m["cpu_seconds"] < 1.5 * m["epoch_seconds"] for m in seen)
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
    tiny["data"].update(mixup=0.5, cutmix=1.0)  # the mixing RNG must be restored too
    tiny["train"]["ema"] = 0.9  # and the average of the weights, which val and test score
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

    # the CLI, from the same checkpoint, runs epoch 3 alone and prints the same metrics
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny))
    r = train_cli(tmp_path / "c.yaml", f"--checkpoint={path}", "--resume")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["3/3"]
    last = full[-1]
    expected = {k: f"{last[k]:.4f}" for k in ("train_loss", "train_acc", "val_loss", "val_acc",
                                              "test_acc")}
    assert dict(re.findall(r"(\w+_(?:loss|acc)|lr) (\S+)", lines[0])) == {
        **expected, "lr": f"{last['lr']:.2e}"}
    assert load_checkpoint(path)["epoch"] == 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real one-epoch checkpoint of a tiny configuration, and that configuration."""
    folder = tmp_path_factory.mktemp("saved")
    d = {k: dict(v) for k, v in TINY.items()}
    d["data"].update(cache_dir=str(folder / "cache"), synthetic_train=600, val_size=100,
                     synthetic_test=100)
    d["train"]["epochs"] = 1
    fit(Config.from_dict(d), on_epoch=lambda m, ckpt: save_checkpoint(ckpt(), folder / "c.pt"))
    return folder / "c.pt", d


def test_resume_accepts_more_epochs_and_moved_folders(saved, tmp_path):
    path, d = saved
    longer = {**d, "train": {**d["train"], "epochs": 5, "threads": 2},
              "data": {**d["data"], "cache_dir": str(tmp_path)}}
    assert load_checkpoint(path, Config.from_dict(longer))["epoch"] == 1


@pytest.mark.parametrize("section, key, value", [
    ("model", "depth", 3), ("model", "pos_embedding", "rope2d"), ("model", "drop_path", 0.1),
    ("data", "split_seed", 1), ("data", "val_size", 50), ("data", "subset", 300),
    ("train", "lr", 0.001), ("train", "batch_size", 50), ("train", "seed", 1),
])
def test_resume_refuses_a_checkpoint_of_another_configuration(saved, section, key, value):
    path, d = saved
    was = Config.from_dict(d).flat()[f"{section}.{key}"]
    other = Config.from_dict({**d, section: {**d[section], key: value}})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, other)
    assert str(e.value) == (f"checkpoint {path} was saved for {section}.{key}={was}; "
                            f"this run has {section}.{key}={value}")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "depth"])
def test_cli_refuses_a_checkpoint_it_cannot_resume_in_one_line(saved, tmp_path, damage):
    path, d = saved
    ckpt = tmp_path / "ckpt.pt"
    whole = path.read_bytes()
    ckpt.write_bytes({"garbage": b"\x00not a checkpoint" * 64, "truncated": whole[:len(whole) // 2],
                      "depth": whole}[damage])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    r = train_cli(tmp_path / "c.yaml", f"--checkpoint={ckpt}", "--resume",
                  *(["--set=model.depth=4"] if damage == "depth" else []))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: checkpoint {ckpt} ") and r.stderr.count("\n") == 1
    if damage == "depth":
        assert "was saved for model.depth=2; this run has model.depth=4" in r.stderr
    else:
        assert "cannot be read" in r.stderr


def test_nan_loss_stops_with_a_clear_error(tiny_cfg):
    tiny_cfg.train.lr, tiny_cfg.train.grad_clip = 1e30, 0.0
    with pytest.raises(TrainingDiverged, match="train.lr"):
        fit(tiny_cfg)


def test_cli_trains_and_checkpoints(tiny, tmp_path):
    args = [f"--set=data.cache_dir={tmp_path / 'cache'}", "--set=train.epochs=1",
            "--set=model.depth=1", "--set=model.embed_dim=32", "--set=data.source=synthetic",
            "--set=data.synthetic_train=1000", "--set=data.val_size=200",
            f"--checkpoint={tmp_path / 'c.pt'}"]
    r = train_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "epoch   1/1" in r.stdout and "test_acc" in r.stdout
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"]["model"]["depth"] == 1


def test_compile_by_default_on_cuda_only_with_cuda_graphs():
    from tinyvit.train import compile_mode
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name needs no CUDA
    assert Config().train.compile is None
    assert compile_mode(None, cuda) == "reduce-overhead" and compile_mode(None, cpu) is None
    assert compile_mode(True, cpu) == "default" and compile_mode(True, cuda) == "reduce-overhead"
    assert compile_mode(False, cuda) is None
