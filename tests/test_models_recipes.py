"""The recipes of Touvron et al. (2022) in the one model path: parallel blocks against a branch-by-branch
reference, LayerScale, stochastic depth, hMLP and conv stems, and the one way a model is built and named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from vitbn.config import ModelConfig, RunConfig
from vitbn.models import VisionTransformer, build_model, count_params, create_model, forward_flops
from vitbn.models.blocks import Block, DropPath, ParallelBlock, drop_path_rates
from vitbn.models.convert import vit_from_vit_pytorch
from vitbn.models.layers import Attention, FeedForward
from vitbn.models.stems import ConvStem, HMLPStem

TINY = dict(dim=16, heads=2, dim_head=8, mlp_dim=32)
VARIANTS = ["vit", "vitbnffn", "vitbn"]


def _perturb(model: nn.Module) -> nn.Module:
    """Affine parameters of every norm away from 1/0, so that branch k's norm really is branch k's."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
    return model


# --- parallel blocks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("branches", [2, 3])
def test_parallel_model_has_the_parameters_and_flops_of_the_sequential_one(variant, branches):
    sequential = create_model(variant, **TINY, depth=6)
    parallel = create_model(variant, **TINY, depth=6 // branches, parallel=branches)
    assert count_params(parallel) == count_params(sequential)
    assert forward_flops(parallel) == forward_flops(sequential)
    assert forward_flops(parallel, train=True) == forward_flops(sequential, train=True)
    assert len(parallel.transformer.layers) == 6 // branches


def _reference_branches(block: ParallelBlock, config: ModelConfig) -> tuple[list[Attention], list[FeedForward]]:
    """K sequential Attention / FeedForward modules holding branch k's parameters (and its norms)."""
    attns, ffs = [], []
    for k in range(config.parallel):
        attn = Attention(dim=config.dim, heads=config.heads, dim_head=config.dim_head, dropout=0.0, norm="none")
        attn.norm = block.attn.norms[k]
        attn.to_qkv.weight = nn.Parameter(block.attn.to_qkv.weight[k].detach().clone())
        attn.to_out.weight = nn.Parameter(block.attn.to_out.weight[k].detach().clone())
        attn.to_out.bias = nn.Parameter(block.attn.to_out.bias[k].detach().clone())
        ff = FeedForward(dim=config.dim, hidden_dim=config.mlp_dim, dropout=0.0, norm="none", inner_norm="none")
        ff.norm, ff.inner_norm = block.ff.norms[k], block.ff.inner_norms[k]
        for name in ("fc1", "fc2"):
            getattr(ff, name).weight = nn.Parameter(getattr(block.ff, name).weight[k].detach().clone())
            getattr(ff, name).bias = nn.Parameter(getattr(block.ff, name).bias[k].detach().clone())
        attns.append(attn)
        ffs.append(ff)
    return attns, ffs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layer_scale", [None, 0.5])
@pytest.mark.parametrize("training", [False, True])
def test_parallel_stage_equals_its_branches_run_one_by_one(variant, layer_scale, training):
    model = _perturb(create_model(variant, **TINY, depth=1, parallel=3, layer_scale=layer_scale))
    if layer_scale is not None:
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "gamma"):
                    m.gamma.uniform_(0.2, 1.0)
    block, config = model.transformer.layers[0], model.config
    x = torch.randn(4, 17, 16) * 2 + 0.5
    model.train(training)  # training: BatchNorm normalizes with batch statistics, in both computations
    attns, ffs = _reference_branches(block, config)
    with torch.no_grad():
        expected, maps = x.clone(), []
        for k, attn in enumerate(attns):
            out, weights = attn(x, return_attn=True)
            gamma = block.attn.layer_scale.gamma[k] if layer_scale is not None else 1.0
            expected, _ = expected + gamma * out, maps.append(weights)
        mid = expected
        for k, ff in enumerate(ffs):
            gamma = block.ff.layer_scale.gamma[k] if layer_scale is not None else 1.0
            expected = expected + gamma * ff(mid)
        got, got_maps = block.forward_with_attn(x)
        assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_close(got_maps, torch.cat(maps, dim=1))  # (B, K*H, N, N), branch-major


