"""``vitbn bench``: throughput, FLOPs, utilization of the matrix-product peak, memory, norm and loader shares.

``--markdown PAGE.md`` also writes a page (its provenance line, then the text printed) and its JSON (``PAGE.json``
or ``--out``); ``--render PAGE.json --markdown PAGE.md`` writes that page again from the JSON, measuring nothing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vitbn.cli.args import add_set_argument
from vitbn.cli.flags import MODEL_FLAGS, add_flags, given, pick

if TYPE_CHECKING:
    from vitbn.bench import BenchOptions


def _list(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").split() if t]


def _depth(token: str) -> str | int:
    if token in ("study", "equal"):
        return token
    try:
        return int(token)
    except ValueError:
        raise argparse.ArgumentTypeError(f"depth {token!r} is not 'study', 'equal' or an integer") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure training/inference throughput, FLOPs, utilization of the matmul peak, memory",
        description="Times every model x depth x precision x mode (x compiled) after warm-up, interleaved in "
        "rounds, against the dense matrix-product peak measured in the same rounds. See docs/benchmarks.md.",
    )
    p.add_argument(
        "--quick", action="store_true", help="study depths, no compile, 3 short rounds, lighter profiling (< 2 minutes)"
    )
    p.add_argument("--models", type=_list, help="comma-separated presets (default: vit,vitbnffn,vitbn)")
    p.add_argument(
        "--depths",
        type=lambda s: [_depth(t) for t in _list(s)],
        help="comma-separated: study (ViT 6, BN models 1), equal (6), or integers (default: study,equal)",
    )
    p.add_argument(
        "--precisions",
        type=_list,
        help="comma-separated: fp32, bf16 (default: both; with --quick, bf16 only where the hardware has it)",
    )
    p.add_argument("--modes", type=_list, help="comma-separated: train, infer, infer_folded (default: all)")
    p.add_argument("--batch-size", type=int, help="training batch (default 100)")
    p.add_argument("--infer-batch-size", type=int, help="inference batch (default 1000)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's, the physical cores)")
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TF32 for fp32 matmuls and cuDNN convolutions alike on Ampere+ GPUs (default: off, fp32 stays fp32)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile'd cases (default: yes, no with --quick)",
    )
    p.add_argument("--repeats", type=int, help="timed rounds (default 7, 3 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed iterations per case (default 5, 1 with --quick)")
    p.add_argument("--min-repeat-s", type=float, help="seconds one timed repeat lasts at least")
    p.add_argument("--peak-size", type=int, help="n of the n^3 matmul that measures the peak (default 2048)")
    p.add_argument("--bandwidth-mib", type=int, help="MiB copied to measure memory bandwidth (default 512)")
    p.add_argument(
        "--no-loader", dest="loader", action="store_false", default=None, help="skip timing the MNIST loader epoch"
    )
    p.add_argument("--loader-epochs", type=int, help="timed loader epochs (default 3, 1 with --quick)")
    p.add_argument(
        "--no-norm-profile",
        dest="profile_norms",
        action="store_false",
        default=None,
        help="skip profiling the shares of operator time (norm%%, mm%%)",
    )
    p.add_argument(
        "--reference",
        metavar="PATH",
        help="a vit-pytorch copy (pip install --no-deps --target PATH vit-pytorch einops): its ViT's plain training "
        "step is timed in the same rounds, for the 1.2x target",
    )
    p.add_argument(
        "--loader-augment",
        dest="augment",
        choices=("none", "light", "medium", "heavy"),
        help="also time the loader with this AugReg level on (default medium; none: not)",
    )
    p.add_argument("--profile-top", type=int, help="operators in the training step's profile (default 12; 0: none)")
    p.add_argument("--profile-iters", type=int, help="profiled calls per case for norm%%/mm%% (default 3, 1 quick)")
    p.add_argument(
        "--tune-allocator",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="raise glibc's mmap/trim thresholds first (vitbn.bench.tune_cpu_allocator; default no)",
    )
    p.add_argument("--no-recipes", dest="recipes", action="store_false", default=None,
                   help="skip the recipe section (parallel vs sequential blocks, hMLP vs linear stem)")  # fmt: skip
    p.add_argument("--no-norms", dest="norms", action="store_false", default=None,
                   help="skip the norms section (LayerNorm, RMSNorm, DyT, BN, PRepBN at depth 6)")  # fmt: skip
    p.add_argument("--norm-variants", type=_list,
                   help="the norms section's variants (default: ln,rms,dyt,bnffn,bn,prepbn)")  # fmt: skip
    p.add_argument("--no-export", dest="export", action="store_false", default=None,
                   help="skip the export section (onnxruntime vs eager and folded torch, CPU fp32)")  # fmt: skip
    add_set_argument(p, help="a ModelConfig field for every model, e.g. --set dim=16 (repeatable)")
    add_flags(p.add_argument_group("model knobs for every model (as --set)"), BENCH_MODEL_FLAGS)
    p.add_argument("--out", help="write the result as JSON to this file (with --markdown: default its name, .json)")
    p.add_argument(
        "--markdown",
        metavar="FILE",
        help="also write a Markdown page: the provenance (command, date, commit, machine, torch) and the text printed",
    )
    p.add_argument(
        "--render",
        metavar="FILE.json",
        help="measure nothing: write the --markdown page again from a JSON written by --out or --markdown",
    )
    p.set_defaults(func=run)


_FIELDS = (
    "models",
    "depths",
    "precisions",
    "modes",
    "batch_size",
    "infer_batch_size",
    "device",
    "threads",
    "tf32",
    "compile",
    "repeats",
    "warmup",
    "min_repeat_s",
    "peak_size",
    "bandwidth_mib",
    "loader",
    "loader_epochs",
    "profile_norms",
    "profile_iters",
    "profile_top",
    "reference",
    "augment",
    "recipes",
    "norms",
    "norm_variants",
    "export",
)
# The shared model flags, but the bench's own --models and --depths choose the presets and depths.
BENCH_MODEL_FLAGS = pick(MODEL_FLAGS, drop=("--model", "--depth"))


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The ``BenchOptions`` the command line asks for (``--quick`` defaults, then the explicit options)."""
    from vitbn.bench import BenchOptions

    changes = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    for name in ("models", "depths", "precisions", "modes", "norm_variants"):
        if name in changes:
            changes[name] = tuple(changes[name])
    if args.tune_allocator is not None:
        changes["tune_allocator"] = args.tune_allocator
    changes["overrides"] = {**dict(args.overrides), **given(args, BENCH_MODEL_FLAGS).get("model", {})}
    return BenchOptions.quick(**changes) if args.quick else BenchOptions(**changes)


def run(args: argparse.Namespace) -> int:
    from vitbn.bench import format_report, run_bench
    from vitbn.bench.report import as_saved, bench_page, publish, render_page
    from vitbn.engine.device import resolve_device
    from vitbn.errors import UserError
    from vitbn.provenance import current

    if args.markdown and Path(args.markdown).suffix == ".json":
        raise UserError(f"--markdown {args.markdown} names the page (.md); its JSON goes next to it (or to --out)")
    if args.render:
        if not args.markdown:
            raise UserError(f"--render {args.render} needs --markdown OUT: the page to write")
        if args.out:
            raise UserError("--render measures nothing: --out (the JSON of a measurement) does not go with it")
        print(f"wrote {render_page(args.render, args.markdown)}")
        return 0
    options = options_from_args(args)
    made = current(device=str(resolve_device(options.device)))  # the code and the start of the measurement
    result = run_bench(options, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    # what is printed, saved and put on the page: the result as its JSON holds it, with the measurement's provenance
    result = as_saved({**result, "provenance": made.to_dict()})
    publish(result, format_report(result), args.out, args.markdown, bench_page)
    return 0
