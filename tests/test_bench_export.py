"""The bench's export section: onnxruntime against eager and folded torch, its printed rows and paired ratios taken
from the measured samples, and one skip line when onnxruntime is missing. Nothing here asserts a speed."""

from __future__ import annotations

import contextlib
import io
import re
import statistics
import sys

import pytest
import torch
from torch.testing import assert_close

from vitbn.bench import BenchOptions, run_bench
from vitbn.bench.export import TINY, ExportOptions, format_export, run_export
from vitbn.cli import main

REPEATS = 3
ROW = re.compile(r"^  (\S+@\d+) +(\d+) +(.+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def section() -> dict:
    """One tiny export section: ViT and ViTBN at depth 1, batches 1 and 8, three short interleaved rounds."""
    options = ExportOptions(models=(("vit", 1), ("vitbn", 1)), batches=(1, 8), overrides=tuple(TINY.items()))
    return run_export(options, repeats=REPEATS, warmup=1, min_repeat_s=0.02)


def test_every_engine_is_timed_on_the_same_threads_and_batches(section):
    keys = [(r["model"], r["engine"], r["batch"]) for r in section["rows"]]
    assert keys == [(m, e, b) for m, engines in (("vit@1", ("eager", "onnx")), ("vitbn@1", ("eager", "folded", "onnx")))
                    for b in (1, 8) for e in engines]  # fmt: skip
    assert section["threads"] == torch.get_num_threads()
    assert all(len(r["samples"]) == REPEATS and r["img_s"] > 0 for r in section["rows"])
    models = section["models"]
    assert (models["vit@1"]["folded"], models["vitbn@1"]["folded"]) == (False, True)
    assert all(0 <= m["max_abs"] <= 1e-4 and m["export_s"] > 0 for m in models.values())  # the timed file is right


def test_ratios_are_paired_over_eager_from_the_measured_samples(section):
    rows = {(r["model"], r["engine"], r["batch"]): r for r in section["rows"]}
    assert len(section["ratios"]) == 6  # vit: onnx at 2 batches; vitbn: folded and onnx at 2 batches
    for r in section["ratios"]:
        a, b = rows[(r["model"], r["engine"], r["batch"])], rows[(r["model"], "eager", r["batch"])]
        assert r["ratio"] == statistics.median(x / y for x, y in zip(a["samples"], b["samples"]))
        assert_close(a["img_s"], statistics.median(a["samples"]))


def _printed(text: str) -> dict[tuple[str, int], list[str]]:
    return {(m, int(b)): rest.split() for m, b, rest in ROW.findall(text)}


def test_printed_rows_and_ratios_are_the_measured_numbers(section):
    text = format_export(section)
    printed = _printed(text)
    assert set(printed) == {(m, b) for m in ("vit@1", "vitbn@1") for b in (1, 8)}
    rows = {(r["model"], r["engine"], r["batch"]): r for r in section["rows"]}
    ratios = {(r["model"], r["engine"], r["batch"]): r["ratio"] for r in section["ratios"]}
    for (model, batch), cells in printed.items():
        eager, eager_spread, *rest = cells  # img/s ±%, then the folded (or -), onnxruntime, folded/eager, onnx/eager
        folded = None if rest[0] == "-" else float(rest[0].replace(",", ""))
        onnx, folded_ratio, onnx_ratio = rest[-4].replace(",", ""), rest[-2], rest[-1]
        assert float(eager.replace(",", "")) == round(rows[(model, "eager", batch)]["img_s"], 1)
        assert float(onnx) == round(rows[(model, "onnx", batch)]["img_s"], 1)
        assert onnx_ratio == f"{ratios[(model, 'onnx', batch)]:.3f}x"
        # the paired ratio (median of per-round ratios) lies within the rounds' ratios of the printed engines
        per_round = [
            x / y for x, y in zip(rows[(model, "onnx", batch)]["samples"], rows[(model, "eager", batch)]["samples"])
        ]
        assert min(per_round) - 5e-4 <= float(onnx_ratio[:-1]) <= max(per_round) + 5e-4
        if model == "vit@1":
            assert folded is None and folded_ratio == "-"
        else:
            assert folded == round(rows[(model, "folded", batch)]["img_s"], 1)
            assert folded_ratio == f"{ratios[(model, 'folded', batch)]:.3f}x"
    assert "vit@1        vit" in text and "max |onnx - eager|" in text and "thread(s) for torch and onnxruntime" in text


def test_one_round_ratio_is_the_ratio_of_the_printed_img_s():
    """With one round the paired ratio is the ratio of the two printed figures, up to their rounding."""
    options = ExportOptions(models=(("vitbn", 1),), batches=(4,), overrides=tuple(TINY.items()))
    cells = _printed(format_export(run_export(options, repeats=1, warmup=1, min_repeat_s=0.02)))[("vitbn@1", 4)]
    eager, folded, onnx = (float(cells[i].replace(",", "")) for i in (0, 2, 4))
    for value, ratio in ((folded, cells[6]), (onnx, cells[7])):
        expected = value / eager  # both printed to 0.1 img/s: relative rounding error below 0.05 / img/s each
        slack = expected * (0.05 / value + 0.05 / eager) + 5e-4
        assert abs(float(ratio[:-1]) - expected) <= slack, (cells, expected)


SMALL = dict(models=("vit",), depths=(1,), precisions=("fp32",), modes=("infer",), compile=False, repeats=1,
             warmup=1, min_repeat_s=0.0, peak_size=64, infer_batch_size=4, loader=False, profile_norms=False,
             recipes=False, norms=False, overrides=TINY)  # fmt: skip


def test_skipped_in_one_line_when_onnxruntime_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    section = run_bench(BenchOptions(**SMALL))["export"]
    line = ("export: skipped (onnxruntime not installed; the section needs the export extra: pip install "
            "'vitbn[export]' (onnx, onnxruntime, onnxscript))")  # fmt: skip
    assert section == {"skipped": section["skipped"]} and format_export(section) == line
    argv = ["bench", "--models", "vit", "--depths", "1", "--precisions", "fp32", "--modes", "infer", "--no-compile",
            "--repeats", "1", "--warmup", "1", "--min-repeat-s", "0", "--peak-size", "64", "--infer-batch-size", "4",
            "--no-loader", "--no-norm-profile", "--no-recipes", "--no-norms", "--set", "dim=16"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("export: skipped") == 1 and f"\n{line}\n" in out and "export (CPU" not in out


def test_no_export_leaves_the_section_out():
    buffer = io.StringIO()
    result = run_bench(BenchOptions(**SMALL, export=False))
    assert result["export"] is None
    with contextlib.redirect_stdout(buffer):
        assert main(["bench", "--models", "vit", "--depths", "1", "--modes", "infer", "--no-export", "--no-compile",
                     "--repeats", "1", "--warmup", "1", "--min-repeat-s", "0", "--peak-size", "64", "--precisions",
                     "fp32", "--infer-batch-size", "4", "--no-loader", "--no-norm-profile", "--no-recipes",
                     "--no-norms", "--set", "dim=16"]) == 0  # fmt: skip
    assert "export" not in buffer.getvalue()  # neither the section nor its skip line
