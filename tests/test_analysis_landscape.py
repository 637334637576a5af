"""The filter-normalized 1-D loss slice."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tolerance import reduction_tol
from vitbn.analysis.common import mean_loss
from vitbn.analysis.landscape import directed_parameters, filter_normalized_direction, loss_slice
from vitbn.config import ModelConfig
from vitbn.models import build_model

# The modules whose weights the direction holds (besides every bias): norms and LayerScale.
HELD_OWNERS = {"LayerNorm", "ChannelLayerNorm", "BatchNorm1d", "BatchNorm2d", "LayerScale"}
TINY = dict(image_size=8, patch_size=4, dim=8, depth=1, heads=2, dim_head=4, mlp_dim=8, num_classes=3)


def _tiny(preset: str, **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset(preset, **{**TINY, **overrides}))


def _reference_slice(model, batches, alphas, seed: int, *, train_bn: bool = False) -> tuple[list, list]:
    """(losses, accuracies) at theta + alpha * d, recomputed on a copy of the model: its parameters moved along the
    seeded direction, one cross-entropy over all images (BatchNorm in train mode: each batch's own statistics)."""
    direction = filter_normalized_direction(model, seed=seed)
    y = torch.cat([yb for _, yb in batches])
    losses, accs = [], []
    for alpha in alphas:
        moved = copy.deepcopy(model).train(train_bn)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                p.add_(direction[name], alpha=alpha)
            logits = torch.cat([moved(xb) for xb, _ in batches])
        losses.append(F.cross_entropy(logits, y).item())
        accs.append(int((logits.argmax(dim=1) == y).sum()) / len(y))
    return losses, accs


def _batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return [(x[:7], y[:7]), (x[7:], y[7:])]


@pytest.mark.parametrize(
    ("preset", "overrides"), [("vit", {}), ("vitbn", {"parallel": 2, "layer_scale": 0.1}), ("vit", {"stem": "conv"})]
)
def test_direction_rows_have_the_weight_row_norms_and_biases_get_zero(preset, overrides):
    model = _tiny(preset, **overrides)
    direction = filter_normalized_direction(model, seed=3)
    layouts = directed_parameters(model)
    params = dict(model.named_parameters())
    owners = {
        f"{prefix}.{leaf}".lstrip("."): (module, leaf)
        for prefix, module in model.named_modules()
        for leaf, _ in module.named_parameters(recurse=False)
    }
    assert layouts["cls_token"] == layouts["pos_embedding"] == "rows"
    assert any(layout is None for layout in layouts.values())
    for name, p in params.items():
        d, layout = direction[name], layouts[name]
        assert d.shape == p.shape and d.dtype == p.dtype
        if layout is None:  # biases, norm scales and shifts, LayerScale
            assert not d.any(), name
            owner, leaf = owners[name]
            assert leaf == "bias" or type(owner).__name__ in HELD_OWNERS, name
            continue
        rows = (lambda t: t.reshape(t.shape[0], -1)) if layout == "conv" else (lambda t: t.reshape(-1, t.shape[-1]))
        torch.testing.assert_close(rows(d).norm(dim=1), rows(p.detach()).norm(dim=1))
    if overrides.get("stem") == "conv":
        assert "conv" in layouts.values()
    again = filter_normalized_direction(model, seed=3)
    assert all(torch.equal(direction[n], again[n]) for n in direction)  # seeded
    assert not torch.equal(filter_normalized_direction(model, seed=4)["mlp_head.weight"], direction["mlp_head.weight"])


@pytest.mark.parametrize("preset", ["vit", "vitbn"])
def test_slice_at_zero_is_the_plain_loss_and_weights_come_back_bit_exact(preset):
    model, batches = _tiny(preset), _batches()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = loss_slice(model, batches, points=7, seed=1)
    assert result.alphas == pytest.approx([-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1]) and result.alphas[3] == 0.0
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # weights and running statistics
    plain = mean_loss(model.eval(), batches)
    assert result.loss[3] == plain[0] and result.acc[3] == plain[1]
    losses, accs = _reference_slice(model, batches, result.alphas, seed=1)
    torch.testing.assert_close(result.loss, losses, **reduction_tol(12))  # 12 images: summed in two batches
    assert result.acc == accs and len(set(result.loss)) == 7
    assert loss_slice(model, batches, points=2, span=0.5, seed=1).alphas == [-0.5, 0.5]


def test_slice_in_train_bn_mode_keeps_running_statistics():
    model, batches = _tiny("vitbn"), _batches()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    result = loss_slice(model, batches, points=3, bn_mode="train")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    losses, accs = _reference_slice(model, batches, result.alphas, seed=0, train_bn=True)
    torch.testing.assert_close(result.loss, losses, **reduction_tol(12))
    assert result.acc == accs
    assert result.loss[1] != mean_loss(model.eval(), batches)[0]  # batch statistics, not the running ones
    with pytest.raises(ValueError, match="points"):
        loss_slice(model, batches, points=1)
