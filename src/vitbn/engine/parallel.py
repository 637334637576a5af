"""Data-parallel glue of the training loop: each rank's batches, and the collectives that keep ranks in step.

Under ``torchrun`` every rank holds the whole training split and draws the same seeded permutation per epoch;
batch i of rank r is every ``world_size``-th image of the global batch i from position r on (the layout of
``torch.utils.data.DistributedSampler``). So N ranks with B/N images each see, step for step, the batches of
one process with B, and with SyncBN (and DDP's gradient averaging) they train as that process would.
Evaluation splits are cut into contiguous shares whose confusion matrices and loss sums are all-reduced, so
every rank ends an epoch with the same record (and the same decisions: divergence, end of run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vitbn.bn.distributed import DistInfo
from vitbn.engine.evaluate import summarize
from vitbn.errors import UserError


class RankLoader:
    """This rank's part of every batch of an ``InMemoryLoader`` over the whole split.

    Every rank gets the same number of images per batch: a last global batch whose size is not a multiple of
    the world size loses its last images (the whole batch if it has fewer than ``world_size``).

    Args:
        loader: the single-process loader (global batch size, shuffle, seed, ``max_batches``).
        rank: this process's rank.
        world_size: the number of ranks; must divide ``loader.batch_size``.
    """

    def __init__(self, loader, rank: int, world_size: int) -> None:
        if loader.batch_size % world_size:
            raise UserError(
                f"batch_size={loader.batch_size} is the global batch and must be divisible by the "
                f"{world_size} ranks of this run"
            )
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.batch_size = loader.batch_size // world_size
        total, size = loader.num_samples, loader.batch_size
        # images of each global batch this rank keeps; a last batch below world_size images is dropped
        kept = [(min(start + size, total) - start) // world_size for start in range(0, total, size)]
        self._kept = [k for k in kept if k > 0]

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose permutation (the same on every rank) the next iteration uses."""
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def num_samples(self) -> int:
        """The images one epoch yields on this rank."""
        return sum(self._kept)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        inner, size, world = self.loader, self.loader.batch_size, self.world_size
        perm = inner.order()
        index = torch.arange(inner.num_samples) if perm is None else perm[: inner.num_samples]
        index = index.to(inner.device)  # one transfer per epoch; batches are slices of it
        for i, kept in enumerate(self._kept):
            mine = index[i * size : i * size + kept * world][self.rank :: world]  # (kept,)
            yield inner.normalize(inner.images.index_select(0, mine)), inner.labels.index_select(0, mine)


def eval_share(split: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s contiguous share of an evaluation ``Split`` (shares differ by at most one image; all
    images are evaluated once over the ranks)."""
    index = torch.tensor_split(torch.arange(len(split)), world_size)[rank]
    return dataclasses.replace(split, images=split.images[index], labels=split.labels[index])


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over all ranks, in float64 with one all-reduce; call on every rank."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank; call on every rank."""
    return sum_over_ranks([float(flag)])[0] > 0


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; call on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_evaluation(result: dict) -> dict:
    """The metrics of all ranks' shares together, from this rank's ``evaluate`` result: confusion matrices and
    loss sums added, the seconds those of the slowest rank; call on every rank."""
    confusion, n = result["confusion"], result["num_samples"]
    loss_sum = result["loss"] * n if n else 0.0
    totals = sum_over_ranks([*confusion.flatten().double().tolist(), loss_sum])
    slowest = torch.tensor([result["seconds"]], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    summed = torch.tensor(totals[:-1], dtype=torch.float64).round().long().reshape(confusion.shape)
    return summarize(summed, totals[-1], float(slowest))


def seed_rank_epoch(seed: int, epoch: int, info: DistInfo) -> None:
    """Seeds torch's generators from ``(seed, epoch, rank)``: dropout differs between ranks, and an epoch's
    random stream is the same after a resume (the checkpoint holds only rank 0's generator state)."""
    state = np.random.SeedSequence([seed, epoch, info.rank]).generate_state(2, dtype=np.uint32)
    torch.manual_seed((int(state[0]) << 31) ^ int(state[1]))
