"""Atomic writes, Ctrl-C deferral, RNG state round trip, history files."""

from __future__ import annotations

import csv
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from vitbn.engine.checkpoint import (
    atomic_save,
    cuda_states_for,
    deferred_interrupt,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from vitbn.engine.history import format_epoch, read_history, write_history
from vitbn.errors import UserError


def test_atomic_save_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]


def test_ctrl_c_waits_for_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():
        with deferred_interrupt():  # nested: the outer block decides
            os.kill(os.getpid(), signal.SIGINT)
            done.append("inner")
        done.append("outer")
    assert done == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    atomic_save({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])  # weights_only: plain data only
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_cuda_states_for_fewer_visible_devices():
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]  # synthetic: 8 GPUs' generator states
    kept, note = cuda_states_for(states, 1)
    assert len(kept) == 1 and torch.equal(kept[0], states[0])
    assert note == ("the checkpoint holds the CUDA RNG states of 8 GPUs but 1 are visible: restored those of GPUs "
                    "0-0, dropped 7 (random streams of those GPUs are not continued)")  # fmt: skip
    assert cuda_states_for(states[:2], 2) == (states[:2], None)
    assert cuda_states_for(states[:1], 4) == (states[:1], None)  # more devices than states: the rest keep theirs
    assert cuda_states_for(states[:2], 0)[0] == []


def test_resume_with_fewer_visible_gpus_sets_the_states_that_exist(monkeypatch):
    """A checkpoint from a machine with 8 visible GPUs, resumed with 1 visible. The CUDA functions are replaced
    (the only way to reach this branch on a machine without CUDA; tests/test_cuda_paths.py runs it on a GPU): the
    stand-in refuses device 1 as torch does with an IndexError. Before, ``set_rng_state_all`` hit that error."""
    set_calls = []

    def fake_set_rng_state(state, device=0):
        if int(device) >= 1:
            raise IndexError("list index out of range")
        set_calls.append((int(device), state.clone()))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake_set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", fake_set_rng_state)  # what set_rng_state_all calls
    state = rng_state()
    state["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    with pytest.warns(UserWarning, match=r"CUDA RNG states of 8 GPUs but 1 are visible: .* dropped 7"):
        set_rng_state(state)
    assert len(set_calls) == 1 and set_calls[0][0] == 0 and torch.equal(set_calls[0][1], state["cuda"][0])


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint .*none.pt does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    atomic_save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=r"is not a vitbn checkpoint \(missing \['config', 'epoch'"):
        load_checkpoint(tmp_path / "partial.pt")


def test_history_files(tmp_path):
    history = [
        {"epoch": 1, "train/loss": math.nan, "train/acc": 0.5, "time/train_epoch_s": 2.0,
         "throughput/train_img_s": 50.0, "lr": 0.1},
        {"epoch": 2, "train/loss": 0.25, "train/acc": 0.75, "test/acc": 0.8125, "time/train_epoch_s": 1.0,
         "time/test_epoch_s": 0.5, "throughput/train_img_s": 100.0, "lr": 0.1},
    ]  # fmt: skip
    write_history(history, tmp_path)
    back = read_history(tmp_path)
    assert math.isnan(back[0]["train/loss"]) and back[1] == history[1]
    with (tmp_path / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["epoch", "train/loss", "train/acc"] and rows[0]["test/acc"] == ""
    assert float(rows[1]["test/acc"]) == 0.8125
    assert format_epoch(history[1], 30) == (
        "epoch 2/30  train_loss 0.2500  train_acc 75.00%  test_acc 81.25%  train 1.0s  test 0.5s  100 img/s"
    )
