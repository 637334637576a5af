"""The attention layouts chosen for speed (``_per_head``, ``_batched``, the fused kernel, the fp32 softmax of
half-precision scores), for one branch and for the K branches of a parallel stage, compute the same function
and the same gradients as the textbook formulation."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vitbn.models import create_model, layers
from vitbn.models.layers import _softmax

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)


def textbook(qkv: torch.Tensor, heads: int, dim_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vit-pytorch's formulation on every branch of (K, B, N, 3*H*Dh): chunk, (B, H, N, Dh) heads, matmul ->
    softmax -> matmul; branch outputs concatenated, weights (B, K*H, N, N)."""
    outs, maps = [], []
    for branch in qkv:
        b, n, _ = branch.shape
        q, k, v = (t.reshape(b, n, heads, dim_head).transpose(1, 2) for t in branch.chunk(3, dim=-1))
        weights = (q @ k.transpose(-1, -2) * dim_head**-0.5).softmax(dim=-1)
        outs.append((weights @ v).transpose(1, 2).reshape(b, n, -1))
        maps.append(weights)
    return torch.cat(outs, dim=-1), torch.cat(maps, dim=1)


@pytest.mark.parametrize("path", ["_per_head", "_batched", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("branches", [1, 3])
def test_layouts_match_the_textbook_formulation(path, dtype, branches, monkeypatch):
    qkv = torch.randn(branches, 3, 17, 3 * 2 * 8, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 17, branches * 16, dtype=dtype)
    if path == "_per_head":  # whichever layout attend would choose
        monkeypatch.setattr(layers, "_batched", layers._per_head)
    if path == "_batched":
        monkeypatch.setattr(layers, "_per_head", layers._batched)
    out, weights = layers.attend(qkv, 2, 8, 8**-0.5, torch.nn.Identity(), explicit=path != "sdpa", dropout_p=0.0)
    (g,) = torch.autograd.grad(out, qkv, grad)
    ref_out, ref_weights = textbook(qkv, 2, 8)
    (ref_g,) = torch.autograd.grad(ref_out, qkv, grad)
    assert_close(out, ref_out)
    assert_close(g, ref_g)
    if path == "sdpa":
        assert weights is None
    else:
        assert_close(weights, ref_weights)


def test_parallel_branches_take_the_batched_layout(monkeypatch):
    seen = []
    monkeypatch.setattr(layers, "_per_head", lambda *a: seen.append("_per_head"))
    model = create_model("vit", **{**TINY, "parallel": 2}, attn_impl="explicit").eval()
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert seen == []


def test_half_precision_training_takes_the_batched_layout_and_agrees_with_fp32(monkeypatch):
    model = create_model("vit", **TINY, attn_impl="explicit")
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    seen = []
    for name in ("_batched", "_per_head"):
        method = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, m=method, n=name: (seen.append(n), m(*a))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_loss = torch.nn.functional.cross_entropy(model(x), y)
    ref_loss.backward()
    assert seen == ["_batched", "_per_head"]  # bf16 training, then fp32 training (one block: one call each)
    assert_close(loss, ref_loss, rtol=0.05, atol=0.05)
    for g, ref in zip(grads, (p.grad for p in model.parameters())):
        assert_close(g, ref, rtol=0.1, atol=0.05)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen[-1] == "_per_head"  # half-precision inference


def test_half_precision_softmax_is_the_rounded_fp32_softmax():
    scores = (torch.randn(5, 17, 17) * 4).bfloat16()
    out = _softmax(scores)
    assert out.dtype == torch.bfloat16
    assert_close(out, scores.float().softmax(-1).bfloat16(), rtol=0, atol=0)
    assert_close(_softmax(scores.float()), scores.float().softmax(-1), rtol=0, atol=0)
