"""SAM / ASAM: the engine's step against the update written out by hand, BatchNorm's running statistics after a
step, the same random masks in both passes, bf16, clipping, a compiled model, two gloo ranks, and the CLI."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from vitbn.config import RunConfig, TrainConfig
from vitbn.engine.checkpoint import unwrap
from vitbn.engine.device import make_amp
from vitbn.engine.distributed import destroy_distributed, init_distributed, wrap_ddp
from vitbn.engine.sam import SAM
from vitbn.engine.step import make_loss, train_step
from vitbn.models import create_model
from vitbn.serve.launch import free_port

TINY = dict(image_size=8, patch_size=4, dim=8, depth=2, heads=2, dim_head=4, mlp_dim=16)
CPU = torch.device("cpu")


def _batch(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int | None = None) -> list[torch.Tensor]:
    if seed is not None:
        torch.manual_seed(seed)
    loss = nn.functional.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def _reference_step(model, x, y, *, rho, adaptive=False, make_opt, clip=None, seed=None) -> nn.Module:
    """The SAM update written out: g at w, e = rho g / ||g|| (ASAM: rho T^2 g / ||T g||, T = |w|), the gradient
    at w + e on the same batch (BN in train mode, a copy of the model so its statistics move apart), then the
    base optimizer's step from w with that gradient."""
    ref = copy.deepcopy(model)
    g = _grads(ref, x, y, seed)
    params = list(ref.parameters())
    with torch.no_grad():
        t = [p.abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
        e = [rho * ti * ti * gi / (norm + 1e-12) for ti, gi in zip(t, g, strict=True)]
        perturbed = copy.deepcopy(ref)
        for p, ei in zip(perturbed.parameters(), e, strict=True):
            p.add_(ei)
    g_sam = _grads(perturbed, x, y, seed)
    for p, gi in zip(params, g_sam, strict=True):
        p.grad = gi
    if clip is not None:
        nn.utils.clip_grad_norm_(params, clip)
    make_opt(params).step()
    return ref


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _engine_step(model, x, y, *, rho, adaptive=False, make_opt, clip=None, seed=None, precision="fp32"):
    opt = make_opt(list(model.parameters()))
    if seed is not None:
        torch.manual_seed(seed)
    loss, hits = train_step(model, x, y, opt, make_loss(), amp=make_amp(precision, CPU), grad_clip=clip,
                            sam=SAM(opt, rho=rho, adaptive=adaptive))  # fmt: skip
    return loss, hits


# Adam for the ViT, as in the study; SGD for ViTBN: a bias in front of a BatchNorm (the patch norm's, before the
# projection and the token BN) has a gradient of rounding noise, which Adam turns into a step of +-lr either way.
@pytest.mark.parametrize(("name", "make_opt"), [("vit", _adam), ("vitbn", _sgd)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_is_the_update_written_out(name, make_opt, adaptive):
    torch.manual_seed(0)
    model = create_model(name, **TINY).train()
    x, y = _batch()
    rho = 0.5 if adaptive else 0.05
    expected = _reference_step(model, x, y, rho=rho, adaptive=adaptive, make_opt=make_opt)
    with torch.no_grad():
        loss_at_w = nn.functional.cross_entropy(copy.deepcopy(model)(x), y)
    loss, hits = _engine_step(model, x, y, rho=rho, adaptive=adaptive, make_opt=make_opt)
    assert_close(loss, loss_at_w)  # the loss reported is the one at w, not at w + e
    assert 0 <= hits.item() <= 12
    for (key, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert_close(p, q, msg=key)


def test_sam_differs_from_a_plain_step():
    torch.manual_seed(0)
    model = create_model("vit", **TINY).train()
    plain = copy.deepcopy(model)
    x, y = _batch()
    _engine_step(model, x, y, rho=0.5, make_opt=_sgd)
    opt = _sgd(list(plain.parameters()))
    train_step(plain, x, y, opt, make_loss(), amp=make_amp("fp32", CPU))
    moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(), plain.parameters(), strict=True)]
    assert max(moved) > 1e-3


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def test_bn_running_stats_move_once_per_sam_step():
    torch.manual_seed(0)
    model = create_model("vitbn", **TINY).train()
    one_pass = copy.deepcopy(model)
    x, y = _batch()
    with torch.no_grad():
        one_pass(x)  # the running statistics of a single forward pass on the batch
    _engine_step(model, x, y, rho=0.05, make_opt=_adam)
    after, expected = _bn_buffers(model), _bn_buffers(one_pass)
    assert len(expected) == sum(1 for m in model.modules() if isinstance(m, _BatchNorm)) * 3
    for key, value in expected.items():
        assert_close(after[key], value, msg=key)


def test_dropout_and_drop_path_masks_are_the_same_in_both_passes():
    torch.manual_seed(0)
    model = create_model("vit", **TINY, dropout=0.3, drop_path=0.5).train()
    x, y = _batch()
    expected = _reference_step(model, x, y, rho=0.05, make_opt=_adam, seed=7)
    _engine_step(model, x, y, rho=0.05, make_opt=_adam, seed=7)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert_close(p, q)
    other = _reference_step(model, x, y, rho=0.05, make_opt=_adam, seed=8)  # other masks: another update
    assert any(not torch.allclose(p, q) for p, q in zip(other.parameters(), expected.parameters(), strict=True))


def test_gradient_clipping_clips_the_update_gradient():
    torch.manual_seed(0)
    model = create_model("vitbn", **TINY).train()
    x, y = _batch()
    expected = _reference_step(model, x, y, rho=0.05, make_opt=_sgd, clip=0.01)
    _engine_step(model, x, y, rho=0.05, make_opt=_sgd, clip=0.01)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert_close(p, q)


def test_bf16_autocast_runs_both_passes_under_autocast():
    torch.manual_seed(0)
    model = create_model("vit", **TINY).train()
    x, y = _batch()
    ref = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference_step(ref, x, y, rho=0.05, make_opt=_sgd)
    _engine_step(model, x, y, rho=0.05, make_opt=_sgd, precision="bf16")
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert p.dtype == torch.float32  # fp32 master weights, restored exactly after the perturbed pass
        assert_close(p, q)


def test_a_compiled_model_takes_the_same_step():
    torch.manual_seed(0)
    model = create_model("vitbn", **TINY).train()
    eager = copy.deepcopy(model)
    x, y = _batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # the graph capture and autograd of the engine's path
    for net in (compiled, eager):
        for _ in range(2):
            _engine_step(net, x, y, rho=0.05, make_opt=_sgd)
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        assert_close(p, q)
    assert_close(_bn_buffers(model), _bn_buffers(eager))


def test_rho_must_be_positive():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    for rho in (0.0, -0.1):
        with pytest.raises(ValueError, match=rf"^sam_rho={rho!r} must be > 0$"):
            SAM(opt, rho=rho)
    with pytest.raises(ValueError, match=r"^sam_rho=0 must be > 0, or null for no SAM$"):
        TrainConfig(sam_rho=0)
    with pytest.raises(ValueError, match=r"^sam_adaptive=True \(ASAM\) needs sam_rho"):
        TrainConfig(sam_adaptive=True)


def test_a_zero_gradient_leaves_the_weights_where_they_are():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.zeros(2)
    sam = SAM(opt, rho=0.05)
    sam.perturb()
    assert_close(p.detach(), torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([3.0, 4.0])
    sam.restore()
    sam.perturb()  # e = 0.05 * (3, 4) / 5
    assert_close(p.detach(), torch.tensor([1.03, -1.96]))
    sam.restore()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0]))


