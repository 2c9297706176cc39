"""TinyViT: a small pre-norm Vision Transformer whose every ablation axis is a ModelConfig field.

With the seed's configuration (patch 4, dim 64, depth 4, heads 4, mlp_ratio 4, learned positions,
CLS pooling) it has exactly the seed's 208,074 parameters: the fused qkv projection and the output
projection carry biases, as `nn.MultiheadAttention` did.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sin/cos codes of `positions` in `dim` channels (half sin, half cos)."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Half the channels encode the row, half the column (MoCo v3 / MAE style)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)], dim=1)


class Rope2d(nn.Module):
    """Axial 2-D rotary embedding: rotates half of each head's channels by the patch row, half by
    the column, so attention scores depend on relative offsets. The CLS token (if any) is left
    unrotated: it has no place on the grid."""

    def __init__(self, grid: int, head_dim: int, base: float, skip: int):
        super().__init__()
        quarter = head_dim // 4
        freqs = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        angles = torch.cat([ys.flatten()[:, None] * freqs, xs.flatten()[:, None] * freqs], dim=1)
        angles = torch.cat([torch.zeros(skip, 2 * quarter), angles])  # identity for CLS
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, heads, tokens, head_dim]
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * self.cos - b * self.sin, a * self.sin + b * self.cos], dim=-1)


def conv_stem(patch_size: int, dim: int) -> nn.Sequential:
    """Xiao et al. 2021, "Early convolutions help transformers see better": 3x3 stride-2 convs with
    BatchNorm and ReLU halve the image until it is the patch grid (channels doubling up to `dim`),
    then a 1x1 projection. The convs' locality is a prior a ViT otherwise has to learn from data,
    which is what a short training on 45,000 images cannot afford."""
    steps = int(math.log2(patch_size))
    widths = [3] + [dim // 2 ** (steps - 1 - i) for i in range(steps)]
    layers = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Conv2d(dim, dim, kernel_size=1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope=None, need_weights=False, queries=None):
        """`queries`: attend from the first `queries` tokens only (all when None)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope(q), rope(k)
        q = q[:, :, :queries]
        weights = None
        if need_weights:  # the explicit path, only for drawing attention maps
            weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            out = weights @ v
        else:  # fused flash / memory-efficient kernels on both CPU and GPU
            drop = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B, q.shape[2], D)
        return self.drop(self.proj(out)), weights


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch for a random subset of samples."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        dim, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, cfg.heads, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(cfg.dropout))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, rope=None, need_weights=False, queries=None):
        """`queries`: compute the output of the first `queries` tokens only (all when None)."""
        attn, weights = self.attn(self.norm1(x), rope, need_weights, queries)
        x = x[:, :queries] + self.drop_path(attn)
        return x + self.drop_path(self.mlp(self.norm2(x))), weights


class SeqPool(nn.Module):
    """Sequence pooling (Hassani et al. 2021, "Escaping the big data paradigm with Compact
    Transformers"): each token gets a learned score, and the image is the softmax-weighted sum of
    its tokens. It replaces the CLS token: the model learns which tokens matter, at dim+1
    parameters, instead of spending a token's attention on gathering them."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x):  # x: [B, tokens, dim]
        return (self.score(x).softmax(dim=1) * x).sum(dim=1)


class TinyViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        patches, dim = self.grid**2, cfg.embed_dim
        self.patch_embed = (conv_stem(cfg.patch_size, dim) if cfg.stem == "conv" else
                            nn.Conv2d(3, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.pool == "cls" else None
        n_cls = int(self.cls_token is not None)
        if cfg.pos_embedding == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_cls + patches, dim))
        elif cfg.pos_embedding == "sinusoidal":
            self.register_buffer("pos_embed", sincos_1d(torch.arange(n_cls + patches), dim)[None],
                                 persistent=False)
        elif cfg.pos_embedding == "sinusoidal2d":  # CLS gets no position: it has no place
            table = torch.cat([torch.zeros(n_cls, dim), sincos_2d(self.grid, dim)])
            self.register_buffer("pos_embed", table[None], persistent=False)
        else:  # none, or rope2d, which rotates queries and keys inside attention instead
            self.pos_embed = None
        self.rope = (Rope2d(self.grid, dim // cfg.heads, cfg.rope_base, n_cls)
                     if cfg.pos_embedding == "rope2d" else None)
        # stochastic depth grows linearly with depth, as in DeiT
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.seq_pool = SeqPool(dim) if cfg.pool == "seq" else None
        self.head = nn.Linear(dim, cfg.num_classes)
        self.apply(_init)
        for p in (self.cls_token, self.pos_embed):
            if isinstance(p, nn.Parameter):
                trunc_normal(p)

    def tokens(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed

    def forward(self, x):
        x = self.tokens(x)
        # With CLS pooling the head reads the CLS token alone, so the last block computes its
        # query, attention, projection and MLP for that token only (keys and values still come
        # from every token): the same function for a fifth less arithmetic in the seed's shape.
        *body, last = self.blocks
        for block in body:
            x, _ = block(x, self.rope)
        x, _ = last(x, self.rope, queries=1 if self.cls_token is not None else None)
        if self.seq_pool is not None:  # as in CCT: the scores read normalized tokens
            return self.head(self.seq_pool(self.norm(x)))
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(self.norm(x))

    @torch.no_grad()
    def attention_maps(self, x) -> torch.Tensor:
        """[depth, B, heads, grid, grid]: how much the CLS token attends to each patch in every
        layer and head; without CLS (mean or sequence pooling) the mean attention each patch
        receives."""
        x, maps = self.tokens(x), []
        for block in self.blocks:
            x, w = block(x, self.rope, need_weights=True)
            w = w[:, :, 0, 1:] if self.cls_token is not None else w.mean(dim=2)
            maps.append(w.reshape(*w.shape[:2], self.grid, self.grid))
        return torch.stack(maps)


def _init(m: nn.Module):
    # ViT init: truncated normal for every weight matrix (the patch conv is one too), zero biases
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        trunc_normal(m.weight)
        if m.bias is not None:  # the conv stem's convs feed BatchNorm and carry none
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def trunc_normal(t: torch.Tensor, std: float = 0.02):
    # cut at 2 std: torch's default bounds (+-2 absolute) would leave a std of 0.02 uncut
    nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