class _MatmulCount(TorchDispatchMode):
    """Counts the matrix-product kernels (and fused attention calls) that run."""

    OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product")

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0].startswith(self.OPS):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_branches_are_batched_into_wide_matmuls():
    x = torch.randn(2, 1, 28, 28)
    counts = {}
    for branches in (1, 3):  # sdpa: the attention itself is one call per stage too
        model = create_model("vit", **TINY, depth=1, parallel=branches, attn_impl="fused").eval()
        with torch.no_grad():
            tokens = model.embed(x)
            with _MatmulCount() as counter:
                model.transformer.layers[0](tokens)
        counts[branches] = counter.calls
    # qkv, attention, output projection, fc1, fc2: five kernels whether the stage has 1 branch or 3
    assert counts == {1: 5, 3: 5}


def test_vit_pytorch_loader_refuses_parallel_and_other_stems():
    with pytest.raises(ValueError, match="vit-pytorch checkpoints hold sequential blocks and a linear patch embedding"):
        vit_from_vit_pytorch({}, image_size=28, patch_size=7, num_classes=10, dim=16, depth=2, heads=2, mlp_dim=32,
                             parallel=2)  # fmt: skip


# --- LayerScale and stochastic depth ---------------------------------------------------------------------------


def test_layer_scale_scales_each_residual_branch():
    model = create_model("vit", **TINY, depth=1, layer_scale=1e-4).eval()
    block: Block = model.transformer.layers[0]
    assert_close(block.attn_scale.gamma, torch.full((16,), 1e-4))
    with torch.no_grad():
        block.attn_scale.gamma.uniform_(0.1, 2.0)
        block.ff_scale.gamma.uniform_(0.1, 2.0)
        x = torch.randn(3, 17, 16)
        mid = x + block.attn_scale.gamma * block.attn(x)
        assert_close(block(x), mid + block.ff_scale.gamma * block.ff(mid))
    assert count_params(model) == count_params(create_model("vit", **TINY, depth=1)) + 2 * 16


def test_drop_path_rates_rise_linearly_over_the_stages():
    assert drop_path_rates(ModelConfig(depth=6, drop_path=0.1)) == pytest.approx([0, 0.02, 0.04, 0.06, 0.08, 0.1])
    model = create_model("vit", **TINY, depth=3, drop_path=0.2)
    assert [getattr(b.drop_path, "rate", 0.0) for b in model.transformer.layers] == pytest.approx([0.0, 0.1, 0.2])
    assert isinstance(model.transformer.layers[0].drop_path, nn.Identity)


def test_drop_path_is_per_sample_unbiased_and_exact_in_eval():
    torch.manual_seed(0)
    drop = DropPath(0.3).train()
    x = torch.randn(20000, 4, 3) + 1.0
    out = drop(x)
    kept = (out != 0).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert bool((kept | dropped).all())  # a whole sample's branch is kept or dropped
    assert abs(dropped.float().mean().item() - 0.3) < 0.02
    assert_close(out[kept], x[kept] / 0.7)
    assert_close(out.mean(0), x.mean(0), rtol=0, atol=0.05)  # E[drop(x)] = x
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("parallel", [1, 2])
def test_stochastic_depth_in_a_model_is_unbiased_per_branch_and_off_in_eval(parallel):
    torch.manual_seed(0)
    model = create_model("vit", **TINY, depth=2, parallel=parallel, drop_path=0.5)
    block = model.transformer.layers[1]  # the last stage: rate 0.5
    tokens = model.embed(torch.randn(1, 1, 28, 28)).detach().expand(8000, -1, -1)
    with torch.no_grad():
        plain = block.attn(tokens[:1])  # the branch sum without stochastic depth
        if parallel == 1:
            draws = block.drop_path.train()(block.attn(tokens))
        else:
            keep = block.train()._keep(tokens)  # (B, K): every branch of every sample on its own
            assert keep.shape == (8000, 2) and set(keep.unique().tolist()) == {0.0, 2.0}
            draws = block.attn(tokens, keep)
        assert_close(draws.mean(0), plain[0], rtol=0, atol=0.05 * plain.abs().max().item())
        block.eval()
        mid = tokens[:3] + block.attn(tokens[:3])
        assert_close(block(tokens[:3]), mid + block.ff(mid))  # eval: exactly the undropped stage


# --- stems -----------------------------------------------------------------------------------------------------


def test_hmlp_refuses_a_patch_without_factors():
    with pytest.raises(ValueError, match=r"patch_size=7 has no factors: use patch_size 4 \(49 tokens"):
        create_model("vit", stem="hmlp")
    model = create_model("vit", **TINY, depth=1, stem="hmlp", patch_size=4)
    assert model.config.num_patches == 49 and model.to_patch_embedding.factors == (2, 2)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert create_model("vit", **TINY, depth=1, stem="hmlp", patch_size=14).to_patch_embedding.factors == (7, 2)


