"""The ``vitbn`` command. Each sub-command lives in a module of this package that exposes
``register(subparsers)``; ``register`` adds a parser whose ``func`` default takes the parsed args and returns
an exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vitbn.runtime import openmp_defaults

# before anything imports torch: libgomp reads its wait settings once, when it is loaded
openmp_defaults()

# Sub-command modules, in the order ``vitbn --help`` lists them.
MODULES = ("models", "train", "finetune", "experiment", "report", "bn", "bench", "analyze", "predict", "export",
           "serve")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from vitbn import __version__

    parser = argparse.ArgumentParser(prog="vitbn", description="Vision Transformers with LayerNorm and BatchNorm.")
    parser.add_argument("--version", action="version", version=f"vitbn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in MODULES:
        try:
            module = importlib.import_module(f"vitbn.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vitbn.cli.{name}":
                raise
            continue  # a sub-command not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vitbn.errors import UserError
    from vitbn.provenance import invoked_as

    parser = build_parser()
    args = parser.parse_args(argv)
    invoked_as(sys.argv[1:] if argv is None else argv)  # the command a page written by this call names
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError) as exc:
        if os.environ.get("VITBN_DEBUG"):
            raise
        from vitbn.cli.flags import MODEL_FLAGS, RUN_FLAGS, flag_error

        print(f"vitbn {args.command}: error: {flag_error(str(exc), args, (MODEL_FLAGS, RUN_FLAGS))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitbn {args.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``vitbn`` script: ``main``, and a rank of a distributed run leaves with ``exit_process``."""
    from vitbn.engine.distributed import exit_process

    return exit_process(main())


if __name__ == "__main__":
    sys.exit(console_main())