# Two gloo ranks, each with half of a batch: the perturbation must use the all-reduced gradient, so both ranks
# hold the same weights after every step, and those of one process stepping on the whole batch.
BATCH, STEPS = 12, 2


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    init_distributed("cpu", sync_bn=False)
    torch.manual_seed(0)
    net = wrap_ddp(create_model("vit", **TINY).train(), device="cpu")
    per = BATCH // world
    opt = _sgd(list(net.parameters()))
    sam = SAM(opt, rho=0.1)
    for step in range(STEPS):
        x, y = _batch(BATCH, seed=step)
        train_step(net, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per], opt, make_loss(),
                   amp=make_amp("fp32", CPU), sam=sam)  # fmt: skip
    destroy_distributed()
    torch.save({k: v.detach() for k, v in unwrap(net).state_dict().items()}, Path(out) / f"rank{rank}.pt")


def test_two_ranks_step_identically_and_as_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    single = create_model("vit", **TINY).train()
    opt = _sgd(list(single.parameters()))
    sam = SAM(opt, rho=0.1)
    for step in range(STEPS):
        x, y = _batch(BATCH, seed=step)
        train_step(single, x, y, opt, make_loss(), amp=make_amp("fp32", CPU), sam=sam)
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_fit_with_sam_logs_it_and_its_time(tmp_path, data_root):
    from vitbn.engine import fit
    from vitbn.tracking import MemoryTracker

    cfg = RunConfig.from_dict({
        "model": {"name": "vitbn", "dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32},
        "data": {"root": str(data_root), "train_subset": 300, "test_subset": 100},
        "train": {"epochs": 1, "batch_size": 50, "device": "cpu", "out_dir": str(tmp_path), "sam_rho": 0.05,
                  "sam_adaptive": True},
        "track": {"run_name": "sam"},
    })  # fmt: skip
    tracker = MemoryTracker()
    result = fit(cfg, tracker=tracker, progress="none")
    assert result.status == "finished"
    params = tracker.run.params
    assert params["train.sam_rho"] in (0.05, "0.05") and params["train.sam_adaptive"] in (True, "True")
    assert result.history[0]["time/train_epoch_s"] > 0


def test_cli_rejects_a_bad_rho(capsys):
    from vitbn.cli import main

    assert main(["train", "--sam-rho", "-1", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vitbn train: error: --sam-rho: sam_rho=-1.0 must be > 0, or null for no SAM"
    )
    assert main(["train", "--asam", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vitbn train: error: --asam: sam_adaptive=True (ASAM) needs sam_rho, the radius of the perturbation"
    )
