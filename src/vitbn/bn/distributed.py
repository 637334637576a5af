"""Data-parallel training helpers: ``torchrun`` environment, data shards, DDP wrapping with optional SyncBN.

Launched as ``torchrun --nproc-per-node N -m vitbn train ...``, every rank trains on its shard of the
in-memory data with DDP (gloo on the CPU, NCCL on CUDA). Without SyncBN each rank's BatchNorm normalizes
over its own shard of the batch; with it, over the whole global batch. Tracking and checkpoints are the job
of rank 0 (``is_main_process``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitbn.bn.syncbn import convert_sync_batchnorm, refuse_ghost_bn
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
    underlying model with ``unwrap``.

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
    if device.type != "cuda":
        return DistributedDataParallel(model)
    return DistributedDataParallel(model, device_ids=[device.index if device.index is not None else 0])


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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself if not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over all ranks (the value itself when not distributed); call on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.as_tensor(value, dtype=torch.float64, device=backend_device).reshape(1).clone()
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()
