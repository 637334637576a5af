"""``vitbn export``: a trained model as ONNX (or TorchScript), BatchNorms folded, checked against the eager model."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vitbn.errors import UserError, first_line


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a saved model as ONNX (or TorchScript) and check it against the eager model",
        description="Writes the model of a model.pt (or run folder) as ONNX with a dynamic batch axis, input "
        "'image' (B, C, H, W) float32 normalized as the model was trained, output 'logits'; the preprocessing (the "
        "dataset, classes, mean and std) is in the file's metadata_props. Then runs the written file on test images "
        "of the model's dataset (seeded random inputs where it does not load) and compares its logits with the "
        "eager model's; a max abs difference above 1e-4 fails the export and leaves no file.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model.pt written by `vitbn train`, or its run folder")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                   help="onnx (default; needs the export extra) or torchscript (torch.jit.trace, deprecated by "
                   "PyTorch)")  # fmt: skip
    p.add_argument("--fuse-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the BatchNorms into the linear layers first (default: yes)")  # fmt: skip
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's); one that this model cannot be "
                   "converted to is an error (LayerNormalization needs 17 or later)")  # fmt: skip
    p.add_argument("--out", metavar="FILE", help="the file to write (default: model.onnx / model.ts beside CHECKPOINT)")
    p.add_argument("--check-images", type=int, default=100, metavar="N",
                   help="inputs of the parity check (default 100; 0 skips it)")  # fmt: skip
    p.set_defaults(func=run)


def _load(checkpoint: str):
    """The model and its InputSpec (None, with the reason, when the model file records none)."""
    from vitbn.engine.checkpoint import load_inference, load_model

    model = load_model(checkpoint)  # a missing or corrupt file is a one-line error here
    try:
        return model, load_inference(checkpoint)[1], None
    except UserError as exc:
        return model, None, first_line(exc)


def _target(args: argparse.Namespace) -> Path:
    from vitbn.engine.checkpoint import resolve_model_path
    from vitbn.export import DEFAULT_NAMES

    if args.out:
        return Path(args.out)
    return resolve_model_path(args.checkpoint).parent / DEFAULT_NAMES[args.format]


def _check_options(args: argparse.Namespace) -> None:
    from vitbn.export import require_onnx

    if args.check_images < 0:
        raise UserError(f"--check-images {args.check_images} must be >= 0")
    if args.opset is not None and args.format != "onnx":
        raise UserError("--opset applies to --format onnx only")
    if args.format == "onnx":
        require_onnx()
        if args.opset is not None:
            import onnx

            newest = onnx.defs.onnx_opset_version()
            if not 1 <= args.opset <= newest:
                raise UserError(f"--opset {args.opset} must be in 1..{newest} (the installed onnx's newest)")


def run(args: argparse.Namespace) -> int:
    from vitbn import export as E
    from vitbn.models import count_params

    _check_options(args)
    model, spec, no_spec = _load(args.checkpoint)
    folding = "BatchNorms folded (fuse_bn)" if args.fuse_bn else "not folded (--no-fuse-bn)"
    print(f"model     {args.checkpoint}  ({model.config.name}, {count_params(model):,} parameters; {folding})")
    if args.fuse_bn:
        _print_unfolded(model)
    if spec is None:
        print(f"input     not recorded ({no_spec}): the exported file will not say how to preprocess")
    else:
        print(f"input     {spec.dataset}, {len(spec.classes)} classes, mean {list(spec.mean)} std {list(spec.std)}")
    out, started = _target(args), time.perf_counter()
    # Written under a temporary name and checked there: a failed check leaves no file (and an older one intact).
    with E.atomic_target(out) as tmp:
        if args.format == "onnx":
            E.export_onnx(model, tmp, spec=spec, opset=args.opset, fuse=args.fuse_bn)
            what = f"ONNX opset {E.onnx_opset(tmp)}"
        else:
            E.export_torchscript(model, tmp, spec=spec, fuse=args.fuse_bn)
            what = "TorchScript (traced)"
        size = os.path.getsize(tmp)
        _check(args, model, spec, tmp, out)
    print(f"wrote     {out}  ({what}, {size / 2**20:.2f} MiB, dynamic batch, {time.perf_counter() - started:.1f} s)")
    return 0


def _print_unfolded(model) -> None:
    from vitbn.bn import fuse_bn
    from vitbn.bn.fuse import unfolded_norms

    try:
        folded = fuse_bn(model)
    except ValueError as exc:
        raise UserError(f"{first_line(exc)}; or export it unfolded with --no-fuse-bn") from None
    left = unfolded_norms(folded)
    if left:
        print(left)


def _check(args: argparse.Namespace, model, spec, path: Path, out: Path) -> None:
    """The parity check of the written file (``vitbn.export.parity``); a UserError when it fails."""
    from vitbn import export as E

    if args.check_images == 0:
        print("parity    skipped (--check-images 0)")
        return
    x, what = E.parity_inputs(model, spec, args.check_images)
    logits = E.onnx_logits if args.format == "onnx" else E.torchscript_logits
    session = E.onnx_session(path) if args.format == "onnx" else path
    result = E.parity(lambda batch: logits(session, batch), model, x)
    folded = result["max_abs_folded"]
    print(f"parity    on {what}, at batch {len(x)} and batch 1 (fp32)")
    print(f"  max abs logit difference vs eager torch (unfolded): {result['max_abs_eager']:.3e}")
    print("  max abs logit difference vs folded torch:           "
          + (f"{folded:.3e}" if folded is not None else f"n/a ({result['folded_error']})"))  # fmt: skip
    print(f"  top-1 agreement with eager torch: {100 * result['top1_agreement']:.2f}% "
          f"({result['top1_matches']}/{result['images']})")  # fmt: skip
    if not result["ok"]:
        worst = max(d for d in (result["max_abs_eager"], folded) if d is not None)
        raise UserError(f"the exported model's logits differ from the torch model's by {worst:.3e} "
                        f"(> {result['tolerance']:.0e}) on {what}; {out} not written")  # fmt: skip
