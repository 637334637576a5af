"""Active fractions and weight norms against direct computations on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vitbn.analysis.activity import active_fraction, weight_norms
from vitbn.analysis.common import parameter_blocks
from vitbn.config import ModelConfig
from vitbn.models import build_model

TINY = dict(image_size=8, patch_size=4, dim=8, depth=2, heads=2, dim_head=4, mlp_dim=12, num_classes=3)


def _tiny(preset: str, **overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(preset, **{**TINY, **overrides}))
    if model.config.uses_batchnorm:  # running statistics away from their (0, 1) start
        with torch.no_grad():
            model.train()(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(14, 1, 8, 8, generator=g)
    return [(x[:9], torch.zeros(9, dtype=torch.long)), (x[9:], torch.zeros(5, dtype=torch.long))]


# A GELU input within this distance of 0 may change sign between the model's path and the one written out here
# (the parallel branches: one batched product against one per branch); their rounding differences are about 1e-6.
SIGN_MARGIN = 1e-4


def _by_hand(model, batches) -> dict[str, tuple[int, int, int]]:
    """fc1, inner norm and the count written out, stage by stage, from the model's parts: per block, (GELU inputs
    clearly positive, not clearly negative, all)."""
    positive, loose, total = {}, {}, {}
    with torch.no_grad():
        for x, _ in batches:
            x = model.embed(x)
            for i, layer in enumerate(model.transformer.layers, start=1):
                x = x + layer.attn_scale(layer.attn(x)) if hasattr(layer, "attn_scale") else x + layer.attn(x)
                ff = layer.ff
                if hasattr(ff, "fc1") and isinstance(ff.fc1, torch.nn.Linear):
                    pre = [ff.inner_norm(ff.fc1(ff.norm(x)))]
                else:  # parallel: each branch's pre-norm, its slice of the batched fc1, its inner norm
                    pre = [
                        inner(norm(x) @ ff.fc1.weight[k].T + ff.fc1.bias[k])
                        for k, (norm, inner) in enumerate(zip(ff.norms, ff.inner_norms))
                    ]
                key = f"block{i}"
                positive[key] = positive.get(key, 0) + sum(int((h > SIGN_MARGIN).sum()) for h in pre)
                loose[key] = loose.get(key, 0) + sum(int((h > -SIGN_MARGIN).sum()) for h in pre)
                total[key] = total.get(key, 0) + sum(h.numel() for h in pre)
                x = x + layer.ff_scale(ff(x)) if hasattr(layer, "ff_scale") else x + ff(x)
    return {k: (positive[k], loose[k], total[k]) for k in positive}


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [("vit", {}), ("vitbn", {}), ("vitbnffn", {"layer_scale": 0.5}), ("vitbn", {"parallel": 2})],
)
def test_active_fraction_equals_a_direct_count(preset, overrides):
    model, batches = _tiny(preset, **overrides), _batches()
    got = active_fraction(model, batches)
    expected = _by_hand(model, batches)
    assert list(got) == list(expected) == ["block1", "block2"]
    for key, (low, high, total) in expected.items():  # a count of GELU inputs: compared as the integer it is
        count = got[key] * total
        assert count == pytest.approx(round(count), abs=1e-6) and low <= round(count) <= high, (key, count, low, high)
    assert all(0.0 < v < 1.0 for v in got.values())


def test_capturing_changes_no_logit_and_leaves_no_hook():
    model, batches = _tiny("vitbn", parallel=2), _batches()
    model.train()
    x = batches[0][0]
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    active_fraction(model, batches)
    assert model.training
    assert all(not layer.ff.act._forward_pre_hooks for layer in model.transformer.layers)
    with torch.no_grad():
        assert_close(model.eval()(x), before, rtol=0, atol=0)


def test_weight_norms_are_the_norms_of_each_block():
    model = _tiny("vitbn", depth=1)
    norms = weight_norms(model)
    blocks = parameter_blocks(model)
    assert list(norms) == list(blocks) == ["embed", "block1.attn", "block1.mlp", "head"]
    for name, params in blocks.items():
        flat = torch.cat([p.detach().reshape(-1) for p in params]).double()
        assert norms[name] == pytest.approx(float(flat.norm()), rel=1e-12)
    total = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().norm()
    assert math.sqrt(sum(v**2 for v in norms.values())) == pytest.approx(float(total), rel=1e-12)
