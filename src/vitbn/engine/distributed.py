"""Everything distributed, in one module: the ``torchrun`` environment, DDP wrapping with optional SyncBN, each
rank's batches, and the collectives that keep ranks in step.

Launched as ``torchrun --nproc-per-node N -m vitbn train ...``, every rank trains on its shard of the
in-memory data with DDP (gloo on the CPU, NCCL on CUDA). Without SyncBN each rank's BatchNorm normalizes
over its own shard of the batch; with it, over the whole global batch. Tracking and checkpoints are the job
of rank 0 (``is_main_process``).

Under ``torchrun`` every rank holds the whole training split and draws the same seeded permutation per epoch;
batch i of rank r is every ``world_size``-th image of the global batch i from position r on (the layout of
``torch.utils.data.DistributedSampler``). So N ranks with B/N images each see, step for step, the batches of
one process with B, and with SyncBN (and DDP's gradient averaging) they train as that process would. With
augmentation on, each rank augments its own share with its own seeded stream (see ``make_loaders``), so the ranks
do not repeat each other's crops and mixes; a run then matches one process in distribution, not batch for batch.
Evaluation splits are cut into contiguous shares whose confusion matrices and loss sums are all-reduced, so
every rank ends an epoch with the same record (and the same decisions: divergence, end of run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitbn.bn.syncbn import convert_sync_batchnorm, refuse_ghost_bn
from vitbn.engine.checkpoint import unwrap
from vitbn.engine.evaluate import summarize
from vitbn.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "launch with torchrun --nproc-per-node N -m vitbn train ..."
_joined = False  # this process joined a process group (its backend's native threads may outlive it)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; a single process is rank 0 of 1 with no backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" | "nccl" | None (not distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def device(self, device: str | torch.device) -> torch.device:
        """The device of this rank: ``cuda:<local_rank>`` for a CUDA run, else ``device`` unchanged."""
        device = torch.device(device)
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.distributed else device


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} in the environment is not an integer; {LAUNCH_HINT}") from None


def init_distributed(device: str | torch.device = "cpu", *, sync_bn: bool = False) -> DistInfo:
    """Joins the process group that ``torchrun`` describes in the environment, if any.

    Without a torchrun environment this is a single process (``DistInfo()``), unless ``sync_bn`` asks for
    synchronization or a partial environment (``WORLD_SIZE`` without ``RANK``...) says a launch went wrong:
    both are one-line ``UserError``s. Calling it again returns the current group's info.

    Args:
        device: the training device (or "auto"); CUDA selects NCCL (and ``cuda:<LOCAL_RANK>``), anything else
            gloo.
        sync_bn: whether the run asks for SyncBatchNorm.
    """
    present = [name for name in TORCHRUN_VARS if os.environ.get(name)]
    if not present:
        if sync_bn:
            raise UserError(f"--sync-bn needs a distributed run, but RANK/WORLD_SIZE are not set: {LAUNCH_HINT}")
        return DistInfo()
    missing = [name for name in TORCHRUN_VARS if not os.environ.get(name)]
    if missing:
        raise UserError(f"{', '.join(present)} set but {', '.join(missing)} missing: {LAUNCH_HINT}")
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent: need 0 <= RANK < WORLD_SIZE")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    global _joined
    _joined = True
    return DistInfo(rank, world, local_rank, backend)


def destroy_distributed(*, barrier: bool = False) -> None:
    """Leaves the process group, if any.

    Args:
        barrier: meet the other ranks first (after a run that ended the same way on all of them: rank 0's tracking
            and model writes are then done before any rank leaves). Not after an error, where another rank may
            never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def exit_process(code: int) -> int:
    """Ends a process that joined a process group with ``os._exit(code)`` once its output is flushed, so that the
    interpreter never finalizes while the backend's threads live; returns ``code`` in any other process.

    Why: ``destroy_process_group`` does not stop gloo's worker threads while DDP still holds the backend (it
    does, from C++, after the wrapper is gone). A worker thread drops its last reference to an all-reduce's
    tensors just after the caller's ``wait()`` returns; if the main thread is already finalizing the interpreter
    by then (a rank with nothing left to do, on a loaded machine), freeing such a tensor's Python object needs
    the GIL, ``take_gil`` exits the thread during finalization, and the forced unwind through a ``noexcept``
    destructor is ``std::terminate``: "terminate called without an active exception", SIGABRT (seen in a core
    of rank 1: ``AsyncAllreduceWork::~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject`` ->
    ``PyEval_AcquireThread`` -> ``pthread_exit``, the main thread in ``Py_FinalizeEx``).
    """
    if not _joined:
        return code
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing left to flush
            stream.flush()
    os._exit(code)


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard(split: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s share of a data ``Split``: every ``world_size``-th image from ``rank`` on.

    Every rank gets the same number of images (the last ``len % world_size`` are dropped) so that all ranks
    run the same number of steps, and, without shuffling, batch i of the ranks together is batch i of one
    process with ``world_size`` times the batch size.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} and world_size={world_size}: need 0 <= rank < world_size")
    per_rank = len(split) // world_size
    if per_rank == 0:
        raise UserError(f"cannot shard {len(split)} images over {world_size} ranks")
    index = torch.arange(rank, per_rank * world_size, world_size)
    return dataclasses.replace(split, images=split.images[index], labels=split.labels[index])


