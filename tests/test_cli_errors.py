"""One-line errors of the CLI for what a newcomer gets wrong: a corrupt model file, ..."""

from __future__ import annotations

import pytest
import torch

from vitbn.cli import main


@pytest.mark.parametrize("kind", ["random", "yaml"])
def test_a_corrupt_file_is_not_a_vitbn_model_file_and_gets_no_weights_only_advice(tmp_path, capsys, data_root, kind):
    """eval, export, serve and train --resume name the file in one line; PyTorch's advice to load it with
    weights_only=False (which runs the code a file holds) is not passed on."""
    bad = tmp_path / "run" / ("checkpoint.pt" if kind == "random" else "config.yaml")
    bad.parent.mkdir()
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad.write_bytes(noise.numpy().tobytes() if kind == "random" else b"model:\n  name: vit\n")
    commands = [["eval", str(bad)], ["export", str(bad)], ["serve", "--checkpoint", str(bad)]]
    if kind == "random":
        commands.append(["train", "--no-track", "--out-dir", str(tmp_path), "--run-name", "run", "--resume",
                         "--train-subset", "100", "--test-subset", "50", "--data-root", str(data_root)])  # fmt: skip
    for argv in commands:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == (
            f"vitbn {argv[0]}: error: not a vitbn model file: {bad} (it holds no PyTorch weights)\n"
        )
