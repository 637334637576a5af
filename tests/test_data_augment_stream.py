"""RandAugment's draws come from a CPU generator (no host sync on a GPU), and for a fixed seed on the CPU they are
the stream they always were: the augmenter's one generator, seeded by (seed, cfg.seed, epoch)."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from vitbn.config import AugmentConfig
from vitbn.data.augment import Augmenter, RandAugment
from vitbn.data.loader import epoch_seed


def test_randaugment_draws_for_a_fixed_seed():
    cfg = AugmentConfig(randaug_ops=2, randaug_magnitude=9, seed=3)
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    aug = Augmenter(cfg, num_classes=10, seed=5)
    aug.set_epoch(2)
    out, targets = aug(x, labels)
    # the stream: one CPU generator seeded by (seed, cfg.seed, epoch); ops (2, B) then signs (2, B)
    g = torch.Generator().manual_seed(epoch_seed(epoch_seed(5, 3), 2))
    n = len(RandAugment.op_names(1))
    ops = torch.randint(0, n, (2, 16), generator=g)
    signs = torch.randint(0, 2, (2, 16), generator=g) * 2 - 1
    assert len(set(ops.flatten().tolist())) > 5  # many ops in one batch, so the grouping is exercised
    assert_close(out, RandAugment(2, 9).apply(x, ops, signs), rtol=0, atol=0)
    assert torch.equal(targets, labels)
    assert aug._host is aug._generator  # on the CPU the draws stay on the one generator
    aug.set_epoch(2)
    assert_close(aug(x, labels)[0], out, rtol=0, atol=0)  # an epoch's draws again after set_epoch (a resume)


def test_group_sizes_are_counted_on_the_host_when_the_draws_are_there():
    """``apply`` takes CPU draws for images anywhere: the counts need no device tensor."""
    ra = RandAugment(1, 9)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ops = torch.tensor([[0, 4, 4, 1]])  # identity, solarize twice, autocontrast
    out = ra.apply(x, ops, torch.ones_like(ops))
    assert_close(out[0], x[0], rtol=0, atol=0)
    assert_close(out[1:3], torch.where(x[1:3] >= 1 - 9 / 30, 1 - x[1:3], x[1:3]), rtol=0, atol=0)
