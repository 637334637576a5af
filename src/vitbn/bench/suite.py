"""``run_bench``: plans the configurations, builds and warms every case, times them interleaved with the
matrix-product peaks, and returns the rows with FLOPs, utilization, memory, norm share and the loader's share."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vitbn.bench import cases as C
from vitbn.bench.roofline import bandwidth_case, bytes_moved, roofline
from vitbn.bench.system import environment, native_bf16, tune_cpu_allocator
from vitbn.bench.targets import against_reference, profile_training, profiler_check
from vitbn.bench.timing import Case, interleave, matmul_case, paired_ratio, summarize, warm_up
from vitbn.config import PRECISIONS
from vitbn.engine.device import resolve_device, set_tf32
from vitbn.errors import UserError, first_line
from vitbn.models import create_model, list_models

# The study's depths: the ViT with 6 blocks against BN models with 1; "equal" compares all at the ViT's.
STUDY_DEPTHS = {"vit": 6, "vitbnffn": 1, "vitbn": 1}
EQUAL_DEPTH = 6
MNIST_TRAIN_IMAGES = 60_000
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchOptions:
    """What ``run_bench`` measures and how long it tries. ``quick()`` gives the two-minute variant."""

    models: tuple[str, ...] = ("vit", "vitbnffn", "vitbn")
    depths: tuple[str | int, ...] = ("study", "equal")  # "study" (ViT 6, BN models 1), "equal" (6), or ints
    precisions: tuple[str, ...] = ("fp32", "bf16")
    modes: tuple[str, ...] = C.MODES
    compile: bool = True  # also time torch.compile'd cases (where the compiler works)
    batch_size: int = 100  # training batch (the study's)
    infer_batch_size: int = 1000
    device: str = "auto"
    threads: int | None = None  # torch.set_num_threads; None keeps PyTorch's choice (the physical cores)
    tf32: bool = False  # TF32 for fp32 matmuls and cuDNN convolutions alike on CUDA (train.tf32's policy)
    warmup: int = 5  # untimed iterations per case (the compiled ones compile in the first)
    repeats: int = 7  # timed rounds; every round times every case once
    min_repeat_s: float = 0.3  # a repeat runs enough iterations to last this long
    peak_size: int = 2048  # the n of the n^3 matrix product that measures the peak
    bandwidth_mib: int = 512  # the buffer copied to measure main-memory bandwidth (well beyond the caches)
    loader: bool = True  # time an InMemoryLoader epoch of MNIST
    loader_epochs: int = 3  # timed loader epochs (after one untimed)
    augment: str = "medium"  # also time the loader with this AugReg level on ("none": not)
    profile_norms: bool = True  # profile operator-time shares (norms, matmuls, ...) of the eager cases
    profile_iters: int = 3  # profiled calls per case for those shares
    tune_allocator: bool = False  # vitbn.bench.system.tune_cpu_allocator() before measuring
    recipes: bool = True  # the recipe section: parallel vs sequential blocks, hMLP vs linear stem
    norms: bool = True  # the norms section: LayerNorm, RMSNorm, DyT, BN (FFN, everywhere), PRepBN at depth 6
    norm_variants: tuple[str, ...] | None = None  # the norms section's variants (None: all of them)
    export: bool = True  # the export section: onnxruntime vs eager and folded torch (needs the export extra)
    short: bool = False  # set by ``quick()``: the recipe section measures fewer layouts and batches too
    overrides: dict = field(default_factory=dict)  # ModelConfig fields for every model (tests, studies)
    reference: str | None = None  # a vit-pytorch copy: its ViT's plain training step, timed in the same rounds
    profile_top: int = 12  # operators of the training step's profile (0: none)

    @classmethod
    def quick(cls, **changes) -> BenchOptions:
        """The study's depths only, no compilation, 3 short rounds, bf16 only where the hardware has it: a few
        minutes on 2 CPU cores."""
        base = dict(depths=("study",), compile=False, warmup=1, repeats=3, min_repeat_s=0.1, loader_epochs=1)
        base["precisions"] = ("fp32", "bf16") if native_bf16() else ("fp32",)
        base.update(profile_iters=1, short=True)
        return cls(**{**base, **changes})

    def __post_init__(self) -> None:
        for name, values, allowed in (
            ("models", self.models, tuple(list_models())),
            ("precisions", self.precisions, PRECISIONS),
            ("modes", self.modes, C.MODES),
        ):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise UserError(f"{name}={list(values)} must be a non-empty subset of {', '.join(allowed)}")
        for d in self.depths:
            if d not in ("study", "equal") and not (isinstance(d, int) and d > 0):
                raise UserError(f"depth {d!r} is not 'study', 'equal' or a positive integer")
        if self.reference is not None:
            from vitbn.bench.reference import reference_file

            reference_file(self.reference)  # before anything is measured
        for name in ("batch_size", "infer_batch_size", "repeats", "peak_size", "loader_epochs", "profile_iters"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)} must be a positive integer")
        if {"depth", "name"} & set(self.overrides):
            raise UserError("overrides may not set 'depth' or 'name': choose them with depths and models")
        if self.threads is not None and self.threads <= 0:
            raise UserError(f"threads={self.threads} must be a positive integer")


@dataclass(frozen=True)
class Spec:
    """One row of the table before it is measured."""

    model: str
    depth: int
    precision: str
    mode: str
    compiled: bool

    @property
    def name(self) -> str:
        return f"{self.model}@{self.depth} {self.precision} {self.mode}{' compiled' if self.compiled else ''}"


def model_depths(options: BenchOptions) -> list[tuple[str, int]]:
    """(model, depth) pairs in order, without duplicates (ViT's study depth is the equal depth)."""
    pairs: list[tuple[str, int]] = []
    for model in options.models:
        for d in options.depths:
            depth = STUDY_DEPTHS[model] if d == "study" else EQUAL_DEPTH if d == "equal" else int(d)
            if (model, depth) not in pairs:
                pairs.append((model, depth))
    return pairs


def plan(options: BenchOptions) -> list[Spec]:
    """Every configuration to measure; folded inference only for models with a BatchNorm."""
    specs = []
    for model, depth in model_depths(options):
        has_bn = create_model(model, depth=1, **options.overrides).config.uses_batchnorm
        for precision in options.precisions:
            for mode in options.modes:
                if mode == "infer_folded" and not has_bn:
                    continue
                for compiled in (False, True) if options.compile else (False,):
                    specs.append(Spec(model, depth, precision, mode, compiled))
    return specs


class Unavailable(Exception):
    """A case that cannot run here (no compiler, no BN folding); its row says ``n/a (reason)``."""


def compile_settings() -> dict:
    """``torch._dynamo.config`` values for the run: the suite compiles one forward code object for many
    configurations, so the recompile limit is raised, and hitting it is an error rather than a silent fallback
    to eager that would be reported as compiled speed. (Both names exist across PyTorch versions.)"""
    cfg, out = torch._dynamo.config, {}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            out[name] = max(getattr(cfg, name), 256)
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            out[name] = True
    return out


def compiler_status(device: torch.device) -> str | None:
    """None if ``torch.compile`` compiles and runs a small function on ``device``, else the reason it fails
    (on CPU the inductor backend needs a working C++ compiler)."""
    try:
        fn = torch.compile(lambda t: torch.nn.functional.gelu(t @ t) + 1)
        fn(torch.ones(8, 8, device=device))
    except Exception as exc:  # any compiler/toolchain failure
        return C.first_line(exc)
    return None


def prepare(spec: Spec, options: BenchOptions, device: torch.device, compile_error: str | None) -> tuple[Case, dict]:
    """Builds and warms up the case of ``spec`` and measures everything but its speed."""
    extras: dict = {"flops_img": None, "bytes_img": None, "mem_mb": None, "mem_method": None, "op_shares": None}
    train = spec.mode == "train"
    batch = options.batch_size if train else options.infer_batch_size
    model = create_model(spec.model, depth=spec.depth, **options.overrides)
    try:
        if spec.mode == "infer_folded":
            try:
                model = C.fold(model)
            except ImportError as exc:
                raise Unavailable(f"vitbn.bn.fuse_bn not importable: {exc}") from None
        extras["flops_img"] = C.flops_per_image(model, spec.mode)
        if spec.compiled and compile_error:
            raise Unavailable(compile_error)
        build = C.train_case if train else C.infer_case
        # the bytes of the eager step (compiled kernels bypass the dispatcher), counted after a first call
        eager = build(spec.name, model, precision=spec.precision, batch=batch, device=device, compile=False)
        eager.run()
        extras["bytes_img"] = bytes_moved(eager.run)["total"] / batch
        case = build(spec.name, model, precision=spec.precision, batch=batch, device=device, compile=spec.compiled)
        if spec.compiled:
            try:
                warm_up(case, options.warmup, options.min_repeat_s)
            except Exception as exc:  # compiler failures surface at the first call
                raise Unavailable(C.first_line(exc)) from None
        else:
            warm_up(case, options.warmup, options.min_repeat_s)
    except Unavailable as exc:
        return Case(spec.name, lambda: None, images=batch, device=device, error=str(exc)), extras
    extras["mem_mb"], extras["mem_method"] = C.peak_memory(case.run, device)
    if options.profile_norms and not spec.compiled:
        extras["op_shares"] = C.op_shares(case.run, device, options.profile_iters)
    return case, extras


def time_loader(
    batch_size: int, device: torch.device, epochs: int = 3, max_batches: int | None = None, augment: str = "none"
) -> dict:
    """Seconds to iterate one shuffled ``InMemoryLoader`` epoch of the MNIST training set (median of
    ``epochs``, after one untimed), the loading work a training epoch adds to its steps. ``max_batches``
    shortens the epoch (tests); ``images`` says how many images the timed epoch had. With an ``augment`` level
    other than none, ``augmented`` holds the same timing with that level's ``Augmenter`` on every batch."""
    from vitbn.data import load_dataset

    try:
        data = load_dataset("mnist")
    except (UserError, OSError) as exc:
        reason = first_line(exc)[:160]
        return {"status": f"n/a (MNIST: {reason})", "epoch_s": None, "images": None, "samples": []}
    out = {"status": "ok", **_loader_epochs(data, batch_size, device, epochs, max_batches, None)}
    if augment != "none":
        from vitbn.config import AugmentConfig
        from vitbn.data.augment import Augmenter

        augmenter = Augmenter(AugmentConfig.from_level(augment), num_classes=len(data.classes))
        out["augmented"] = {"level": augment, **_loader_epochs(data, batch_size, device, epochs, max_batches,
                                                                augmenter)}  # fmt: skip
    return out


def _loader_epochs(data, batch_size: int, device: torch.device, epochs: int, max_batches, augment) -> dict:
    from vitbn.data import InMemoryLoader
    from vitbn.engine.timing import synchronize

    loader = InMemoryLoader(
        data.train, batch_size=batch_size, mean=data.mean, std=data.std, shuffle=True, device=device,
        max_batches=max_batches, augment=augment,
    )  # fmt: skip
    samples = []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        synchronize(device)
        start = time.perf_counter()
        for _batch in loader:
            pass
        synchronize(device)
        if epoch:
            samples.append(time.perf_counter() - start)
    return {"epoch_s": statistics.median(samples), "images": loader.num_samples, "samples": samples}


def _num(x: float | None) -> float | None:
    """JSON-safe: None for missing or NaN values (the table rounds, the JSON keeps every digit)."""
    return None if x is None or x != x else float(x)


def make_row(
    spec: Spec, case: Case, extras: dict, peaks: dict[str, Case], loader: dict | None, bandwidth: float | None = None
) -> dict:
    """The table row of a measured case; the derived figures are computed from the stored medians. ``bandwidth``
    (GB/s, measured in the same rounds) gives the case's roofline bound with its FLOPs and bytes."""
    status = "ok" if case.error is None else f"n/a ({case.error})"
    row = {**dataclasses.asdict(spec), "batch": case.images, "status": status}
    stats = summarize(case.samples)
    img_s, peak = stats["median"], peaks[spec.precision].img_s
    flops, shares = extras["flops_img"], extras["op_shares"]
    gflops = flops * img_s / 1e9 if flops is not None and case.error is None else None
    roof = roofline(flops, extras.get("bytes_img"), peak, bandwidth or 0.0)
    roof_pct = 100.0 * img_s / roof["roof_img_s"] if roof["roof_img_s"] and case.error is None else None
    row.update(
        img_s=_num(img_s),
        spread_pct=_num(stats["spread_pct"]),
        samples=case.samples,
        flops_img=flops,
        gflops=_num(gflops),
        peak_gflops=_num(peak),
        util_pct=_num(None if gflops is None else 100.0 * gflops / peak),
        bytes_img=extras.get("bytes_img"),
        roof_img_s=_num(roof["roof_img_s"]),
        roof_pct=_num(roof_pct),
        bound=roof["bound"],
        epoch_s=None,
        loader_pct=None,
        mem_mb=_num(extras["mem_mb"]),
        mem_method=extras["mem_method"],
        norm_pct=_num(shares["norm"]) if shares else None,
        matmul_pct=_num(shares["matmul"]) if shares else None,
        op_shares=shares,
    )
    if spec.mode == "train" and case.error is None:
        row["epoch_s"] = _num(MNIST_TRAIN_IMAGES / img_s)
        if loader and loader.get("epoch_s"):
            load_s = loader["epoch_s"] * MNIST_TRAIN_IMAGES / loader["images"]
            row["loader_pct"] = _num(100.0 * load_s / (load_s + MNIST_TRAIN_IMAGES / img_s))
    return row


def comparisons(measured: dict[Spec, Case], extras: dict[Spec, dict], bf16_target: float = 2.0) -> list[dict]:
    """Paired ratios (median over rounds of A/B, see ``paired_ratio``) that the issue sets targets for:
    bf16 over fp32 training (>= ``bf16_target``), compiled over eager, BN folded inference over the ViT's at the
    same depth (>= 1), and folded over unfolded inference, with the most folding can buy: removing all of the
    unfolded model's normalization time, ``1 / (1 - norm share)`` (``bound``)."""
    out = []

    def add(what: str, a: Spec, b: Spec, target: float | None, bound: float | None = None) -> None:
        ca, cb = measured.get(a), measured.get(b)
        if ca is None or cb is None or ca.error or cb.error:
            return
        ratio = paired_ratio(ca, cb)
        met = None if target is None else bool(ratio >= target)
        out.append({"what": what, "a": a.name, "b": b.name, "ratio": _num(ratio), "target": target, "met": met,
                    "bound": bound})  # fmt: skip

    for s in measured:
        if s.mode == "train" and s.precision == "bf16":
            add("bf16 / fp32 training", s, dataclasses.replace(s, precision="fp32"), bf16_target)
        if s.compiled:
            add("compiled / eager", s, dataclasses.replace(s, compiled=False), None)
        if s.mode == "infer_folded":
            unfolded = dataclasses.replace(s, mode="infer", compiled=False)
            shares = extras.get(unfolded, {}).get("op_shares")
            bound = 100.0 / (100.0 - shares["norm"]) if shares else None
            add("folded / unfolded inference", s, dataclasses.replace(s, mode="infer"), None, bound)
            add("BN folded / ViT inference", s, dataclasses.replace(s, model="vit", mode="infer"), 1.0)
    return out


def run_bench(options: BenchOptions, log: Callable[[str], None] = lambda _msg: None) -> dict:
    """Measures every planned configuration; returns ``{"meta", "peaks", "loader", "rows", "comparisons"}``.

    Args:
        options: what to measure.
        log: progress messages (one line each).
    """
    device = resolve_device(options.device)
    if device.type == "cuda":
        set_tf32(options.tf32)
    if options.threads:
        torch.set_num_threads(options.threads)
    tuned = tune_cpu_allocator() if options.tune_allocator else False
    env, date, started = environment(device), time.strftime("%Y-%m-%d %H:%M:%S %z"), time.perf_counter()
    with torch._dynamo.config.patch(compile_settings()):
        compile_error = None
        if options.compile:
            log("checking torch.compile ...")
            compile_error = compiler_status(device)
        peaks = {p: matmul_case(_DTYPES[p], device, options.peak_size) for p in options.precisions}
        bandwidth = bandwidth_case(device, options.bandwidth_mib)
        for case in (*peaks.values(), bandwidth):
            warm_up(case, 1, 0.0)
        measured: dict[Spec, Case] = {}
        extras: dict[Spec, dict] = {}
        for i, spec in enumerate(plan(options), 1):
            log(f"[{i}] warming up {spec.name}")
            measured[spec], extras[spec] = prepare(spec, options, device, compile_error)
        references = _references(options, device, compile_error, log) if options.reference else {}
        timed = [c for c in references.values() if c.error is None]
        log(f"timing {len(measured) + len(timed)} cases in {options.repeats} interleaved rounds ...")
        interleave([*peaks.values(), bandwidth, *measured.values(), *timed], options.repeats)
        profile = profile_training(measured, device, options.profile_iters, options.profile_top, log)
        recipes = _recipes(options, device, log) if options.recipes else None
        norms = _norms(options, device, compile_error, log) if options.norms else None
    # outside the compile settings above: torch.onnx.export traces with torch.export, under dynamo's defaults
    export = _export(options, log) if options.export else None
    loader = (
        time_loader(options.batch_size, device, options.loader_epochs, augment=options.augment)
        if options.loader
        else None
    )
    meta = {
        **env,
        "load_avg_end": environment(device)["load_avg"],
        "date": date,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()},
        "allocator_tuned": tuned,
        "bandwidth_gb_s": bandwidth.img_s,
        "compile": "disabled" if not options.compile else f"n/a ({compile_error})" if compile_error else "ok",
        "seconds": time.perf_counter() - started,
    }
    peak_info = {p: {"size": options.peak_size, **summarize(c.samples), "samples": c.samples} for p, c in peaks.items()}
    rows = [make_row(s, measured[s], extras[s], peaks, loader, bandwidth.img_s) for s in measured]
    # CPUs with bf16 matrix units (AMX, AVX512-BF16) should train bf16 at >= 3x fp32; elsewhere 2x
    bf16_target = 3.0 if device.type == "cpu" and native_bf16(device) else 2.0
    return {
        "meta": meta,
        "peaks": peak_info,
        "loader": loader,
        "rows": rows,
        "comparisons": comparisons(measured, extras, bf16_target) + against_reference(measured, references),
        "profile": profile,
        "profiler_check": profiler_check(device, options.profile_iters) if options.profile_norms else None,
        "recipes": recipes,
        "norms": norms,
        "export": export,
    }


