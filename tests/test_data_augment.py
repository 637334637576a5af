"""vitbn.data.augment: each op against a hand formula or reference loop, batched RandAugment against per-sample
application, Mixup / CutMix targets, the seeded Augmenter, the named levels and the config's errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vitbn.config import AugmentConfig
from vitbn.data import augment as A


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_translate_equals_roll_with_zero_fill():
    x = rand(3, 2, 5, 6)
    dx, dy = torch.tensor([2, -1, 0]), torch.tensor([-3, 1, 4])
    expected = []
    for b in range(3):
        r = torch.roll(x[b], shifts=(int(dy[b]), int(dx[b])), dims=(-2, -1))
        rows, cols = torch.arange(5) - dy[b], torch.arange(6) - dx[b]  # source index, wrapped when outside
        r[:, (rows < 0) | (rows >= 5)] = 0
        r[:, :, (cols < 0) | (cols >= 6)] = 0
        expected.append(r)
    assert_close(A.translate(x, dx, dy), torch.stack(expected))


def test_random_crop_is_a_translation_within_padding():
    x, pad = rand(8, 1, 6, 6) + 0.1, 2  # no zero pixels, so each shift is identifiable
    out = A.random_crop(x, pad, torch.Generator().manual_seed(1))
    shifts = [(dx, dy) for dx in range(-pad, pad + 1) for dy in range(-pad, pad + 1)]
    for b in range(8):
        assert any(torch.equal(out[b : b + 1], A.translate(x[b : b + 1], dx, dy)) for dx, dy in shifts)
    assert not torch.equal(out, x)


@pytest.mark.parametrize("size", [5, 6])
@pytest.mark.parametrize("channels", [1, 3])
def test_rotate_90_equals_rot90(size, channels):
    x = rand(2, channels, size, size)
    assert_close(A.rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))
    assert_close(A.rotate(x, torch.tensor([-90.0, 180.0]))[0], torch.rot90(x[0], -1, dims=(-2, -1)))
    assert_close(A.rotate(x, 90.0, mode="nearest"), torch.rot90(x, 1, dims=(-2, -1)))


def test_affine_identity_and_integer_translation():
    x = rand(2, 3, 5, 7)
    assert_close(A.affine(x), x)
    assert_close(A.affine(x, translate_x=torch.tensor([1.0, -2.0]), translate_y=1.0), A.translate(x, [1, -2], 1))


def test_shear_matches_nearest_neighbour_map():
    x, c = rand(1, 1, 7, 7), 3  # centre pixel (3, 3)
    expected = torch.zeros_like(x)
    for i in range(7):
        for j in range(7):
            src = j - (i - c)  # shear_x 1 maps (u, v) to (u + v, v), so output column j reads column j - v
            if 0 <= src < 7:
                expected[0, 0, i, j] = x[0, 0, i, src]
    assert_close(A.affine(x, shear_x=1.0, mode="nearest"), expected)
    dot = torch.zeros(1, 1, 7, 7)
    dot[0, 0, 3, 5] = 1.0  # u = 2, v = 0 -> shear_y 0.5: v' = 0.5 u = 1, one row down
    moved = A.affine(dot, shear_y=0.5, mode="nearest")
    assert moved[0, 0, 4, 5] == 1.0 and moved.sum() == 1.0


def test_brightness_contrast_color_against_formulas():
    x = rand(2, 3, 4, 4)
    f = torch.tensor([0.5, 1.8])
    assert_close(A.brightness(x, f), (f.view(2, 1, 1, 1) * x).clamp(0, 1))
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (B, H, W)
    mean = gray.mean((1, 2)).view(2, 1, 1, 1)
    assert_close(A.contrast(x, f), (f.view(2, 1, 1, 1) * x + (1 - f.view(2, 1, 1, 1)) * mean).clamp(0, 1))
    assert_close(A.contrast(x[:, :1], 0.0), x[:, :1].mean((1, 2, 3), keepdim=True).expand(2, 1, 4, 4))
    assert_close(A.color(x, 0.0), gray[:, None].expand(2, 3, 4, 4))
    assert_close(A.color(x[:, :1], 0.0), x[:, :1])


def test_solarize_and_posterize_against_formulas():
    x = torch.tensor([0.2, 0.5, 0.9, 0.6]).view(1, 1, 2, 2)
    assert_close(A.solarize(x, 0.5), torch.tensor([0.2, 0.5, 0.1, 0.4]).view(1, 1, 2, 2))
    assert_close(A.posterize(torch.full((1, 1, 1, 1), 0.6), 1), torch.full((1, 1, 1, 1), 128 / 255))
    levels = torch.tensor([0, 7, 153, 255]).view(1, 1, 2, 2)
    assert_close(A.posterize(levels / 255, 4), (levels & 0xF0) / 255)
    assert_close(A.posterize(levels / 255, torch.tensor([8])), levels / 255)


def test_autocontrast_maps_min_to_0_and_max_to_1():
    x = torch.stack([torch.tensor([[0.2, 0.4], [0.6, 0.3]]), torch.full((2, 2), 0.7)])[None]  # (1, 2, 2, 2)
    out = A.autocontrast(x)
    assert_close(out[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    assert_close(out[0, 1], x[0, 1])  # a constant channel is unchanged


def reference_equalize(channel: torch.Tensor) -> torch.Tensor:
    """torchvision's / PIL's equalize of one (H, W) channel in 8-bit levels."""
    hist = torch.histc(channel.float(), bins=256, min=0, max=255)
    step = torch.div(hist[hist != 0][:-1].sum(), 255, rounding_mode="floor")
    if step == 0:
        return channel
    lut = torch.div(torch.cumsum(hist, 0) + torch.div(step, 2, rounding_mode="floor"), step, rounding_mode="floor")
    lut = torch.cat([torch.zeros(1), lut[:-1]]).clamp(0, 255)
    return lut[channel.long()]


def test_equalize_against_reference_and_two_levels():
    two = torch.full((1, 1, 32, 32), 51 / 255)
    two[..., 16:, :] = 204 / 255
    assert_close(A.equalize(two), (two > 0.5).float())  # 512 pixels per level: step 2, levels -> 0 and 255
    levels = torch.randint(0, 256, (2, 3, 20, 20), generator=torch.Generator().manual_seed(0))
    levels[0, 1] = levels[0, 1] // 64  # four levels
    levels[1, 2] = 9  # constant: step 0
    expected = torch.stack([torch.stack([reference_equalize(ch) for ch in img]) for img in levels])
    assert_close(A.equalize(levels / 255), expected / 255)


def test_sharpness_of_constant_image_and_against_kernel():
    assert_close(A.sharpness(torch.full((2, 3, 5, 5), 0.4), 1.7), torch.full((2, 3, 5, 5), 0.4))
    x = rand(1, 1, 4, 5)
    smooth = x.clone()
    for i in range(1, 3):
        for j in range(1, 4):
            smooth[0, 0, i, j] = (x[0, 0, i - 1 : i + 2, j - 1 : j + 2].sum() + 4 * x[0, 0, i, j]) / 13
    assert_close(A.sharpness(x, 0.0), smooth)
    assert_close(A.sharpness(x, 0.5), (0.5 * x + 0.5 * smooth).clamp(0, 1))


def test_mixup_images_and_targets():
    x, labels = rand(4, 1, 3, 3), torch.tensor([0, 1, 2, 3])
    targets, perm = torch.eye(5)[labels], torch.tensor([1, 2, 3, 0])
    lam = torch.tensor([0.3, 0.5, 0.9, 1.0])
    out, soft = A.mixup(x, targets, lam, perm)
    assert_close(soft.sum(1), torch.ones(4))
    assert_close(soft, lam[:, None] * targets + (1 - lam[:, None]) * targets[perm])
    assert_close(out, lam.view(4, 1, 1, 1) * x + (1 - lam.view(4, 1, 1, 1)) * x[perm])


def test_cutmix_lambda_is_the_kept_fraction():
    b, h, w = 32, 6, 5
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, h, w) / b  # each sample one value
    targets, perm = torch.eye(b), torch.roll(torch.arange(b), 1)
    boxes = A.cutmix_boxes(0.4, b, h, w, torch.Generator().manual_seed(0))
    out, soft = A.cutmix(x, targets, perm, boxes)
    kept = (out == x).float().mean((1, 2, 3))
    assert_close(soft[torch.arange(b), torch.arange(b)], kept)
    assert_close(soft[torch.arange(b), perm], 1 - kept)
    assert_close(soft.sum(1), torch.ones(b))
    assert len(set(kept.tolist())) > 1  # clipping at the border changed some boxes' area


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_batched_equals_per_sample(channels):
    ra = A.RandAugment(2, 12)
    n = len(ra.op_names(channels))
    assert ("color" in ra.op_names(channels)) == (channels == 3)
    x = rand(n, channels, 10, 10)
    ops = torch.stack([torch.arange(n), torch.randperm(n, generator=torch.Generator().manual_seed(0))])
    signs = torch.randint(0, 2, (2, n), generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = ra.apply(x, ops, signs)
    expected = torch.cat([ra.apply(x[i : i + 1], ops[:, i : i + 1], signs[:, i : i + 1]) for i in range(n)])
    assert_close(out, expected)
    assert out.min() >= 0 and out.max() <= 1
    drawn = ra(x, torch.Generator().manual_seed(2))
    assert_close(drawn, ra(x, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="magnitude=31"):
        A.RandAugment(2, 31)


def test_randaugment_translate_cap():
    table = A.RandAugment(1, 30).ops(28, 28)
    dot = torch.zeros(1, 1, 28, 28)
    dot[0, 0, 14, 14] = 1.0
    moved = table["translate_x"](dot, torch.tensor([1.0]))
    assert moved[0, 0, 14, 14 + round(0.2 * 28)] == 1.0  # 0.2 of the size below 32 pixels
    assert A.RandAugment(1, 30).ops(64, 64)["translate_x"](torch.eye(64)[None, None], torch.tensor([1.0])).sum() == 35


def heavy(**overrides) -> AugmentConfig:
    return AugmentConfig.from_level("heavy", rotate=10.0, cutmix_alpha=1.0, **overrides)


@pytest.mark.parametrize("channels", [1, 3])
def test_augmenter_reproducible_per_epoch(channels):
    x, labels = rand(16, channels, 12, 12), torch.arange(16) % 10
    first = A.Augmenter(heavy(), num_classes=10, seed=3)
    outs = []
    for epoch in range(2):
        first.set_epoch(epoch)
        outs.append(first(x, labels))
    resumed = A.Augmenter(heavy(), num_classes=10, seed=3)
    resumed.set_epoch(1)
    again = resumed(x, labels)
    assert_close(again, outs[1])
    assert not torch.equal(outs[0][0], outs[1][0])
    for images, targets in outs:
        assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
        assert targets.dtype == torch.float32 and targets.shape == (16, 10)
        assert_close(targets.sum(1), torch.ones(16))
    other_seed = A.Augmenter(heavy(seed=1), num_classes=10, seed=3)
    other_seed.set_epoch(1)
    assert not torch.equal(other_seed(x, labels)[0], outs[1][0])


def test_augmenter_targets_kind_follows_mixes():
    x, labels = rand(8, 1, 8, 8), torch.arange(8)
    plain = A.Augmenter(AugmentConfig.from_level("light", rotate=15.0), num_classes=8)
    images, targets = plain(x, labels)
    assert targets.dtype == torch.int64 and torch.equal(targets, labels) and not torch.equal(images, x)
    unmixed = A.Augmenter(AugmentConfig(mixup_alpha=0.2, mix_prob=1e-12, level="custom"), num_classes=8)
    images, targets = unmixed(x, labels)
    assert_close(targets, torch.eye(8))
    assert_close(images, x)
    for cfg in (AugmentConfig(cutmix_alpha=1.0, level="custom"), AugmentConfig(mixup_alpha=0.4, level="custom")):
        images, targets = A.Augmenter(cfg, num_classes=8)(x, labels)
        assert targets.shape == (8, 8) and not torch.equal(targets, torch.eye(8))
    with pytest.raises(ValueError, match="torch.uint8"):
        plain(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), labels[:2])


def test_levels_build_configs():
    assert set(A.LEVELS) == {"none", "light", "medium", "heavy", "natural-light", "natural-medium", "natural-heavy"}
    for name in A.LEVELS:
        cfg = AugmentConfig.from_level(name)
        assert cfg.level == name and cfg.enabled == (name != "none")
        assert cfg.mixes == (name in ("medium", "heavy", "natural-medium", "natural-heavy"))
        assert cfg.hflip == name.startswith("natural") and cfg.crop_padding == (4 if cfg.hflip else 2 * cfg.enabled)
    assert AugmentConfig.from_level("light").level == "light"
    assert AugmentConfig.from_level("light", seed=4).level == "light"
    assert AugmentConfig.from_level("medium", mixup_alpha=0.3).level == "custom"


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="randaug_magnitude=31"):
        AugmentConfig(randaug_magnitude=31)
    with pytest.raises(ValueError, match="extreme"):
        AugmentConfig.from_level("extreme")
