"""One-line errors of the CLI for what a newcomer runs into: a corrupt model file, Ctrl-C during start-up, a
closed pipe."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

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


def _vitbn(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitbn", *argv], stderr=subprocess.PIPE, text=True, **kwargs)


def test_ctrl_c_while_pytorch_is_imported_is_one_line(monkeypatch, capsys):
    """Before a sub-command runs, the start-up imports PyTorch (a second or more): Ctrl-C there used to print a
    20-line traceback from inside importlib."""
    import vitbn.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.console_main() == 130
    assert capsys.readouterr().err == "vitbn: interrupted\n"
    proc = _vitbn("models")  # the real thing: SIGINT once libtorch is being loaded
    maps = f"/proc/{proc.pid}/maps"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and "libtorch" not in Path(maps).read_text():
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.rstrip().endswith("interrupted"), err


def test_a_reader_closing_the_pipe_early_gets_no_traceback():
    """``vitbn models | head -c 10``: the output ends quietly with 141 (128 + SIGPIPE) instead of a
    BrokenPipeError traceback."""
    proc = _vitbn("models", stdout=subprocess.PIPE)
    proc.stdout.close()  # before the command writes anything
    err = proc.communicate(timeout=120)[1]
    assert (proc.returncode, err) == (141, "")


def test_import_vitbn_does_not_import_torch():
    code = (
        "import sys, vitbn, vitbn.cli; print('torch' in sys.modules, vitbn.__version__); vitbn.ViT; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "0.1.0", "True"]


def test_report_on_an_unreachable_server_does_not_suggest_no_track(capsys):
    assert main(["report", "quick", "--tracking-uri", "http://127.0.0.1:9"]) == 2  # port 9: nothing listens
    err = capsys.readouterr().err
    assert err.startswith("vitbn report: error: MLflow tracking server http://127.0.0.1:9 is not reachable (")
    assert err.endswith("); start it or pass another --tracking-uri\n") and err.count("\n") == 1


def test_a_name_of_two_parent_runs_says_which_it_uses(tmp_path):
    from mlflow import MlflowClient

    from vitbn.experiments.runs import resolve_parent

    client = MlflowClient(f"sqlite:///{tmp_path / 'db.sqlite'}")
    eid = client.create_experiment("e")
    ids = []
    for start in (1000, 2000):
        run = client.create_run(eid, start_time=start, tags={"vitbn.role": "parent"}, run_name="quick")
        ids.append(run.info.run_id)
    with pytest.warns(UserWarning) as caught:
        assert resolve_parent(client, "quick").info.run_id == ids[1]
    assert [str(w.message) for w in caught] == [
        f"2 experiment runs match 'quick': using the newest, {ids[1]}; name another by its run id ({ids[0]})"
    ]
    assert resolve_parent(client, ids[0]).info.run_id == ids[0]


def test_lr_inf_is_refused_naming_the_flag(capsys):
    assert main(["train", "--no-track", "--lr", "inf"]) == 2
    assert capsys.readouterr().err == "vitbn train: error: --lr: lr=inf must be a finite number > 0\n"


def test_a_subset_beyond_the_split_is_said(data_root):
    from vitbn.config import DataConfig
    from vitbn.data import prepare_data

    with pytest.warns(UserWarning) as caught:
        data = prepare_data(DataConfig(dataset="mnist", root=str(data_root), train_subset=100, test_subset=20000))
    assert [str(w.message) for w in caught] == ["test_subset=20000: mnist has 10000 test images; using all 10000"]
    assert (len(data.train), len(data.test)) == (100, 10000)


def test_an_interrupted_experiment_prints_how_to_resume(monkeypatch, tmp_path, capsys):
    import vitbn.experiments.lr_sweep as lr_sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lr_sweep, "run_lr_sweep", interrupted)
    argv = ["experiment", "lr-sweep", "--epochs", "1", "--out-dir", str(tmp_path)]
    assert main(argv) == 130
    assert capsys.readouterr().err == (
        f"vitbn experiment: interrupted; resume with the same command: vitbn experiment lr-sweep --epochs 1 "
        f"--out-dir {tmp_path}\n"
    )


def test_an_implausible_time_ratio_is_warned():
    """r_t = T(ViT) / T(model): a model whose epochs took 14.2x the ViT's gives g_t = -1320%; the report warns."""
    import pandas as pd

    from vitbn.report.tables import add_ratios

    ref = pd.Series({"model": "vit", "depth": 6, "t_train": 10.0, "t_test": 1.0, "flops": 100.0})
    row = {"model": "vitbn", "depth": 6, "t_train": 142.0, "t_test": 1.1, "flops": 100.0}
    with pytest.warns(UserWarning) as caught:
        out = add_ratios(row, ref)
    assert out["g_t"] == pytest.approx(-1320.0) and out["g_v"] == pytest.approx(100 * (1 - 1.1))
    assert [str(w.message) for w in caught] == [
        "g_t -1320.0% for ViTBN (depth 6): its training epochs took 14.20x as long as ViT (depth 6)'s, beyond 3x "
        "either way; the "
        "timings were likely disturbed by other load on the machine: measure again on a quiet one"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_ratios({**row, "t_train": 25.0}, ref)  # 2.5x: plausible, silent
