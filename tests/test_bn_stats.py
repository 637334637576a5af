"""Precise BN statistics, frozen BN and ghost BN, checked against reference formulas and nn.BatchNorm1d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vitbn.bn import FrozenBatchNorm, freeze_bn, recompute_bn_stats, set_ghost_batch_size, unfreeze_bn
from vitbn.models import TokenBatchNorm, create_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread; two threads on a loaded 2-core machine mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(b: int) -> torch.Tensor:
    return torch.randn(b, 1, 28, 28) * 1.5 + 0.3


def _token_bns(model: nn.Module) -> list[TokenBatchNorm]:
    return [m for m in model.modules() if isinstance(m, TokenBatchNorm)]


def _stats_of_concatenated_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Reference: every token BN's (rows, width) inputs over all batches (train mode, as the passes run),
    concatenated, then torch.var_mean -> (mean, unbiased var) per BN."""
    model = copy.deepcopy(model).train()
    inputs = {id(m): [] for m in _token_bns(model)}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: inputs[id(mod)].append(args[0].reshape(-1, mod.bn.num_features)))
        for m in _token_bns(model)
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    out = []
    for m in _token_bns(model):
        var, mean = torch.var_mean(torch.cat(inputs[id(m)]), dim=0, unbiased=True)
        out.append((mean, var))
    return out


@pytest.mark.parametrize(
    ("extra", "ghost"),
    [({}, None), ({"bn_stats": "scalar"}, None), ({}, 2), ({"parallel": 2}, None), ({"parallel": 2}, 2)],
)
def test_precise_stats_equal_stats_of_concatenated_inputs(tiny_overrides, extra, ghost):
    model = create_model("vitbn", **{**tiny_overrides, **extra}, ghost_batch_size=ghost).eval()
    batches = [_images(b) for b in (3, 5, 8)]  # unequal sizes: pooling must weight by rows
    expected = _stats_of_concatenated_inputs(model, batches)
    params = {k: v.clone() for k, v in model.named_parameters()}
    tracked = [m.bn.num_batches_tracked.clone() for m in _token_bns(model)]

    used = recompute_bn_stats(model, [(x, torch.zeros(len(x))) for x in batches], num_batches=3)

    assert used == 3
    for m, (mean, var), n in zip(_token_bns(model), expected, tracked):
        assert_close(m.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        assert_close(m.bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert m.bn.momentum == 0.1 and torch.equal(m.bn.num_batches_tracked, n)
    assert not model.training and not any(m.training for m in model.modules())
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])


def test_precise_stats_of_first_bn_match_raw_patches(tiny_overrides):
    # The first BN (patch-embedding norm_in) sees the patch pixels: an independent reference from the data.
    model = create_model("vitbn", **tiny_overrides).train()
    batches = [_images(4), _images(7)]
    recompute_bn_stats(model, batches, num_batches=None)
    patches = torch.cat([model.to_patch_embedding.patchify(x) for x in batches]).reshape(-1, 49)
    var, mean = torch.var_mean(patches, dim=0, unbiased=True)
    bn = model.to_patch_embedding.norm_in.bn
    assert_close(bn.running_mean, mean)
    assert_close(bn.running_var, var)
    assert model.training  # train mode restored


def test_precise_stats_of_plain_batchnorm2d():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    batches = [torch.randn(b, 3, 6, 6) + 2.0 for b in (2, 5)]
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x in batches])  # the first BN's input: (7, 4, 4, 4)
    recompute_bn_stats(model, iter(batches), num_batches=2)
    var, mean = torch.var_mean(feats, dim=(0, 2, 3), unbiased=True)
    assert_close(model[1].running_mean, mean)
    assert_close(model[1].running_var, var)


def test_precise_stats_with_fewer_batches_warns_and_uses_them(tiny_overrides):
    model = create_model("vitbn", **tiny_overrides)
    batches = [_images(3), _images(4)]
    reference = copy.deepcopy(model)
    recompute_bn_stats(reference, batches, num_batches=2)
    with pytest.warns(UserWarning, match="asked for 5 batches but the data has 2; using 2"):
        assert recompute_bn_stats(model, batches, num_batches=5) == 2
    for a, b in zip(_token_bns(model), _token_bns(reference)):
        assert_close(a.bn.running_var, b.bn.running_var)


def test_precise_stats_bad_input(tiny_overrides):
    model = create_model("vitbn", **tiny_overrides)
    with pytest.raises(ValueError, match="got no batches"):
        recompute_bn_stats(model, [], num_batches=3)
    with pytest.raises(ValueError, match="num_batches=0 must be a positive integer"):
        recompute_bn_stats(model, [_images(2)], num_batches=0)
    assert recompute_bn_stats(create_model("vit", **tiny_overrides), [_images(2)], 1) == 0  # no BN: nothing to do


