"""Ghost BN under bf16 autocast computes its statistics in fp32 and gives nn.BatchNorm's numbers, per sub-batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

from vitbn.models.norms import TokenBatchNorm


def test_ghost_bn_under_bf16_autocast_matches_batchnorm_per_sub_batch():
    torch.manual_seed(0)
    x = (50 + torch.randn(8, 3, 8)).bfloat16()  # features far from zero: a bf16 mean is off by up to 0.125
    ghost = TokenBatchNorm(8, ghost_batch_size=4).train()
    with torch.no_grad():
        ghost.bn.weight.uniform_(0.5, 1.5)
        ghost.bn.bias.uniform_(-1, 1)
    reference = nn.BatchNorm1d(8).train()
    reference.load_state_dict(ghost.bn.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ghost(x).reshape(-1, 8)
        # nn.BatchNorm on each sub-batch of 4 images (12 token rows), and the ghost update of the running stats
        expected = torch.cat([reference(chunk.reshape(-1, 8)) for chunk in x.split(4)])
    assert out.dtype == expected.dtype == torch.bfloat16  # before: fp32 (the fp32 affine promoted it)
    # Both compute in fp32 and round once to bf16: at most one bf16 ulp (2^-7 relative) apart where the fp32
    # values straddle a rounding boundary. Before, the bf16 statistics put outputs 0.16 off.
    assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-3)
    chunks = x.double().reshape(2, -1, 8)  # (sub-batch, 4 images x 3 tokens, D)
    mean = chunks.mean(1).mean(0)
    var = chunks.var(1, unbiased=True).mean(0)
    # fp32 statistics of 12 rows: a few fp32 ulps of 50 (and of the variance)
    assert_close(ghost.bn.running_mean.double(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    assert_close(ghost.bn.running_var.double(), 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)


def test_ghost_bn_keeps_float64():
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    ghost = TokenBatchNorm(4, ghost_batch_size=2).double().train()
    reference = nn.BatchNorm1d(4).double().train()
    out = ghost(x).reshape(-1, 4)
    expected = torch.cat([reference(chunk.reshape(-1, 4)) for chunk in x.split(2)])
    assert out.dtype == torch.float64
    assert_close(out, expected, rtol=1e-12, atol=1e-12)  # fp64 all through: a few fp64 ulps of values near 1
