"""The CUDA branches that no other test reaches on a CPU: fp16 with its GradScaler, SAM's replay of the CUDA
generator, a one-process NCCL group (DDP, PRepBN's idle parameters, the collectives), CUDA RNG states on resume,
the bench's CUDA profile, data and augmentation on the GPU, the TF32 policy, ``cuda:N`` devices, ghost BN under
autocast. Every test compares numbers (against the CPU, fp32, a hand-written reference or the profiler's own
device rows). Without CUDA the whole module is skipped; ``benchmarks/gpu.sh`` runs it first on a GPU machine:

    python -m pytest tests/test_cuda_paths.py -v -rs
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu.sh)")

from vitbn.config import AugmentConfig, RunConfig  # noqa: E402
from vitbn.data import Dataset, InMemoryLoader, PreparedData, Split  # noqa: E402
from vitbn.engine.checkpoint import rng_state, set_rng_state  # noqa: E402
from vitbn.engine.device import make_amp, resolve_device, set_tf32  # noqa: E402
from vitbn.engine.sam import SAM  # noqa: E402
from vitbn.engine.step import make_loss, train_step  # noqa: E402
from vitbn.errors import UserError  # noqa: E402
from vitbn.models import create_model  # noqa: E402

CUDA = torch.device("cuda", 0)
TINY = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32, "attn_impl": "explicit"}


@pytest.fixture(autouse=True)
def _fp32_stays_fp32():
    """Every test starts with TF32 off (the run's default policy) and leaves the flags as it found them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(False)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model(name: str = "vit", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**TINY, **overrides}).to(CUDA)


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g).to(CUDA), torch.randint(0, 10, (n,), generator=g).to(CUDA)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------- fp16 + GradScaler


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_fp16_step_with_its_grad_scaler_follows_the_fp32_step(grad_clip):
    x, y = _batch()
    deltas, losses = {}, {}
    for precision in ("fp32", "fp16"):
        model = _model().train()
        before = _params(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        amp = make_amp(precision, CUDA)
        loss, _ = train_step(model, x, y, optimizer, make_loss(), amp=amp, grad_clip=grad_clip)
        losses[precision] = loss
        deltas[precision] = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
        if precision == "fp16":
            assert amp.scaler is not None and amp.scaler.get_scale() == 2.0**16  # a finite step keeps the scale
    # fp16 products round to 11 bits: the loss and the SGD steps (lr * unscaled gradient, clipped or not) agree
    # to about 1e-3 relative; a step on the scaled gradient would be 65536 times too large.
    assert_close(losses["fp16"], losses["fp32"], rtol=1e-2, atol=1e-2)
    for got, want in zip(deltas["fp16"], deltas["fp32"], strict=True):
        assert_close(got, want, rtol=5e-2, atol=2e-4)


def test_fp16_scaler_skips_a_non_finite_step_and_halves_its_scale():
    x, y = _batch()
    x[0] = float("inf")
    model = _model().train()
    before = _params(model)
    amp = make_amp("fp16", CUDA)
    loss, _ = train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), make_loss(), amp=amp)
    assert not torch.isfinite(loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert amp.scaler.get_scale() == 2.0**15


def test_the_reference_plain_step_runs_fp16_with_a_scaler():
    from vitbn.bench.reference import plain_step

    x, y = _batch()
    model = _model().train()
    seen = []
    model.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    before = _params(model)
    step = plain_step(model, "fp16", x, y, compile=False)
    step()
    step()  # the scaler may skip a first step whose scaled gradients overflow: two steps move the weights
    assert seen == [torch.float16] * 2
    moved = [(p - b).abs().max().item() for p, b in zip(model.parameters(), before, strict=True)]
    assert 0 < max(moved) <= 2.2e-4  # an Adam step moves a weight by at most about lr = 1e-4


# ------------------------------------------------------------------------------------------ SAM's RNG replay


def test_sam_replays_the_cuda_generator_in_its_second_pass():
    """Dropout and drop-path draw on the CUDA generator: SAM's second pass must see the first pass's masks. The
    reference does the two passes by hand, rewinding the CUDA generator between them."""
    x, y = _batch()
    options = {"depth": 2, "dropout": 0.2, "drop_path": 0.3}
    ours, ref = _model(**options).train(), _model(**options).train()
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    torch.cuda.manual_seed(123)
    train_step(ours, x, y, optimizer, make_loss(), amp=make_amp("fp32", CUDA), sam=SAM(optimizer, rho=0.05))

    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state(CUDA)
    F.cross_entropy(ref(x), y).backward()
    params = [p for p in ref.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * p.grad / (norm + 1e-12))
    ref.zero_grad(set_to_none=True)
    torch.cuda.set_rng_state(state, CUDA)
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w - 0.1 * p.grad)
    for got, want in zip(ours.parameters(), ref.parameters(), strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-5)  # other masks in pass 2 would move weights by ~lr * grad


