"""``vitbn serve``: the browser demo: draw a digit, see every loaded model's answer (``vitbn.serve.app``)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="the browser demo: draw a digit and see ViT, ViTBNFFN and ViTBN name it (JSON API too)",
        description="Loads the models once (BatchNorm folded, eval mode) and serves the page and /api/predict. "
        "Without --checkpoint: for each of vit, vitbnffn and vitbn, the MNIST model under --runs-dir (its model.pt "
        "files and those `vitbn experiment best` kept in demo/) with the best validation accuracy, else test "
        "accuracy; it says which it chose and which names it found none of.",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="FILE",
        help="a model.pt or run folder (repeatable); default: the best MNIST model per study name under RUNS_DIR",
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
    from vitbn.serve.predictor import STUDY_MODELS, Predictor, choose_study_models

    if args.checkpoint:
        return [Predictor.load(Path(c)) for c in args.checkpoint]
    chosen, counts = choose_study_models(args.runs_dir)
    if not chosen:
        raise UserError(
            f"no trained {'/'.join(STUDY_MODELS)} model of MNIST under {args.runs_dir}/: run `make run` (or `vitbn "
            "train --model vit`) first, or pass --checkpoint FILE"
        )
    for name in STUDY_MODELS:
        if name in chosen:
            c = chosen[name]
            print(f"{name}: chose {c.path} ({c.describe()}; the best of {counts[name]} MNIST {name} model(s))")
        else:
            print(f"{name}: no MNIST {name} model under {args.runs_dir}/ (`vitbn train --model {name}` makes one)")
    return [Predictor.load(c.path) for c in chosen.values()]


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
