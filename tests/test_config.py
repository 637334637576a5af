"""Config dataclasses: validation messages, presets, dict/YAML round trip, flattening."""

from __future__ import annotations

import pytest

from vitbn.config import DataConfig, RunConfig, TrainConfig, flatten, load_yaml, save_yaml


def test_round_trip_through_yaml(tmp_path):
    config = RunConfig.from_dict({"model": {"name": "vitbn", "depth": 1}, "train": {"lr": 0.01, "epochs": 3}})
    assert config.model.depth == 1 and config.model.ffn_inner_norm == "batch" and config.model.dim == 64
    save_yaml(config.to_dict(), tmp_path / "c.yaml")
    again = RunConfig.from_dict(load_yaml(tmp_path / "c.yaml"))
    assert again == config
    assert again.train.betas == (0.9, 0.999)


def test_flatten_gives_dotted_keys():
    flat = flatten(RunConfig().to_dict())
    assert flat["train.lr"] == 5e-4 and flat["model.depth"] == 6 and flat["data.dataset"] == "mnist"
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trian": {}}, r"unknown config section\(s\) \['trian'\]; allowed: model, data, train, track, hpo"),
        ({"train": {"learning_rate": 1}}, r"unknown TrainConfig field\(s\) \['learning_rate'\]; allowed: epochs"),
        ({"train": {"optimizer": "lamb"}}, r"optimizer='lamb' is not one of 'adam', 'adamw', 'sgd'"),
        ({"train": {"lr": 0}}, r"lr=0 must be a finite number > 0"),
        ({"train": {"lr": float("inf")}}, r"lr=inf must be a finite number > 0"),
        ({"train": {"lr": float("nan")}}, r"lr=nan must be a finite number > 0"),
        ({"train": {"batch_size": 0}}, r"batch_size=0 must be a positive integer"),
        ({"train": {"precision": "fp8"}}, r"precision='fp8' is not one of 'fp32', 'bf16', 'fp16'"),
        (
            {"model": {"name": "vgg"}},
            r"model='vgg' is not one of 'vit', 'vit-cifar', 'vitbn', 'vitbn-cifar', 'vitbnffn', 'vitbnffn-cifar'",
        ),
        ({"hpo": {"batch_min": 200}}, r"batch_min=200 must be <= batch_max=120"),
    ],
)
def test_bad_configs_get_one_line_messages(data, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(data)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ValueError, match=r"config file .*missing.yaml does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match=r"config file .*bad.yaml is not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"config file .*list.yaml must hold a mapping, got list"):
        load_yaml(tmp_path / "list.yaml")


def test_defaults_are_the_study_settings():
    train, data = TrainConfig(), DataConfig()
    assert (train.optimizer, train.lr, train.batch_size, train.eval_batch_size, train.epochs) == (
        "adam",
        5e-4,
        100,
        5000,
        30,
    )
    assert data.test_every_epoch and data.val_size == 0
