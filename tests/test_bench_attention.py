"""The attention layouts chosen for speed (``Attention._per_head``, ``Attention._batched``, the fp32 softmax of
half-precision scores) compute the same function and the same gradients as the textbook formulation."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vitbn.models import create_model
from vitbn.models.layers import Attention, _softmax

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)


def textbook(attn: Attention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vit-pytorch's formulation: chunk, (B, H, N, Dh) heads, matmul -> softmax -> matmul."""
    b, n, _ = qkv.shape
    q, k, v = (t.reshape(b, n, attn.heads, attn.dim_head).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, -1), weights


@pytest.mark.parametrize("path", ["_per_head", "_batched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layouts_match_the_textbook_formulation(path, dtype):
    attn = create_model("vit", **TINY).transformer.layers[0].attn.to(dtype)
    qkv = torch.randn(3, 17, 3 * 2 * 8, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 17, 16, dtype=dtype)
    out, weights = getattr(attn, path)(qkv)
    (g,) = torch.autograd.grad(out, qkv, grad)
    ref_out, ref_weights = textbook(attn, qkv)
    (ref_g,) = torch.autograd.grad(ref_out, qkv, grad)
    assert_close(out, ref_out)
    assert_close(weights, ref_weights)
    assert_close(g, ref_g)


def test_half_precision_training_takes_the_batched_layout_and_agrees_with_fp32():
    model = create_model("vit", **TINY)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    attn = model.transformer.layers[0].attn
    seen = []
    for name in ("_batched", "_per_head"):
        method = getattr(attn, name)
        setattr(attn, name, lambda qkv, m=method, n=name: (seen.append(n), m(qkv))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_loss = torch.nn.functional.cross_entropy(model(x), y)
    ref_loss.backward()
    assert seen == ["_batched", "_per_head"]  # bf16 training, then fp32 training
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
