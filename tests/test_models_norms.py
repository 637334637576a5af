"""The newer norms (RMSNorm, DyT, RepBN, PRepBN) against their formulas; PRepBN's lambda set by the engine's
step (exact on resume); folding; every kind in every slot trains, saves, loads and resumes; flags and names."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from vitbn.bn import convert_sync_batchnorm, freeze_bn, fuse_bn, recompute_bn_stats, set_ghost_batch_size
from vitbn.bn.fuse import unfolded_norms
from vitbn.cli import main
from vitbn.config import NORM_SLOTS, NORMS, DataConfig, ModelConfig, RunConfig, TrainConfig
from vitbn.data import prepare_data
from vitbn.engine import fit, load_model
from vitbn.engine.optim import PRepBNRamp
from vitbn.models import TokenBatchNorm, create_model
from vitbn.models.convert import vit_from_vit_pytorch
from vitbn.models.norms import DyT, PRepBN, RepBN, make_norm, prepbn_lambda, set_prepbn_lambda
from vitbn.tracking import MemoryTracker

TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32)
DATA = dict(train_subset=160, test_subset=80, val_size=40)


@pytest.fixture(scope="module")
def data():
    return prepare_data(DataConfig(**DATA))


def _tokens() -> torch.Tensor:
    return torch.randn(4, 5, 16) * 1.7 + 0.4  # (B, N, D)


def _randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith(("weight", "alpha", "eta")) else torch.randn_like(p))
    return module


def test_dyt_is_its_formula():
    dyt = _randomize(DyT(16, alpha=0.5))
    x = _tokens()
    assert_close(dyt(x), dyt.weight * torch.tanh(dyt.alpha * x) + dyt.bias)
    assert DyT(16, alpha=0.8).alpha.item() == pytest.approx(0.8)
    assert make_norm("dyt", 16, dyt_alpha=0.25).alpha.item() == 0.25


def test_rms_is_its_formula():
    rms = _randomize(make_norm("rms", 16))
    x = _tokens()
    assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight)


def _bn_reference(x: torch.Tensor, bn: nn.BatchNorm1d, training: bool) -> torch.Tensor:
    """BatchNorm per feature over batch x tokens, written out."""
    rows = x.reshape(-1, x.shape[-1])
    if training:
        var, mean = torch.var_mean(rows, dim=0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return ((rows - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias).reshape(x.shape)


def test_repbn_is_bn_plus_eta_x():
    rep = _randomize(RepBN(16))
    x = _tokens()
    assert_close(rep.train()(x), _bn_reference(x, rep.bn.bn, True) + rep.eta * x)
    assert_close(rep.eval()(x), _bn_reference(x, rep.bn.bn, False) + rep.eta * x)
    assert isinstance(rep.bn, TokenBatchNorm) and RepBN(16).eta.item() == 1.0


def test_prepbn_lambda_schedule():
    assert [prepbn_lambda(s, 10, 20) for s in (0, 9, 10, 15, 25, 30, 99)] == [1, 1, 1, 0.75, 0.25, 0, 0]
    assert prepbn_lambda(0, 0, 0) == 0.0
    ramp = PRepBNRamp.of_run(TrainConfig(epochs=3), steps_per_epoch=50)  # defaults: 15 warm-up steps, then 135
    assert (ramp.warmup, ramp.decay, ramp.end) == (15, 135, 150) and ramp(150) == 0.0 and ramp(149) > 0
    assert PRepBNRamp.of_run(TrainConfig(epochs=3, prepbn_warmup_steps=0, prepbn_decay_steps=60), 50).end == 60
    with pytest.raises(ValueError, match="prepbn_decay_steps=-1 must be an integer >= 0"):
        TrainConfig(prepbn_decay_steps=-1)


@pytest.mark.parametrize("lam", [1.0, 0.3, 0.0])
def test_prepbn_train_and_eval_against_the_hand_computed_blend(lam):
    norm = _randomize(PRepBN(16))
    norm.set_lambda(lam)
    x = _tokens()
    ln = F.layer_norm(x, (16,), norm.ln.weight, norm.ln.bias)
    bn = norm.repbn.bn.bn
    before = bn.running_mean.clone()
    train_out = norm.train()(x)
    rep = _bn_reference(x, bn, True) + norm.repbn.eta * x
    assert_close(train_out, lam * ln + (1 - lam) * rep)
    assert torch.equal(bn.running_mean, before) == (lam == 1.0)  # the LayerNorm-only warm-up runs no BN
    eval_out = norm.eval()(x)
    rep_eval = _bn_reference(x, bn, False) + norm.repbn.eta * x
    assert_close(eval_out, lam * ln + (1 - lam) * rep_eval)
    if lam == 0.0:
        assert_close(eval_out, norm.repbn(x))  # evaluation is RepBN alone
    with pytest.raises(ValueError, match=r"PRepBN lambda=1.5 must be in \[0, 1\]"):
        norm.set_lambda(1.5)


def test_prepbn_lambda_travels_in_the_state_dict():
    model = create_model("vit", norm="prepbn", **TINY)
    assert set_prepbn_lambda(model, 0.0) == 2 + 2 * 2 + 1  # embed in + out, 2 pre-norms per block, final
    fresh = create_model("vit", norm="prepbn", **TINY)
    assert all(m.phase == "layer" for m in fresh.modules() if isinstance(m, PRepBN))
    fresh.load_state_dict(model.state_dict())
    assert all(m.phase == "repbn" and m.lam.item() == 0.0 for m in fresh.modules() if isinstance(m, PRepBN))


def _trained(model: nn.Module) -> nn.Module:
    """Random affine parameters, a few train-mode passes (running statistics away from 0/1), eval mode."""
    _randomize(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 1, 28, 28) * 2 + 0.3)
    return model.eval()


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (TokenBatchNorm, RepBN, PRepBN, nn.BatchNorm2d))]


@pytest.mark.parametrize("kind", ["batch", "repbn", "prepbn"])
@pytest.mark.parametrize(
    "extra", [{}, {"parallel": 2}, {"stem": "hmlp", "patch_size": 4}, {"bn_stats": "scalar"}],
    ids=["sequential", "parallel", "hmlp", "scalar"],
)  # fmt: skip
def test_every_bn_kind_folds_exactly_in_every_slot(kind, extra):
    model = create_model("vit", **{**TINY, **extra}, **dict.fromkeys(NORM_SLOTS, kind))
    set_prepbn_lambda(model, 0.4)
    _trained(model)
    set_prepbn_lambda(model, 0.0)  # the end of the ramp: RepBN alone
    x = torch.randn(5, 1, 28, 28)
    fused = fuse_bn(model)
    with torch.no_grad():
        assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    assert _norm_modules(fused) == [] and not fused.config.uses_batchnorm
    assert unfolded_norms(fused) is None


def test_fuse_refuses_prepbn_before_lambda_zero():
    model = _trained(create_model("vit", norm="prepbn", **TINY))
    set_prepbn_lambda(model, 0.25)
    with pytest.raises(ValueError, match=r"fuse_bn cannot fold a PRepBN at lambda=0.25: it is affine only at lambda"):
        fuse_bn(model)


@pytest.mark.parametrize(("kind", "line"), [
    ("dyt", "fuse_bn left 7 norm(s) unfolded: 7 DyT (tanh is nonlinear)"),
    ("rms", "fuse_bn left 7 norm(s) unfolded: 7 RMSNorm (depends on the sample)"),
])  # fmt: skip
def test_fuse_says_what_it_leaves(kind, line):
    model = create_model("vit", norm=kind, **TINY).eval()
    fused = fuse_bn(model)
    assert unfolded_norms(fused) == line
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close(fused(x), model(x))


def test_bn_tools_reach_repbn_and_prepbn():
    model = create_model("vitbn", norm="prepbn", **TINY)
    inner = [m for m in model.modules() if isinstance(m, TokenBatchNorm)]
    assert len(inner) == 3 + 2 * 2 and set_ghost_batch_size(model, 2) == len(inner)
    set_ghost_batch_size(model, None)
    set_prepbn_lambda(model, 0.5)
    batches = [torch.randn(b, 1, 28, 28) for b in (3, 5)]
    reference = copy.deepcopy(model).train()
    ref_inputs = {id(m): [] for m in _token_bns(reference)}
    for m in _token_bns(reference):
        m.register_forward_pre_hook(lambda mod, a: ref_inputs[id(mod)].append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x in batches:
            reference(x)
    assert recompute_bn_stats(model, batches, num_batches=2) == 2  # PreciseBN
    for m, r in zip(_token_bns(model), _token_bns(reference)):
        var, mean = torch.var_mean(torch.cat(ref_inputs[id(r)]), dim=0, unbiased=True)
        assert_close(m.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        assert_close(m.bn.running_var, var, rtol=1e-5, atol=1e-6)
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        frozen = freeze_bn(copy.deepcopy(model)).train()  # FrozenBN: a fixed map, in train mode too
        assert_close(frozen(x), expected)
        synced = convert_sync_batchnorm(copy.deepcopy(model)).eval()  # outside a process group: plain BN
        assert_close(synced(x), expected)


def _token_bns(model: nn.Module) -> list[TokenBatchNorm]:
    return [m for m in model.modules() if isinstance(m, TokenBatchNorm)]


def _config(tmp_path, norms: dict, run_name: str, **train) -> RunConfig:
    norms = dict(norms)
    if norms.pop("_ramp", False):
        train = {"prepbn_warmup_steps": 1, "prepbn_decay_steps": 2, **train}
    train = {"epochs": 1, "batch_size": 40, "eval_batch_size": 80, "lr": 1e-3, "device": "cpu", "threads": 1,
             "out_dir": str(tmp_path), "max_steps_per_epoch": 2, **train}  # fmt: skip
    return RunConfig.from_dict({"model": {"name": "vit", **TINY, **norms}, "data": DATA, "train": train,
                                "track": {"enabled": False, "run_name": run_name}})  # fmt: skip


@pytest.mark.parametrize("kind", [k for k in NORMS if k != "none"])
def test_every_kind_in_every_slot_trains_saves_loads_and_resumes(tmp_path, data, kind):
    # PRepBN's default schedule spans the run's own steps: a fixed one, so the 1-epoch part ramps like the whole
    norms = {**dict.fromkeys(NORM_SLOTS, kind), **({"_ramp": True} if kind == "prepbn" else {})}
    whole = fit(_config(tmp_path, norms, "whole", epochs=2), tracker=MemoryTracker(), data=data, progress="none")
    with warnings.catch_warnings():  # PRepBN: the 1-epoch part ends before its ramp does, and says so
        warnings.simplefilter("ignore")
        part = fit(_config(tmp_path, norms, "part", epochs=1), tracker=MemoryTracker(), data=data, progress="none")
    resumed = fit(_config(tmp_path, norms, "part", epochs=2, resume=True), tracker=MemoryTracker(), data=data,
                  progress="none")  # fmt: skip
    assert whole.status == part.status == resumed.status == "finished"
    assert_close(resumed.model.state_dict(), whole.model.state_dict(), rtol=0, atol=0)
    assert [r["test/acc"] for r in resumed.history] == [r["test/acc"] for r in whole.history]
    loaded = load_model(tmp_path / "whole" / "model.pt").eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close(loaded(x), whole.model.eval()(x), rtol=0, atol=0)
    assert loaded.config == whole.model.config and [getattr(loaded.config, s) for s in NORM_SLOTS] == [kind] * 5


def test_prepbn_lambda_follows_the_step_and_is_exact_on_resume(tmp_path, data):
    norms = {"norm": "prepbn"}
    train = dict(epochs=3, max_steps_per_epoch=4, prepbn_warmup_steps=1)  # 120 images / 40: 9 steps; ramp 8
    tracker = MemoryTracker()
    whole = fit(_config(tmp_path, norms, "whole", **train), tracker=tracker, data=data, progress="none")
    lams = [r["prepbn/lambda"] for r in whole.history]
    assert lams == [prepbn_lambda(3 * e, 1, 8) for e in (1, 2, 3)] == [0.75, 0.375, 0.0]
    assert tracker.run.metric("prepbn/lambda") == lams
    assert tracker.run.params["prepbn.warmup_steps"] == "1" and tracker.run.params["prepbn.end_step"] == "9"
    assert all(m.lam.item() == 0.0 for m in whole.model.modules() if isinstance(m, PRepBN))

    def stop_after_one(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    fit(_config(tmp_path, norms, "part", **train), tracker=MemoryTracker(), data=data, on_epoch=stop_after_one,
        progress="none")  # fmt: skip
    resumed = fit(_config(tmp_path, norms, "part", resume=True, **train), tracker=MemoryTracker(), data=data,
                  progress="none")  # fmt: skip
    assert [r["prepbn/lambda"] for r in resumed.history] == lams
    assert_close(resumed.model.state_dict(), whole.model.state_dict(), rtol=0, atol=0)
    fuse_bn(whole.model.eval())  # lambda 0: folds

    with pytest.warns(UserWarning, match="PRepBN's lambda reaches 0 at step 39, after the run's 9 steps"):
        late = fit(_config(tmp_path, norms, "late", prepbn_decay_steps=38, **train), tracker=MemoryTracker(),
                   data=data, progress="none")  # fmt: skip
    assert late.history[-1]["prepbn/lambda"] == pytest.approx(1 - 8 / 38)


def test_norm_sets_every_slot_that_holds_one_and_names_the_model():
    assert ModelConfig.from_preset("vit", norm="dyt").name == "vit+norm=dyt"
    cfg = ModelConfig.from_preset("vit+norm=dyt", dyt_alpha=0.7)
    assert [getattr(cfg, s) for s in NORM_SLOTS] == ["dyt", "dyt", "dyt", "none", "dyt"] and cfg.dyt_alpha == 0.7
    bn = ModelConfig.from_preset("vitbn", norm="prepbn", final_norm="layer")  # per-slot settings win
    assert [getattr(bn, s) for s in NORM_SLOTS] == ["prepbn", "prepbn", "none", "prepbn", "layer"]
    assert ModelConfig.from_preset(bn.name) == bn
    assert ModelConfig.from_preset("vitbn", norm="batch").name == "vitbn"
    assert RunConfig.from_dict({"model": {"norm": "rms"}}).model.attn_norm == "rms"
    assert ModelConfig.from_preset("vit", norm="prepbn").uses_batchnorm
    with pytest.raises(ValueError, match="norm='group' is not one of 'layer', 'rms', 'batch'"):
        ModelConfig.from_preset("vit", norm="group")
    with pytest.raises(ValueError, match="dyt_alpha=0.0 must be > 0"):
        ModelConfig(dyt_alpha=0.0)


@pytest.mark.parametrize(("argv", "line"), [
    (["--norm", "group"], "argument --norm: invalid choice: 'group' (choose from 'layer', 'rms', 'batch', "
                              "'repbn', 'prepbn', 'dyt', 'none')"),
    (["--norm", "dyt", "--dyt-alpha", "-1"], "vitbn train: error: --dyt-alpha: dyt_alpha=-1.0 must be > 0"),
    (["--norm", "prepbn", "--prepbn-warmup-steps", "-3"],
     "vitbn train: error: --prepbn-warmup-steps: prepbn_warmup_steps=-3 must be an integer >= 0 or null"),
])  # fmt: skip
def test_bad_norm_flags_get_one_line(argv, line, capsys):
    with pytest.raises(SystemExit) if "invalid choice" in line else _no_raise():
        assert main(["train", *argv, "--no-track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert line in err[-1]


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("kind", ["rms", "dyt", "repbn", "prepbn"])
def test_vit_pytorch_loader_refuses_kinds_it_does_not_have(kind):
    with pytest.raises(ValueError, match=f"vit-pytorch has no {kind!r} norm"):
        vit_from_vit_pytorch({}, image_size=28, patch_size=7, num_classes=10, dim=16, depth=1, heads=2,
                             mlp_dim=32, attn_norm=kind)  # fmt: skip
