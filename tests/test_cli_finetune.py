"""``vitbn finetune`` end to end (an MNIST-trained tiny ViT fine-tuned on scikit-learn's digits), ``vitbn eval`` of
its delta, and the one-line refusals."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from vitbn.cli import main
from vitbn.tracking import MemoryTracker

RUN = ["--threads", "1", "--device", "cpu", "--progress", "none", "--no-track"]
DIGITS = ["--dataset", "digits", "--train-subset", "300", "--test-subset", "100", "--epochs", "1", "--batch-size", "50",
          "--max-steps", "3", *RUN]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny ViT (28x28, patch 4) trained one short epoch on MNIST with `vitbn train`."""
    out = tmp_path_factory.mktemp("base")
    argv = ["train", "--model", "vit", "--depth", "1", "--dim", "16", "--heads", "2", "--dim-head", "8", "--mlp-dim",
            "32", "--patch-size", "4", "--train-subset", "600", "--test-subset", "100", "--epochs", "1",
            "--batch-size", "50", "--out-dir", str(out), "--run-name", "base", *RUN]  # fmt: skip
    assert main(argv) == 0
    return out / "base" / "model.pt"


def _finetune(base, tmp_path, monkeypatch, part: str, *extra: str) -> tuple[str, MemoryTracker]:
    tracker = MemoryTracker()
    monkeypatch.setattr("vitbn.tracking.make_tracker", lambda cfg: tracker)
    argv = ["finetune", str(base), "--train", part, *DIGITS, "--out-dir", str(tmp_path), "--run-name", part, *extra]
    assert main(argv) == 0
    return argv, tracker


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_attn_only_on_digits_prints_what_the_run_logged(base, tmp_path, monkeypatch, capsys):
    _, tracker = _finetune(base, tmp_path, monkeypatch, "attn", "--val-fraction", "0.2")
    out = capsys.readouterr().out
    run = tracker.run
    metric = {k: v[-1] for k, v in ((k, run.metric(k)) for k in run.metrics)}
    assert re.search(r"^adapted   position table resampled \(bicubic\) from 7x7 to 2x2 patches$", out, re.M)
    m = re.search(r"^finetune  attn: ([\d,]+) of ([\d,]+) parameters trainable \(([\d.]+)%\); peak step memory "
                  r"([\d.e+-]+) MiB \((.+)\); step ([\d.e+-]+) ms$", out, re.M)  # fmt: skip
    assert m, out
    trainable, total = _number(m[1]), _number(m[2])
    assert (trainable, total) == (metric["finetune/trainable_params"], metric["finetune/total_params"])
    assert 0 < trainable < total and float(m[3]) == round(100 * trainable / total, 1)
    assert float(m[4]) == float(f"{metric['finetune/peak_step_memory_mb']:.3g}") > 0
    assert m[5] == run.params["finetune.memory_method"] and m[5].startswith("torch.profiler")
    assert float(m[6]) == float(f"{metric['finetune/step_time_ms']:.3g}") > 0
    m = re.search(r"^run attn finished after 1 epoch\(s\): val/acc ([\d.]+)%  test/acc ([\d.]+)%; delta ([\d.e+-]+) "
                  r"MiB of ([\d.e+-]+) MiB full: (\S+); model (\S+)$", out, re.M)  # fmt: skip
    assert m, out
    assert float(m[1]) == round(100 * metric["val/acc"], 2) and float(m[2]) == round(100 * metric["test/acc"], 2)
    assert float(m[3]) == float(f"{metric['finetune/delta_mb']:.3g}") < float(m[4])
    assert float(m[4]) == float(f"{metric['finetune/full_mb']:.3g}")
    assert m[5] == str(tmp_path / "attn" / "delta.pt") and m[6] == str(tmp_path / "attn" / "model.pt")
    assert run.params["data.val_fraction"] == "0.2" and run.params["finetune.part"] == "attn"

    (record,) = json.loads((tmp_path / "attn" / "history.json").read_text())
    eval_argv = ["eval", m[5], "--dataset", "digits", "--test-subset", "100", "--device", "cpu"]
    assert main([*eval_argv, "--base", str(base)]) == 0
    acc = float(re.search(r"^accuracy\s+([\d.]+)%", capsys.readouterr().out, re.M)[1])
    assert acc == round(100 * record["test/acc"], 2)
    assert main(eval_argv) == 2  # a delta without its base
    err = capsys.readouterr().err
    assert err.startswith("vitbn eval: error: model file ") and "is a fine-tuning delta of base/model.pt" in err
    assert err.count("\n") == 1 and "--base BASE" in err
    assert main([*eval_argv, "--base", m[6]]) == 2  # the fine-tuned model is not its base
    assert "was made from base base/model.pt with sha256" in capsys.readouterr().err

    _, all_tracker = _finetune(base, tmp_path, monkeypatch, "all", "--max-steps", "1")
    assert all_tracker.run.metric("finetune/trainable_params") == [total]
    assert all_tracker.run.metric("finetune/peak_step_memory_mb")[0] > metric["finetune/peak_step_memory_mb"]


def test_image_size_upsamples_the_digits(base, tmp_path, monkeypatch, capsys):
    _finetune(base, tmp_path, monkeypatch, "head", "--image-size", "28", "--max-steps", "1")
    out = capsys.readouterr().out
    assert "adapted   nothing to adapt" in out and "finetune  head: 170 of " in out
    delta = str(tmp_path / "head" / "delta.pt")
    argv = ["eval", delta, "--base", str(base), "--dataset", "digits", "--test-subset", "20", "--device", "cpu"]
    assert main(argv) == 2 and "takes images of shape (1, 28, 28)" in capsys.readouterr().err
    assert main([*argv, "--image-size", "28"]) == 0


def test_precise_bn_flags(monkeypatch, tmp_path, capsys):
    calls = []

    def fake(path, config, **kwargs):
        calls.append((kwargs["precise_bn"], config.train.precise_bn))
        raise ValueError("stop")

    monkeypatch.setattr("vitbn.engine.finetune.finetune", fake)
    for flag in ([], ["--precise-bn"], ["--no-precise-bn"]):
        assert main(["finetune", "x.pt", "--dataset", "digits", "--no-track", *flag]) == 2
    assert calls == [(True, False), (True, True), (False, False)]
    capsys.readouterr()


def test_bad_input_is_one_line(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", str(base), "--dataset", "digits", "--train", "mlp"])
    assert exit_.value.code == 2 and "argument --train: invalid choice: 'mlp'" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(3)}, tmp_path / "w.pt")
    cases = [
        ([str(tmp_path / "w.pt")], "is not a vitbn model (expected keys 'config' and 'state_dict')"),
        ([str(tmp_path / "none.pt")], "none.pt does not exist"),
        ([str(tmp_path)], "has no model.pt (the run did not finish?)"),
    ]
    p7 = tmp_path / "p7.pt"
    from vitbn.engine import export_model
    from vitbn.models import create_model

    export_model(create_model("vit", depth=1, dim=16, heads=2, dim_head=8, mlp_dim=32), p7)
    cases.append(([str(p7)], "patch size 7x7 of model 'vit' does not divide the image size 8x8: resize the images"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"depth": 2}}))
    cases.append(([str(base), "--config", str(config)], "drop its model section"))
    for argv, message in cases:
        assert main(["finetune", *argv, *DIGITS, "--out-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitbn finetune: error: ") and message in err and err.count("\n") == 1, err