@pytest.mark.parametrize(("variant", "training"), [("vit", True), ("vit", False), ("vitbn", False)])
def test_hmlp_keeps_patches_independent(variant, training):
    model = _perturb(create_model(variant, **TINY, depth=1, stem="hmlp", patch_size=4)).train(training)
    stem = model.to_patch_embedding
    x = torch.randn(2, 1, 28, 28)
    y = x.clone()
    y[:, :, 8:12, 4:8] = torch.randn(2, 1, 4, 4)  # the patch at grid row 2, column 1 -> token 2 * 7 + 1
    with torch.no_grad():
        changed = (stem(x) - stem(y)).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [15]  # LayerNorm in training too; BatchNorm in eval


def test_conv_stem_mixes_neighbouring_patches():
    stem = create_model("vit", **TINY, depth=1, stem="conv", patch_size=4).to_patch_embedding.eval()
    assert isinstance(stem, ConvStem)
    x = torch.randn(1, 1, 28, 28)
    y = x.clone()
    y[:, :, 8:12, 4:8] += 1.0
    with torch.no_grad():
        changed = ((stem(x) - stem(y)).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()
    assert 15 in changed and len(changed) > 1


def _windows(x: torch.Tensor, k: int, stride: int, pad: int = 0) -> torch.Tensor:
    """(B, C, H, W) -> (B, h, w, C*k*k): the k x k window under every output position, in a conv weight's
    (C, kh, kw) order, by indexing (no convolution)."""
    x = F.pad(x, (pad, pad, pad, pad))
    return x.unfold(2, k, stride).unfold(3, k, stride).permute(0, 2, 3, 1, 4, 5).flatten(3)


def _affine(windows: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    out = windows @ conv.weight.flatten(1).T  # (B, h, w, C*k*k) @ (C*k*k, C_out)
    return out if conv.bias is None else out + conv.bias


def _norm(y: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """A stem norm on channels-last (B, h, w, C): BatchNorm in eval mode from its running statistics, else a
    LayerNorm over the channels of each position."""
    if isinstance(norm, nn.BatchNorm2d):
        return (y - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _cf(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 3, 1, 2)  # channels-last -> (B, C, h, w)


def _stem_parts(stem: nn.Module, norm_type: type) -> tuple[list, list]:
    convs = [m for m in stem.proj if isinstance(m, nn.Conv2d)]
    return convs, [m for m in stem.proj if isinstance(m, norm_type)]


def _bn_eval_stats(model: nn.Module) -> nn.Module:
    """Running statistics away from 0/1, so that eval-mode BatchNorm is a real affine map."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize(("variant", "norm_type"), [("vit", nn.LayerNorm), ("vitbn", nn.BatchNorm2d)])
def test_hmlp_stem_is_its_two_linear_stages(variant, norm_type):
    model = _bn_eval_stats(_perturb(create_model(variant, **TINY, depth=1, stem="hmlp", patch_size=4))).eval()
    stem = model.to_patch_embedding
    (c1, c2), (n1, n2) = _stem_parts(stem, norm_type)
    x = torch.randn(3, 1, 28, 28)
    # patch 4 = 2x2 sub-patches of 2x2 pixels: linear (1*4 -> D/4), norm, GELU; then 2x2 of those: linear (-> D), norm
    h = F.gelu(_norm(_affine(_windows(x, 2, 2), c1), n1))  # (3, 14, 14, 4)
    h = _norm(_affine(_windows(_cf(h), 2, 2), c2), n2)  # (3, 7, 7, 16)
    with torch.no_grad():
        assert_close(stem(x), h.flatten(1, 2))  # row-major tokens, as the linear stem's


@pytest.mark.parametrize(("variant", "norm_type"), [("vit", nn.LayerNorm), ("vitbn", nn.BatchNorm2d)])
def test_conv_stem_is_its_strided_3x3_stages(variant, norm_type):
    model = _bn_eval_stats(_perturb(create_model(variant, **TINY, depth=1, stem="conv", patch_size=4))).eval()
    stem = model.to_patch_embedding
    (c1, c2, c3), (n1, n2) = _stem_parts(stem, norm_type)
    assert (c1.bias is None, c3.kernel_size) == (variant == "vitbn", (1, 1))  # BN makes the 3x3 convs' bias moot
    x = torch.randn(3, 1, 28, 28)
    # patch 4 = two 3x3 stride-2 convs (padding 1; widths D/4, D/2), each + norm + ReLU, then a 1x1 to D
    h = F.relu(_norm(_affine(_windows(x, 3, 2, pad=1), c1), n1))  # (3, 14, 14, 4)
    h = F.relu(_norm(_affine(_windows(_cf(h), 3, 2, pad=1), c2), n2))  # (3, 7, 7, 8)
    h = _affine(_windows(_cf(h), 1, 1), c3)  # (3, 7, 7, 16)
    with torch.no_grad():
        assert_close(stem(x), h.flatten(1, 2))


def test_hmlp_flops_analytic_equal_counted():
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model("vit", depth=1, stem="hmlp", patch_size=4)
    stem: HMLPStem = model.to_patch_embedding
    # 28 -> 14: 2x2 kernels 1 -> 16 channels; 14 -> 7: 2x2 kernels 16 -> 64
    assert stem.flops() == 2 * 14 * 14 * 4 * 1 * 16 + 2 * 7 * 7 * 4 * 16 * 64
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        stem.eval()(torch.randn(1, 1, 28, 28))
    assert counter.get_total_flops() == stem.flops()


# --- one way to build a model and its name ---------------------------------------------------------------------


def test_one_build_path_and_names_that_describe_the_model():
    model = create_model("vitbn", **TINY, depth=1)
    assert type(model) is VisionTransformer and model.config.name == "vitbn"
    assert type(build_model(model.config)) is VisionTransformer
    assert create_model("vit", attn_norm="batch").config.name == "vit+attn_norm=batch"
    bn_norms = dict(embed_norm="batch", attn_norm="batch", ffn_norm="none", ffn_inner_norm="batch", final_norm="batch")
    assert create_model("vit", **bn_norms).config.name == "vitbn"
    assert create_model("vitbn", parallel=2, depth=3).config.name == "vitbn"  # recipes are params, not names
    assert ModelConfig(name="custom", attn_norm="batch").name == "custom"
    again = RunConfig.from_dict({"model": {"name": "vit+attn_norm=batch", "depth": 2}}).model
    assert (again.name, again.attn_norm, again.depth, again.patch_size) == ("vit+attn_norm=batch", "batch", 2, 7)
    with pytest.raises(
        ValueError,
        match="model='vitx' is not one of 'vit', 'vit-cifar', 'vitbn', 'vitbn-cifar', 'vitbnffn', 'vitbnffn-cifar'",
    ):
        create_model("vitx")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"parallel": 0}, "parallel=0 must be a positive integer"),
        ({"layer_scale": 0.0}, r"layer_scale=0.0 must be > 0 or null \(off\)"),
        ({"drop_path": 1.0}, r"drop_path=1.0 must be in \[0, 1\)"),
        ({"stem": "patchify"}, "stem='patchify' is not one of 'linear', 'hmlp', 'conv'"),
        ({"stem": "conv", "patch_size": 7}, "patch_size=7 must be even"),
        ({"stem": "hmlp", "patch_size": (4, 2), "image_size": 28}, "needs a square patch"),
    ],
)
def test_recipe_fields_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_precise_bn_reaches_the_hmlp_stem_and_every_branch():
    from vitbn.bn import recompute_bn_stats

    model = create_model("vitbn", **TINY, depth=1, parallel=2, stem="hmlp", patch_size=4)
    batches = [torch.randn(b, 1, 28, 28) * 2 + 0.5 for b in (3, 5)]
    conv = model.to_patch_embedding.proj[0]
    with torch.no_grad():  # the first stem BN's input: conv features, statistics per channel over batch x positions
        rows = torch.cat([conv(x) for x in batches]).transpose(0, 1).reshape(conv.out_channels, -1)
    assert recompute_bn_stats(model, batches) == 2
    bn = model.to_patch_embedding.proj[1]
    assert isinstance(bn, nn.BatchNorm2d)
    assert_close(bn.running_mean, rows.mean(1), rtol=1e-5, atol=1e-6)
    assert_close(bn.running_var, rows.var(1), rtol=1e-5, atol=1e-5)
    first, second = model.transformer.layers[0].attn.norms  # both branches normalize the same tokens
    assert_close(first.bn.running_var, second.bn.running_var)
    assert not torch.allclose(first.bn.running_var, torch.ones(16))
