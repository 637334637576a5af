"""``vitbn train`` / ``vitbn eval``: config file + flags, exit codes, output, and Ctrl-C then resume."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from vitbn.cli import build_parser, main
from vitbn.cli.train import config_from_args

TINY = ["--depth", "1", "--train-subset", "120", "--test-subset", "60", "--batch-size", "40", "--threads", "1",
        "--device", "cpu"]  # fmt: skip
TINY_MODEL = {"dim": 16, "heads": 2, "dim_head": 8, "mlp_dim": 32}


def write_config(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_config_file_with_flags_over_it(tmp_path):
    f = write_config(tmp_path / "c.yaml", {"model": {"name": "vit", "depth": 2}, "train": {"epochs": 7, "lr": 0.01},
                                           "track": {"experiment": "from-file"}})  # fmt: skip
    args = build_parser().parse_args(["train", "--config", f, "--model", "vitbn", "--epochs", "2", "--no-compile"])
    cfg = config_from_args(args)
    assert (cfg.model.name, cfg.model.depth, cfg.model.ffn_inner_norm) == ("vitbn", 2, "batch")
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.compile, cfg.train.resume) == (2, 0.01, False, False)
    assert cfg.track.experiment == "from-file" and cfg.track.enabled
    cfg = config_from_args(build_parser().parse_args(["train", "--no-track", "--max-steps", "3", "--seed", "5"]))
    assert (cfg.track.enabled, cfg.train.max_steps_per_epoch, cfg.train.seed, cfg.train.epochs) == (False, 3, 5, 30)


def test_bad_config_key_is_one_line(tmp_path, capsys):
    f = write_config(tmp_path / "bad.yaml", {"train": {"lrr": 0.1}})
    assert main(["train", "--config", f]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitbn train: error: unknown TrainConfig field(s) ['lrr']; allowed: epochs, batch_size")
    assert err.count("\n") == 1
    f = write_config(tmp_path / "bad2.yaml", {"training": {}})
    assert main(["train", "--config", f]) == 2
    assert "unknown config section(s) ['training']" in capsys.readouterr().err


def test_train_then_eval(tmp_path, capsys, monkeypatch):
    f = write_config(tmp_path / "m.yaml", {"model": {"name": "vitbn", **TINY_MODEL}})
    argv = ["train", "--config", f, *TINY, "--epochs", "1", "--no-track", "--out-dir", str(tmp_path), "--run-name", "c",
            "--progress", "lines"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^epoch 1/1  train_loss \d\.\d{4}  train_acc [\d.]+%  test_acc [\d.]+%  train [\d.]+s", out, re.M)
    assert re.search(r"^run c finished after 1 epoch\(s\): test/acc [\d.]+%", out, re.M)
    (record,) = json.loads((tmp_path / "c" / "history.json").read_text())
    model = str(tmp_path / "c" / "model.pt")
    for extra in ([], ["--fuse-bn"]):
        assert main(["eval", model, "--test-subset", "60", "--device", "cpu", *extra]) == 0
        out = capsys.readouterr().out
        acc = float(re.search(r"^accuracy\s+([\d.]+)%", out, re.M).group(1))
        assert acc == round(100 * record["test/acc"], 2)
        assert re.search(r"^time\s+[\d.]+ s", out, re.M) and "per-class accuracy" in out
        rows = out.split("columns: predicted)\n")[1].splitlines()[1:]
        matrix = [[int(v) for v in row.split()[1:]] for row in rows]
        assert len(matrix) == 10 and sum(map(sum, matrix)) == 60
        assert sum(matrix[k][k] for k in range(10)) == round(record["test/acc"] * 60)
    assert main(["eval", str(tmp_path / "nope.pt")]) == 2
    assert "model file" in capsys.readouterr().err


def test_diverged_run_exits_3(tmp_path, capsys):
    argv = ["train", "--model", "vit", *TINY, "--optimizer", "sgd", "--lr", "1e6", "--no-track", "--out-dir",
            str(tmp_path), "--run-name", "d", "--progress", "none"]  # fmt: skip
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err == "vitbn train: run d diverged in epoch 1 (non-finite training loss); try a lower --lr\n"


def test_ctrl_c_leaves_a_killed_run_that_resumes(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here, not in the repository
    db = f"sqlite:///{tmp_path}/db.sqlite"
    argv = ["train", "--model", "vit", *TINY, "--max-steps", "1", "--epochs", "1000", "--out-dir", str(tmp_path),
            "--run-name", "k", "--tracking-uri", db, "--experiment", "cli"]  # fmt: skip
    out, err = (tmp_path / "out.txt").open("w"), (tmp_path / "err.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vitbn", *argv], stdout=out, stderr=err, cwd=tmp_path)
    checkpoint = tmp_path / "k" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, (tmp_path / "err.txt").read_text()
    out.close(), err.close()
    last = (tmp_path / "err.txt").read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"vitbn train: interrupted after \d+ complete epoch\(s\); resume with: vitbn train .*", last)
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["vitbn.status"] == "killed"
    done = len(json.loads((tmp_path / "k" / "history.json").read_text()))
    assert done >= 1

    resume = shlex.split(last.split("resume with: ")[1])[1:]  # the printed command, without "vitbn"
    assert resume[-3:] == ["--run-name", "k", "--resume"]
    resume[resume.index("--epochs") + 1] = str(done + 1)  # finish soon
    assert main([*resume, "--progress", "none"]) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vitbn.status"] == "finished"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, done + 2))
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert (tmp_path / "mlruns").is_dir()


@pytest.mark.parametrize("flag", ["--lr", "--epochs"])
def test_bad_flag_values_are_one_line(flag, capsys):
    assert main(["train", flag, "0", "--no-track"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_train_without_model_builds_and_names_the_vit_preset(tmp_path, capsys):
    """The run is named by its preset (it used to be "custom", which `vitbn serve` does not look for)."""
    from vitbn.config import ModelConfig
    from vitbn.serve.predictor import find_study_models

    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert cfg.model == ModelConfig.from_preset("vit") and cfg.model.name == "vit"
    argv = ["train", *TINY, "--dim", "16", "--heads", "2", "--dim-head", "8", "--mlp-dim", "32", "--epochs", "1",
            "--max-steps", "1", "--no-track", "--out-dir", str(tmp_path), "--run-name", "plain",
            "--progress", "none"]  # fmt: skip
    assert main(argv) == 0
    assert find_study_models(tmp_path) == [tmp_path / "plain" / "model.pt"]
    assert yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["model"]["name"] == "vit"


def test_train_image_size_flag_fits_the_model_to_small_images(tmp_path, capsys):
    cfg = config_from_args(build_parser().parse_args(["train", "--image-size", "8", "--patch-size", "4",
                                                      "--channels", "3", "--num-classes", "5"]))  # fmt: skip
    assert (cfg.model.image_size, cfg.model.patch_size, cfg.model.channels, cfg.model.num_classes) == (8, 4, 3, 5)
    cfg = config_from_args(build_parser().parse_args(["train", "--image-size", "8x12", "--patch-size", "4"]))
    assert tuple(cfg.model.image_size) == (8, 12)
