"""Presets: the study's recipe exactly, the fair and quick variants, YAML files equal to the code, overrides, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitbn.cli import main
from vitbn.errors import UserError
from vitbn.experiments.presets import PRESETS, ExperimentPreset, load_preset, override_preset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def labels(preset: ExperimentPreset) -> list[str]:
    return [m.label for m in preset.models]


def test_study_is_the_articles_setting():
    study = load_preset("study")
    assert labels(study) == ["vit-d6", "vitbnffn-d1", "vitbn-d1"]
    assert study.lrs == [0.0005, 0.005, 0.01] and study.seeds == [0]
    for spec in study.models:
        cfg = study.base_config(spec, lr=0.005, seed=0)
        assert (cfg.model.name, cfg.model.depth, cfg.model.dim, cfg.model.heads, cfg.model.mlp_dim) == (
            spec.name, spec.depth, 64, 8, 128)  # fmt: skip
        assert (cfg.model.dropout, cfg.model.emb_dropout) == (0.0, 0.0)
        tc = cfg.train
        assert (tc.epochs, tc.optimizer, tc.lr, tc.batch_size, tc.eval_batch_size) == (30, "adam", 0.005, 100, 5000)
        assert (tc.schedule, tc.label_smoothing, tc.weight_decay, tc.precision) == ("constant", 0.0, 0.0, "fp32")
        assert (cfg.data.dataset, cfg.data.val_size, cfg.data.test_every_epoch) == ("mnist", 0, True)
        assert (cfg.data.train_subset, cfg.data.test_subset) == (None, None)


def test_fair_and_quick():
    fair = load_preset("fair")
    assert sorted(labels(fair)) == sorted(f"{m}-d{d}" for m in ("vit", "vitbnffn", "vitbn") for d in (1, 6))
    assert len(fair.seeds) >= 2
    cfg = fair.base_config(fair.models[0])
    assert (cfg.data.val_size, cfg.data.test_every_epoch, cfg.train.epochs) == (10000, False, 30)
    quick = load_preset("quick")
    assert labels(quick) == ["vit-d1", "vitbnffn-d1", "vitbn-d1", "vit-d6"]
    cfg = quick.base_config(quick.models[0])
    assert cfg.train.precision == "fp32" and cfg.train.epochs == 3 and cfg.data.train_subset == 5000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_configs_yaml_equal_the_presets(name):
    assert load_preset(CONFIGS / f"{name}.yaml").to_dict() == PRESETS[name].to_dict()


def test_overrides():
    study = load_preset("study")
    small = override_preset(study, lrs=[0.0005], models=["vitbn", "vit-d6"], seeds=[0, 1], epochs=2,
                            run={"data": {"train_subset": 500}})  # fmt: skip
    assert small.lrs == [0.0005] and labels(small) == ["vit-d6", "vitbn-d1"] and small.seeds == [0, 1]
    cfg = small.base_config(small.models[1], lr=0.0005, seed=1)
    assert (cfg.train.epochs, cfg.data.train_subset, cfg.train.seed) == (2, 500, 1)
    assert small.shared_hash() != study.shared_hash()
    with pytest.raises(UserError, match=r"--lr \[0.1\] not in preset 'study' lrs \[0.0005, 0.005, 0.01\]"):
        override_preset(study, lrs=[0.1])
    with pytest.raises(UserError, match=r"--models \['resnet'\] not in preset 'study'"):
        override_preset(study, models=["resnet"])


def test_parent_hash_ignores_where_runs_go_and_the_trial_budget():
    tune = load_preset("study-tune")
    moved = override_preset(tune, run={"track": {"experiment": "x"}, "train": {"out_dir": "/tmp/x"},
                                       "hpo": {"trials": 50}})  # fmt: skip
    assert moved.shared_hash() == tune.shared_hash()
    assert override_preset(tune, run={"hpo": {"epochs": 5}}).shared_hash() != tune.shared_hash()


def test_bad_presets(tmp_path):
    with pytest.raises(UserError, match=r"preset 'nope' is not one of .*study.* nor a YAML file"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [{name: vit, depth: 0}]\nlrs: [0.1]\n")
    with pytest.raises(UserError, match=r"model 'vit': depth=0 must be a positive integer"):
        load_preset(bad)
    bad.write_text("name: x\nmodels: [{name: vit, depth: 1}]\nlrs: [0.1]\nrun: {train: {optimizer: lion}}\n")
    with pytest.raises(UserError, match=r"preset 'x': optimizer='lion' is not one of"):
        load_preset(bad)


def test_cli_lists_presets_and_reports_bad_input_in_one_line(capsys):
    assert main(["experiment", "lr-sweep", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert main(["experiment", "lr-sweep", "--preset", "study", "--lr", "0.2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vitbn experiment: error: --lr [0.2] not in preset 'study' lrs [0.0005, 0.005, 0.01] (use a YAML preset)"
    )
    assert main(["experiment", "lr-sweep", "--lr", "0.2"]) == 2  # no --preset: the quick one, not hours of study
    assert "not in preset 'quick' lrs [0.0005, 0.005]" in capsys.readouterr().err
    assert main(["experiment", "lr-sweep", "--preset", "study-tune"]) == 2
    assert "has no learning rates to sweep" in capsys.readouterr().err
    assert main(["experiment", "tune", "--preset", "study", "--tracking-uri", "sqlite:////nonexistent/x.db"]) == 2
    assert "tuning maximizes validation accuracy" in capsys.readouterr().err
