"""``vitbn serve``'s default models: per study name, the MNIST model best on validation (else test) accuracy, and
it says what it chose and which names it found none of."""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

import torch

from vitbn.cli.serve import load_predictors
from vitbn.engine.checkpoint import export_model
from vitbn.models import create_model
from vitbn.serve.predictor import choose_study_models

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)


def _run(folder, name: str, dataset: str, last: dict, age_s: float, **model):
    """A run folder with a tiny model file and a history whose last record is ``last``; ``age_s`` seconds old."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    info = SimpleNamespace(name=dataset, classes=[str(k) for k in range(10)], mean=(0.5,), std=(0.5,))
    path = export_model(create_model(name, **TINY, **model), folder / "model.pt", info)
    (folder / "history.json").write_text(json.dumps([{"epoch": 1, **last}]))
    stamp = path.stat().st_mtime - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_serve_chooses_by_accuracy_on_mnist_and_says_what_is_missing(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs / "ft" / "digits-head", "vit", "digits", {"test/acc": 0.42}, 0, image_size=8, patch_size=4)  # newest
    _run(runs / "quick" / "vit-a", "vit", "mnist", {"test/acc": 0.97}, 300)
    _run(runs / "quick" / "vit-b", "vit", "mnist", {"test/acc": 0.93}, 200)
    _run(runs / "quick" / "vit-c", "vit", "mnist", {"val/acc": 0.95, "test/acc": 0.99}, 250)  # val (0.95) counts
    _run(runs / "quick" / "vitbn-a", "vitbn", "mnist", {"test/acc": 0.96}, 100)
    chosen, counts = choose_study_models(runs)
    assert {n: c.path for n, c in chosen.items()} == {
        "vit": runs / "quick" / "vit-a" / "model.pt",
        "vitbn": runs / "quick" / "vitbn-a" / "model.pt",
    }
    assert counts == {"vit": 3, "vitbn": 1}  # the digits fine-tune is not a candidate
    predictors = load_predictors(argparse.Namespace(checkpoint=[], runs_dir=str(runs)))
    assert [p.name for p in predictors] == ["vit", "vitbn"]
    assert capsys.readouterr().out.splitlines() == [
        f"vit: chose {runs / 'quick' / 'vit-a' / 'model.pt'} (test acc 97.00%; the best of 3 MNIST vit model(s))",
        f"vitbnffn: no MNIST vitbnffn model under {runs}/ (`vitbn train --model vitbnffn` makes one)",
        f"vitbn: chose {runs / 'quick' / 'vitbn-a' / 'model.pt'} (test acc 96.00%; the best of 1 MNIST vitbn model(s))",
    ]


def test_validation_accuracy_ranks_before_an_unrecorded_one_and_ties_go_to_the_newest(tmp_path):
    runs = tmp_path / "runs"
    old = _run(runs / "a", "vit", "mnist", {"val/acc": 0.9}, 100)
    new = _run(runs / "b", "vit", "mnist", {"val/acc": 0.9}, 10)
    _run(runs / "c", "vit", "mnist", {}, 0)  # newest, but no accuracy recorded
    assert choose_study_models(runs)[0]["vit"].path == new
    (runs / "b" / "history.json").write_text(json.dumps([{"epoch": 1, "val/acc": 0.8}]))
    assert choose_study_models(runs)[0]["vit"].path == old
