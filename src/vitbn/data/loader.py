"""Batches from uint8 images held on the training device, normalized on the fly.

The images are moved to the device once. An epoch is a permutation drawn from a generator seeded by
``(seed, epoch)``, so any epoch's order can be reproduced (``set_epoch``) after a restart. A batch is one
``index_select`` on the device tensor and one fused multiply-add, ``x * scale + shift`` with
``scale = 1 / (255 std)`` and ``shift = -mean / std`` per channel, which equals ``(x / 255 - mean) / std``.
There is no per-sample Python in the loop. An ``augment`` callable (``vitbn.data.augment.Augmenter``) works on
the batch in [0, 1] before the normalization, on the same device, inside the timed epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from vitbn.data.base import Split

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed mixing ``seed`` and ``epoch`` (distinct pairs give unrelated streams)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _per_channel(name: str, values: float | Sequence[float] | torch.Tensor, channels: int) -> torch.Tensor:
    """A (C,) float64 tensor from a scalar, a 1-sequence (broadcast) or a C-sequence."""
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values; the images have {channels} channel(s)")
    return t.clone()


class InMemoryLoader:
    """Iterates over ``(x, y)`` batches: x (B, C, H, W) normalized in ``dtype``, y (B,) int64, both on ``device``.

    Args:
        split: The images (uint8) and labels.
        batch_size: Images per batch.
        mean: Per-channel mean on the [0, 1] scale (one value is used for every channel).
        std: Per-channel std on the [0, 1] scale.
        shuffle: A new seeded permutation per epoch; else the split's order.
        seed: Seeds the permutations together with the epoch.
        device: Where the images live and the batches are made.
        dtype: The floating type of x.
        drop_last: Drop the last batch if it is smaller than ``batch_size``.
        max_batches: Stop an epoch after this many batches (smoke runs, tests).
        augment: ``(images in [0, 1], labels) -> (images, targets)`` applied to every batch, with a
            ``set_epoch(epoch)`` that ``set_epoch`` calls; targets may be soft (B, K) rows (Mixup, CutMix).
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        mean: float | Sequence[float] | torch.Tensor,
        std: float | Sequence[float] | torch.Tensor,
        shuffle: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
        max_batches: int | None = None,
        augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches <= 0):
            raise ValueError(f"max_batches={max_batches!r} must be a positive integer or None")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype={dtype} is not one of {', '.join(str(d) for d in FLOAT_DTYPES)}")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        channels = split.images.shape[1]
        mean64, std64 = _per_channel("mean", mean, channels), _per_channel("std", std, channels)
        if not bool((std64 > 0).all()):
            raise ValueError(f"std={std64.tolist()} must be > 0 in every channel")
        self.device = torch.device(device)
        self.images = split.images.to(self.device).contiguous()  # (N, C, H, W) uint8, moved once
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.dtype, self.drop_last, self.max_batches = dtype, drop_last, max_batches
        self.augment = augment
        # Half types: compute in float32 and round once, so the error is one rounding of the final value.
        self._compute_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        shape = (1, channels, 1, 1)
        self._scale = (1.0 / (255.0 * std64)).reshape(shape).to(self.device, self._compute_dtype)
        self._shift = (-mean64 / std64).reshape(shape).to(self.device, self._compute_dtype)
        self._scale01 = (1.0 / std64).reshape(shape).to(self.device, self._compute_dtype)  # for [0, 1] input
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose permutation the next iteration uses."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self.epoch = epoch
        if self.augment is not None and hasattr(self.augment, "set_epoch"):
            self.augment.set_epoch(epoch)

    def __len__(self) -> int:
        """The number of batches an epoch yields."""
        n = len(self.labels)
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return batches if self.max_batches is None else min(batches, self.max_batches)

    @property
    def num_samples(self) -> int:
        """The number of images an epoch yields."""
        n = len(self.labels)
        usable = n - n % self.batch_size if self.drop_last else n
        return min(usable, len(self) * self.batch_size)

    def order(self) -> torch.Tensor | None:
        """This epoch's permutation of the indices (on the CPU), or None without shuffling."""
        if not self.shuffle:
            return None
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(len(self.labels), generator=generator)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 on the device -> normalized ``dtype``."""
        x = torch.addcmul(self._shift, images.to(self._compute_dtype), self._scale)
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def augmented(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) uint8 -> ``augment`` in [0, 1] -> normalized ``dtype``, with the augment's targets."""
        x01, targets = self.augment(images.to(self._compute_dtype) / 255.0, labels)
        x = torch.addcmul(self._shift, x01, self._scale01)
        return (x if x.dtype == self.dtype else x.to(self.dtype)), targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = self.order()
        if perm is not None:
            perm = perm.to(self.device)  # one transfer per epoch; batches are slices of it
        total = self.num_samples
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            if perm is None:
                images, labels = self.images[start:stop], self.labels[start:stop]
            else:
                index = perm[start:stop]
                images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
            yield self.augmented(images, labels) if self.augment is not None else (self.normalize(images), labels)
