"""AugReg-style training augmentation (Steiner et al. 2021) of batched image tensors, on their own device.

Every function takes float images in [0, 1] of shape (B, C, H, W), C = 1 or 3, with per-sample parameters as (B,)
tensors (or scalars, shared by the batch); none loops over samples in Python. ``RandAugment`` draws its ops per
sample and runs each op once, on the samples that drew it, so a batch costs O(ops) kernels. ``Augmenter`` chains
what a training step needs: random crop, horizontal flip, random rotation, RandAugment, then Mixup or CutMix with
soft targets.

The named levels are configuration (``vitbn.config.AUGMENT_LEVEL_SETTINGS``, re-exported here as ``LEVELS``):
AugReg's light / medium / heavy scaled down for 28x28 digits (no flips, 2-pixel translations), and natural-* levels
for natural images (pad-4 random crop and horizontal flip).

Choices worth knowing:
    * Magnitudes follow torchvision's scale (0..30, 30 = an op's largest change): rotate up to 30 degrees, shear up
      to 0.3, brightness / contrast / sharpness / color factors 1 +- 0.9 m/30, solarize threshold 1 - m/30,
      posterize to 8 - round(4 m/30) bits. Signed ops get a random sign per sample.
    * Translation moves by whole pixels, up to ``translate_max`` of the size at m = 30: torchvision's 0.45 for images
      of 32 pixels or more, 0.2 below (0.45 would push a 28x28 digit 13 pixels, out of the frame).
    * Geometric ops turn and shear about the image centre with bilinear sampling and zero fill; positive angles turn
      counter-clockwise (as ``torch.rot90``); ``shear_x`` s maps pixel (u, v) to (u + s v, v) (y pointing down).
    * Mixup and CutMix draw one lambda per batch (timm's default) and pair sample i with sample perm[i] of a random
      permutation; CutMix's lambda is corrected to the pasted area inside the image. The per-batch draws (mix or
      not, which, lambda) come from a CPU NumPy generator, the per-sample ones from a ``torch.Generator`` on the
      images' device, both seeded by (seed, cfg.seed, epoch), so the augmenter never waits on the device for them.
      RandAugment's ops and signs are drawn on the CPU (the same generator on a CPU; on a GPU a CPU generator with
      that seed): the host needs the group sizes, and counting them there costs no sync with the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vitbn.config import AUGMENT_LEVEL_SETTINGS, RANDAUG_MAX_MAGNITUDE, AugmentConfig
from vitbn.data.loader import epoch_seed

Param = torch.Tensor | float
Boxes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (top, bottom, left, right), each (B,)

LEVELS = AUGMENT_LEVEL_SETTINGS
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision
SMALL_IMAGE = 32  # images smaller than this (in pixels, either side) get the smaller translation cap
MODES = ("bilinear", "nearest")


def _per_sample(value: Param, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) parameter as a (B, 1, 1, 1) tensor in x's dtype on x's device. A Python number is filled
    in on the device: copying it there from the host would wait for the GPU."""
    if isinstance(value, (int, float)):
        return x.new_full((x.shape[0], 1, 1, 1), float(value))
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


def _shifts(value: Param, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) integer shift as a (B,) int64 tensor on x's device (a Python number filled in there)."""
    if isinstance(value, (int, float)):
        return torch.full((x.shape[0],), int(value), dtype=torch.long, device=x.device)
    return torch.as_tensor(value, device=x.device).long().reshape(-1).expand(x.shape[0])


# ----------------------------------------------------------------------------------------------- geometric


