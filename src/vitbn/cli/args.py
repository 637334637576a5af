"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse

import yaml


def key_value(text: str) -> tuple[str, object]:
    """``--set KEY=VALUE`` -> ``(key, value)``, the value parsed as YAML (``2`` -> int, ``none`` -> None)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set {text!r} must look like KEY=VALUE, e.g. depth=2")
    return key.strip(), yaml.safe_load(value)


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected into ``args.overrides`` as (key, value) pairs."""
    parser.add_argument(
        "--set", dest="overrides", type=key_value, action="append", default=[], metavar="KEY=VALUE", help=help
    )
