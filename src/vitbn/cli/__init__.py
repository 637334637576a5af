"""The ``vitbn`` command. Each sub-command lives in a module of this package that exposes
``register(subparsers)``; ``register`` adds a parser whose ``func`` default takes the parsed args and returns
an exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from vitbn.runtime import openmp_defaults

# before anything imports torch: libgomp reads its wait settings once, when it is loaded
openmp_defaults()

# Sub-command modules, in the order ``vitbn --help`` lists them.
MODULES = ("models", "train", "finetune", "experiment", "report", "compare", "bn", "bench", "analyze", "predict",
           "export", "serve")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from vitbn import __version__
    from vitbn.cli.parser import VitbnParser

    parser = VitbnParser(prog="vitbn", description="Vision Transformers with LayerNorm and BatchNorm.")
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
    from vitbn.cli.parser import subcommand_parser
    from vitbn.errors import UserError
    from vitbn.provenance import invoked_as

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the sub-command's parser, with its usage
        subcommand_parser(parser, argv).error(f"unrecognized arguments: {' '.join(unknown)}")
    invoked_as(argv)  # the command a page written by this call names
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.func(args) or 0)
    except (UserError, ValueError) as exc:
        if os.environ.get("VITBN_DEBUG"):
            raise
        from vitbn.cli.flags import MODEL_FLAGS, RUN_FLAGS, SHAPE_FLAGS, flag_error

        message = flag_error(str(exc), args, (MODEL_FLAGS, SHAPE_FLAGS, RUN_FLAGS))
        print(f"vitbn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitbn {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(command: str):
    """``warnings.showwarning`` for the CLI: ``vitbn CMD: warning: <first line>``, without the file, line number and
    source line that Python's default quotes (noise to a user)."""
    from vitbn.errors import first_line

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(
            f"vitbn {command}: warning: {first_line(message) if isinstance(message, Warning) else message}",
            file=file or sys.stderr,
        )

    return show


def console_main() -> int:
    """The ``vitbn`` script: ``main``, and a rank of a distributed run leaves with ``exit_process``. Ctrl-C before a
    sub-command runs (while PyTorch is imported) is one line and 130; a reader that closes the pipe early
    (``vitbn predict ... --json | head``) ends the output quietly."""
    try:
        code = main()
        sys.stdout.flush()  # here, where a closed pipe can be caught, rather than at the interpreter's exit
    except KeyboardInterrupt:
        print("vitbn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 141  # 128 + SIGPIPE, as a shell reports a process that a closed pipe ended
    from vitbn.engine.distributed import exit_process

    return exit_process(code)


if __name__ == "__main__":
    sys.exit(console_main())
