"""The reference side of the bench runs in the precision it is named after: fp16 is fp16 autocast (with a
GradScaler in training), not fp32 (bench/reference.py and benchmarks/vs_vit_pytorch.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vitbn.bench.reference import autocast_dtype, plain_step
from vitbn.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))


def _logit_dtypes(model: nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    model.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_plain_step_runs_in_each_precision():
    x = torch.linspace(-1, 1, 20).reshape(5, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1])
    start = _model()
    deltas = {}
    for precision, dtype in DTYPES.items():
        model = copy.deepcopy(start)
        seen = _logit_dtypes(model)
        plain_step(model, precision, x, y, compile=False)()
        assert seen == [dtype], precision  # before: fp16 ran in fp32
        deltas[precision] = [(p - q).detach() for p, q in zip(model.parameters(), start.parameters(), strict=True)]
    # Adam's first step is lr * g / (|g| + eps), about lr * sign(g): the same step in every precision (and
    # unchanged by fp16's loss scale), up to gradients that rounding moves across or near zero.
    for precision in ("bf16", "fp16"):
        for got, want in zip(deltas[precision], deltas["fp32"], strict=True):
            assert_close(got, want, rtol=0, atol=2e-5)  # lr = 1e-4: a sign flip would be 2e-4 off


def test_autocast_dtype_names_every_precision():
    assert [autocast_dtype(p) for p in DTYPES] == [None, torch.bfloat16, torch.float16]
    with pytest.raises(UserError, match="precision='fp8' is not one of 'fp32', 'bf16', 'fp16'"):
        autocast_dtype("fp8")


def test_vs_vit_pytorch_infers_in_the_named_precision_and_refuses_fp16_on_the_cpu(vs_script, capsys):
    x = torch.randn(3, 1, 2, 2)
    for precision, dtype in DTYPES.items():
        assert vs_script.infer(_model().eval(), precision, x, False)().dtype == dtype
    with pytest.raises(SystemExit):
        vs_script.parse_args(["--vit-pytorch", "/tmp/vp", "--precisions", "fp32,fp16"])
    assert "--precisions fp16 needs CUDA, and this script times on the CPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vs_script.parse_args(["--vit-pytorch", "/tmp/vp", "--precisions", "fp8"])
    assert "--precisions fp8: not one of fp32, bf16, fp16" in capsys.readouterr().err
