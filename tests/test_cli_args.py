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
