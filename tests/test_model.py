import math

import pytest
import torch

from tinyvit.config import ConfigError, ModelConfig, POS_EMBEDDINGS
from tinyvit.model import Block, TinyViT, count_params

SMALL = dict(embed_dim=32, depth=2, heads=2)  # patch 4: an 8x8 grid of 64 patches


def test_seed_configuration_has_the_seeds_parameter_count():
    assert count_params(TinyViT(ModelConfig())) == 208_074


@pytest.mark.parametrize("pos", POS_EMBEDDINGS)
@pytest.mark.parametrize("pool", ["cls", "mean", "seq"])
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
    total = maps.sum(dim=(-2, -1))
    if pool == "cls":  # CLS attends to itself too, so what reaches the patches is below 1
        assert ((total > 0) & (total < 1)).all()
    else:  # the mean over queries of rows that each sum to 1
        torch.testing.assert_close(total, torch.ones_like(total))


@pytest.mark.parametrize("patch", [2, 4, 16])
def test_conv_stem_reaches_the_patch_grid(patch):
    model = TinyViT(ModelConfig(stem="conv", patch_size=patch, embed_dim=32, heads=2, depth=1))
    convs = [m for m in model.patch_embed if isinstance(m, torch.nn.Conv2d)]
    halvings = patch.bit_length() - 1
    assert [c.stride[0] for c in convs] == [2] * halvings + [1]
    assert [c.kernel_size[0] for c in convs] == [3] * halvings + [1]
    # channels double up to embed_dim, and every stride-2 conv feeds a BatchNorm
    widths = [32 >> (halvings - 1 - i) for i in range(halvings)] + [32]
    assert [c.out_channels for c in convs] == widths
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.patch_embed) == halvings
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


def _blank_image_embedding(model: TinyViT) -> TinyViT:
    # zero the patch projection and the CLS token: every token is then its position code alone
    with torch.no_grad():
        for p in model.patch_embed.parameters():
            p.zero_()
        if model.cls_token is not None:
            model.cls_token.zero_()
    return model


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_sinusoidal_1d_table_is_the_transformer_code_of_the_token_index(pool):
    model = _blank_image_embedding(TinyViT(ModelConfig(**SMALL, pool=pool,
                                                       pos_embedding="sinusoidal")))
    assert "pos_embed" not in dict(model.named_parameters())  # fixed, never trained
    tokens = model.tokens(torch.randn(2, 3, 32, 32))
    assert tokens.shape[1] == 64 + (pool == "cls")
    half = 16
    for pos in (0, 1, 7, tokens.shape[1] - 1):  # 1-D: the CLS token, if any, is position 0
        for c in (0, 1, 5, half - 1):
            angle = pos / 10000 ** (c / half)
            assert tokens[1, pos, c].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert tokens[1, pos, half + c].item() == pytest.approx(math.cos(angle), abs=1e-5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_sinusoidal_2d_table_codes_row_and_column_and_leaves_cls_blank(pool):
    model = _blank_image_embedding(TinyViT(ModelConfig(**SMALL, pool=pool,
                                                       pos_embedding="sinusoidal2d")))
    assert "pos_embed" not in dict(model.named_parameters())
    tokens = model.tokens(torch.randn(2, 3, 32, 32))[1]
    n_cls = int(pool == "cls")
    if n_cls:
        assert torch.equal(tokens[0], torch.zeros(32))  # CLS has no place on the grid
    quarter = 8  # channels: sin(row) | cos(row) | sin(col) | cos(col)
    for row, col in ((0, 0), (1, 0), (0, 1), (3, 5), (7, 2)):
        token = tokens[n_cls + row * 8 + col]
        for k in (0, 1, 3, quarter - 1):
            w = 10000 ** (-k / quarter)
            expected = [math.sin(row * w), math.cos(row * w), math.sin(col * w), math.cos(col * w)]
            got = [token[i * quarter + k].item() for i in range(4)]
            assert got == pytest.approx(expected, abs=1e-5), (row, col, k)


def test_learned_table_is_a_trained_parameter_and_none_adds_nothing():
    learned = _blank_image_embedding(TinyViT(ModelConfig(**SMALL)))
    assert learned.pos_embed.requires_grad and learned.pos_embed.abs().sum() > 0
    torch.testing.assert_close(learned.tokens(torch.randn(2, 3, 32, 32)),
                               learned.pos_embed.expand(2, -1, -1))
    for pos in ("none", "rope2d"):  # rope2d acts inside attention, not on the tokens
        blank = _blank_image_embedding(TinyViT(ModelConfig(**SMALL, pos_embedding=pos)))
        assert blank.tokens(torch.randn(2, 3, 32, 32)).abs().sum() == 0


def test_rope2d_turns_channel_pair_k_by_base_to_the_minus_k_over_quarter_per_patch():
    # rope_base is the base of the frequency ladder: the k-th pair of each axis turns
    # base**(-k / quarter) radians per patch (k = 0 .. head_dim/4 - 1), so pair 0 turns one radian
    # per patch and the slowest pair has a wavelength of 2*pi*base**((quarter-1)/quarter) patches
    base, head_dim = 37.0, 16
    rope = TinyViT(ModelConfig(**SMALL, pos_embedding="rope2d", rope_base=base)).rope
    quarter, half = head_dim // 4, head_dim // 2
    # channel j of the first half and channel j of the second half are one rotated pair; a unit
    # vector on the first axis of every pair comes out as (cos angle, sin angle)
    unit = torch.cat([torch.ones(half), torch.zeros(half)]).expand(1, 1, 65, head_dim)
    out = rope(unit)[0, 0]
    torch.testing.assert_close(out[0], unit[0, 0, 0])  # CLS: not rotated
    for row, col in ((0, 0), (1, 0), (0, 1), (3, 5), (7, 7)):
        token = out[1 + row * 8 + col]
        for k in range(quarter):
            f = base ** (-k / quarter)
            for pair, offset in ((k, row), (quarter + k, col)):  # first the row, then the column
                got = (token[pair].item(), token[half + pair].item())
                assert got == pytest.approx((math.cos(offset * f), math.sin(offset * f)),
                                            abs=1e-5), (row, col, k)


def test_stochastic_depth_grows_linearly_to_drop_path_in_the_last_block():
    model = TinyViT(ModelConfig(embed_dim=32, heads=2, depth=5, drop_path=0.2))
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])


