"""``vitbn export`` and ``vitbn.export``: the exported files compute the eager model's logits (ONNX at any batch
from one file, BatchNorms folded or not; TorchScript), say how to preprocess, are written atomically, and the CLI
checks parity, refuses what it cannot fold and names the missing extra in one line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from vitbn import export as E
from vitbn.cli import main
from vitbn.config import DataConfig
from vitbn.data import prepare_data
from vitbn.engine.checkpoint import InputSpec, export_model, load_model
from vitbn.models import create_model
from vitbn.models.norms import set_prepbn_lambda

TINY = dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32)
SPEC = InputSpec("mnist", tuple(str(i) for i in range(10)), (0.1307,), (0.3081,))
STUDY = ("vit", "vitbnffn", "vitbn")
EAGER_LINE = re.compile(r"max abs logit difference vs eager torch \(unfolded\): (\S+)")
FOLDED_LINE = re.compile(r"max abs logit difference vs folded torch: +(\S+)")


def trained_like(name: str, **extra) -> nn.Module:
    """A tiny model whose BatchNorms have non-trivial affine parameters and running statistics (a fresh BN is
    the identity map, and folding it would prove nothing), in eval mode."""
    torch.manual_seed(0)
    model = create_model(name, **{**TINY, **extra})
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.weight is not None:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 28, 28) * 2 + 0.5)
    return model.eval()


def eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Each study model, exported once with the BatchNorms folded and once without: {(name, fuse): (model, path)}."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in STUDY:
        model = trained_like(name)
        for fuse in (True, False):
            out[(name, fuse)] = model, E.export_onnx(model, folder / f"{name}-{fuse}.onnx", spec=SPEC, fuse=fuse)
    return out


@pytest.mark.parametrize("fuse", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("name", STUDY)
def test_onnx_logits_equal_eager_at_batch_1_and_5_from_one_file(exported, name, fuse):
    model, path = exported[(name, fuse)]
    session = E.onnx_session(path)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        got = torch.from_numpy(E.onnx_logits(session, x))
        assert got.shape == (batch, 10)
        assert_close(got, eager(model, x), atol=1e-4, rtol=0)


def test_the_file_has_a_dynamic_batch_and_folding_removes_the_batchnorms(exported):
    import onnx

    folded, unfolded = (onnx.load(str(exported[("vitbn", fuse)][1])) for fuse in (True, False))
    for graph in (folded.graph, unfolded.graph):
        (image,), (logits,) = graph.input, graph.output
        assert (image.name, logits.name) == ("image", "logits")
        dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
        assert isinstance(dims[0], str) and dims[0] and dims[1:] == [1, 28, 28]

    def batchnorms(graph) -> int:
        return sum(n.op_type == "BatchNormalization" for n in graph.node)

    # ViTBN at depth 2: patch embedding (in, out), 2 x (attention pre-norm, feed-forward inner norm), final
    assert (batchnorms(folded.graph), batchnorms(unfolded.graph)) == (0, 7)


def test_metadata_props_read_back_equal_the_input_spec(exported):
    import json

    model, path = exported[("vitbn", True)]
    meta = E.onnx_metadata(path)
    assert E.read_input_spec(meta) == SPEC
    assert meta[E.META_MODEL] == "vitbn" and json.loads(meta[E.META_FOLDED]) is True
    assert json.loads(meta[E.META_CONFIG])["dim"] == 16 and "(x - mean) / std" in meta[E.META_PREPROCESS]
    assert E.read_input_spec(E.onnx_metadata(exported[("vit", False)][1])) == SPEC
    assert json.loads(E.onnx_metadata(exported[("vit", False)][1])[E.META_FOLDED]) is False


def test_torchscript_logits_and_metadata(tmp_path):
    model = trained_like("vitbn")
    path = E.export_torchscript(model, tmp_path / "model.ts", spec=SPEC)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        assert_close(torch.from_numpy(E.torchscript_logits(path, x)), eager(model, x), atol=1e-4, rtol=0)
    assert E.read_input_spec(E.torchscript_metadata(path)) == SPEC


def test_parity_measures_the_difference_and_the_top1_agreement():
    model = trained_like("vitbn")
    x = torch.randn(6, 1, 28, 28)
    logits = eager(model, x).numpy()
    exact = E.parity(lambda b: eager(model, b).numpy(), model, x)
    assert exact["ok"] and exact["max_abs_eager"] < 1e-6 and exact["max_abs_folded"] < 1e-4
    assert exact["top1_matches"] == 6 and exact["top1_agreement"] == 1.0

    flipped = logits.copy()
    flipped[0] = -flipped[0]  # the first input's top-1 changes, by much more than the tolerance
    off = E.parity(lambda b: flipped[: len(b)] if len(b) > 1 else logits[:1] + 1e-3, model, x)
    assert not off["ok"] and off["max_abs_eager"] == pytest.approx(np.abs(2 * logits[0]).max(), rel=1e-5)
    assert off["top1_matches"] == 5 and off["top1_agreement"] == pytest.approx(5 / 6)


def test_parity_inputs_are_normalized_test_images_else_seeded_random(data_root):
    model = trained_like("vit")
    x, what = E.parity_inputs(model, SPEC, 7)
    images = prepare_data(DataConfig(test_subset=7)).test.images.float() / 255
    assert what == "7 test images of mnist"
    assert_close(x, (images - 0.1307) / 0.3081)
    other = InputSpec("no-such-dataset", SPEC.classes, (0.5,), (0.25,))
    y, what = E.parity_inputs(model, other, 7)
    assert what.startswith("7 seeded random images, uniform in [0, 1] and normalized (no-such-dataset did not load")
    assert y.shape == (7, 1, 28, 28) and float(y.min()) >= -2.0 and float(y.max()) <= 2.0  # (u - 0.5) / 0.25
    assert_close(y, E.parity_inputs(model, other, 7)[0])  # seeded
    z, what = E.parity_inputs(model, None, 3)
    assert z.shape == (3, 1, 28, 28) and "standard-normal" in what


def test_an_interrupted_write_leaves_no_file_and_the_old_one_intact(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(KeyboardInterrupt), E.atomic_target(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), E.atomic_target(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("exporter failed")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


# ---- the command


def _figure(pattern: re.Pattern, text: str) -> float:
    match = pattern.search(text)
    assert match, text
    return float(match.group(1))


def test_cli_exports_onnx_beside_the_model_and_checks_it_on_test_images(tmp_path, capsys, data_root):
    data = prepare_data(DataConfig(test_subset=20))
    model = trained_like("vitbn")
    path = export_model(model, tmp_path / "model.pt", data)
    assert main(["export", str(path), "--check-images", "20"]) == 0
    out = capsys.readouterr().out
    assert "on 20 test images of mnist, at batch 20 and batch 1" in out
    assert 0 <= _figure(EAGER_LINE, out) <= 1e-4 and 0 <= _figure(FOLDED_LINE, out) <= 1e-4
    assert "top-1 agreement with eager torch: 100.00% (20/20)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt"]  # no temporary file left
    assert E.read_input_spec(E.onnx_metadata(tmp_path / "model.onnx")) == InputSpec(
        "mnist", tuple(data.classes), tuple(data.info.mean), tuple(data.info.std)
    )
    x = torch.randn(3, 1, 28, 28)
    assert_close(torch.from_numpy(E.onnx_logits(tmp_path / "model.onnx", x)), eager(load_model(path), x), atol=1e-4,
                 rtol=0)  # fmt: skip


def test_cli_torchscript_from_a_run_folder_without_an_input_spec(tmp_path, capsys):
    export_model(trained_like("vitbnffn"), tmp_path / "model.pt")
    out_file = tmp_path / "deploy" / "net.ts"
    assert (
        main(["export", str(tmp_path), "--format", "torchscript", "--out", str(out_file), "--check-images", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert "input     not recorded (" in out and "on 8 seeded random standard-normal inputs" in out
    assert _figure(EAGER_LINE, out) <= 1e-4 and out_file.is_file()
    assert "fuse_bn left 5 norm(s) unfolded: 5 LayerNorm" in out  # ViTBNFFN keeps its attention LayerNorms
    assert E.read_input_spec(E.torchscript_metadata(out_file)) is None


def test_cli_refuses_to_fold_a_prepbn_mid_ramp_and_exports_it_unfolded(tmp_path, capsys):
    model = trained_like("vit", norm="prepbn")
    set_prepbn_lambda(model, 0.5)
    path = export_model(model, tmp_path / "model.pt")
    assert main(["export", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitbn export: error: fuse_bn cannot fold a PRepBN at lambda=0.5")
    assert err.rstrip().endswith("; or export it unfolded with --no-fuse-bn")
    assert not (tmp_path / "model.onnx").exists()
    assert main(["export", str(path), "--no-fuse-bn", "--check-images", "4"]) == 0
    out = capsys.readouterr().out
    assert _figure(EAGER_LINE, out) <= 1e-4 and "vs folded torch:           n/a (fuse_bn cannot fold" in out
    assert (tmp_path / "model.onnx").is_file()


def test_cli_fails_in_one_line_when_the_export_differs(tmp_path, capsys, monkeypatch):
    path = export_model(trained_like("vitbn"), tmp_path / "model.pt")
    real = E.torchscript_logits
    monkeypatch.setattr(E, "torchscript_logits", lambda file, x: real(file, x) + 1e-3)
    assert main(["export", str(path), "--format", "torchscript", "--check-images", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vitbn export: error: the exported model's logits differ from the torch" in err
    assert "(> 1e-04) on 4 seeded random standard-normal inputs (the model file records no input spec); " in err
    assert err.rstrip().endswith(f"{tmp_path / 'model.ts'} not written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("content", [None, b"not a torch file"], ids=["missing", "corrupt"])
def test_cli_missing_or_corrupt_checkpoint_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    assert main(["export", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"vitbn export: error: model file {path} does not exist\n"
        if content is None
        else f"vitbn export: error: not a vitbn model file: {path} (it holds no PyTorch weights)\n"
    )


def test_cli_names_the_export_extra_when_onnxruntime_is_missing(tmp_path, capsys, monkeypatch):
    path = export_model(trained_like("vit"), tmp_path / "model.pt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    assert main(["export", str(path)]) == 2
    assert capsys.readouterr().err == (
        "vitbn export: error: --format onnx needs the export extra: pip install 'vitbn[export]' "
        "(onnx, onnxruntime, onnxscript); not importable here: onnxruntime\n"
    )
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["model.pt"]


def test_cli_opset_is_honoured_or_refused_in_one_line(tmp_path, capfd):
    """An opset the exporter cannot convert the model to is an error with no file and no exporter traceback (it
    used to write opset 18 and exit 0); one it can is the file's opset."""
    import onnx

    path = export_model(trained_like("vit"), tmp_path / "model.pt")
    assert main(["export", str(path), "--opset", "5", "--check-images", "0"]) == 2
    err = capfd.readouterr().err
    assert err == (
        "vitbn export: error: --opset 5: the exporter writes opset 18 and could not convert this model to 5 (e.g. "
        "LayerNormalization exists from opset 17 on); use a later --opset, or leave it out\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    newest = onnx.defs.onnx_opset_version()
    assert main(["export", str(path), "--opset", str(newest + 1)]) == 2
    assert capfd.readouterr().err == (
        f"vitbn export: error: --opset {newest + 1} must be in 1..{newest} (the installed onnx's newest)\n"
    )
    assert main(["export", str(path), "--opset", "17", "--check-images", "4"]) == 0
    assert "ONNX opset 17" in capfd.readouterr().out
    assert E.onnx_opset(tmp_path / "model.onnx") == 17
