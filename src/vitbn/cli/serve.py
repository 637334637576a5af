"""``vitbn serve``: the browser demo: draw a digit, see every loaded model's answer (``vitbn.serve.app``)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="the browser demo: draw a digit and see ViT, ViTBNFFN and ViTBN name it (JSON API too)",
        description="Loads the models once (BatchNorm folded, eval mode) and serves the page and /api/predict. "
        "Without --checkpoint: for each of vit, vitbnffn and vitbn, the model `vitbn experiment best` kept in "
        "--runs-dir/demo/ (the best on validation), else the newest under --runs-dir.",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="FILE",
        help="a model.pt or run folder (repeatable); default: RUNS_DIR/demo/<name>.pt, else the newest study models",
    )
    p.add_argument("--runs-dir", default="runs", help="where `vitbn train` and `make run` write runs (default runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on; 0: any free port (the URL printed says which)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.set_defaults(func=run)


def load_predictors(args: argparse.Namespace) -> list:
    """The models to serve; one line of UserError when there are none or one cannot be loaded."""
    from pathlib import Path

    from vitbn.errors import UserError
    from vitbn.serve.predictor import STUDY_MODELS, Predictor, find_study_models

    paths = [Path(c) for c in args.checkpoint] or find_study_models(args.runs_dir)
    if not paths:
        raise UserError(
            f"no trained {'/'.join(STUDY_MODELS)} model under {args.runs_dir}/: run `make run` (or `vitbn train "
            "--model vit`) first, or pass --checkpoint FILE"
        )
    return [Predictor.load(p) for p in paths]


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from vitbn.errors import UserError
    from vitbn.serve.app import create_app

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} must be in 1..65535")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    predictors = load_predictors(args)
    for p in predictors:
        print(f"model {p.name:<10} {p.params:>9,} parameters  {p.source}" + (f"  ({p.note})" if p.note else ""))
    print(f"vitbn serve: http://{args.host}:{args.port}/  (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(predictors), host=args.host, port=args.port, log_level="warning")
    return 0