def translate(x: torch.Tensor, dx: Param, dy: Param) -> torch.Tensor:
    """Shifts each image by whole pixels, ``dx`` right and ``dy`` down, filling with zeros.

    Equals ``torch.roll(x[b], (dy[b], dx[b]), dims=(-2, -1))`` with the wrapped-around pixels zeroed.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device) - _shifts(dy, x)[:, None]  # (B, H): source row of each output row
    cols = torch.arange(w, device=x.device) - _shifts(dx, x)[:, None]  # (B, W)
    out = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(b, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(b, c, h, w))
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    return out.masked_fill(~inside, 0)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad-and-crop: a translation by integers drawn uniformly in [-padding, padding] per axis and sample."""
    shape, dev = (2, x.shape[0]), generator.device
    d = torch.randint(-padding, padding + 1, shape, generator=generator, device=dev).to(x.device)
    return translate(x, d[0], d[1])


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirrors each image left-right with probability ``p`` (one draw per sample)."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def affine_matrix(
    x: torch.Tensor, angle_deg: Param = 0.0, shear_x: Param = 0.0, shear_y: Param = 0.0,
    translate_x: Param = 0.0, translate_y: Param = 0.0,
) -> torch.Tensor:  # fmt: skip
    """The (B, 2, 3) forward maps ``p -> R(angle) Sy Sx p + t`` in pixels about the centre (x right, y down).

    R turns counter-clockwise on screen; Sx = [[1, shear_x], [0, 1]], Sy = [[1, 0], [shear_y, 1]].
    """
    angle, sx, sy, tx, ty = (
        _per_sample(p, x).reshape(-1) for p in (angle_deg, shear_x, shear_y, translate_x, translate_y)
    )
    cos, sin = torch.cos(torch.deg2rad(angle)), torch.sin(torch.deg2rad(angle))
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], 1)  # (B, 2, 2)
    one = torch.ones_like(sx)
    shear = torch.stack([torch.stack([one, sx], -1), torch.stack([sy, sx * sy + one], -1)], 1)  # Sy @ Sx
    return torch.cat([rot @ shear, torch.stack([tx, ty], -1)[:, :, None]], 2)


