"""The one argparse convention of every ``vitbn`` command: no abbreviated flags, defaults shown in ``--help``, and
an error answered with the sub-command's short usage and one line (not the whole option list)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class DefaultsFormatter(argparse.HelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` without its noise: a default is shown when there is one to show (not None,
    not False, not an empty list) and the help line does not already name it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, False, [], argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class VitbnParser(argparse.ArgumentParser):
    """Every parser of the CLI (sub-parsers inherit the class): ``allow_abbrev=False`` so that ``--epoch 1`` is an
    error rather than ``--epochs 1``, and ``DefaultsFormatter``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Two lines: where to read the options, then the error (last, as argparse puts it)."""
        print(f"usage: {self.prog} [options]  (`{self.prog} --help` lists them)", file=sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def subcommand_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The deepest sub-parser that ``argv`` names (``vitbn experiment lr-sweep ...`` -> its parser), so that an
    unknown flag is reported with the sub-command's usage rather than the top-level one."""
    current = parser
    for word in argv:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            if not word.startswith("-") and actions:
                break
            continue
        current = actions[0].choices[word]
    return current
