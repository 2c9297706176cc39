"""The trainer's CUDA path (bench/gpu.sh runs these on a GPU); skipped where no CUDA is visible."""
import math

import pytest
import torch

from tinyvit.config import Config
from tinyvit.model import TinyViT
from tinyvit.data import load_arrays, split
from tinyvit.train import compile_mode, evaluate, fit, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_cuda(tiny: dict, **train) -> Config:
    tiny["train"].update(device="cuda", **train)
    return Config.from_dict(tiny)


def fit_watching_linears(cfg: Config):
    """fit, recording the dtype every nn.Linear produced: bf16 autocast makes them bfloat16."""
    dtypes, epochs = set(), []

    def hook(module, args, out):
        if isinstance(module, torch.nn.Linear):
            dtypes.add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        fit(cfg, on_epoch=lambda m, ckpt: epochs.append((m, ckpt())))
    finally:
        handle.remove()
    return epochs, dtypes


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("auto", torch.bfloat16)])
def test_fit_on_cuda_learns_in_its_precision(tiny, precision, dtype):
    # eager: a CUDA-graph replay runs no Python, so no hook would see the layers' dtypes
    epochs, dtypes = fit_watching_linears(on_cuda(tiny, precision=precision, compile=False))
    assert dtypes == {dtype}  # auto must mean bf16 on a GPU that has it
    final, ckpt = epochs[-1]
    assert all(math.isfinite(m[k]) for m, _ in epochs for k in ("train_loss", "val_loss"))
    assert final["val_acc"] > 0.3 and final["test_acc"] > 0.3  # chance is 0.1
    assert ckpt["model"]["patch_embed.weight"].device.type == "cuda"  # trained there


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_channels_last_input_gives_the_same_logits(tiny, stem):
    tiny["model"]["stem"] = stem
    model = TinyViT(Config.from_dict(tiny).model).cuda().eval()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        nchw, nhwc = model(x), model(x.contiguous(memory_format=torch.channels_last))
    # cuDNN may pick other (TF32) algorithms per layout; a mis-read layout is off by O(1)
    torch.testing.assert_close(nhwc, nchw, atol=1e-2, rtol=1e-2)


def test_compiled_fit_on_cuda_learns(tiny):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    final = fit(on_cuda(tiny, compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert math.isfinite(final["train_loss"]) and final["val_acc"] > 0.3


def test_cuda_graphs_are_the_default_and_score_as_eager_does(tiny):
    """The default on CUDA replays CUDA graphs, whose output buffer the next replay reuses:
    test-time flip must still average each image's logits with its mirror's, as eager does."""
    cfg = on_cuda(tiny, precision="fp32", eval_flip=True)
    assert compile_mode(cfg.train.compile, torch.device("cuda")) == "reduce-overhead"
    torch._dynamo.reset()
    model = TinyViT(cfg.model).cuda()
    graphed = torch.compile(model, mode="reduce-overhead")
    data = split(load_arrays(cfg.data), cfg.data, torch.device("cuda"))
    fp32 = torch.autocast("cuda", enabled=False)
    eager = evaluate(model, data.val, data.normalize, 250, fp32, flip=True)
    for _ in range(3):  # the first calls record the graphs, the later ones replay them
        loss, acc = evaluate(graphed, data.val, data.normalize, 250, fp32, flip=True)
    assert loss == pytest.approx(eager[0], rel=1e-4) and acc == pytest.approx(eager[1], abs=0.002)


def test_checkpoint_saved_on_cuda_resumes_on_cpu(tiny, tmp_path):
    path = tmp_path / "ckpt.pt"
    cuda_run = []

    def save_first(m, ckpt):
        cuda_run.append(m)
        if m["epoch"] == 1:
            save_checkpoint(ckpt(), path)

    fit(on_cuda(tiny), on_epoch=save_first)
    state = load_checkpoint(path)
    assert "cuda" in state["rng"]
    assert all(t.device.type == "cpu" for t in state["model"].values())

    tiny["train"]["device"] = "cpu"
    cpu_run = []
    fit(Config.from_dict(tiny), on_epoch=lambda m, ckpt: cpu_run.append((m, ckpt())),
        resume=state)
    assert [m["epoch"] for m, _ in cpu_run] == [2]
    resumed, ckpt = cpu_run[0]
    assert resumed["lr"] == pytest.approx(cuda_run[1]["lr"])  # the schedule went on
    steps_per_epoch = (tiny["data"]["synthetic_train"] - tiny["data"]["val_size"]) \
        // tiny["train"]["batch_size"]
    assert ckpt["optimizer"]["state"][0]["step"] == 2 * steps_per_epoch  # Adam's moments too
    # same weights, other device: the epoch continues the CUDA run, it does not start over
    assert abs(resumed["train_loss"] - cuda_run[1]["train_loss"]) < 0.1
    assert resumed["val_acc"] > 0.3
