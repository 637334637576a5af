"""Attention capture and rollout against direct computations."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vitbn import create_model
from vitbn.analysis import attention_maps, patch_attention, rollout


def _random_maps(b: int, layers: int, heads: int, n: int) -> torch.Tensor:
    return torch.randn(b, layers, heads, n, n, dtype=torch.float64).softmax(dim=-1)


def test_rollout_equals_the_product_written_out():
    maps = _random_maps(2, 3, 4, 5)
    eye = torch.eye(5, dtype=torch.float64)
    expected = []
    for b in range(2):
        r = eye
        for layer in range(3):
            a = 0.5 * eye + 0.5 * maps[b, layer].mean(0)
            r = (a / a.sum(1, keepdim=True)) @ r
        expected.append(r)
    flow = rollout(maps)
    assert_close(flow, torch.stack(expected))
    assert_close(flow.sum(-1), torch.ones(2, 5, dtype=torch.float64))  # rows stay distributions


def test_rollout_of_uniform_attention_and_bad_shapes():
    n = 4
    uniform = torch.full((1, 2, 1, n, n), 1.0 / n)
    # one layer: 0.5 I + 0.5 / n everywhere
    assert_close(rollout(uniform[:, :1])[0], 0.5 * torch.eye(n) + 0.5 / n)
    with pytest.raises(ValueError, match=r"\(B, L, H, N, N\)"):
        rollout(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="residual"):
        rollout(uniform, residual=1.0)


def test_patch_attention_cls_row_and_mean_pool():
    flow = torch.arange(25, dtype=torch.float64).reshape(1, 5, 5) + 1
    cls = patch_attention(flow, (2, 2), class_token=True)
    assert_close(cls[0], (flow[0, 0, 1:] / flow[0, 0, 1:].sum()).reshape(2, 2))
    flow4 = flow[:, 1:, 1:]
    mean = patch_attention(flow4, (2, 2), class_token=False)
    assert_close(mean[0], (flow4[0].mean(0) / flow4[0].mean(0).sum()).reshape(2, 2))
    with pytest.raises(ValueError, match="grid"):
        patch_attention(flow, (3, 3), class_token=True)


@pytest.mark.parametrize("overrides", [{}, {"parallel": 2}, {"pool": "mean"}])
def test_capture_changes_no_logit(tiny_overrides, overrides):
    model = create_model("vitbn", **{**tiny_overrides, **overrides}).eval()
    x = torch.randn(3, 1, 28, 28)
    logits, maps = attention_maps(model, x)
    with torch.no_grad():
        assert_close(logits, model(x))
    heads = model.config.heads * model.config.parallel
    n = model.config.num_tokens
    assert maps.shape == (3, model.config.depth, heads, n, n)
    assert_close(maps.sum(-1), torch.ones(3, model.config.depth, heads, n))
