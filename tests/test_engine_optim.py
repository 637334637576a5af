"""Weight-decay groups, optimizer choice and the per-step learning-rate schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vitbn.config import TrainConfig
from vitbn.engine import WarmupCosine, build_optimizer, build_scheduler, param_groups
from vitbn.models import create_model


@pytest.mark.parametrize("name", ["vit", "vitbnffn", "vitbn"])
def test_only_linear_weights_are_decayed(name, tiny_overrides):
    model = create_model(name, **tiny_overrides)
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in groups["decay"]["params"]} == linear_weights
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert {"cls_token", "pos_embedding", "mlp_head.bias", "transformer.layers.0.ff.fc1.bias"} <= undecayed
    norm_params = {n for n in names.values() if ".norm" in n or "inner_norm" in n}
    assert norm_params and norm_params <= undecayed
    # every parameter exactly once
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize(
    ("optimizer", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_build_optimizer(optimizer, cls, tiny_overrides):
    model = create_model("vit", **tiny_overrides)
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=0.01, weight_decay=0.05, momentum=0.8))
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 0.01 for g in opt.param_groups)
    assert opt.defaults["fused"] or opt.defaults["foreach"]
    if optimizer == "sgd":
        assert opt.defaults["momentum"] == 0.8


def test_sgd_with_momentum_takes_parameters_whose_first_gradient_comes_later():
    """PRepBN's RepBN gets its first gradient when the ramp begins; fused SGD raised a TypeError there."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    reference = copy.deepcopy(model)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9)
    opt = build_optimizer(model, cfg)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x = torch.linspace(-1, 1, 6).reshape(2, 3)
    for step in range(3):
        for net, optim in ((model, opt), (reference, ref_opt)):
            optim.zero_grad(set_to_none=True)
            out = net(x) if step else net[0](x)  # step 0: the second Linear is left out of the graph
            out.square().sum().backward()
            optim.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(p, q, rtol=1e-6, atol=1e-7)


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


def test_cosine_with_warmup_follows_the_formula():
    cfg = TrainConfig(epochs=3, lr=0.1, schedule="cosine", warmup_epochs=1)
    warmup, total = 4, 12
    expected = [
        0.1 * (s + 1) / warmup if s < warmup else 0.1 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        for s in range(total)
    ]
    torch.testing.assert_close(_lrs(cfg, steps_per_epoch=4), expected)


def test_constant_schedule_and_warmup_then_constant():
    assert build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), TrainConfig(), 10) is None
    lrs = _lrs(TrainConfig(epochs=2, lr=0.2, warmup_epochs=0.5), steps_per_epoch=4)
    torch.testing.assert_close(lrs, [0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])


def test_schedule_state_round_trips():
    factor = WarmupCosine(3, 10)
    p = nn.Parameter(torch.zeros(1))
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([p], lr=1.0), factor)
    other = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([p], lr=1.0), WarmupCosine(0, 1))
    other.load_state_dict(sched.state_dict())
    assert other.lr_lambdas[0].warmup_steps == 3 and other.lr_lambdas[0].total_steps == 10
