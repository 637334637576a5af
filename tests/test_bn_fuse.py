"""Folding BatchNorm into Linear layers: same outputs as the eval-mode model, no BatchNorm left."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from vitbn.bn import FrozenBatchNorm, convert_sync_batchnorm, freeze_bn, fuse_bn, set_ghost_batch_size
from vitbn.models import TokenBatchNorm, VisionTransformer, create_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread; two threads on a loaded 2-core machine mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, TokenBatchNorm, FrozenBatchNorm))]


def _nontrivial(model: VisionTransformer) -> VisionTransformer:
    """Random affine parameters and running statistics away from 0/1 (train-mode forwards), then eval."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (_BatchNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 1, 28, 28) * 2.0 + 0.5)
    return model.eval()


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize(
    "extra",
    [{}, {"bn_stats": "scalar"}, {"pool": "mean"}, {"parallel": 2}, {"stem": "hmlp", "patch_size": 4},
     {"stem": "conv", "patch_size": 4}, {"parallel": 3, "stem": "hmlp", "patch_size": 4, "layer_scale": 0.3}],
    ids=["feature", "scalar", "mean", "parallel", "hmlp", "conv", "parallel-hmlp-ls"],
)  # fmt: skip
@pytest.mark.parametrize("name", ["vit", "vitbnffn", "vitbn"])
def test_fused_model_matches_original(tiny_overrides, name, extra, depth):
    model = _nontrivial(create_model(name, **{**tiny_overrides, **extra, "depth": depth}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layernorms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    x = torch.randn(5, 1, 28, 28)

    fused = fuse_bn(model)

    with torch.no_grad():
        assert_close(fused(x), model(x))
    assert type(fused) is type(model) and not fused.training
    assert _batchnorms(fused) == []
    assert sum(isinstance(m, nn.LayerNorm) for m in fused.modules()) == layernorms  # LayerNorm is not foldable
    assert not fused.config.uses_batchnorm
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, state[k]), k


def test_fused_vitbn_structure(tiny_overrides):
    model = _nontrivial(create_model("vitbn", **tiny_overrides))
    fused = fuse_bn(model)
    block = fused.transformer.layers[0]
    assert isinstance(block.attn.norm, nn.Identity) and isinstance(block.ff.inner_norm, nn.Identity)
    assert isinstance(fused.transformer.norm, nn.Identity)
    assert isinstance(fused.to_patch_embedding.norm_in, nn.Identity)
    assert block.attn.to_qkv.bias is not None and model.transformer.layers[0].attn.to_qkv.bias is None
    cfg = fused.config
    assert (cfg.embed_norm, cfg.attn_norm, cfg.ffn_inner_norm, cfg.final_norm) == ("none",) * 4


@pytest.mark.parametrize("variant", ["frozen", "ghost", "syncbn", "ffn_prenorm"])
def test_fused_variants(tiny_overrides, variant):
    extra = {"ffn_norm": "batch"} if variant == "ffn_prenorm" else {}  # pre-norm and inner norm both fold into fc1
    model = _nontrivial(create_model("vitbn", **tiny_overrides, **extra))
    if variant == "frozen":
        freeze_bn(model)
    elif variant == "ghost":
        set_ghost_batch_size(model, 2)
    elif variant == "syncbn":
        model = convert_sync_batchnorm(model)
    x = torch.randn(4, 1, 28, 28)
    fused = fuse_bn(model.eval())
    with torch.no_grad():
        assert_close(fused(x), model(x))
    assert _batchnorms(fused) == []


def test_fuse_rejects_training_mode_and_other_models(tiny_overrides):
    model = create_model("vitbn", **tiny_overrides).train()
    with pytest.raises(ValueError, match=r"fuse_bn needs an eval-mode model: call model.eval\(\) first"):
        fuse_bn(model)
    model.eval()
    model.transformer.norm.train()  # one BN left in training mode normalizes with batch statistics
    with pytest.raises(ValueError, match="needs an eval-mode model"):
        fuse_bn(model)
    with pytest.raises(ValueError, match="fuse_bn folds a VisionTransformer, got Sequential"):
        fuse_bn(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval())


def test_fused_copy_is_independent(tiny_overrides):
    model = _nontrivial(create_model("vitbn", **tiny_overrides))
    fused = fuse_bn(model)
    reference = copy.deepcopy(fused)
    with torch.no_grad():
        model.mlp_head.weight.add_(1.0)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert_close(fused(x), reference(x))
