"""Data-parallel training: rank loaders against one process's batches, and ``torchrun -m vitbn train`` with
SyncBN and precise BN against a single process with the same global batch (then resumed), plus --sync-bn
without torchrun."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from torch.testing import assert_close

from vitbn.cli import main
from vitbn.config import ModelConfig, RunConfig, TrainConfig
from vitbn.data import Dataset, InMemoryLoader, PreparedData, Split
from vitbn.engine import fit
from vitbn.engine.checkpoint import CHECKPOINT_NAME, MODEL_NAME
from vitbn.engine.distributed import TORCHRUN_VARS, DistInfo, RankLoader, eval_share
from vitbn.engine.history import read_history
from vitbn.engine.setup import check_sync_bn, make_loaders
from vitbn.errors import UserError
from waits import wait_s

# SGD: with Adam, a bias whose gradient is rounding noise (one before a BatchNorm) moves by +-lr either way,
# so two summation orders of the same gradient give visibly different parameters.
CONFIG = {
    "model": {"name": "vitbn", "dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32},
    "data": {"train_subset": 400, "test_subset": 200},
    "train": {"epochs": 1, "batch_size": 40, "device": "cpu", "threads": 1, "max_steps_per_epoch": 3,
              "optimizer": "sgd", "lr": 0.05, "precise_bn": True, "precise_bn_batches": 4},
}  # fmt: skip


def _split(n: int) -> Split:
    return Split(torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1), torch.arange(n))


def _labels(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_batches_together_are_the_single_process_batches(shuffle):
    loader = InMemoryLoader(_split(23), batch_size=6, mean=0.0, std=1.0, shuffle=shuffle, seed=3)
    loader.set_epoch(2)
    ranks = [RankLoader(loader, r, 3) for r in range(3)]
    per_rank = [_labels(r) for r in ranks]
    # 23 images in batches of 6: 6, 6, 6, 5 -> the last keeps 3 (a multiple of the 3 ranks), one each
    assert [len(r) for r in ranks] == [4, 4, 4] and [r.num_samples for r in ranks] == [7, 7, 7]
    assert all(r.batch_size == 2 for r in ranks)
    for i, batch in enumerate(_labels(loader)):
        kept = batch[: len(batch) - len(batch) % 3]
        assert [per_rank[r][i] for r in range(3)] == [kept[r::3] for r in range(3)]
    x, y = next(iter(ranks[1]))
    assert_close(x, y.float().reshape(-1, 1, 1, 1) / 255)  # images follow their labels, normalized
    ranks[0].set_epoch(5)
    assert loader.epoch == 5


def test_rank_loader_augments_each_rank_share():
    """Every rank's share goes through the inner loader's augmenter (in [0, 1], before normalizing), with the
    augmenter's targets; before, RankLoader normalized the raw images and kept the hard labels."""
    seen = []

    def augment(x01, labels):  # a deterministic stand-in: invert the image, one-hot targets
        seen.append(labels.tolist())
        return 1.0 - x01, torch.nn.functional.one_hot(labels, 24).float()

    loader = InMemoryLoader(_split(24), batch_size=8, mean=0.5, std=0.25, augment=augment)
    (x, y), *_ = list(RankLoader(loader, 1, 2))
    assert seen[0] == [1, 3, 5, 7]  # the augmenter saw this rank's share of global batch 0
    expected = ((1.0 - torch.tensor([1.0, 3, 5, 7]) / 255) - 0.5) / 0.25
    assert_close(x.flatten(), expected)
    assert_close(y, torch.nn.functional.one_hot(torch.tensor([1, 3, 5, 7]), 24).float())


def test_rank_loader_rules():
    loader = InMemoryLoader(_split(5), batch_size=4, mean=0.0, std=1.0)
    with pytest.raises(UserError, match="batch_size=4 is the global batch and must be divisible by the 3 ranks"):
        RankLoader(loader, 0, 3)
    short = RankLoader(loader, 1, 2)  # batches of 4 and 1: the single last image is dropped on every rank
    assert len(short) == 1 and _labels(short) == [[1, 3]]
    shares = [eval_share(_split(7), r, 3).labels.tolist() for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]


