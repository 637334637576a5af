"""The ViT family: norms, variants, depth, position tables, attention paths, presets, vit-pytorch weights."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vitbn import ViT, ViTBN, ViTBNFFN, create_model, list_models
from vitbn.config import ModelConfig
from vitbn.models import TokenBatchNorm, VisionTransformer, count_params, forward_flops, make_norm
from vitbn.models.convert import convert_vit_pytorch_state_dict, vit_from_vit_pytorch
from vitbn.models.layers import sincos_1d, sincos_2d

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ["vit", "vitbnffn", "vitbn"]


def tokens(b=4, n=5, d=6):
    return torch.randn(b, n, d) * 3 + 1


# --- TokenBatchNorm -------------------------------------------------------------------------------------------


def test_token_batchnorm_equals_batchnorm1d_on_flattened_tokens():
    tbn, ref = TokenBatchNorm(6), nn.BatchNorm1d(6)
    with torch.no_grad():
        tbn.bn.weight.uniform_(0.5, 2)
        tbn.bn.bias.uniform_(-1, 1)
    ref.load_state_dict(tbn.bn.state_dict())
    for _ in range(3):  # train mode: batch stats, running stats updated
        x = tokens()
        assert_close(tbn(x), ref(x.reshape(-1, 6)).reshape(x.shape))
    assert_close(tbn.bn.running_mean, ref.running_mean)
    assert_close(tbn.bn.running_var, ref.running_var)
    assert tbn.bn.num_batches_tracked.item() == 3
    tbn.eval(), ref.eval()
    x = tokens()
    assert_close(tbn(x), ref(x.reshape(-1, 6)).reshape(x.shape))


def test_token_batchnorm_normalizes_over_batch_and_tokens_per_feature():
    x = tokens(8, 17, 4)
    y = TokenBatchNorm(4)(x)
    assert_close(y.mean(dim=(0, 1)), torch.zeros(4), atol=1e-5, rtol=0)
    assert_close(y.var(dim=(0, 1), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    # A bare BatchNorm1d on (B, N, D) would normalize over N instead: the two disagree.
    assert not torch.allclose(nn.BatchNorm1d(17)(x), y)


def test_scalar_stats_equal_the_original_batchnorm2d_formulation():
    tbn, ref = TokenBatchNorm(6, stats="scalar"), nn.BatchNorm2d(1)
    assert tbn.bn.weight.shape == (1,)
    for _ in range(2):
        x = tokens()
        assert_close(tbn(x), ref(x.unsqueeze(1)).squeeze(1))
    assert_close(tbn.bn.running_mean, ref.running_mean)
    assert_close(tbn.bn.running_var, ref.running_var)
    tbn.eval(), ref.eval()
    x = tokens()
    assert_close(tbn(x), ref(x.unsqueeze(1)).squeeze(1))


def test_ghost_batchnorm_equals_batchnorm_per_sub_batch():
    x = tokens(8, 5, 6)
    ghost = TokenBatchNorm(6, ghost_batch_size=3)  # sub-batches of 3, 3, 2 images
    whole = TokenBatchNorm(6, ghost_batch_size=8)
    plain = TokenBatchNorm(6)
    assert_close(whole(x), plain(x))
    expected = torch.cat([TokenBatchNorm(6)(chunk) for chunk in x.split(3)])
    assert_close(ghost(x), expected)
    means = torch.stack([c.reshape(-1, 6).mean(0) for c in x.split(3)]).mean(0)
    assert_close(ghost.bn.running_mean, 0.1 * means)


def test_make_norm_factory():
    assert isinstance(make_norm("layer", 8), nn.LayerNorm)
    assert isinstance(make_norm("batch", 8), TokenBatchNorm)
    assert isinstance(make_norm("none", 8), nn.Identity)
    with pytest.raises(
        ValueError, match="norm='group' is not one of 'layer', 'rms', 'batch', 'repbn', 'prepbn', 'dyt', 'none'"
    ):
        make_norm("group", 8)


# --- the variants ---------------------------------------------------------------------------------------------


NORM_SLOTS = ("norm", "norm_in", "norm_out", "inner_norm")


def norm_kinds(model: nn.Module) -> dict[str, str]:
    """Norm slot path -> the type of module in it (LayerNorm, TokenBatchNorm or Identity)."""
    return {n: type(m).__name__ for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in NORM_SLOTS}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_every_block_is_used(variant, depth, tiny_overrides):
    model = create_model(variant, **{**tiny_overrides, "depth": depth}).eval()
    x = torch.randn(3, 1, 28, 28)
    before = model(x)
    with torch.no_grad():
        model.transformer.layers[-1].ff.fc2.weight.add_(torch.randn_like(model.transformer.layers[-1].ff.fc2.weight))
    assert not torch.allclose(model(x), before, atol=1e-4)
    assert len(model.transformer.layers) == depth


def test_variants_differ_only_in_norm_modules(tiny_overrides):
    models = {v: create_model(v, **tiny_overrides) for v in VARIANTS}
    structures = {}
    for v, model in models.items():
        kinds = norm_kinds(model)
        inside_norm = tuple(f"{k}." for k in kinds)
        structures[v] = [
            (n, type(m).__name__)
            for n, m in model.named_modules()
            if n and n not in kinds and not n.startswith(inside_norm)
        ]
    assert structures["vit"] == structures["vitbnffn"] == structures["vitbn"]
    layer = norm_kinds(models["vit"])
    assert layer["transformer.layers.0.ff.norm"] == "LayerNorm"
    assert layer["transformer.layers.0.ff.inner_norm"] == "Identity"
    bnffn = norm_kinds(models["vitbnffn"])
    assert bnffn["transformer.layers.0.attn.norm"] == "LayerNorm"
    assert bnffn["transformer.layers.0.ff.norm"] == "Identity"
    assert bnffn["transformer.layers.0.ff.inner_norm"] == "TokenBatchNorm"
    bn = norm_kinds(models["vitbn"])
    assert "LayerNorm" not in bn.values()
    assert bn["to_patch_embedding.norm_in"] == bn["transformer.norm"] == "TokenBatchNorm"


def test_constructors_take_vit_pytorch_keywords():
    kw = dict(image_size=28, patch_size=7, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, channels=1)
    for cls, variant in ((ViT, "vit"), (ViTBNFFN, "vitbnffn"), (ViTBN, "vitbn")):
        model = cls(**kw, pos_emb="pe2d")
        assert isinstance(model, VisionTransformer) and model.config.name == variant
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert not isinstance(ViTBN(**kw), ViT)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ViT(**kw, heads_count=3)


@pytest.mark.parametrize("pos_emb", ["learn", "pe1d", "pe2d"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_pooling_and_position_embeddings(pos_emb, pool, tiny_overrides):
    model = create_model("vitbn", **tiny_overrides, pos_emb=pos_emb, pool=pool, image_size=(28, 14))
    assert model.pos_embedding.shape == (8 + (pool == "cls"), 16)  # (28/7) x (14/7) patches
    assert model(torch.randn(2, 1, 28, 14)).shape == (2, 10)
    assert ("pos_embedding" in model.state_dict()) == (pos_emb == "learn")


def test_sincos_tables_match_their_formulas():
    t1 = sincos_1d(5, 8)
    pos, i = 3, 2  # feature 2i and 2i+1
    assert_close(t1[pos, 2 * i], torch.tensor(float(torch.sin(torch.tensor(pos / 10000 ** (2 * i / 8))))))
    assert_close(t1[pos, 2 * i + 1], torch.tensor(float(torch.cos(torch.tensor(pos / 10000 ** (2 * i / 8))))))
    t2 = sincos_2d(2, 3, 8)  # quarter = 2, omega = [1, 1e-4]
    y, x = 1, 2
    row = t2[y * 3 + x]
    expected = torch.tensor([x * 1.0, x * 1e-4]).sin().tolist() + torch.tensor([x * 1.0, x * 1e-4]).cos().tolist()
    expected += torch.tensor([y * 1.0, y * 1e-4]).sin().tolist() + torch.tensor([y * 1.0, y * 1e-4]).cos().tolist()
    assert_close(row, torch.tensor(expected))


def test_sincos_table_is_a_buffer_that_follows_to(tiny_overrides):
    model = create_model("vit", **tiny_overrides, pos_emb="pe2d")
    assert "pos_embedding" in dict(model.named_buffers())
    model = model.to(torch.float64)
    assert model.pos_embedding.dtype == torch.float64
    assert model(torch.randn(1, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64
    assert model.pos_embedding[0].abs().sum() == 0  # the CLS token has no position


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip(variant, tiny_overrides):
    model = create_model(variant, **tiny_overrides)
    model(torch.randn(4, 1, 28, 28))  # move BN running stats away from their init
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = create_model(variant, **tiny_overrides)
    clone.load_state_dict(torch.load(buffer))
    model.eval(), clone.eval()
    x = torch.randn(3, 1, 28, 28)
    assert_close(clone(x), model(x), rtol=0, atol=0)


# --- attention ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_paths_are_equal(dtype, tiny_overrides):
    explicit = create_model("vit", **tiny_overrides, attn_impl="plain").to(dtype).eval()
    fused = create_model("vit", **tiny_overrides, attn_impl="fused").to(dtype).eval()
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(4, 1, 28, 28, dtype=dtype)
    assert_close(fused(x), explicit(x))
    logits, maps = explicit.forward_with_attn(x)
    assert_close(logits, explicit(x))
    assert len(maps) == 2 and maps[0].shape == (4, 2, 17, 17)
    assert_close(maps[0].sum(-1), torch.ones(4, 2, 17, dtype=dtype))


def test_attention_weights_match_a_hand_computation(tiny_overrides):
    model = create_model("vit", **tiny_overrides).eval()
    x = torch.randn(2, 1, 28, 28)
    attn = model.transformer.layers[0].attn
    h = model.embed(x)
    q, k, _ = attn.to_qkv(attn.norm(h)).chunk(3, dim=-1)
    q = q.reshape(2, 17, 2, 8).transpose(1, 2)
    k = k.reshape(2, 17, 2, 8).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    assert_close(model.forward_with_attn(x)[1][0], expected)


# --- presets, counts, errors ----------------------------------------------------------------------------------


def test_presets_carry_the_study_hyperparameters():
    assert list_models() == ["vit", "vit-cifar", "vitbn", "vitbn-cifar", "vitbnffn", "vitbnffn-cifar"]
    c = create_model("vitbn").config
    assert (c.image_size, c.patch_size, c.channels, c.num_classes, c.dim, c.heads, c.dim_head, c.mlp_dim) == (
        28,
        7,
        1,
        10,
        64,
        8,
        64,
        128,
    )
    assert (c.depth, c.pool, c.pos_emb, c.dropout, c.emb_dropout) == (6, "cls", "learn", 0.0, 0.0)
    assert create_model("vitbn", depth=1).config.depth == 1
    with pytest.raises(
        ValueError,
        match="model='resnet' is not one of 'vit', 'vit-cifar', 'vitbn', 'vitbn-cifar', 'vitbnffn', 'vitbnffn-cifar'",
    ):
        create_model("resnet")


def test_parameter_and_flop_counts_match_the_analytic_formula():
    c = create_model("vit").config
    model = create_model("vit")
    d, m, inner, n, p = c.dim, c.mlp_dim, c.heads * c.dim_head, c.num_tokens, c.num_patches
    block = 2 * 2 * d + d * 3 * inner + inner * d + d + d * m + m + m * d + d
    expected_params = 2 * 49 + 49 * d + d + 2 * d + d + n * d + c.depth * block + 2 * d + d * 10 + 10
    assert count_params(model) == expected_params == 893_164
    # Matrix products of one forward pass, 2 FLOPs per multiply-add.
    per_block = 2 * n * (d * 3 * inner + inner * d + d * m + m * d) + 2 * 2 * c.heads * n * n * c.dim_head
    expected_flops = 2 * p * 49 * d + c.depth * per_block + 2 * d * 10
    assert forward_flops(model) == expected_flops


def test_forward_flops_leaves_the_model_untouched(tiny_overrides):
    model = create_model("vitbn", **tiny_overrides).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward_flops(model, train=True)
    for k, v in model.state_dict().items():
        assert_close(v, before[k], rtol=0, atol=0)
    assert not model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(patch_size=5), r"patch_size=5 must divide image_size=28 in both dimensions"),
        (
            dict(ffn_norm="group"),
            r"ffn_norm='group' is not one of 'layer', 'rms', 'batch', 'repbn', 'prepbn', 'dyt', 'none'",
        ),
        (dict(pool="max"), r"pool='max' is not one of 'cls', 'mean'"),
        (dict(pos_emb="rope"), r"pos_emb='rope' is not one of 'learn', 'pe1d', 'pe2d'"),
        (dict(dim=0), r"dim=0 must be a positive integer"),
        (dict(depth=-1), r"depth=-1 must be a positive integer"),
        (dict(image_size=(28, 0)), r"image_size=0 must be a positive integer"),
        (dict(dropout=1.5), r"dropout=1.5 must be in \[0, 1\)"),
        (dict(attn_impl="flash"), r"attn_impl='flash' is not one of 'auto', 'fused', 'plain'"),
        (dict(bn_stats="channel"), r"bn_stats='channel' is not one of 'feature', 'scalar'"),
    ],
)
def test_bad_configs_name_the_field_the_value_and_the_allowed_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("vit", **overrides)
    with pytest.raises(ValueError, match=message):
        ViT(**{**dict(image_size=28, patch_size=7, num_classes=10, dim=8, depth=1, heads=1, mlp_dim=8), **overrides})


def test_sincos_tables_need_a_suitable_width():
    with pytest.raises(ValueError, match="pos_emb='pe2d' needs dim divisible by 4, got dim=6"):
        ModelConfig(dim=6, pos_emb="pe2d")
    with pytest.raises(ValueError, match="pos_emb='pe1d' needs an even dim, got dim=5"):
        ModelConfig(dim=5, pos_emb="pe1d")


# --- vit-pytorch checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["current", "old"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch_checkpoints_give_the_same_logits(layout, pool):
    fixture = torch.load(FIXTURES / f"vit_pytorch_{layout}.pt")
    case = fixture["cases"][pool]
    model = vit_from_vit_pytorch(case["state_dict"], **fixture["kwargs"], pool=pool).eval()
    assert model.config.has_class_token == (pool == "cls" or layout == "old")
    assert_close(model(case["input"]), case["logits"])


def test_unknown_vit_pytorch_keys_are_rejected():
    fixture = torch.load(FIXTURES / "vit_pytorch_current.pt")
    state = dict(fixture["cases"]["cls"]["state_dict"], **{"transformer.layers.0.2.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="key 'transformer.layers.0.2.weight' is not part of a vit-pytorch ViT"):
        convert_vit_pytorch_state_dict(state)
