"""Folding BatchNorm into Linear layers: same outputs as the eval-mode model, no BatchNorm left."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from vitbn.bn import FrozenBatchNorm, convert_sync_batchnorm, freeze_bn, fuse_bn, set_ghost_batch_size
from vitbn.bn.fuse import OutputShift, bn_scale_shift
from vitbn.config import NORM_SLOTS
from vitbn.models import TokenBatchNorm, VisionTransformer, create_model
from vitbn.models.norms import set_prepbn_lambda


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
    assert block.attn.to_qkv.bias is None and model.transformer.layers[0].attn.to_qkv.bias is None
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


# --- the attention biases: k dropped, v moved into the output projection, q a per-key score term ---------------


def _folded_qkv_reference(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, b) of the qkv product with the attention BatchNorm folded in (float64, the textbook fold), per branch
    stacked as (K, 3*H*Dh, D) and (K, 3*H*Dh), and the BN shifts."""
    norms = getattr(attn, "norms", None) or [attn.norm]
    weight = attn.to_qkv.weight.double().reshape(len(norms), -1, attn.to_qkv.weight.shape[-1])
    maps = [bn_scale_shift(norm.bn) for norm in norms]
    w = torch.stack([weight[k] * scale[None, :] for k, (scale, _) in enumerate(maps)])
    b = torch.stack([weight[k] @ shift for k, (_, shift) in enumerate(maps)])
    return w, b


@pytest.mark.parametrize("parallel", [1, 2])
def test_the_key_bias_is_dropped_the_value_bias_moved_and_the_query_bias_is_a_key_term(tiny_overrides, parallel):
    model = _nontrivial(create_model("vitbn", **{**tiny_overrides, "parallel": parallel}))
    fused = fuse_bn(model)
    h, dh = model.config.heads, model.config.dim_head
    inner = h * dh
    for before, after in zip(model.transformer.layers, fused.transformer.layers):
        w, b = _folded_qkv_reference(before.attn)  # (K, 3*H*Dh, D), (K, 3*H*Dh)
        b_q, b_k, b_v = b.reshape(parallel, 3, inner).unbind(1)
        assert b_q.abs().min() > 0 and b_k.abs().min() > 0 and b_v.abs().min() > 0  # all three are there to fold
        qkv, out = after.attn.to_qkv, after.attn.to_out
        assert qkv.bias is None and after.attn.key_term
        got = qkv.weight.double().reshape(parallel, 3 * inner + h, -1)
        assert_close(got[:, : 3 * inner], w, check_dtype=False, rtol=1e-5, atol=1e-6)  # the LN model's product
        w_k = w[:, inner : 2 * inner].reshape(parallel, h, dh, -1)
        u = dh**-0.5 * (b_q.reshape(parallel, h, dh, 1) * w_k).sum(2)  # (K, H, D): scale * W_k^T b_q per head
        assert_close(got[:, 3 * inner :], u, check_dtype=False, rtol=1e-5, atol=1e-6)
        w_o = before.attn.to_out.weight.double().reshape(parallel, -1, inner)
        moved = before.attn.to_out.bias.double().reshape(parallel, -1) + (w_o @ b_v[..., None])[..., 0]
        assert_close(out.bias.double().reshape(parallel, -1), moved, rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert_close(fused(x), model(x))


def test_a_zero_query_bias_adds_no_key_term_and_no_projection_keeps_the_value_bias(tiny_overrides):
    model = _nontrivial(create_model("vitbn", **{**tiny_overrides, "heads": 1, "dim_head": 16}))  # no to_out
    with torch.no_grad():
        for block in model.transformer.layers:
            block.attn.to_qkv.weight[:16].zero_()  # W_q = 0: b_q = W_q shift = 0, while b_k and b_v are not
    fused = fuse_bn(model)
    for block in fused.transformer.layers:
        attn = block.attn
        assert not attn.key_term and attn.to_qkv.weight.shape == (48, 16) and attn.to_qkv.bias is None
        assert isinstance(attn.to_out, OutputShift) and attn.to_out.shift.abs().min() > 0
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close(fused(x), model(x))


@pytest.mark.parametrize("slot", NORM_SLOTS)
@pytest.mark.parametrize("kind", ["batch", "prepbn"])
@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_every_placement_alone_folds_exactly_on_both_attention_paths(slot, kind, impl):
    model = create_model("vit", dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32, attn_impl=impl, **{slot: kind})
    set_prepbn_lambda(model, 0.0)  # PRepBN at the end of its ramp: RepBN alone
    model = _nontrivial(model)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "eta"):
                m.eta.fill_(0.3)
    fused = fuse_bn(model)
    assert getattr(fused.config, slot) == "none" and _batchnorms(fused) == []
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"parallel": 2}])
def test_a_bf16_model_folds_within_bf16_rounding(tiny_overrides, extra):
    model = _nontrivial(create_model("vitbn", **{**tiny_overrides, **extra}))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
        folded = fuse_bn(model.bfloat16())(x.bfloat16())
        unfolded = model(x.bfloat16())
    assert folded.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: both bf16 models are off the fp32 one by rounding, and by as much as each other
    scale = reference.abs().max()
    assert_close(unfolded.float(), reference, rtol=0, atol=0.05 * scale)
    assert_close(folded.float(), reference, rtol=0, atol=0.05 * scale)


class _Ops(TorchDispatchMode):
    """Records every kernel that runs: its name and the number of elements of its (first) output."""

    VIEWS = ("view", "_unsafe_view", "t", "permute", "transpose", "unbind", "expand", "slice", "unsqueeze", "alias")
    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu")

    def __init__(self) -> None:
        super().__init__()
        self.products: list[tuple[str, tuple[int, ...]]] = []
        self.other_elements = 0  # elements written by every kernel that is neither a product nor a view

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name, first = func.__name__.split(".")[0], out[0] if isinstance(out, (tuple, list)) else out
        if name in self.PRODUCTS:
            self.products.append((name, tuple(first.shape)))
        elif name not in self.VIEWS:
            self.other_elements += first.numel()
        return out


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("parallel", [1, 2])
def test_a_folded_vitbn_block_runs_the_products_of_the_layernorm_block_and_no_more(impl, parallel):
    config = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32, parallel=parallel, attn_impl=impl)
    blocks = {
        "vit": create_model("vit", **config).eval(),
        "folded": fuse_bn(_nontrivial(create_model("vitbn", **config))),
    }
    x = torch.randn(3, 1, 28, 28)
    ops = {}
    for name, model in blocks.items():
        with torch.no_grad():
            tokens = model.embed(x)
            with _Ops() as ops[name]:
                model.transformer.layers[0](tokens)
    vit, folded = ops["vit"], ops["folded"]
    # the same kernels, one by one; the qkv product without a bias (mm/bmm, not addmm/baddbmm) and 2 (H) wider
    assert [n for n, _ in folded.products] == [n for n, _ in vit.products]
    assert folded.products[0][0] in ("mm", "bmm") and folded.products[0][1][-1] == vit.products[0][1][-1] + 2
    assert folded.products[1:] == vit.products[1:]
    # and no more elementwise work than the LayerNorm block (whose LayerNorms the folded block does not run)
    assert folded.other_elements <= vit.other_elements
