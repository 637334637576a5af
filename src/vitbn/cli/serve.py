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

    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must be in 0..65535 (0: any free port)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    predictors = load_predictors(args)
    for p in predictors:
        served = f" ({p.served_params:,} served)" if p.served_params != p.params else ""
        print(f"model {p.name:<10} {p.params:>9,} parameters{served}  {p.source}" + (f"  ({p.note})" if p.note else ""))
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"vitbn serve: http://{_url_host(host)}:{port}/  (Ctrl-C stops)", flush=True)
    config = uvicorn.Config(create_app(predictors), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def listen(host: str, port: int):
    """A socket bound to ``host:port`` (0: a free port the system picks) and listening, so that the URL printed
    after it answers; a port in use is one line of UserError before anything is printed."""
    import errno
    import socket

    from vitbn.errors import UserError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use: stop what listens there, or pass another --port "
                            "(0: any free port)") from None  # fmt: skip
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