def _references(options: BenchOptions, device: torch.device, compile_error: str | None, log) -> dict:
    from vitbn.bench.reference import reference_cases

    log(f"warming up the reference (vit-pytorch from {options.reference})")
    return reference_cases(options.reference, precisions=options.precisions, batch=options.batch_size,
                           compile=options.compile and not compile_error, device=device, warmup=options.warmup,
                           min_repeat_s=options.min_repeat_s)  # fmt: skip


def _recipes(options: BenchOptions, device: torch.device, log: Callable[[str], None]) -> dict:
    """The recipe section for the ViT and ViTBN among ``options.models`` (else the first model), quick or full
    as the main table (``quick`` runs fewer layouts and batches)."""
    from vitbn.bench.recipes import RecipeOptions, run_recipes

    models = tuple(m for m in options.models if m in ("vit", "vitbn")) or options.models[:1]
    make = RecipeOptions.quick if options.short else RecipeOptions
    recipe = make(models=models, precisions=options.precisions, train_batch=options.batch_size,
                  overrides=tuple(options.overrides.items()))  # fmt: skip
    return run_recipes(recipe, device, options.repeats, options.warmup, options.min_repeat_s, log)


def _norms(options: BenchOptions, device: torch.device, compile_error: str | None, log: Callable[[str], None]) -> dict:
    """The norms section at depth 6, with the main table's precisions, batches and compile setting."""
    from vitbn.bench.norms import NormOptions, run_norms

    batches = tuple(dict.fromkeys((1, options.batch_size, options.infer_batch_size)))
    chosen = {"variants": tuple(options.norm_variants)} if options.norm_variants else {}
    norm = NormOptions(**chosen, precisions=options.precisions, batches=batches, train="train" in options.modes,
                       train_batch=options.batch_size, compile=options.compile,
                       overrides=tuple(options.overrides.items()))  # fmt: skip
    return run_norms(norm, device, options.repeats, options.warmup, options.min_repeat_s, compile_error, log)


def _export(options: BenchOptions, log: Callable[[str], None]) -> dict:
    """The export section (CPU, fp32) for ``options.models`` at the first of ``options.depths``, at batch 1 and the
    inference batch; ``quick`` times tiny models (unless overrides are given) at batch 1 and at most 100."""
    from vitbn.bench.export import TINY, ExportOptions, run_export

    d = options.depths[0]
    pairs = tuple(
        (m, STUDY_DEPTHS[m] if d == "study" else EQUAL_DEPTH if d == "equal" else int(d)) for m in options.models
    )
    overrides = options.overrides or (TINY if options.short else {})
    batch = min(options.infer_batch_size, 100) if options.short else options.infer_batch_size
    export = ExportOptions(models=pairs, batches=tuple(dict.fromkeys((1, batch))), overrides=tuple(overrides.items()))
    return run_export(export, options.repeats, options.warmup, options.min_repeat_s, log)
