"""The 32x32 RGB presets (vit-cifar, vitbnffn-cifar, vitbn-cifar): every norm placement and recipe builds and runs on
a 3x32x32 batch (patch 4, 64 tokens), folds exactly and exports; the real preset's size once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from tolerance import reduction_tol
from vitbn.bn import fuse_bn
from vitbn.config import VIT_CIFAR, ModelConfig, RunConfig
from vitbn.experiments.presets import NORM_VARIANTS
from vitbn.models import count_params, create_model
from vitbn.models.norms import set_prepbn_lambda

TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32)
RECIPES = {
    "sequential": {},
    "parallel": {"parallel": 2},
    "hmlp4": {"stem": "hmlp"},  # patch 4 = 2x2 stages
    "conv4": {"stem": "conv"},
    "parallel-hmlp-ls-dp": {"parallel": 2, "stem": "hmlp", "layer_scale": 0.3, "drop_path": 0.1},
}


def nontrivial(model: nn.Module) -> nn.Module:
    """Affine parameters away from 1/0 and running statistics from a few train-mode batches, then eval mode (a
    fresh BatchNorm is the identity, and folding it would prove nothing)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (_BatchNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2.0 + 0.5)
    set_prepbn_lambda(model, 0.0)  # PRepBN at the end of its ramp: all BatchNorm, what a deployed model runs
    return model.eval()


def cifar_model(variant: str, **extra) -> nn.Module:
    name, overrides = NORM_VARIANTS[variant]
    return create_model(f"{name}-cifar", **{**overrides, **TINY, **extra})


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("variant", list(NORM_VARIANTS))
def test_every_norm_and_recipe_runs_and_folds_on_32x32_rgb(variant, recipe):
    torch.manual_seed(0)
    model = nontrivial(cifar_model(variant, **RECIPES[recipe]))
    assert model.config.num_tokens == 65 and model.config.channels == 3
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
        fused = fuse_bn(model)
        assert logits.shape == (4, 10) and bool(torch.isfinite(logits).all())
        # Folding reorders the products of every layer: float32 rounding of the chain of reductions (depth x
        # branches x (dim + mlp_dim) terms), on the scale of the largest logit (PRepBN's run to ~30).
        chain = reduction_tol(TINY["depth"] * model.config.parallel * (TINY["dim"] + TINY["mlp_dim"]))["rtol"]
        assert_close(fused(x), logits, rtol=chain, atol=chain * float(logits.abs().max()))
    assert not any(isinstance(m, _BatchNorm) for m in fused.modules())


@pytest.mark.parametrize("name", ["vitbn"])  # BatchNorm everywhere, folded: the case export can get wrong
def test_export_on_32x32_rgb_equals_eager(tmp_path, name):
    from vitbn import export as E

    if E.missing_extra():
        pytest.skip(f"ONNX export needs {E.missing_extra()}")
    torch.manual_seed(0)
    model = nontrivial(create_model(f"{name}-cifar", **TINY, parallel=2, stem="hmlp"))
    path = E.export_onnx(model, tmp_path / f"{name}.onnx", fuse=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    assert_close(torch.from_numpy(E.onnx_logits(E.onnx_session(path), x)), expected, atol=1e-4, rtol=0)


def test_the_real_preset_size():
    """ViT-Lite-7/4 class: patch 4, 64 tokens, dim 256, depth 7, MLP ratio 2, under 4M parameters."""
    config = ModelConfig.from_preset("vit-cifar")
    assert (config.image_size, config.patch_size, config.channels, config.num_patches) == (32, 4, 3, 64)
    assert (config.dim, config.depth, config.mlp_dim // config.dim) == (256, 7, 2)
    d, m, inner, depth = config.dim, config.mlp_dim, config.heads * config.dim_head, config.depth
    patch = 4 * 4 * 3
    # patch LN (2 * 48) + proj + LN, CLS + positions, per block: LN, qkv (no bias), out proj, LN, fc1, fc2; final LN
    # and head: the analytic count of the layout vit-pytorch's ViT has.
    block = 2 * d + d * 3 * inner + inner * d + d + 2 * d + d * m + m + m * d + d
    expected = 2 * patch + patch * d + d + 2 * d + d + 65 * d + depth * block + 2 * d + d * 10 + 10
    model = create_model("vit-cifar")
    assert count_params(model) == expected == 3_717_482
    assert max(count_params(create_model(f"{n}-cifar")) for n in ("vit", "vitbnffn", "vitbn")) <= 4_000_000
    torch.manual_seed(0)
    bn = nontrivial(create_model("vitbn-cifar"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = bn(x)
        chain = reduction_tol(config.depth * (config.dim + config.mlp_dim))["rtol"]
        assert_close(fuse_bn(bn)(x), expected, rtol=chain, atol=chain * float(expected.abs().max()))


def test_a_run_on_cifar10_takes_its_input_unless_set():
    config = RunConfig.from_dict({"model": {"name": "vitbn", "depth": 1}, "data": {"dataset": "cifar10"}})
    m = config.model
    assert (m.channels, m.image_size, m.patch_size, m.num_classes, m.dim, m.depth) == (3, 32, 4, 10, 64, 1)
    assert RunConfig.from_dict({"data": {"dataset": "cifar100"}}).model.num_classes == 100
    assert RunConfig.from_dict({"data": {"dataset": "emnist-balanced"}}).model.num_classes == 47
    own = RunConfig.from_dict({"model": {"name": "vit", "patch_size": 8}, "data": {"dataset": "cifar10"}}).model
    assert (own.patch_size, own.num_patches) == (8, 16)
    assert RunConfig.from_dict({"model": {"name": "vit"}}).model.image_size == 28  # MNIST as before
    assert VIT_CIFAR["image_size"] == 32