# ------------------------------------------------------------------------------------------- NCCL, one process

_NCCL = """
import copy, json
import torch
import torch.nn.functional as F
from vitbn.engine.distributed import (all_reduce_mean, any_rank, destroy_distributed, exit_process, from_main,
                                      init_distributed, sum_over_ranks, wrap_ddp)
from vitbn.models import create_model
from vitbn.models.norms import set_prepbn_lambda

info = init_distributed("cuda")
device = info.device("cuda")
out = {"backend": info.backend, "device": str(device)}
g = torch.Generator().manual_seed(0)
x, y = torch.randn(8, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device)
for norm, lam in (("layer", None), ("prepbn", 1.0), ("prepbn", 0.0)):
    torch.manual_seed(0)
    plain = create_model("vit", norm=norm, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32,
                         attn_impl="explicit").to(device)
    if lam is not None:
        set_prepbn_lambda(plain, lam)
    twin = copy.deepcopy(plain)
    ddp = wrap_ddp(twin, device=device)
    for net, model in ((plain, plain), (ddp, twin)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    out[f"{norm}:{lam}"] = {
        "type": type(ddp).__name__,
        "diff": max((a - b).abs().max().item() for a, b in zip(plain.parameters(), twin.parameters())),
        "idle": [sum(p.grad is None for p in m.parameters()) for m in (plain, twin)],
    }
out["mean"] = all_reduce_mean(torch.tensor(3.5, device=device))
out["sums"] = sum_over_ranks([1.0, 2.5])
out["any"] = [any_rank(False), any_rank(True)]
out["main"] = from_main({"a": 1})
print("RESULT " + json.dumps(out), flush=True)
destroy_distributed(barrier=True)
exit_process(0)
"""


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="this PyTorch build has no NCCL")
def test_nccl_group_of_one_process_trains_as_the_plain_model():
    """NCCL set-up, DDP on cuda:LOCAL_RANK (with find_unused_parameters for PRepBN at lambda 1 and 0) and the
    collectives, in a child process (it leaves with exit_process, as a torchrun rank does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _NCCL], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert (out["backend"], out["device"]) == ("nccl", "cuda:0")
    for key in ("layer:None", "prepbn:1.0", "prepbn:0.0"):
        assert out[key]["type"] == "DistributedDataParallel"
        assert out[key]["diff"] <= 1e-6, key  # one rank: DDP's average of one gradient is that gradient
        assert out[key]["idle"][0] == out[key]["idle"][1], key  # idle parameters keep no gradient, as in one process
    assert out["prepbn:1.0"]["idle"][0] > 0 and out["prepbn:0.0"]["idle"][0] > 0
    assert (out["mean"], out["sums"], out["any"], out["main"]) == (3.5, [1.0, 2.5], [False, True], {"a": 1})


# ------------------------------------------------------------------------------------------- CUDA RNG resume


def test_cuda_rng_states_resume_also_with_more_states_than_devices():
    torch.cuda.init()
    torch.cuda.manual_seed_all(7)
    state = rng_state()
    expected = torch.rand(4, device=CUDA)
    visible = torch.cuda.device_count()
    assert len(state["cuda"]) == visible
    state["cuda"] = [*state["cuda"], *(s.clone() for s in state["cuda"][:1] * 8)]  # as if 8 more were visible then
    torch.cuda.manual_seed_all(99)
    with pytest.warns(UserWarning, match=f"CUDA RNG states of {visible + 8} GPUs but {visible} are visible"):
        set_rng_state(state)
    assert torch.equal(torch.rand(4, device=CUDA), expected)


# ------------------------------------------------------------------------------------------ bench CUDA profile


def test_bench_cuda_profile_counts_each_kernel_once():
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    from vitbn.bench.cases import kernel_rows, op_shares, quiet_profiler, shares, train_case
    from vitbn.bench.targets import top_ops

    case = train_case("vit@2", create_model("vit", depth=2), precision="fp32", batch=64, device=CUDA, compile=False)
    for _ in range(3):
        case.run()
    torch.cuda.synchronize()
    with quiet_profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        case.run()
        torch.cuda.synchronize()
    events = prof.events()
    rows = kernel_rows(events)
    annotations = {
        e.name for e in events if e.device_type == DeviceType.CPU and (e.is_user_annotation or "#" in e.name)
    }
    device_rows = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in annotations
                   and not e.is_user_annotation]  # fmt: skip
    device_us = sum(e.time_range.elapsed_us() for e in device_rows)
    counted = sum(us for _, us, _ in rows)
    assert counted <= device_us * (1 + 1e-6) + 1.0  # never more than the device did: each kernel once
    assert counted >= 0.95 * device_us, sorted({e.name for e in device_rows})[:20]  # and (nearly) all of them
    got = shares([(key, us, 1, category) for key, us, category in rows])
    other = sorted({key for key, _, category in rows if category == "other"})
    assert got["other"] < 15.0, other
    assert got["matmul"] > 10.0 and got["norm"] > 0.0 and got["optimizer"] > 0.0, got
    assert_close(sum(op_shares(case.run, CUDA, 1).values()), 100.0)
    ops = top_ops(case.run, CUDA, iters=1, k=5)
    assert len(ops) == 5 and all(o["calls"] >= 1 and o["self_ms"] > 0 for o in ops)
    assert not any("#" in o["op"] for o in ops)  # no annotation row among the operators


# -------------------------------------------------------------------------------------------- data on the GPU


def _data(n_train: int = 120, n_test: int = 60) -> PreparedData:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
        return Split(images, torch.randint(0, 10, (n,), generator=g))

    info = Dataset("synthetic", split(n_train), split(n_test), [str(k) for k in range(10)], mean=(0.13,),
                   std=(0.31,), shape=(1, 28, 28))  # fmt: skip
    return PreparedData(train=info.train, val=None, test=info.test, info=info)


def test_loader_batches_on_the_gpu_equal_the_cpu_batches():
    data = _data()
    kwargs = dict(batch_size=32, mean=0.13, std=0.31, shuffle=True, seed=4)
    cpu, gpu = InMemoryLoader(data.train, **kwargs), InMemoryLoader(data.train, device=CUDA, **kwargs)
    for loader in (cpu, gpu):
        loader.set_epoch(3)
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda" and torch.equal(yg.cpu(), yc)
        assert_close(xg.cpu(), xc, rtol=1e-6, atol=1e-6)  # one fused multiply-add either way


def test_augmentation_on_the_gpu_draws_randaugment_on_the_host_without_a_sync():
    from vitbn.data.augment import Augmenter

    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    cfg = AugmentConfig(randaug_ops=2, randaug_magnitude=9)
    cpu, gpu = Augmenter(cfg, num_classes=10, seed=3), Augmenter(cfg, num_classes=10, seed=3)
    gpu(x.to(CUDA), y.to(CUDA))  # creates the generators
    for aug in (cpu, gpu):
        aug.set_epoch(1)
    assert gpu._host.device.type == "cpu"
    expected, _ = cpu(x, y)
    x_gpu, y_gpu = x.to(CUDA), y.to(CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        got, targets = gpu(x_gpu, y_gpu)
        cropped = Augmenter(AugmentConfig(crop_padding=2, randaug_ops=2, randaug_magnitude=9), num_classes=10, seed=3)
        cropped(got, targets)  # and with the crop's draws on the GPU generator
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # the same ops per image (drawn on the host with the same seed); bilinear warps differ by float rounding
    close = ((got.cpu() - expected).abs() <= 1e-4).float().mean().item()
    assert close >= 0.999, close


def _fit(tmp_path, device: str, **train):
    from vitbn.engine import fit
    from vitbn.tracking import MemoryTracker

    train = {"epochs": 1, "batch_size": 40, "eval_batch_size": 60, "optimizer": "sgd", "lr": 0.05, "device": device,
             "max_steps_per_epoch": 3, "out_dir": str(tmp_path), **train}  # fmt: skip
    config = RunConfig.from_dict({"model": {"name": "vitbn", **TINY}, "train": train,
                                  "track": {"enabled": False, "run_name": device.replace(":", "")}})  # fmt: skip
    return fit(config, tracker=MemoryTracker(), data=_data(), progress="none").history[0]


def test_training_on_cuda_n_matches_the_cpu_and_tf32_is_one_policy(tmp_path):
    cpu = _fit(tmp_path, "cpu")
    gpu = _fit(tmp_path, "cuda:0", tf32=False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    for key in ("train/loss", "test/loss"):  # fp32 on both: 3 SGD steps apart only by summation order
        assert_close(gpu[key], cpu[key], rtol=1e-4, atol=1e-5, msg=key)
    tf32 = _fit(tmp_path / "tf32", "cuda:0", tf32=True)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    assert_close(tf32["train/loss"], cpu["train/loss"], rtol=1e-2, atol=1e-3)  # TF32: 10-bit products


def test_tf32_policy_changes_matmul_precision():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    exact = (a.double() @ b.double()).float()
    errors = {}
    for enabled in (False, True):
        set_tf32(enabled)
        got = (a.to(CUDA) @ b.to(CUDA)).cpu()
        errors[enabled] = ((got - exact).norm() / exact.norm()).item()
    assert errors[False] < 1e-5, errors  # fp32 products
    major, _ = torch.cuda.get_device_capability(CUDA)
    if major >= 8:  # Ampere and later have TF32: about 1e-3 relative
        assert errors[True] > 1e-5, errors
    set_tf32(False)
    conv = F.conv2d(a[None, None, :64, :64].to(CUDA), b[None, None, :3, :3].to(CUDA)).cpu()
    want = F.conv2d(a[None, None, :64, :64].double(), b[None, None, :3, :3].double()).float()
    assert_close(conv, want, rtol=1e-5, atol=1e-5)  # cuDNN follows the same policy: fp32 convolutions


def test_cuda_n_beyond_the_visible_gpus_is_one_line():
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(
        UserError, match=rf"device='cuda:{count}': {count} GPU\(s\) visible, cuda:0 to cuda:{count - 1}"
    ):
        resolve_device(f"cuda:{count}")


def test_ghost_bn_under_bf16_autocast_on_the_gpu_matches_batchnorm():
    from vitbn.models.norms import TokenBatchNorm

    torch.manual_seed(0)
    x = (50 + torch.randn(8, 3, 8, device=CUDA)).bfloat16()
    ghost = TokenBatchNorm(8, ghost_batch_size=4).to(CUDA).train()
    reference = copy.deepcopy(ghost.bn)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ghost(x).reshape(-1, 8)
        expected = torch.cat([reference(chunk.reshape(-1, 8)) for chunk in x.split(4)])
    assert out.dtype == expected.dtype
    assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-3)  # one bf16 rounding of fp32 results