def test_make_loaders_for_a_rank():
    info = Dataset("t", _split(40), _split(9), ["c"], mean=(0.0,), std=(1.0,), shape=(1, 1, 1))
    data = PreparedData(train=info.train, val=None, test=info.test, info=info)
    tc = TrainConfig(batch_size=8, eval_batch_size=4, precise_bn_batches=2, seed=1)
    loaders = make_loaders(data, tc, torch.device("cpu"), DistInfo(rank=1, world_size=2, backend="gloo"))
    single = make_loaders(data, tc, torch.device("cpu"))
    for name in ("train", "bn"):
        getattr(loaders, name).set_epoch(1)
        getattr(single, name).set_epoch(1)
        assert _labels(getattr(loaders, name)) == [b[1::2] for b in _labels(getattr(single, name))]
    assert len(loaders.bn) == 2 and loaders.val is None
    assert _labels(loaders.test) == [[5, 6, 7, 8]]  # rank 1's share of the test set


def test_sync_bn_excludes_ghost_bn():
    check_sync_bn(TrainConfig(sync_bn=True), ModelConfig())
    check_sync_bn(TrainConfig(), ModelConfig(ghost_batch_size=8))
    with pytest.raises(UserError, match="sync_bn and model.ghost_batch_size=8 exclude each other"):
        check_sync_bn(TrainConfig(sync_bn=True), ModelConfig(ghost_batch_size=8))