def test_frozen_bn_is_a_fixed_affine_map(tiny_overrides):
    model = create_model("vitbn", **tiny_overrides)
    with torch.no_grad():
        model.train()(_images(6))  # running stats away from 0/1
        for m in _token_bns(model):
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.normal_()
    reference = copy.deepcopy(model).eval()
    inner = [m.bn for m in _token_bns(model)]
    keys = list(model.state_dict())

    freeze_bn(model).train()

    frozen = [m.bn for m in _token_bns(model)]
    assert all(isinstance(f, FrozenBatchNorm) for f in frozen)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(f.weight is bn.weight and f.running_var is bn.running_var for f, bn in zip(frozen, inner))
    assert list(model.state_dict()) == keys
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = _images(5)
    out = model(x)  # train mode
    assert_close(out, reference(x))  # = the eval-mode model
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    f = frozen[1]
    z = torch.randn(7, f.num_features)
    expected = (z - f.running_mean) / torch.sqrt(f.running_var + f.eps) * f.weight + f.bias
    assert_close(f(z), expected)
    out.sum().backward()  # the affine parameters still learn
    assert f.weight.grad is not None and f.weight.grad.abs().sum() > 0


def test_unfreeze_restores_batchnorm_with_same_buffers(tiny_overrides):
    model = create_model("vitbn", **tiny_overrides)
    model.train()(_images(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unfreeze_bn(freeze_bn(model))
    assert all(type(m.bn) is nn.BatchNorm1d for m in _token_bns(model))
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    bn = model.transformer.norm.bn
    assert bn.momentum == 0.1 and bn.training
    mean = bn.running_mean.clone()
    model(_images(4))
    assert not torch.equal(bn.running_mean, mean)  # a normal, updating BN again


def test_set_ghost_batch_size(tiny_overrides):
    model = create_model("vitbn", **tiny_overrides)
    assert set_ghost_batch_size(model, 4) == len(_token_bns(model)) == 3 + 2 * 2
    assert all(m.ghost_batch_size == 4 for m in _token_bns(model)) and model.config.ghost_batch_size == 4
    set_ghost_batch_size(model, None)
    assert all(m.ghost_batch_size is None for m in _token_bns(model)) and model.config.ghost_batch_size is None
    with pytest.raises(ValueError, match="ghost batch size=0 must be a positive integer or None"):
        set_ghost_batch_size(model, 0)


def test_ghost_bn_with_nbs_equal_to_batch_is_plain_bn(tiny_overrides):
    plain = create_model("vitbn", **tiny_overrides).train()
    ghost = copy.deepcopy(plain)
    set_ghost_batch_size(ghost, 6)
    x = _images(6)
    assert_close(ghost(x), plain(x))
    for g, p in zip(_token_bns(ghost), _token_bns(plain)):
        assert_close(g.bn.running_mean, p.bn.running_mean)
        assert_close(g.bn.running_var, p.bn.running_var)


def test_ghost_bn_equals_bn_on_each_sub_batch():
    torch.manual_seed(1)
    tbn = TokenBatchNorm(8, ghost_batch_size=2, momentum=0.3)
    with torch.no_grad():
        tbn.bn.weight.uniform_(0.5, 1.5)
        tbn.bn.bias.normal_()
        tbn.bn.running_mean.normal_()
    start_mean, start_var = tbn.bn.running_mean.clone(), tbn.bn.running_var.clone()
    x = torch.randn(6, 5, 8) * 2 + 1  # (B, N, D): 3 sub-batches of 2 images
    out = tbn.train()(x)
    outs, means, variances = [], [], []
    for chunk in x.split(2):
        bn = copy.deepcopy(tbn.bn)
        bn.momentum = 1.0  # running stats become this sub-batch's (unbiased) statistics
        outs.append(bn(chunk.reshape(-1, 8)).reshape(chunk.shape))
        means.append(bn.running_mean)
        variances.append(bn.running_var)
    assert_close(out, torch.cat(outs))
    # The documented rule: running stats move by the mean of the sub-batch statistics.
    assert_close(tbn.bn.running_mean, 0.7 * start_mean + 0.3 * torch.stack(means).mean(0))
    assert_close(tbn.bn.running_var, 0.7 * start_var + 0.3 * torch.stack(variances).mean(0))


def test_ghost_model_equals_model_on_each_sub_batch(tiny_overrides):
    model = create_model("vitbn", **tiny_overrides).train()
    ghost = copy.deepcopy(model)
    set_ghost_batch_size(ghost, 2)
    x = _images(6)
    expected = torch.cat([copy.deepcopy(model)(chunk) for chunk in x.split(2)])
    assert_close(ghost(x), expected)
