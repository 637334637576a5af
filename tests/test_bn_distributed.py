"""Data-parallel helpers and SyncBN: two gloo processes on 2 x B/2 images against one process on B."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

from vitbn.bn import AllReduceSyncBatchNorm, convert_sync_batchnorm
from vitbn.data import Split
from vitbn.engine.checkpoint import unwrap
from vitbn.engine.distributed import (
    TORCHRUN_VARS,
    DistInfo,
    all_reduce_mean,
    average_bn_buffers,
    destroy_distributed,
    init_distributed,
    is_main_process,
    shard,
    wrap_ddp,
)
from vitbn.errors import UserError
from vitbn.models import create_model
from vitbn.models.norms import set_prepbn_lambda

TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32)
# The recipes too: parallel branches (one BN per branch) and an hMLP stem (BatchNorm2d).
RECIPES = dict(TINY, depth=1, parallel=2, stem="hmlp", patch_size=4)
# And PRepBN mid-ramp (lambda 0.5): the BatchNorm inside each RepBN synchronizes like any other.
PREPBN = dict(TINY, norm="prepbn")


def _prepbn_model() -> nn.Module:
    model = create_model("vit", **PREPBN).train()
    set_prepbn_lambda(model, 0.5)
    return model


BATCH = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread; two threads on a loaded 2-core machine mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_init_distributed_without_torchrun(no_torchrun, monkeypatch):
    assert init_distributed("cpu") == DistInfo(rank=0, world_size=1, local_rank=0, backend=None)
    with pytest.raises(UserError, match="--sync-bn needs a distributed run, but RANK/WORLD_SIZE are not set"):
        init_distributed("cpu", sync_bn=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="WORLD_SIZE set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        init_distributed("cpu")


def test_wrap_without_process_group(no_torchrun):
    model = create_model("vitbn", **TINY)
    assert wrap_ddp(model) is model and unwrap(model) is model and is_main_process()
    with pytest.raises(UserError, match="--sync-bn needs a distributed run"):
        wrap_ddp(model, sync_bn=True)
    assert all_reduce_mean(torch.tensor(2.5)) == 2.5


def test_shard_gives_equal_interleaved_shares():
    split = Split(torch.arange(11, dtype=torch.uint8).reshape(11, 1, 1, 1), torch.arange(11))
    shards = [shard(split, r, 3) for r in range(3)]
    assert [s.labels.tolist() for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert torch.equal(shards[1].images.flatten(), torch.tensor([1, 4, 7], dtype=torch.uint8))
    with pytest.raises(ValueError, match="rank=3 and world_size=3"):
        shard(split, 3, 3)
    with pytest.raises(UserError, match="cannot shard 11 images over 12 ranks"):
        shard(split, 0, 12)


def test_sync_bn_without_process_group_is_batchnorm():
    bn = nn.BatchNorm1d(5, momentum=0.2)
    sync = convert_sync_batchnorm(copy.deepcopy(bn))
    assert isinstance(sync, AllReduceSyncBatchNorm)
    x = torch.randn(12, 5) * 3 + 1
    assert_close(sync(x), bn(x))
    assert_close(sync.running_var, bn.running_var)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 1, 28, 28, generator=g) * 1.5 + 0.2, torch.randint(0, 10, (BATCH,), generator=g)


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items() if "running_" in k}


def _one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One Adam step; the loss, gradients, BN statistics and the loss after the step.

    The loss after the step is taken with batch statistics: Adam moves a bias whose gradient is rounding noise
    (fc1's bias before a BN cancels out) by about +-lr either way, which batch statistics cancel again."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in unwrap(model).named_parameters()}
    opt.step()
    stats = _bn_stats(model)
    with torch.no_grad():
        after = nn.functional.cross_entropy(unwrap(model)(x), y)
    return {"loss": loss.item(), "grads": grads, "stats": stats, "after": after.item()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    info = init_distributed("cpu", sync_bn=True)
    x, y = _data()
    per = BATCH // world
    local_x, local_y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    result = {"info": info, "main": is_main_process()}
    for sync in (True, False):
        torch.manual_seed(0)
        model = wrap_ddp(create_model("vitbn", **TINY).train(), sync_bn=sync, device="cpu")
        converted = sum(isinstance(m, AllReduceSyncBatchNorm) for m in model.modules())
        step = _one_step(model, local_x, local_y)
        step["loss"] = all_reduce_mean(step["loss"])  # the loss over the global batch
        step["unaveraged"] = _bn_stats(model)  # after the step and the loss-after forward
        step["averaged_count"] = average_bn_buffers(model)
        step["averaged"] = _bn_stats(model)
        with torch.no_grad():  # the global batch on every rank (same parameters everywhere)
            step["after"] = nn.functional.cross_entropy(unwrap(model)(x), y).item()
        result[sync] = {**step, "converted": converted}
    torch.manual_seed(0)
    model = wrap_ddp(create_model("vitbn", **RECIPES).train(), sync_bn=True, device="cpu")
    result["recipes"] = {**_one_step(model, local_x, local_y),
                         "converted": sum(isinstance(m, AllReduceSyncBatchNorm) for m in model.modules())}  # fmt: skip
    torch.manual_seed(0)
    model = wrap_ddp(_prepbn_model(), sync_bn=True, device="cpu")
    result["prepbn"] = {**_one_step(model, local_x, local_y),
                        "converted": sum(isinstance(m, AllReduceSyncBatchNorm) for m in model.modules())}  # fmt: skip
    destroy_distributed()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_sync_bn_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.manual_seed(0)
    x, y = _data()
    single = _one_step(create_model("vitbn", **TINY).train(), x, y)

    assert ranks[0]["info"] == DistInfo(0, 2, 0, "gloo") and ranks[1]["info"].rank == 1
    assert ranks[0]["main"] and not ranks[1]["main"]
    sync = ranks[0][True]
    assert sync["converted"] == 7 and ranks[0][False]["converted"] == 0
    for key, value in single["stats"].items():
        assert_close(sync["stats"][key], value, rtol=1e-5, atol=1e-6)
    assert_close(sync["loss"], single["loss"], rtol=1e-6, atol=1e-6)
    for key, value in single["grads"].items():  # DDP averages the ranks' gradients: the global batch's gradient
        assert_close(sync["grads"][key], value, rtol=1e-4, atol=1e-6)
    assert_close(sync["after"], single["after"], rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    single_recipes = _one_step(create_model("vitbn", **RECIPES).train(), x, y)
    recipes = ranks[0]["recipes"]
    # stem: 2 BatchNorm2d; stage: 2 branches x (attention pre-norm + inner norm); final norm
    assert recipes["converted"] == 7
    for key, value in single_recipes["stats"].items():
        assert_close(recipes["stats"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in single_recipes["grads"].items():
        assert_close(recipes["grads"][key], value, rtol=1e-4, atol=1e-6, msg=key)

    torch.manual_seed(0)
    single_prepbn = _one_step(_prepbn_model(), x, y)
    prepbn = ranks[0]["prepbn"]
    assert prepbn["converted"] == 7  # patch embedding 2, 2 blocks x (attention + feed-forward), final
    for key, value in single_prepbn["stats"].items():
        assert_close(prepbn["stats"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in single_prepbn["grads"].items():
        assert_close(prepbn["grads"][key], value, rtol=1e-4, atol=1e-6, msg=key)

    plain = ranks[0][False]  # each rank normalizes its own half: different statistics
    key = "transformer.norm.bn.running_var"
    assert not torch.allclose(plain["stats"][key], single["stats"][key], rtol=1e-3, atol=1e-4)
    assert not torch.allclose(plain["stats"][key], ranks[1][False]["stats"][key], rtol=1e-3, atol=1e-4)
    # before evaluation the ranks' statistics are averaged: both ranks hold the mean of the two
    assert plain["averaged_count"] == 7
    for k, value in plain["unaveraged"].items():
        mean = (value.double() + ranks[1][False]["unaveraged"][k].double()) / 2
        assert_close(plain["averaged"][k], mean.float(), rtol=1e-6, atol=1e-7, msg=k)
        assert torch.equal(plain["averaged"][k], ranks[1][False]["averaged"][k])
    assert not torch.equal(plain["unaveraged"][key], ranks[1][False]["unaveraged"][key])
    for k, value in sync["unaveraged"].items():  # under SyncBN they were equal already, and stay so
        assert_close(sync["averaged"][k], value, rtol=1e-6, atol=1e-7)


def test_ghost_bn_is_refused_by_sync_bn_conversion():
    model = create_model("vitbn", **TINY, ghost_batch_size=4)
    with pytest.raises(ValueError, match=r"SyncBN and ghost BN \(ghost_batch_size=4\) exclude each other"):
        convert_sync_batchnorm(model)
    assert not any(isinstance(m, AllReduceSyncBatchNorm) for m in model.modules())  # nothing converted
    assert average_bn_buffers(model) == 0  # outside a distributed run: a no-op