def test_sync_bn_without_torchrun_is_one_line(tmp_path, monkeypatch, capsys):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--sync-bn", "--device", "cpu", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "vitbn train: error: --sync-bn needs a distributed run, but RANK/WORLD_SIZE are not set: "
        "launch with torchrun --nproc-per-node N -m vitbn train ...\n"
    )
    assert list(tmp_path.iterdir()) == []  # failed before any tracking store or run folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "vitbn", "train", "--config", "c.yaml", "--progress", "lines",
           *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=wait_s(120))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_torchrun_sync_bn_matches_one_process_and_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'db.sqlite'}"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**CONFIG, "track": {"tracking_uri": uri}}))
    first = _torchrun(tmp_path, "--sync-bn")  # rank 0 names the run for both
    assert first.stdout.count("epoch 1/1  train_loss") == 1 and first.stdout.count("finished after 1 epoch") == 1
    (folder,) = (tmp_path / "runs").iterdir()

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["vitbn.status"] == "finished"
    assert (run.data.tags["dist.world_size"], run.data.tags["dist.backend"]) == ("2", "gloo")
    assert run.data.params["train.sync_bn"] == "True" and run.data.params["train.batch_size"] == "40"
    files = {"config.yaml", "history.json", "history.csv", "curves.png", CHECKPOINT_NAME, MODEL_NAME}  # rank 0 only
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)

    # Every rank loads the checkpoint, trains epoch 2 and rank 0 alone logs into the same MLflow run.
    second = _torchrun(tmp_path, "--sync-bn", "--run-name", folder.name, "--epochs", "2", "--resume")
    assert second.stdout.count("epoch 2/2  train_loss") == 1
    (run,) = client.search_runs([run.info.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["vitbn.resumed_from_epoch"] == "1"
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)

    # One process with the global batch of 40 on the same data order trains the same model.
    single_cfg = {**CONFIG, "train": {**CONFIG["train"], "epochs": 2, "out_dir": str(tmp_path / "single")},
                  "track": {"enabled": False, "run_name": "one"}}  # fmt: skip
    single = fit(RunConfig.from_dict(single_cfg), progress="none")
    for key in ("train/loss", "train/acc", "test/loss", "test/acc"):
        assert_close(_history(client, run.info.run_id, key), [r[key] for r in single.history], rtol=1e-5, atol=1e-6)
    ddp = torch.load(folder / MODEL_NAME, weights_only=True)["state_dict"]
    expected = single.model.state_dict()
    assert sorted(ddp) == sorted(expected)
    for key, value in expected.items():
        assert_close(ddp[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any("running_var" in k for k in ddp)


_TEARDOWN = """
import os, sys, torch, torch.distributed as dist
from torch import nn
from vitbn.engine.distributed import destroy_distributed, exit_process, init_distributed

def tasks():
    return len(os.listdir("/proc/self/task"))

base = tasks()
assert exit_process(5) == 5  # not in a group yet: a plain return
init_distributed("cpu")
model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
model(torch.randn(3, 4)).sum().backward()
t = torch.ones(2)
dist.all_reduce(t)
del model, t
destroy_distributed(barrier=True)
print("threads", base, tasks())
exit_process(3)
print("not reached")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_rank_leaves_without_finalizing_the_interpreter_while_gloo_threads_live(tmp_path):
    """The cause of torchrun's SIGABRT, deterministically: after DDP, destroying the process group leaves gloo's
    native threads running, so a rank must not finalize the interpreter (a worker thread freeing an all-reduce's
    tensor then needs the GIL, and dies in std::terminate). ``exit_process`` leaves with os._exit, output
    flushed; before joining a group it just returns the code."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _TEARDOWN], env=env, capture_output=True, text=True, timeout=wait_s(120)
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    base, after = map(int, proc.stdout.split("threads")[1].split())
    assert after > base  # the backend's threads outlived destroy_process_group
    assert "not reached" not in proc.stdout and "terminate called" not in proc.stderr


# PRepBN through its whole ramp in 3 epochs of 3 steps: lambda = 1 for steps 0-2 (epoch 1, LayerNorm alone: RepBN's
# parameters get no gradient), the blend for steps 3-4, then lambda = 0 (RepBN alone: the LayerNorm's get none).
PREPBN = {**CONFIG, "model": {**CONFIG["model"], "name": "vit", "norm": "prepbn"},
          "train": {**CONFIG["train"], "epochs": 3, "precise_bn": False, "prepbn_warmup_steps": 2,
                    "prepbn_decay_steps": 3}}  # fmt: skip
LAMBDAS = [2 / 3, 0.0, 0.0]  # lambda after each epoch's last step: 1 - (3 - 2) / 3, then 0


def test_torchrun_prepbn_through_the_ramp_matches_one_process(tmp_path):
    """DDP used to fail at the first step ("Expected to have finished reduction ..."): at lambda = 1 RepBN's
    parameters take no part in the loss. With SyncBN, two ranks of 20 images train as one process with the batch
    of 40 in every phase. Tolerance rtol 1e-5, atol 1e-6 (float32): the two runs differ only in summation order
    (the mean of two half-batch losses, DDP's average of two half-batch gradients), a few ulps per step over 9
    SGD steps."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**PREPBN, "track": {"enabled": False, "run_name": "ddp"}}))
    proc = _torchrun(tmp_path, "--sync-bn")
    assert proc.stdout.count("finished after 3 epoch") == 1
    ddp = read_history(tmp_path / "runs" / "ddp")
    single_cfg = {**PREPBN, "train": {**PREPBN["train"], "out_dir": str(tmp_path / "single")},
                  "track": {"enabled": False, "run_name": "one"}}  # fmt: skip
    single = fit(RunConfig.from_dict(single_cfg), progress="none")
    assert_close([r["prepbn/lambda"] for r in ddp], LAMBDAS)
    for key in ("train/loss", "train/acc", "test/loss", "test/acc"):
        assert_close([r[key] for r in ddp], [r[key] for r in single.history], rtol=1e-5, atol=1e-6, msg=key)
    weights = torch.load(tmp_path / "runs" / "ddp" / MODEL_NAME, weights_only=True)["state_dict"]
    for key, value in single.model.state_dict().items():
        assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


_AUGMENTED_RANK = """
import json, os, sys
from vitbn.data import augment

original = augment.Augmenter.__call__
calls = []

def recording(self, x01, labels):  # what each rank's augmenter was given and gave back
    x, targets = original(self, x01, labels)
    calls.append({"images": x01.shape[0], "changed": bool((x - x01).abs().amax() > 0.1), "soft": targets.ndim == 2,
                  "seed": self.seed, "first": x[0].flatten()[:200].tolist()})
    return x, targets

augment.Augmenter.__call__ = recording
from vitbn.cli import main
from vitbn.engine.distributed import exit_process

code = main(sys.argv[1:])
with open(f"rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"code": code, "calls": calls}, f)
exit_process(code)
"""


def test_torchrun_augments_every_rank_batch_through_the_prepbn_ramp(tmp_path):
    """``--augment medium`` under torchrun (without SyncBN): every step of every rank augments its 20 images (crop,
    RandAugment, Mixup: soft targets), each rank with its own stream; before, RankLoader skipped the augmenter."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**PREPBN, "track": {"enabled": False, "run_name": "aug"}}))
    (tmp_path / "rank.py").write_text(_AUGMENTED_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "rank.py", "train", "--config", "c.yaml", "--progress", "none",
           "--augment", "medium"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in ranks] == [0, 0]
    for rank, record in enumerate(ranks):
        calls = record["calls"]
        assert len(calls) == 9  # 3 epochs x 3 steps
        assert all(c["images"] == 20 and c["changed"] and c["soft"] for c in calls)
        assert {c["seed"] for c in calls} == {PREPBN["train"].get("seed", 0) + 1000 * rank}
    assert ranks[0]["calls"][0]["first"] != ranks[1]["calls"][0]["first"]
    history = read_history(tmp_path / "runs" / "aug")
    assert_close([r["prepbn/lambda"] for r in history], LAMBDAS)
    assert all(math.isfinite(r["train/loss"]) for r in history)