def warp(x: torch.Tensor, matrix: torch.Tensor, *, mode: str = "bilinear") -> torch.Tensor:
    """Applies per-sample forward maps (B, 2, 3) in centred pixel coordinates (see ``affine_matrix``), zero fill."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    b, c, h, w = x.shape
    a, t = matrix[:, :, :2].to(x.dtype), matrix[:, :, 2:].to(x.dtype)  # (B, 2, 2), (B, 2, 1)
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    inv = torch.stack([torch.stack([a[:, 1, 1], -a[:, 0, 1]], -1), torch.stack([-a[:, 1, 0], a[:, 0, 0]], -1)], 1)
    inv = inv / det[:, None, None]
    # Output -> input in normalized coordinates (align_corners=False): n = S u, S = diag(2 / W, 2 / H).
    scale = torch.stack([x.new_full((), 2.0 / w), x.new_full((), 2.0 / h)])  # filled on the device: no host copy
    lin = scale[None, :, None] * inv / scale[None, None, :]  # S A^-1 S^-1
    theta = torch.cat([lin, -scale[None, :, None] * (inv @ t)], 2)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def affine(
    x: torch.Tensor, angle_deg: Param = 0.0, shear_x: Param = 0.0, shear_y: Param = 0.0,
    translate_x: Param = 0.0, translate_y: Param = 0.0, *, mode: str = "bilinear",
) -> torch.Tensor:  # fmt: skip
    """Rotation, shears and (sub-pixel) translation about the image centre; see ``affine_matrix``."""
    return warp(x, affine_matrix(x, angle_deg, shear_x, shear_y, translate_x, translate_y), mode=mode)


def rotate(x: torch.Tensor, angle_deg: Param, *, mode: str = "bilinear") -> torch.Tensor:
    """Turns each image counter-clockwise by ``angle_deg`` about its centre (90 on a square equals ``rot90``)."""
    return affine(x, angle_deg, mode=mode)


# --------------------------------------------------------------------------------------------- photometric


def _blend(image: torch.Tensor, other: torch.Tensor, factor: Param) -> torch.Tensor:
    """``factor * image + (1 - factor) * other``, clamped to [0, 1] (PIL's ImageEnhance)."""
    f = _per_sample(factor, image)
    return (f * image + (1 - f) * other).clamp(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma; a single channel is returned as it is."""
    if x.shape[1] == 1:
        return x
    weights = torch.stack([x.new_full((), w) for w in GRAY_WEIGHTS])  # filled on the device: no host copy
    return (x * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def brightness(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend with black: ``clamp(factor * x)``."""
    return _blend(x, torch.zeros_like(x), factor)


def contrast(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend with the per-image mean of the grayscale image."""
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def color(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Saturation: blend an RGB image with its grayscale; a single-channel image is returned unchanged."""
    return x if x.shape[1] == 1 else _blend(x, grayscale(x), factor)


def sharpness(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend with PIL's smoothed image (kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; border pixels kept)."""
    b, c, h, w = x.shape
    if h < 3 or w < 3:
        return x
    kernel = x.new_ones(3, 3)  # [[1, 1, 1], [1, 5, 1], [1, 1, 1]], filled on the device: no host copy
    kernel[1, 1] = 5.0
    kernel = kernel.view(1, 1, 3, 3) / 13
    smooth = F.conv2d(x.reshape(b * c, 1, h, w), kernel).view(b, c, h - 2, w - 2)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, factor)


def solarize(x: torch.Tensor, threshold: Param) -> torch.Tensor:
    """Inverts the pixels at or above ``threshold``."""
    return torch.where(x >= _per_sample(threshold, x), 1 - x, x)


def _to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).long()


def posterize(x: torch.Tensor, bits: Param) -> torch.Tensor:
    """Keeps the top ``bits`` (0..8) bits of each pixel's 8-bit value."""
    if isinstance(bits, int):  # filled on the device: no host copy
        keep = torch.full((1, 1, 1, 1), bits, dtype=torch.long, device=x.device)
    else:
        keep = torch.as_tensor(bits, device=x.device).long().reshape(-1, 1, 1, 1)
    mask = 256 - 2 ** (8 - keep)  # bits=1: 0b10000000
    return (_to_uint8_levels(x) & mask).to(x.dtype) / 255


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel, maps min..max to 0..1; a constant channel is unchanged."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = hi <= lo
    lo = lo.masked_fill(flat, 0)
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    return ((x - lo) / span).clamp(0, 1)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel histogram equalization of the 8-bit values, by PIL's rule (``ImageOps.equalize``).

    step = (pixels below the highest value present) // 255; lut[i] = (pixels below i + step // 2) // step;
    a channel with step 0 is unchanged.
    """
    b, c, h, w = x.shape
    v = _to_uint8_levels(x).reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    step = (h * w - hist.gather(1, v.amax(1, keepdim=True))) // 255  # (B*C, 1)
    below = torch.cat([torch.zeros_like(step), hist.cumsum(1)[:, :-1]], 1)  # (B*C, 256): pixels below each level
    lut = ((below + step // 2) // step.clamp_min(1)).clamp(0, 255)
    out = (lut.gather(1, v).to(x.dtype) / 255).view(b, c, h, w)
    return torch.where((step > 0).view(b, c, 1, 1), out, x)


# -------------------------------------------------------------------------------------------------- mixing


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: Param, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blends sample i with sample perm[i]: images and (B, K) targets become ``lam * a + (1 - lam) * b``."""
    mix = _per_sample(lam, x)
    mix_t = mix.reshape(-1, 1).to(targets.dtype)
    return mix * x + (1 - mix) * x[perm], mix_t * targets + (1 - mix_t) * targets[perm]


def cutmix_boxes(lam: Param, batch: int, height: int, width: int, generator: torch.Generator) -> Boxes:
    """CutMix boxes of side ``sqrt(1 - lam)`` times the image's, centred uniformly, clipped to the image (timm)."""
    dev = generator.device
    # a Python lam is filled in on the device (copying it there from the host would wait for the GPU)
    lam = torch.full((), lam, device=dev) if isinstance(lam, (int, float)) else torch.as_tensor(lam, device=dev)
    ratio = (1 - lam.to(torch.float32)).clamp(0, 1).sqrt().reshape(-1).expand(batch)
    boxes = []
    for size, cut in ((height, (ratio * height).long()), (width, (ratio * width).long())):
        centre = torch.randint(0, size, (batch,), generator=generator, device=dev)
        start = centre - cut // 2
        boxes += [start.clamp(0, size), (start + cut).clamp(0, size)]
    return boxes[0], boxes[1], boxes[2], boxes[3]


def cutmix(
    x: torch.Tensor, targets: torch.Tensor, perm: torch.Tensor, boxes: Boxes
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pastes box ``[top, bottom) x [left, right)`` of sample perm[i] into sample i.

    The (B, K) targets become ``lam * a + (1 - lam) * b`` with lam the fraction of sample i's pixels kept.
    """
    h, w = x.shape[-2:]
    top, bottom, left, right = (t.to(x.device) for t in boxes)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])  # (B, W)
    pasted = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (B, 1, H, W)
    lam = 1 - ((bottom - top) * (right - left)).to(targets.dtype)[:, None] / (h * w)  # (B, 1)
    return torch.where(pasted, x[perm], x), lam * targets + (1 - lam) * targets[perm]


# ---------------------------------------------------------------------------------------------- RandAugment

OPS = (
    "identity", "autocontrast", "equalize", "rotate", "solarize", "posterize", "contrast", "brightness", "sharpness",
    "shear_x", "shear_y", "translate_x", "translate_y", "color",
)  # fmt: skip
Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images (n, C, H, W), signs (n,)) -> images


class RandAugment:
    """RandAugment (Cubuk et al. 2020): ``num_ops`` ops per image, drawn uniformly per sample, at one magnitude.

    Args:
        num_ops: Ops applied to each image, one after the other.
        magnitude: 0..30 on torchvision's scale (see the module docstring).
        translate_max: Largest translation, as a fraction of the size, at magnitude 30; None: 0.45 for images of
            32 pixels or more, 0.2 for smaller ones.
        mode: Sampling of the rotation and shears, "bilinear" or "nearest".
    """

    def __init__(
        self, num_ops: int, magnitude: float, *, translate_max: float | None = None, mode: str = "bilinear"
    ) -> None:
        if not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops={num_ops!r} must be an integer >= 0")
        if not 0 <= magnitude <= RANDAUG_MAX_MAGNITUDE:
            raise ValueError(f"magnitude={magnitude!r} must be in [0, {RANDAUG_MAX_MAGNITUDE}]")
        if translate_max is not None and not 0 <= translate_max <= 1:
            raise ValueError(f"translate_max={translate_max!r} must be in [0, 1] or None")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.num_ops, self.magnitude, self.translate_max, self.mode = num_ops, magnitude, translate_max, mode

    @staticmethod
    def op_names(channels: int) -> tuple[str, ...]:
        """The ops drawn from for images with ``channels`` channels (color only for RGB)."""
        return OPS if channels == 3 else OPS[:-1]

    def ops(self, height: int, width: int) -> dict[str, Op]:
        """Each op at this magnitude for images of this size, as ``op(images, signs)``."""
        m = self.magnitude / RANDAUG_MAX_MAGNITUDE
        cap = (
            self.translate_max
            if self.translate_max is not None
            else (0.45 if min(height, width) >= SMALL_IMAGE else 0.2)
        )
        dx, dy = round(cap * width * m), round(cap * height * m)
        bits = 8 - round(4 * m)
        return {
            "identity": lambda x, s: x,
            "autocontrast": lambda x, s: autocontrast(x),
            "equalize": lambda x, s: equalize(x),
            "rotate": lambda x, s: rotate(x, 30.0 * m * s, mode=self.mode),
            "solarize": lambda x, s: solarize(x, 1.0 - m),
            "posterize": lambda x, s: posterize(x, bits),
            "contrast": lambda x, s: contrast(x, 1 + 0.9 * m * s),
            "brightness": lambda x, s: brightness(x, 1 + 0.9 * m * s),
            "sharpness": lambda x, s: sharpness(x, 1 + 0.9 * m * s),
            "shear_x": lambda x, s: affine(x, shear_x=0.3 * m * s, mode=self.mode),
            "shear_y": lambda x, s: affine(x, shear_y=0.3 * m * s, mode=self.mode),
            "translate_x": lambda x, s: translate(x, dx * s, 0),
            "translate_y": lambda x, s: translate(x, 0, dy * s),
            "color": lambda x, s: color(x, 1 + 0.9 * m * s),
        }

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws (num_ops, B) ops and signs from ``generator`` and applies them (see ``apply``). Give a CPU
        generator for images on a GPU: the group sizes are then counted on the host without waiting for the GPU."""
        shape, dev, n = (self.num_ops, x.shape[0]), generator.device, len(self.op_names(x.shape[1]))
        ops = torch.randint(0, n, shape, generator=generator, device=dev)
        signs = torch.randint(0, 2, shape, generator=generator, device=dev) * 2 - 1
        return self.apply(x, ops, signs)

    def apply(self, x: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Applies op ``ops[k, i]`` (an index into ``op_names(C)``) with sign ``signs[k, i]`` to image i, k in order.

        Per slot the samples are grouped by op (a stable argsort), each group goes through its op once, and the
        results are written back in place. The group sizes are counted where ``ops`` lives: on the CPU that costs
        nothing, on a GPU one host sync for all slots.
        """
        names = self.op_names(x.shape[1])
        table = self.ops(*x.shape[-2:])
        counts = F.one_hot(ops, len(names)).sum(1).tolist()  # (num_ops, n_ops)
        ops, signs = ops.to(x.device, non_blocking=True), signs.to(x.device, non_blocking=True)
        for slot_ops, slot_signs, slot_counts in zip(ops, signs, counts):
            order = torch.argsort(slot_ops, stable=True)
            groups = zip(names, x[order].split(slot_counts), slot_signs[order].to(x.dtype).split(slot_counts))
            parts = [table[name](part, s) if len(part) and name != "identity" else part for name, part, s in groups]
            x = torch.empty_like(x).index_copy_(0, order, torch.cat(parts))
        return x


# ------------------------------------------------------------------------------------------------ Augmenter


class Augmenter:
    """A training step's augmentation: crop, flip, rotation, RandAugment, then Mixup or CutMix (``AugmentConfig``).

    Args:
        cfg: What to apply.
        num_classes: Width of the soft targets.
        seed: The run's seed, mixed with ``cfg.seed`` and the epoch.
    """

    def __init__(self, cfg: AugmentConfig, *, num_classes: int, seed: int = 0) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
        self.cfg, self.num_classes, self.seed, self.epoch = cfg, num_classes, seed, 0
        self.randaug = RandAugment(cfg.randaug_ops, cfg.randaug_magnitude) if cfg.randaug_ops else None
        self._generator: torch.Generator | None = None
        self._host: torch.Generator | None = None  # RandAugment's draws: a CPU generator (see _reseed)
        self._rng = np.random.default_rng(0)

    def set_epoch(self, epoch: int) -> None:
        """Restarts the random streams at ``epoch``'s seed, so an epoch's augmentation is the same after a resume."""
        self.epoch = epoch
        if self._generator is not None:
            self._reseed(self._generator.device)

    def _reseed(self, device: torch.device) -> None:
        seed = epoch_seed(epoch_seed(self.seed, self.cfg.seed), self.epoch)
        self._generator = torch.Generator(device=device).manual_seed(seed)
        # RandAugment's op draws decide the group sizes the host needs: drawn on the CPU, they never wait for a
        # GPU. On the CPU it is the one generator (the stream as before); on a GPU a CPU one with the same seed.
        self._host = self._generator if self._generator.device.type == "cpu" else torch.Generator().manual_seed(seed)
        self._rng = np.random.default_rng(seed)

    def __call__(self, x01: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments a batch: (B, C, H, W) images in [0, 1] and (B,) int labels -> images in [0, 1] and targets.

        The targets are the int64 labels when ``cfg.mixes`` is False, else float32 (B, num_classes) probability
        rows, one-hot for a batch that was not mixed. The generator follows the device of the first batch (a batch
        on another device restarts the epoch's stream there).
        """
        if x01.ndim != 4 or not x01.is_floating_point():
            raise ValueError(
                f"expected float images (B, C, H, W) in [0, 1], got {x01.dtype} of shape {tuple(x01.shape)}"
            )
        if labels.shape != x01.shape[:1]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match {x01.shape[0]} images")
        if self._generator is None or self._generator.device != x01.device:
            self._reseed(x01.device)
        g, cfg = self._generator, self.cfg
        x = x01 if x01.dtype in (torch.float32, torch.float64) else x01.float()  # half precision: ops in fp32
        if cfg.crop_padding:
            x = random_crop(x, cfg.crop_padding, g)
        if cfg.hflip:
            x = random_hflip(x, g)
        if cfg.rotate:
            x = rotate(x, torch.rand(x.shape[0], generator=g, device=g.device) * (2 * cfg.rotate) - cfg.rotate)
        if self.randaug is not None:
            x = self.randaug(x, self._host)
        if not cfg.mixes:
            return x.to(x01.dtype), labels.long()
        targets = F.one_hot(labels.long(), self.num_classes).float()
        if self._rng.random() < cfg.mix_prob:
            x, targets = self._mix(x, targets)
        return x.to(x01.dtype), targets

    def _mix(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or CutMix (one of them at p = 0.5 when both are on), with one lambda for the batch."""
        cfg, g, (b, _, h, w) = self.cfg, self._generator, x.shape
        use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or self._rng.random() < 0.5)
        alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
        lam = float(self._rng.beta(alpha, alpha))
        perm = torch.randperm(b, generator=g, device=g.device).to(x.device)
        if use_cutmix:
            return cutmix(x, targets, perm, cutmix_boxes(lam, b, h, w, g))
        return mixup(x, targets, lam, perm)


__all__ = [
    "LEVELS", "OPS", "Augmenter", "RandAugment", "affine", "affine_matrix", "autocontrast", "brightness", "color",
    "contrast", "cutmix", "cutmix_boxes", "equalize", "grayscale", "mixup", "posterize", "random_crop", "random_hflip",
    "rotate", "sharpness", "solarize", "translate", "warp",
]  # fmt: skip
