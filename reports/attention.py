"""Where the best model looks: its CLS-token attention over a few test images.

Kept apart from analysis.py because it is the one part of a report that needs torch and the
tinyvit package (slow to import), and only when the best trial logged a checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tinyvit.config import Config
from tinyvit.data import load_arrays
from tinyvit.model import TinyViT
from tinyvit.train import scored_weights


def attention_on_test_images(checkpoint: Path, n_images: int = 6):
    """(images uint8 [n, 3, H, W], maps [depth, n, heads, grid, grid], one title per image naming
    the true and the predicted class) for test images of the trial's own data, one per class."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = Config.from_dict(state["config"])
    model = TinyViT(cfg.model)
    model.load_state_dict(scored_weights(state))
    model.eval()
    arrays = load_arrays(cfg.data)
    # the first test image of each class in turn: folder-ordered test sets hold one class first
    first = [int((arrays.test_y == c).nonzero()[0]) for c in arrays.test_y.unique()[:n_images]]
    images, labels = arrays.test_x[first], arrays.test_y[first]
    # the trainer normalizes with the train split's statistics, saved in the checkpoint
    mean, std = (torch.tensor(state[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    titles = [f"{arrays.classes[t]} -> {arrays.classes[p]}" for t, p in zip(labels, predicted)]
    return images, model.attention_maps(x), titles
