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
import torch
import yaml

from vitbn.cli import build_parser, main
from vitbn.cli.train import config_from_args
from waits import wait_s

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
    history = tmp_path / "k" / "history.json"  # a complete epoch (checkpoint.pt exists from the start)
    deadline = time.monotonic() + wait_s(120)
    while not history.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(wait_s(60)) == 130, (tmp_path / "err.txt").read_text()
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


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "0", "--lr: lr=0.0 must be a finite number > 0"),
        ("--lr", "-1e-3", "--lr: lr=-0.001 must be a finite number > 0"),
        ("--epochs", "0", "--epochs: epochs=0 must be a positive integer"),
    ],
)
def test_bad_flag_values_are_one_line(flag, value, message, capsys):
    assert main(["train", f"{flag}={value}", "--no-track"]) == 2
    assert capsys.readouterr().err == f"vitbn train: error: {message}\n"  # the flag, the value and the rule


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


def _interrupt_at_step(monkeypatch, n: int) -> None:
    """Ctrl-C (KeyboardInterrupt) at the ``n``-th training step of this process."""
    import vitbn.engine.loop as loop

    calls, step = [], loop.train_step

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted)


def test_ctrl_c_in_the_first_epoch_leaves_a_run_that_resumes_exactly(tmp_path, monkeypatch, capsys):
    """The run is checkpointed before its first step: --resume continues the one MLflow run (it used to start
    afresh, leaving a KILLED and a FINISHED run of one name), and ends with the uninterrupted run's weights."""
    from mlflow import MlflowClient

    from vitbn.engine import load_model

    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path}/db.sqlite"
    common = ["--model", "vit", *TINY, "--dim", "16", "--heads", "2", "--dim-head", "8", "--mlp-dim", "32",
              "--epochs", "2", "--out-dir", str(tmp_path), "--progress", "none"]  # fmt: skip
    assert main(["train", *common, "--no-track", "--run-name", "straight"]) == 0
    with monkeypatch.context() as m:
        _interrupt_at_step(m, 2)
        assert main(["train", *common, "--tracking-uri", db, "--experiment", "e", "--run-name", "k"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("vitbn train: interrupted after 0 complete epoch(s); resume with: vitbn train ")
    assert (tmp_path / "k" / "checkpoint.pt").is_file()
    assert main(shlex.split(last.split("resume with: ")[1])[1:]) == 0
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["vitbn.status"] == "finished"
    resumed, straight = load_model(tmp_path / "k"), load_model(tmp_path / "straight")
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name  # one thread, same seed, same batches: bit for bit


def test_resume_of_a_missing_run_is_an_error_that_lists_the_runs(tmp_path, capsys):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "config.yaml").write_text("model:\n  name: vit\n")
    assert main(["train", "--no-track", "--out-dir", str(tmp_path), "--run-name", "r2x", "--resume"]) == 2
    assert capsys.readouterr().err == f"vitbn train: error: --resume: no run 'r2x' under {tmp_path}/ (runs there: r1)\n"
    assert main(["train", "--no-track", "--out-dir", str(tmp_path / "none"), "--run-name", "a", "--resume"]) == 2
    assert capsys.readouterr().err.endswith("(it holds none)\n")
    assert main(["train", "--no-track", "--out-dir", str(tmp_path), "--resume"]) == 2
    assert capsys.readouterr().err == "vitbn train: error: --resume needs --run-name NAME: the run to continue\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1"]


def test_resume_reads_the_runs_config_and_the_flags_given_change_it(tmp_path, capsys):
    first = ["train", "--model", "vitbn", *TINY, "--dim", "16", "--heads", "2", "--dim-head", "8", "--mlp-dim", "32",
             "--epochs", "1", "--lr", "0.002", "--no-track", "--out-dir", str(tmp_path), "--run-name", "r2",
             "--progress", "none"]  # fmt: skip
    assert main(first) == 0
    capsys.readouterr()
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "r2", "--resume", "--epochs", "2",
                 "--progress", "none"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "vitbn train: resuming r2 with changed settings: train.epochs 1 -> 2"
    assert "warning" not in err
    config = yaml.safe_load((tmp_path / "r2" / "config.yaml").read_text())
    assert (config["model"]["name"], config["model"]["dim"], config["model"]["depth"]) == ("vitbn", 16, 1)
    assert (config["train"]["lr"], config["train"]["epochs"], config["track"]["enabled"]) == (0.002, 2, False)
    assert [r["epoch"] for r in json.loads((tmp_path / "r2" / "history.json").read_text())] == [1, 2]