def wrap_ddp(model: nn.Module, *, sync_bn: bool = False, device: str | torch.device | None = None) -> nn.Module:
    """The model to train: DDP-wrapped in a distributed run (after converting BatchNorm to SyncBatchNorm if
    ``sync_bn``), the model itself otherwise.

    The conversion keeps the parameter objects, so an optimizer may be built before or after. Reach the
    underlying model with ``vitbn.engine.checkpoint.unwrap``.

    Args:
        model: the model.
        sync_bn: synchronize BatchNorm statistics over all ranks.
        device: where the model lives; default: where its parameters are.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if sync_bn:
            raise UserError(f"--sync-bn needs a distributed run (no process group): {LAUNCH_HINT}")
        return model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if sync_bn:  # PyTorch's fused kernels on CUDA; DDP rejects nn.SyncBatchNorm elsewhere
        refuse_ghost_bn(model)
        model = (
            nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_sync_batchnorm(model)
        )
    model.to(device)
    # A PRepBN runs only its LayerNorm while lambda = 1 and only its RepBN at lambda = 0, so the other branch's
    # parameters get no gradient and DDP's reducer would wait for them. ``find_unused_parameters`` lets DDP mark
    # them ready after each backward (their gradient stays None on every rank, as in one process); it costs a walk
    # of the autograd graph per step, so only models that can leave parameters unused pay it. Adding the idle
    # branch as ``0 * branch`` would keep the graph static, but turns those None gradients into zeros, which Adam's
    # moments and weight decay then act on: the run would no longer match one process.
    find_unused = has_idle_parameters(model)
    if device.type != "cuda":
        return DistributedDataParallel(model, find_unused_parameters=find_unused)
    index = device.index if device.index is not None else 0
    return DistributedDataParallel(model, device_ids=[index], find_unused_parameters=find_unused)


def has_idle_parameters(model: nn.Module) -> bool:
    """Whether a training step of ``model`` can leave some of its parameters out of the graph: a PRepBN uses
    only one of its two branches at lambda = 1 and at lambda = 0."""
    from vitbn.models.norms import PRepBN

    return any(isinstance(m, PRepBN) for m in model.modules())


def average_bn_buffers(model: nn.Module) -> int:
    """Averages every BatchNorm's running mean and variance over the ranks, in place (a no-op outside a
    distributed run); returns how many BatchNorms it averaged.

    Without SyncBN each rank's running statistics follow its own shard, so ranks would evaluate (and rank 0 would
    save) different models. The mean over ranks is what SyncBN's update of the running mean would give for the
    last step (the variance: the mean of the ranks' variances, without the spread of their means); DDP broadcasts
    rank 0's buffers before the next training forward as usual. Call on every rank (a collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    from torch.nn.modules.batchnorm import _BatchNorm

    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    count, world = 0, dist.get_world_size()
    for module in unwrap(model).modules():
        if not isinstance(module, _BatchNorm) or module.running_mean is None:
            continue
        for buffer in (module.running_mean, module.running_var):
            work = buffer.detach().to(backend_device or buffer.device, torch.float64)
            dist.all_reduce(work)
            buffer.copy_((work / world).to(buffer.dtype))
        count += 1
    return count


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over all ranks (the value itself when not distributed); call on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.as_tensor(value, dtype=torch.float64, device=backend_device).reshape(1).clone()
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


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
            images, labels = inner.images.index_select(0, mine), inner.labels.index_select(0, mine)
            # the inner loader's augmenter (seeded per rank by make_loaders) transforms this rank's share
            yield inner.augmented(images, labels) if inner.augment is not None else (inner.normalize(images), labels)


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