def test_drop_path_drops_a_residual_branch_per_sample_and_rescales_the_rest():
    torch.manual_seed(0)
    p = 0.5
    block = Block(ModelConfig(**SMALL), drop_path=p)
    with torch.no_grad():  # a zero MLP branch leaves the attention branch alone to watch
        block.mlp[3].weight.zero_()
        block.mlp[3].bias.zero_()
    x = torch.randn(64, 5, 32)
    branch = block.attn(block.norm1(x))[0].detach()
    out = block.train()(x)[0].detach()
    dropped = (out == x).all(dim=2).all(dim=1)
    assert 10 < dropped.sum() < 54  # about half of 64 samples
    torch.testing.assert_close(out[~dropped], x[~dropped] + branch[~dropped] / (1 - p))
    out = block.eval()(x)[0].detach()  # evaluation: every branch, unscaled
    torch.testing.assert_close(out, x + branch)


@pytest.mark.parametrize("kind", ["dropout", "attn_dropout", "drop_path"])
def test_dropouts_act_in_training_only(kind):
    torch.manual_seed(0)
    noisy = TinyViT(ModelConfig(**SMALL, **{kind: 0.5}))
    clean = TinyViT(ModelConfig(**SMALL))
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(noisy.eval()(x), clean.eval()(x))
        a, b, reference = noisy.train()(x), noisy(x), clean.train()(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, reference)


def test_mean_pooling_reads_the_mean_of_the_patch_tokens():
    torch.manual_seed(0)
    model = TinyViT(ModelConfig(**SMALL, pool="mean")).eval()
    assert model.cls_token is None
    x = torch.randn(3, 3, 32, 32)
    t = model.tokens(x)
    assert t.shape == (3, 64, 32)
    with torch.no_grad():
        for block in model.blocks:
            t, _ = block(t)
        torch.testing.assert_close(model(x), model.head(model.norm(t.mean(dim=1))))


def test_sequence_pooling_is_the_softmax_weighted_sum_of_normalized_tokens():
    torch.manual_seed(0)
    model = TinyViT(ModelConfig(**SMALL, pool="seq")).eval()
    assert model.cls_token is None
    # the pooling's score layer is all it adds to mean pooling
    assert count_params(model) == count_params(TinyViT(ModelConfig(**SMALL, pool="mean"))) + 33
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = model.tokens(x)
        for block in model.blocks:
            t, _ = block(t)
        t = model.norm(t)
        score = t @ model.seq_pool.score.weight[0] + model.seq_pool.score.bias  # [B, tokens]
        weights = score.exp() / score.exp().sum(dim=1, keepdim=True)
        pooled = torch.einsum("bn,bnd->bd", weights, t)
        torch.testing.assert_close(model(x), model.head(pooled))
        assert not torch.allclose(pooled, t.mean(dim=1))  # weighted, not a plain mean


@pytest.mark.parametrize("pos", ["learned", "rope2d"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_maps_are_the_softmax_of_scaled_query_key_products(pos, pool):
    torch.manual_seed(0)
    model = TinyViT(ModelConfig(**SMALL, pos_embedding=pos, pool=pool)).eval()
    with torch.no_grad():  # a trained-looking table: the init's is too small to matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x)
    heads, head_dim = 2, 16
    with torch.no_grad():
        t = model.tokens(x)
        for depth, block in enumerate(model.blocks):
            B, N, D = t.shape
            q, k, _ = block.attn.qkv(block.norm1(t)).split(D, dim=-1)
            q, k = (z.view(B, N, heads, head_dim).transpose(1, 2) for z in (q, k))
            if model.rope is not None:
                q, k = model.rope(q), model.rope(k)
            w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
            # CLS pooling: the CLS query's row over the patch keys; mean pooling: the attention
            # each patch receives, averaged over the queries
            expected = w[:, :, 0, 1:] if pool == "cls" else w.mean(dim=2)
            torch.testing.assert_close(maps[depth], expected.reshape(B, heads, 8, 8))
            t, _ = block(t, model.rope)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_blank_queries_and_keys_attend_uniformly(pool):
    # zero qkv weights make every score 0: each query spreads its attention evenly over all
    # tokens, 1/65 per patch with a CLS token and 1/64 without
    model = TinyViT(ModelConfig(**SMALL, pool=pool, pos_embedding="rope2d")).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.zero_()
            block.attn.qkv.bias.zero_()
    maps = model.attention_maps(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(maps, torch.full_like(maps, 1 / (64 + (pool == "cls"))))
