"""The benchmarked work: a training step (the engine's own), an inference forward pass, the same with the
BatchNorms folded, each eager or compiled; and what is measured about each besides its speed: FLOPs per image,
peak memory and the shares of operator time (normalization, matrix products, copies, ...)."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from vitbn.bench.timing import Case
from vitbn.config import TrainConfig
from vitbn.engine.device import make_amp
from vitbn.engine.step import make_loss, train_step
from vitbn.engine.timing import synchronize
from vitbn.errors import first_line as message_line
from vitbn.models import VisionTransformer, forward_flops

MODES = ("train", "infer", "infer_folded")
# Operator-name fragments per category, first match wins (forward and backward ops alike).
OP_CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                "scaled_dot_product", "mkldnn", "gemm")),
    ("norm", ("layer_norm", "batch_norm")),
    ("softmax", ("softmax",)),
    ("copy", ("aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::_to_copy", "aten::contiguous",
              "aten::index", "aten::fill_", "aten::zero_")),
    ("optimizer", ("adam", "Optimizer.")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "gelu", "aten::sum", "aten::mean",
                     "aten::lerp", "aten::addc", "aten::sqrt", "aten::neg", "aten::exp", "loss", "aten::argmax",
                     "aten::eq", "aten::_foreach")),
)  # fmt: skip
# Kernel-name fragments per category (matched lower-case, first match wins), for the kernels of a CUDA profile
# whose launching operator is unknown or says nothing (cuBLAS/cuBLASLt, CUTLASS, flash and memory-efficient
# attention, cuDNN and ATen norms, fused optimizers, copies and memsets).
KERNEL_CATEGORIES = (
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "flash", "fmha", "attention", "sdpa")),
    ("norm", ("layer_norm", "layernorm", "batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford", "rms_norm")),
    ("softmax", ("softmax",)),
    ("optimizer", ("adam", "sgd")),
    ("copy", ("copy", "memcpy", "memset", "catarray", "index", "fill")),
    ("elementwise", ("elementwise", "reduce", "gelu", "functor")),
)  # fmt: skip
_WINDOW = "vitbn.bench.memory_window"


def first_line(exc: BaseException) -> str:
    """``ExcType: first line of the message``, short enough for a table cell."""
    return f"{type(exc).__name__}: {message_line(exc)[:120]}" if str(exc).strip() else type(exc).__name__


def batch_for(model: VisionTransformer, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of images of the model's shape, (B, C, H, W) float32, and (B,) int64 labels."""
    c = model.config
    h, w = (c.image_size, c.image_size) if isinstance(c.image_size, int) else c.image_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.channels, h, w, generator=gen)
    y = torch.randint(0, c.num_classes, (batch,), generator=gen)
    return x.to(device), y.to(device)


