"""Shared CLI argument types and the top-level command."""

from __future__ import annotations

import argparse

import pytest

from vitbn.cli import main
from vitbn.cli.args import key_value


def test_key_value_parses_yaml_values():
    assert key_value("depth=2") == ("depth", 2)
    assert key_value(" pool = mean") == ("pool", "mean")
    assert key_value("ghost_batch_size=null") == ("ghost_batch_size", None)
    assert key_value("image_size=[28, 14]") == ("image_size", [28, 14])


@pytest.mark.parametrize("text", ["depth2", "=2", " =2"])
def test_key_value_rejects_text_without_a_key(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"must look like KEY=VALUE, e.g. depth=2"):
        key_value(text)


def test_models_command_prints_every_preset(capsys):
    assert main(["models", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "vit            1    153,324           5.71            17.12" in out
    assert "vitbn          1    153,452" in out and "vitbnffn       1    153,452" in out


def test_user_errors_are_one_line(capsys):
    assert main(["train", "--model", "resnet", "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "vitbn train: error: --model: model='resnet' is not one of 'vit', 'vit-cifar', 'vitbn', 'vitbn-cifar', "
        "'vitbnffn', 'vitbnffn-cifar'"
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["models"],
        ["train"],
        ["eval"],
        ["experiment", "lr-sweep"],
        ["experiment", "tune"],
        ["report"],
        ["bn-study"],
        ["bench"],
    ],
)
def test_every_help_page_renders(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: vitbn")


def _parsers(parser: argparse.ArgumentParser):
    """Every parser of the CLI, sub-commands and their sub-commands included."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_has_a_help_line_and_no_abbreviations_are_accepted():
    from vitbn.cli import build_parser

    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 15
    flags = [(p, a) for p in parsers for a in p._actions if not isinstance(a, argparse._SubParsersAction)]
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p, a in flags if not a.help]
    assert missing == []
    assert all(p.allow_abbrev is False for p in parsers)


def test_an_abbreviated_or_unknown_flag_gets_the_sub_commands_usage_in_two_lines(capsys):
    for argv, prog in [
        (["train", "--epoch", "1"], "vitbn train"),
        (["experiment", "lr-sweep", "--bogus", "1"], "vitbn experiment lr-sweep"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"usage: {prog} [options]  (`{prog} --help` lists them)",
            f"{prog}: error: unrecognized arguments: {' '.join(argv[-2:])}",
        ]


def test_a_bad_choice_is_two_lines_not_the_whole_usage(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--optimizer", "adagrad"])
    assert capsys.readouterr().err.splitlines() == [
        "usage: vitbn train [options]  (`vitbn train --help` lists them)",
        "vitbn train: error: argument --optimizer: invalid choice: 'adagrad' (choose from 'adam', 'adamw', 'sgd')",
    ]


def test_train_help_shows_the_defaults_of_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for fragment in [
        "--model MODEL model preset: vit, vitbnffn, vitbn (see `vitbn models`); the other model flags override its "
        "settings (default: vit)",
        "--depth DEPTH stages (blocks, or groups of --parallel blocks) (default: 6)",
        "--epochs EPOCHS passes over the training set (default: 30)",
        "--lr LR learning rate (default: 0.0005)",
        "--image-size IMAGE_SIZE image side the model takes, or HxW",
        "(default: 28)",
    ]:
        assert fragment in help_text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "(default: 8000)" in capsys.readouterr().out
