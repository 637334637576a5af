"""Run-wide policies for GPU users that a CPU can check: the epoch whose time includes torch.compile is flagged,
one TF32 policy (config, CLI, both backends' flags), and ``cuda:N`` devices in the config and on the CLI."""

from __future__ import annotations

import pytest
import torch

from vitbn.cli import build_parser
from vitbn.cli.train import config_from_args
from vitbn.config import DataConfig, RunConfig, TrainConfig
from vitbn.data import prepare_data
from vitbn.engine import fit
from vitbn.engine.device import set_tf32
from vitbn.tracking import MemoryTracker

TINY = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32}


def _config(tmp_path, **train) -> RunConfig:
    train = {"epochs": 2, "batch_size": 40, "eval_batch_size": 64, "device": "cpu", "threads": 1,
             "max_steps_per_epoch": 2, "out_dir": str(tmp_path), **train}  # fmt: skip
    return RunConfig.from_dict({"model": {"name": "vit", **TINY}, "data": {"train_subset": 80, "test_subset": 40},
                                "train": train, "track": {"enabled": False, "run_name": "r"}})  # fmt: skip


def test_the_epoch_that_compiles_is_flagged(tmp_path, monkeypatch):
    calls = []

    class PassThrough(torch.nn.Module):  # torch.compile's stand-in: counts calls, runs the model eagerly
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            calls.append(self._orig_mod.training)
            return self._orig_mod(x)

    monkeypatch.setattr(torch, "compile", PassThrough)
    data = prepare_data(DataConfig(train_subset=80, test_subset=40))
    result = fit(_config(tmp_path, compile=True), tracker=MemoryTracker(), data=data, progress="none")
    assert calls.count(True) == 4 and False in calls  # trained and evaluated through the "compiled" module
    assert [r["time/includes_compile"] for r in result.history] == [1.0, 0.0]
    plain = fit(_config(tmp_path / "plain"), tracker=MemoryTracker(), data=data, progress="none")
    assert all("time/includes_compile" not in r for r in plain.history)


def test_one_tf32_policy_for_matmul_and_cudnn(capsys):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for enabled in (True, False):
            set_tf32(enabled)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert TrainConfig().tf32 is False
    with pytest.raises(ValueError, match="tf32='yes' must be true or false"):
        TrainConfig(tf32="yes")
    parser = build_parser()
    assert config_from_args(parser.parse_args(["train", "--tf32"])).train.tf32 is True
    assert config_from_args(parser.parse_args(["train", "--no-tf32"])).train.tf32 is False
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "cuDNN convolutions alike on Ampere+ GPUs (default: off, fp32 stays fp32)" in " ".join(
        capsys.readouterr().out.split()
    )


def test_the_bench_takes_the_same_tf32_policy():
    from vitbn.bench import BenchOptions
    from vitbn.cli.bench import options_from_args

    assert BenchOptions().tf32 is False
    assert options_from_args(build_parser().parse_args(["bench", "--quick", "--tf32"])).tf32 is True
    assert options_from_args(build_parser().parse_args(["bench", "--quick"])).tf32 is False


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:12", "mps"])
def test_config_and_cli_take_cuda_n(device):
    assert TrainConfig(device=device).device == device
    assert config_from_args(build_parser().parse_args(["train", "--device", device])).train.device == device
    assert build_parser().parse_args(["eval", "model.pt", "--device", device]).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "cuda1"])
def test_bad_devices_name_the_allowed_forms(device, capsys):
    message = f"device={device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N' (a GPU index), 'mps'"
    with pytest.raises(ValueError) as caught:
        TrainConfig(device=device)
    assert str(caught.value) == message
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--device", device])
    assert f"argument --device: --{message}" in capsys.readouterr().err