def fold(model: VisionTransformer) -> VisionTransformer:
    """The eval-mode model with its BatchNorms folded into the Linears (``vitbn.bn.fuse_bn``)."""
    from vitbn.bn import fuse_bn  # the BN toolkit; optional for the benchmark

    return fuse_bn(model.eval())


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` (the engine's way: the module, so forward and backward are compiled), or the
    model itself. Compilation happens at the first call, inside the warm-up."""
    return torch.compile(model) if enabled else model


def train_case(
    name: str, model: VisionTransformer, *, precision: str, batch: int, device: torch.device, compile: bool
) -> Case:
    """One training step of the engine (``vitbn.engine.step.train_step``: autocast forward, fp32 loss,
    ``zero_grad(set_to_none=True)``, backward, the engine's optimizer: fused Adam where available)."""
    from vitbn.engine.optim import build_optimizer

    model = model.to(device).train()
    net = compiled(model, compile)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    amp, loss_fn = make_amp(precision, device), make_loss()
    x, y = batch_for(model, batch, device)
    return Case(name, lambda: train_step(net, x, y, optimizer, loss_fn, amp=amp), images=batch, device=device)


def infer_case(
    name: str, model: VisionTransformer, *, precision: str, batch: int, device: torch.device, compile: bool
) -> Case:
    """One eval-mode forward pass under ``torch.inference_mode()`` and the precision's autocast."""
    model = model.to(device).eval()
    net = compiled(model, compile)
    amp = make_amp(precision, device, training=False)
    x, _ = batch_for(model, batch, device)

    def run() -> torch.Tensor:
        with torch.inference_mode(), amp.autocast():
            return net(x)

    return Case(name, run, images=batch, device=device)


def eval_img_s(
    models: dict[str, nn.Module], batch: int, repeats: int = 7, min_repeat_s: float = 0.2
) -> dict[str, float]:
    """Images per second of one eval-mode forward pass of each model at ``batch`` (fp32, eager, CPU), the models
    timed in the same interleaved rounds; median over the rounds."""
    from vitbn.bench.timing import interleave, warm_up

    device = torch.device("cpu")
    cases = {label: infer_case(label, model, precision="fp32", batch=batch, device=device, compile=False)
             for label, model in models.items()}  # fmt: skip
    for case in cases.values():
        warm_up(case, 3, min_repeat_s)
    interleave(list(cases.values()), repeats)
    return {label: case.img_s for label, case in cases.items()}


def flops_per_image(model: VisionTransformer, mode: str) -> int:
    """Matrix-product FLOPs per image (``torch.utils.flop_counter``): forward for inference modes, forward and
    backward for ``train``. Counted on a copy; the model is left as it is."""
    return forward_flops(model, train=mode == "train")


@contextlib.contextmanager
def quiet_profiler(**kwargs) -> Iterator:
    """``torch.profiler.profile`` (CPU activity unless ``activities`` is given) with its C++ start/stop banners
    (written straight to file descriptor 2) silenced; Python exceptions still propagate."""
    from torch.profiler import ProfilerActivity, profile

    kwargs.setdefault("activities", [ProfilerActivity.CPU])
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(**kwargs) as prof:
                yield prof
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(run: Callable[[], object], device: torch.device) -> tuple[float | None, str]:
    """Peak tensor memory of one call above the level before it, in MiB, and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation and free events that ``torch.profiler``
    records (``profile_memory=True``), summed in time order over the second of two profiled calls, so that
    every free in the window is of a block the profiler saw allocated. Process RSS would not do: freed memory
    stays with the C allocator and the next case reuses it without growing the RSS.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max_memory_allocated"
    with quiet_profiler(profile_memory=True) as prof:
        run()
        with torch.profiler.record_function(_WINDOW):
            run()
    try:
        events = list(prof.profiler.kineto_results.events())
        window = next(e for e in events if e.name() == _WINDOW)
        lo, hi = window.start_ns(), window.end_ns()
        memory = sorted(
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and lo <= e.start_ns() <= hi
        )
    except (AttributeError, TypeError, StopIteration):  # the profiler's result layout is not a public API
        return None, "n/a (profiler memory events unavailable)"
    live = itertools.accumulate(nbytes for _, nbytes in memory)
    return max(0, max(live, default=0)) / 2**20, "torch.profiler tensor allocations"


def categorize(op: str) -> str:
    """The category of an operator name (``OP_CATEGORIES``, first match), else ``"other"``."""
    for category, needles in OP_CATEGORIES:
        if any(n in op for n in needles):
            return category
    return "other"


def categorize_kernel(name: str) -> str:
    """The category of a CUDA kernel's name (``KERNEL_CATEGORIES``, first match), else ``"other"``."""
    lower = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(n in lower for n in needles):
            return category
    return "other"


def _skipped(event) -> bool:
    """A CPU event that launches nothing itself: a runtime call (``cudaLaunchKernel``), a user annotation
    (``Optimizer.step#Adam.step``, ``record_function``) or a Python frame."""
    name = event.name
    return (
        name.startswith(("cuda", "cuLaunch", "cuMemcpy", "cuMemset", "hip"))
        or "#" in name
        or bool(getattr(event, "is_user_annotation", False))
        or bool(getattr(event, "is_python_function", False))
    )


def _launcher(event) -> str | None:
    """The operator that launched the kernels recorded on ``event``: the event itself, or its nearest ancestor that
    is neither a runtime call nor an annotation; None if there is none."""
    while event is not None and _skipped(event):
        event = event.cpu_parent
    return None if event is None else event.name


def kernel_rows(events) -> list[tuple[str, float, str]]:
    """``(key, device microseconds, category)`` of every kernel (and memcpy/memset) of a CUDA profile, each once.

    Kineto shows a kernel's time three times: on the CPU event that launched it (``kernels``), as a device-side row
    of its own, and inside any ``gpu_user_annotation`` row (``Optimizer.step#...``) that spans it. Only the first is
    read here, from the CPU events; an entry named as its own event is not a kernel (an annotation's device-side
    span, or the legacy profiler's whole-operator time) and is left out. The key is the launching operator
    (``_launcher``), else the kernel's name; the category is the operator's (``categorize``), else the kernel
    name's (``categorize_kernel``).
    """
    from torch.autograd import DeviceType

    rows = []
    for event in events:
        if event.device_type != DeviceType.CPU or not event.kernels or getattr(event, "is_async", False):
            continue
        op = _launcher(event)
        for kernel in (k for k in event.kernels if k.name != event.name):
            category = categorize(op) if op is not None else "other"
            if category == "other":
                category = categorize_kernel(kernel.name)
            rows.append((op if op is not None else kernel.name, float(kernel.duration), category))
    return rows


def profile_rows(run: Callable[[], object], device: torch.device, iters: int) -> list[tuple[str, float, int, str]]:
    """``(operator, self time in microseconds, calls, category)`` over ``iters`` profiled calls of ``run``: on
    CUDA the device time of the kernels each operator launched (``kernel_rows``; ``calls`` counts kernels), CPU
    time elsewhere."""
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with quiet_profiler(activities=activities) as prof:
        for _ in range(iters):
            run()
        synchronize(device)
    if not cuda:
        return [(a.key, a.self_cpu_time_total, a.count, categorize(a.key)) for a in prof.key_averages()]
    totals: dict[tuple[str, str], list] = {}
    for key, us, category in kernel_rows(prof.events()):
        row = totals.setdefault((key, category), [0.0, 0])
        row[0], row[1] = row[0] + us, row[1] + 1
    return [(key, us, count, category) for (key, category), (us, count) in totals.items()]


def self_times(run: Callable[[], object], device: torch.device, iters: int) -> list[tuple[str, float, int]]:
    """``(operator, self time in microseconds, calls)`` of every operator over ``iters`` profiled calls of ``run``:
    device time on CUDA (each kernel once, see ``kernel_rows``), CPU time elsewhere."""
    totals: dict[str, list] = {}
    for key, us, count, _category in profile_rows(run, device, iters):
        row = totals.setdefault(key, [0.0, 0])
        row[0], row[1] = row[0] + us, row[1] + count
    return [(key, us, count) for key, (us, count) in totals.items()]


def shares(rows: list[tuple[str, float, int, str]]) -> dict[str, float]:
    """Percent of the time per category (``OP_CATEGORIES`` and ``"other"``) of ``profile_rows``."""
    times = dict.fromkeys([c for c, _ in OP_CATEGORIES] + ["other"], 0.0)
    for _key, us, _count, category in rows:
        times[category] += us
    total = sum(times.values())
    return {c: 100.0 * t / total if total else float("nan") for c, t in times.items()}


def op_shares(run: Callable[[], object], device: torch.device, iters: int = 3) -> dict[str, float]:
    """Percent of operator time per category (``OP_CATEGORIES``: matrix products, normalization, softmax,
    copies, optimizer, elementwise, other) over ``iters`` profiled calls: operators' self time (on CUDA the device
    time of their kernels, each counted once; CPU time elsewhere) summed per category, over the sum for all. The
    profiler adds a fixed cost per operator, so cheap operators (the norms) come out over- rather than
    under-estimated on the CPU."""
    return shares(profile_rows(run, device, iters))
