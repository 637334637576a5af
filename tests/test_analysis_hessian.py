"""lambda_max by power iteration on Hessian-vector products against the explicit Hessian of tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from vitbn.analysis.common import analysis_mode, is_bn_norm, parameter_blocks
from vitbn.analysis.hessian import block_lambda_max, hvp, lambda_max, power_iteration
from vitbn.bn import kept_bn_stats
from vitbn.config import ModelConfig
from vitbn.models import build_model

TINY = dict(image_size=8, patch_size=4, dim=8, depth=1, heads=2, dim_head=4, mlp_dim=8, num_classes=3)
TIGHT = dict(tol=1e-7, max_iter=3000)  # the check is of the eigenvalue, not of a loose stopping rule


def _tiny(preset: str, **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset(preset, **{**TINY, **overrides})).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return [(x[:10], y[:10]), (x[10:], y[10:])]  # uneven: the weighting by batch size matters


def _explicit_hessian(model, batches, names: list[str], bn_mode: str) -> torch.Tensor:
    """The Hessian of the mean loss over the images w.r.t. the named parameters, by ``autograd.functional``. In
    eval mode the images go through as one batch (an independent check of the per-batch weighting); in train
    mode BN statistics are per batch, so the loss is the size-weighted mean of the batch losses."""
    named = dict(model.named_parameters())
    shapes, sizes = [named[n].shape for n in names], [named[n].numel() for n in names]
    flat0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    total = sum(len(y) for _, y in batches)

    def loss(flat):
        weights = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        if bn_mode == "eval":
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            return F.cross_entropy(functional_call(model, weights, (x,)), y)
        parts = [F.cross_entropy(functional_call(model, weights, (x,)), y) * len(y) for x, y in batches]
        return sum(parts) / total

    with analysis_mode(model, bn_mode, math_attention=True):  # a kernel that can be differentiated twice
        return torch.autograd.functional.hessian(loss, flat0, vectorize=True)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize(("preset", "bn_mode"), [("vit", "eval"), ("vitbn", "eval"), ("vitbn", "train")])
def test_lambda_max_equals_the_top_eigenvalue_of_the_explicit_hessian(preset, bn_mode):
    model, batches = _tiny(preset), _batches()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = float(torch.linalg.eigvalsh(_explicit_hessian(model, batches, names, bn_mode))[-1])
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    result = lambda_max(model, batches, bn_mode=bn_mode, **TIGHT)
    assert result.converged and not result.shifted
    assert _rel(result.value, expected) < 1e-3, (result, expected)
    assert result.residual < 1e-2
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())  # running statistics unchanged
    assert (preset == "vitbn") == bool(stats)
    assert model.training  # the mode it was in


def test_train_and_eval_bn_modes_differ():
    model, batches = _tiny("vitbn"), _batches()
    assert lambda_max(model, batches, bn_mode="eval", **TIGHT).value != pytest.approx(
        lambda_max(model, batches, bn_mode="train", **TIGHT).value, rel=1e-3
    )


@pytest.mark.parametrize("block", ["block1.mlp", "head"])
def test_block_lambda_max_equals_the_top_eigenvalue_of_its_submatrix(block):
    model, batches = _tiny("vit"), _batches()
    ids = {id(p) for p in parameter_blocks(model)[block]}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    expected = float(torch.linalg.eigvalsh(_explicit_hessian(model, batches, names, "eval"))[-1])
    result = block_lambda_max(model, batches, blocks=[block], **TIGHT)[block]
    assert _rel(result.value, expected) < 1e-3, (result, expected)


def test_hvp_is_linear_and_symmetric():
    model, batches = _tiny("vitbn"), _batches()
    params = [p for p in model.parameters()]
    g = torch.Generator().manual_seed(3)
    u = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    with analysis_mode(model):
        hu, hv = hvp(model, batches, params, u), hvp(model, batches, params, v)
        h2 = hvp(model, batches, params, [2 * a + b for a, b in zip(u, v)])
    dot = lambda a, b: sum(float((x * y).sum()) for x, y in zip(a, b))  # noqa: E731
    assert dot(u, hv) == pytest.approx(dot(v, hu), rel=1e-9)  # u' H v = v' H u
    for a, b, c in zip(hu, hv, h2):
        torch.testing.assert_close(c, 2 * a + b)


def test_negative_dominant_eigenvalue_takes_the_shifted_iteration():
    diag = torch.tensor([-5.0, 2.0, 1.0, -0.5], dtype=torch.float64)
    result = power_iteration(lambda v: diag * v, 4, tol=1e-10, max_iter=1000, dtype=torch.float64)
    assert result.shifted and result.converged
    assert result.value == pytest.approx(2.0, rel=1e-6)
    positive = power_iteration(lambda v: -diag * v, 4, tol=1e-10, max_iter=1000, dtype=torch.float64)
    assert not positive.shifted and positive.value == pytest.approx(5.0, rel=1e-6)


def test_no_convergence_warns_with_the_estimate_and_residual():
    model, batches = _tiny("vit"), _batches()
    with pytest.warns(UserWarning, match=r"did not converge in 1 iterations .*estimate [-0-9.e]+, residual [0-9.e]+"):
        result = lambda_max(model, batches, max_iter=1)
    assert not result.converged and result.iterations == 1
    with pytest.raises(ValueError, match="tol"):
        lambda_max(model, batches, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        lambda_max(model, batches, max_iter=0)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("vit", {}),
        ("vitbn", {"depth": 2, "pool": "mean", "pos_emb": "pe2d"}),
        ("vit", {"depth": 2, "parallel": 2, "layer_scale": 0.1}),
        ("vitbnffn", {"layer_scale": 0.1, "stem": "hmlp"}),
        ("vitbn", {"stem": "conv", "norm": "prepbn"}),
    ],
)
def test_every_trainable_parameter_is_in_exactly_one_block(preset, overrides):
    model = _tiny(preset, **overrides)
    blocks = parameter_blocks(model)
    depth = model.config.depth
    assert list(blocks) == ["embed", *[f"block{i}.{p}" for i in range(1, depth + 1) for p in ("attn", "mlp")], "head"]
    ids = [id(p) for params in blocks.values() for p in params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_analysis_mode_puts_only_the_bn_norms_in_training_and_restores_every_flag():
    model = _tiny("vitbn", parallel=2, drop_path=0.5, dropout=0.1)
    model.train()
    model.transformer.layers[0].attn.eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    with analysis_mode(model, "train", math_attention=True):
        for m in model.modules():
            assert m.training == is_bn_norm(m)
        assert all(getattr(m, "impl", "fused") == "fused" for m in model.modules() if hasattr(m, "heads"))
        assert any(isinstance(m, _BatchNorm) and m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    assert all(m.impl == "auto" for m in model.modules() if hasattr(m, "heads") and hasattr(m, "impl"))
    with kept_bn_stats(model), pytest.raises(ValueError, match="bn_mode"), analysis_mode(model, "batch"):
        pass


@pytest.mark.parametrize("overrides", [{}, {"parallel": 2, "depth": 2}])
def test_hvp_through_the_math_attention_kernel_equals_the_plain_path(overrides):
    model, batches = _tiny("vitbn", attn_impl="plain", **overrides), _batches()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    with analysis_mode(model):  # the plain path
        explicit = hvp(model, batches, params, v)
    with analysis_mode(model, math_attention=True):
        math = hvp(model, batches, params, v)
    for a, b in zip(explicit, math):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
