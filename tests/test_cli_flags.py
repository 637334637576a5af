"""The one table of model and run flags: every model knob reaches the config from ``vitbn train``, ``vitbn
experiment`` and ``vitbn bench``; a bad value gets one line that names the flag and the allowed values."""

from __future__ import annotations

import pytest

from vitbn.cli import build_parser, main
from vitbn.cli.bench import options_from_args
from vitbn.cli.experiment import RUN_FLAGS, preset_from_args
from vitbn.cli.flags import MODEL_FLAGS
from vitbn.cli.train import config_from_args, resume_command
from vitbn.config import ModelConfig

KNOBS = ["--dim", "32", "--heads", "4", "--dim-head", "8", "--mlp-dim", "48", "--patch-size", "4", "--pool", "mean",
         "--no-class-token", "--pos-emb", "pe2d", "--dropout", "0.1", "--emb-dropout", "0.05", "--attn-norm", "batch",
         "--bn-stats", "scalar", "--bn-momentum", "0.2", "--ghost-batch-size", "8", "--attn-impl", "plain",
         "--parallel", "2", "--layer-scale", "1e-4", "--drop-path", "0.1", "--stem", "hmlp"]  # fmt: skip
EXPECTED = dict(dim=32, heads=4, dim_head=8, mlp_dim=48, patch_size=4, pool="mean", class_token=False, pos_emb="pe2d",
                dropout=0.1, emb_dropout=0.05, attn_norm="batch", bn_stats="scalar", bn_momentum=0.2,
                ghost_batch_size=8, attn_impl="plain", parallel=2, layer_scale=1e-4, drop_path=0.1,
                stem="hmlp")  # fmt: skip


def test_every_model_field_has_a_flag():
    fields = {f for f in ModelConfig.__dataclass_fields__} - {"image_size", "channels", "num_classes"}  # the data's
    assert {spec.field for spec in MODEL_FLAGS.values()} == fields | {"norm"}  # norm: every slot at once


def test_train_flags_reach_the_model_config():
    cfg = config_from_args(build_parser().parse_args(["train", "--model", "vit", "--depth", "3", *KNOBS]))
    got = {k: getattr(cfg.model, k) for k in EXPECTED}
    assert got == EXPECTED and cfg.model.depth == 3
    assert cfg.model.name == "vit+attn_norm=batch"  # a vit preset holding BatchNorm is not logged as plain vit
    args = build_parser().parse_args(["train", "--patch-size", "4x4", "--stem", "hmlp", "--no-track"])
    assert config_from_args(args).model.patch_size == (4, 4)
    assert "--patch-size 4x4 --stem hmlp" in resume_command(args, "r1")


def test_experiment_and_bench_take_the_same_model_flags():
    args = build_parser().parse_args(["experiment", "lr-sweep", "--preset", "quick", *KNOBS])
    preset = preset_from_args(args, RUN_FLAGS)
    assert {k: preset.run["model"][k] for k in EXPECTED} == EXPECTED
    config = preset.base_config(preset.models[0])
    assert (config.model.parallel, config.model.stem, config.model.depth) == (2, "hmlp", 1)
    bench = options_from_args(build_parser().parse_args(["bench", "--quick", *KNOBS]))
    assert bench.overrides == EXPECTED
    assert options_from_args(build_parser().parse_args(["bench", "--quick", "--depths", "3"])).depths == (3,)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--parallel", "0"], "vitbn train: error: --parallel: parallel=0 must be a positive integer"),
        (["--drop-path", "1.5"], r"vitbn train: error: --drop-path: drop_path=1.5 must be in [0, 1)"),
        (["--stem", "hmlp"], "vitbn train: error: --stem: stem='hmlp' splits the patch into stages (4 = 2x2, 14 = "
                             "7x2, 16 = 4x2x2) but patch_size=7 has no factors: use patch_size 4 (49 tokens on 28x28 "
                             "images) or 14"),
        (["--model", "vitx"], "vitbn train: error: --model: model='vitx' is not one of 'vit', 'vit-cifar', 'vitbn', "
                              "'vitbn-cifar', 'vitbnffn', 'vitbnffn-cifar'"),
    ],
)  # fmt: skip
def test_bad_model_values_are_one_line_naming_the_flag(argv, line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-track", *argv]) == 2
    assert capsys.readouterr().err == line + "\n"
    assert list(tmp_path.iterdir()) == []


def test_bad_choices_name_the_flag_and_the_allowed_values(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--stem", "patchify"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert (
        err == "vitbn train: error: argument --stem: invalid choice: 'patchify' (choose from 'linear', 'hmlp', 'conv')"
    )
    with pytest.raises(SystemExit):
        main(["experiment", "lr-sweep", "--attn-norm", "group"])
    assert (
        "argument --attn-norm: invalid choice: 'group' (choose from 'layer', 'rms', 'batch', 'repbn', 'prepbn', "
        "'dyt', 'none')" in capsys.readouterr().err
    )
