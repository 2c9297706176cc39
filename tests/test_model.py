import pytest
import torch

from tinyvit.config import ConfigError, ModelConfig, POS_EMBEDDINGS
from tinyvit.model import TinyViT, count_params


def test_seed_configuration_has_the_seeds_parameter_count():
    assert count_params(TinyViT(ModelConfig())) == 208_074


@pytest.mark.parametrize("pos", POS_EMBEDDINGS)
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("patch", [2, 8])
def test_every_variant_runs_and_gives_attention_maps(pos, pool, patch):
    cfg = ModelConfig(patch_size=patch, embed_dim=32, depth=2, heads=2, pos_embedding=pos,
                      pool=pool, drop_path=0.1, dropout=0.1, attn_dropout=0.1)
    model = TinyViT(cfg)
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 10)
    maps = model.eval().attention_maps(x)
    grid = 32 // patch
    assert maps.shape == (2, 3, 2, grid, grid)
    assert (maps >= 0).all()
    if pool == "cls":  # CLS attends to itself too, so what reaches the patches is below 1
        assert (maps.sum(dim=(-2, -1)) <= 1 + 1e-5).all()


@pytest.mark.parametrize("patch", [2, 4, 16])
def test_conv_stem_reaches_the_patch_grid(patch):
    model = TinyViT(ModelConfig(stem="conv", patch_size=patch, embed_dim=32, heads=2, depth=1))
    convs = [m for m in model.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2] * (patch.bit_length() - 1) + [1]
    assert model.tokens(torch.randn(2, 3, 32, 32)).shape == (2, 1 + (32 // patch) ** 2, 32)
    # BatchNorm in the stem: the eval forward must not depend on the rest of the batch
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x)[:1], model(x[:1]), atol=1e-5, rtol=1e-4)


def test_explicit_attention_matches_the_fused_kernel():
    model = TinyViT(ModelConfig(pos_embedding="rope2d")).eval()
    tokens = model.tokens(torch.randn(2, 3, 32, 32))
    fused, _ = model.blocks[0](tokens, model.rope)
    explicit, weights = model.blocks[0](tokens, model.rope, need_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@pytest.mark.parametrize("pos", ["learned", "rope2d"])
def test_cls_only_last_block_is_the_full_forward(pos):
    # forward() computes the last block for the CLS token alone; every token through every block
    # must give the same logits and the same gradients
    torch.manual_seed(0)
    model = TinyViT(ModelConfig(pos_embedding=pos))
    x = torch.randn(4, 3, 32, 32)

    def full(x):
        t = model.tokens(x)
        for block in model.blocks:
            t, _ = block(t, model.rope)
        return model.head(model.norm(t[:, 0]))

    grads = []
    for f in (model, full):
        model.zero_grad()
        out = f(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (short, g_short), (reference, g_ref) = grads
    torch.testing.assert_close(short, reference, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_short, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_rope_scores_depend_only_on_relative_offsets():
    # shifting the whole content of a patch grid moves every token, but the query-key scores of
    # token pairs at the same offset must stay equal under rope2d
    rope = TinyViT(ModelConfig(pos_embedding="rope2d", pool="mean")).rope
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 64, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 1, 64, 16)
    scores = (rope(q) @ rope(k).transpose(-2, -1))[0, 0]
    # token (0,0)->(0,1) and token (3,3)->(3,4) are both one column apart
    assert torch.allclose(scores[0, 1], scores[3 * 8 + 3, 3 * 8 + 4], atol=1e-5)
    assert not torch.allclose(scores[0, 1], scores[0, 5], atol=1e-3)


def test_vit_initialisation():
    model = TinyViT(ModelConfig())
    w = model.blocks[0].mlp[0].weight
    assert 0.015 < w.std().item() < 0.025 and w.abs().max().item() <= 0.04 + 1e-6
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0


@pytest.mark.parametrize("field, kwargs", [
    ("model.heads", {"heads": 3}),
    ("model.patch_size", {"patch_size": 5}),
    ("model.pos_embedding", {"pos_embedding": "alibi"}),
    ("model.pool", {"pool": "max"}),
    ("model.embed_dim", {"embed_dim": 60, "heads": 6, "pos_embedding": "rope2d"}),
    ("model.stem", {"stem": "resnet"}),
    ("model.stem", {"stem": "conv", "patch_size": 1}),
])
def test_invalid_combinations_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
        TinyViT(ModelConfig(**kwargs))
    assert isinstance(e.value, ConfigError)
