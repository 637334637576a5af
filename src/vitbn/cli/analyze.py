"""``vitbn analyze``: the loss geometry and attention of a trained model (lambda_max of the Hessian, whole and per
block, active neurons, weight norms, a loss-landscape slice, attention maps), written to a folder and logged to
the model's MLflow run."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from vitbn.errors import UserError, first_line

# Flags whose default depends on --quick (``AnalyzeOptions`` or ``QUICK``).
_SCALED = ("images", "max_iter", "block_max_iter", "attention_images", "landscape_points")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="lambda_max of the loss Hessian, active neurons, a loss-landscape slice and attention maps of a model",
        description="Analyses a trained model on the first N training images of its dataset (fixed, in order): the "
        "largest Hessian eigenvalue of the mean cross-entropy by power iteration (all parameters, then each block "
        "with the others fixed), the fraction of positive GELU inputs per stage, the weight norm per block and the "
        "loss along a filter-normalized random direction; attention maps and rollout on test images. Writes "
        "analysis.json, PNG figures and attention.npz, and logs them to the model's MLflow run (if it has one) "
        "without changing the run's status. Images are normalized with the mean/std the model was trained with.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model.pt written by `vitbn train`, or its run folder")
    p.add_argument("--dataset", help="images to analyse on (default: the model's training dataset)")
    p.add_argument("--data-root", metavar="DIR", help="data folder (default: $VITBN_DATA, else ~/.cache/vitbn)")
    p.add_argument("--images", type=int, metavar="N", help="first N training images (default 2048; --quick 256)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per pass (default 256); with --bn-mode train, the batch of the BN "
                   "statistics")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="output folder (default: analysis/ in the run folder)")
    p.add_argument("--bn-mode", choices=("eval", "train"), default="eval",
                   help="BatchNorm on running statistics (eval, default) or on batch statistics (train; running "
                   "statistics kept); the rest of the model in eval mode either way")  # fmt: skip
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of power iteration (default 1e-3)")
    p.add_argument("--max-iter", type=int, metavar="N",
                   help="Hessian-vector products per power iteration, whole model (default 100; "
                   "--quick 20)")  # fmt: skip
    p.add_argument("--block-max-iter", type=int, metavar="N",
                   help="the same per parameter block (default: --max-iter; --quick 5)")  # fmt: skip
    p.add_argument("--no-blocks", action="store_true", help="skip lambda_max per parameter block")
    p.add_argument("--attention-images", type=int, metavar="N", help="test images in the figures (default 4)")
    p.add_argument("--landscape-points", type=int, metavar="N", help="alphas on [-1, 1] (default 21; --quick 7)")
    p.add_argument("--seed", type=int, default=0, help="start vectors and landscape direction (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 256 images, low iteration caps, 7 points")
    p.add_argument("--tracking-uri", help="MLflow store of the model's run (default: the one in its config.yaml)")
    p.add_argument("--no-track", action="store_true", help="do not log to the model's MLflow run")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace):
    """The AnalyzeOptions of the flags; a bad value is a one-line error naming the flag."""
    from vitbn.analysis.run import QUICK, AnalyzeOptions

    defaults = AnalyzeOptions()
    values = {k: getattr(args, k) for k in _SCALED}
    for key, value in values.items():
        if value is not None and value < (2 if key == "landscape_points" else 1):
            raise UserError(f"--{key.replace('_', '-')} {value} must be >= {2 if key == 'landscape_points' else 1}")
        if value is None:
            values[key] = QUICK[key] if args.quick else getattr(defaults, key)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads} must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    if not 0 < args.tol < 1:
        raise UserError(f"--tol {args.tol:g} must be in (0, 1), e.g. 1e-3")
    return AnalyzeOptions(**values, batch_size=args.batch_size, bn_mode=args.bn_mode, tol=args.tol,
                          blocks=not args.no_blocks, seed=args.seed)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import torch

    from vitbn.analysis.run import analyze_checkpoint
    from vitbn.engine.device import resolve_device

    options = _options(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with one_line_warnings():  # e.g. power iteration that did not converge
        result, out, model_path = analyze_checkpoint(
            args.checkpoint,
            options,
            out=args.out,
            dataset=args.dataset,
            data_root=args.data_root,
            device=device,
            progress=True,
        )
    _print_summary(result, out)
    if args.no_track:
        print("mlflow    not logged (--no-track)")
    else:
        _track(model_path, args.tracking_uri, result, out)
    return 0


@contextlib.contextmanager
def one_line_warnings(prog: str = "vitbn analyze"):
    """Python warnings raised inside, printed as one line each on stderr (``PROG: warning: ...``)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {first_line(message)}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield


def _track(model_path: Path, uri: str | None, result: dict, out: Path) -> None:
    """Logs to the model's run; an unreachable store or a missing run is a one-line warning (the files stay)."""
    from vitbn.analysis.tracking import log_analysis, recorded_run

    run_id, recorded_uri, why = recorded_run(model_path)
    if run_id is None:
        print(f"mlflow    not logged: {why}")
        return
    try:
        used = log_analysis(run_id, uri or recorded_uri, result, out)
    except UserError as exc:
        print(f"vitbn analyze: warning: not logged to MLflow: {first_line(exc)}", file=sys.stderr)
        return
    print(f"mlflow    logged to run {run_id} ({used}): metrics analysis/*, artifacts analysis/")


def _print_summary(result: dict, out: Path) -> None:
    h, active, norms = result["hessian"], result["active_fraction"], result["weight_norms"]
    print(f"model     {result['checkpoint']}  ({result['model']['name']}, {result['model']['params']:,} parameters)")
    print(f"images    first {result['images']} training images of {result['dataset']}, BN {result['bn_mode']} mode")
    state = "converged" if h["converged"] else "NOT converged"
    print(f"lambda    {h['lambda_max']:.5g} (all parameters; residual {h['residual']:.2g}, "
          f"{h['iterations']} iterations, {state})")  # fmt: skip
    print(f"{'block':<14}{'lambda_max':>12}{'residual':>10}{'iters':>7}{'active':>8}{'|w|':>9}")
    for name, norm in norms.items():
        e = h["blocks"].get(name)
        its = f"{e['iterations']}{'' if e['converged'] else '*'}" if e else ""
        lam = f"{e['lambda_max']:>12.5g}{e['residual']:>10.2g}{its:>7}" if e else f"{'-':>12}{'':>10}{'':>7}"
        stage = name.split(".")[0]
        act = f"{active[stage]:>8.3f}" if name.endswith(".mlp") and stage in active else f"{'':>8}"
        print(f"{name:<14}{lam}{act}{norm:>9.3g}")
    if any(not e["converged"] for e in h["blocks"].values()):
        print("          * not converged at --block-max-iter: a lower estimate, as rough as its residual")
    print(f"active    {active['mean']:.3f} mean over stages")
    loss = result["landscape"]["loss"]
    print(f"landscape loss {min(loss):.4g} .. {max(loss):.4g} over alpha in [-1, 1] ({len(loss)} points)")
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items())
    print(f"seconds   {seconds}")
    print(f"wrote     {out}/: {', '.join(result['files'])}")
