"""The in-memory dataset types, per-channel statistics and the seeded validation split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vitbn.errors import UserError

# Images per chunk when computing statistics: bounds the int64 copy bincount needs to ~chunk * H * W * 8 bytes.
_STATS_CHUNK = 4096


@dataclass
class Split:
    """Images and labels of one split, in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"Split.images must be a (N, C, H, W) uint8 tensor, got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            got = f"{tuple(self.labels.shape)} {self.labels.dtype}"
            raise ValueError(f"Split.labels must be a (N,) int64 tensor, got {got}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: torch.Tensor) -> Split:
        """The images and labels at ``index`` (a 1-D int64 tensor), as a new split."""
        return Split(self.images.index_select(0, index), self.labels.index_select(0, index))

    def head(self, n: int | None) -> Split:
        """The first ``n`` images (all of them if ``n`` is None or at least the split's size); views, no copy."""
        return self if n is None or n >= len(self) else Split(self.images[:n], self.labels[:n])


@dataclass
class Dataset:
    """A dataset's train and test splits with what a model and a loader need to know about it."""

    name: str
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    shape: tuple[int, int, int]  # (C, H, W)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class PreparedData:
    """What a training run uses: train (less the validation images), validation (or None) and test splits."""

    train: Split
    val: Split | None
    test: Split
    info: Dataset  # the whole dataset: classes, mean, std, shape

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def mean(self) -> tuple[float, ...]:
        return self.info.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.info.std

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.shape


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images on the [0, 1] scale.

    Works from a 256-bin histogram per channel, in chunks, so it needs no float copy of the whole set.
    A constant channel gets std 1.0 rather than 0, which would divide by zero when normalizing.

    Args:
        images: (N, C, H, W) uint8.

    Returns:
        ``(mean, std)``, one float per channel.
    """
    n, c = images.shape[:2]
    if n == 0:
        raise UserError("cannot compute normalization statistics of an empty training set")
    counts = torch.zeros(c, 256, dtype=torch.float64)
    for start in range(0, n, _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].transpose(0, 1).reshape(c, -1).long()  # (C, n_chunk*H*W)
        for ch in range(c):
            counts[ch] += torch.bincount(chunk[ch], minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(dim=1)
    mean = (counts * values).sum(dim=1) / total
    var = ((counts * values**2).sum(dim=1) / total - mean**2).clamp_min(0.0)
    std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    """Raises a one-line UserError naming ``source`` if a label is outside ``[0, num_classes)``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise UserError(
            f"{source}: label {int(bad[0])} is outside the class range 0..{num_classes - 1} "
            f"({bad.size} label(s) out of range)"
        )


def split_validation(split: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Carves a seeded random validation set out of a training split.

    Both parts keep the original order of their images, so the result depends only on ``(len(split), val_size,
    seed)``.

    Args:
        split: The training split.
        val_size: Images for validation (0 gives an empty validation split).
        seed: Seeds the choice of the validation images.

    Returns:
        ``(train, val)``.

    Raises:
        UserError: ``val_size`` is negative or leaves no training image.
    """
    if val_size < 0 or val_size >= len(split):
        raise UserError(f"val_size={val_size} must be >= 0 and < the {len(split)} training images")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(split), generator=generator)
    val_index, _ = perm[:val_size].sort()
    train_index, _ = perm[val_size:].sort()
    return split.select(train_index), split.select(val_index)


def split_stratified(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Holds out ``round(fraction * n_k)`` images of each class k (seeded) for validation.

    The class proportions of the validation split equal those of the training split up to rounding, and both
    parts keep the original order of their images.

    Args:
        split: The training split.
        fraction: Per-class fraction for validation, in (0, 0.5].
        seed: Seeds the choice within each class.

    Returns:
        ``(train, val)``.

    Raises:
        UserError: ``fraction`` is outside (0, 0.5] or leaves a class without validation images.
    """
    if not 0.0 < fraction <= 0.5:
        raise UserError(f"val_fraction={fraction!r} must be in (0, 0.5]")
    generator = torch.Generator().manual_seed(seed)
    labels = split.labels
    chosen = []
    for k in torch.unique(labels).tolist():
        members = (labels == k).nonzero().flatten()  # (n_k,) indices of class k, in order
        take = round(fraction * len(members))
        if take == 0:
            raise UserError(
                f"val_fraction={fraction} holds out no image of class {k} ({len(members)} image(s)); "
                "use a larger fraction or more training images"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.cat(chosen)] = True
    return split.select(torch.nonzero(~is_val).flatten()), split.select(torch.nonzero(is_val).flatten())
