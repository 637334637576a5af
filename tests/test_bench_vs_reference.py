"""benchmarks/vs_vit_pytorch.py pairs like with like: eager with eager, compiled with compiled; a target is judged
only on such a pairing (fake cases with known timings; the script itself needs vit-pytorch, not a dependency)."""

from __future__ import annotations

import pytest
import torch

from vitbn.bench.timing import Case


def _case(impl: str, seconds: list[float], precision: str = "fp32") -> tuple[dict, Case]:
    case = Case(impl, lambda: None, images=100, device=torch.device("cpu"), seconds=seconds)
    return {"precision": precision, "mode": "train", "impl": impl}, case


def test_each_implementation_is_paired_with_its_like_reference(vs_script):
    cases = [
        _case("vit-pytorch", [1.0, 2.0]),
        _case("vitbn", [0.8, 1.6]),  # 1.25x the eager reference in both rounds
        _case("vit-pytorch+compile", [0.5, 0.5]),
        _case("vitbn+compile", [0.45, 0.5]),  # 1.11x, 1.0x the compiled one (but 2.2x the eager one)
        _case("vitbn", [0.4, 0.8], "bf16"),
        _case("vit-pytorch", [0.5, 1.0], "bf16"),
    ]
    rows = {(r["precision"], r["impl"]): r for r in vs_script.rows_of(cases)}
    assert rows[("fp32", "vitbn")]["pairing"] == "vit-pytorch"
    assert rows[("fp32", "vitbn")]["vs_ref"] == pytest.approx(1.25)
    assert rows[("fp32", "vitbn+compile")]["pairing"] == "vit-pytorch+compile"
    assert rows[("fp32", "vitbn+compile")]["vs_ref"] == pytest.approx((0.5 / 0.45 + 1.0) / 2)
    assert rows[("bf16", "vitbn")]["vs_ref"] == pytest.approx(1.25)
    assert rows[("bf16", "vitbn")]["bf16_vs_fp32"] == pytest.approx(2.0)
    text = vs_script.format_rows(list(rows.values()))
    lines = {(line.split()[0], line.split()[2]): line for line in text.splitlines()[2:]}
    assert "1.25x vit-pytorch" in lines[("fp32", "vitbn")]
    assert "target >= 1.2x vit-pytorch: met" in lines[("fp32", "vitbn")]
    assert "target >= 1.2x vit-pytorch+compile: NOT met" in lines[("fp32", "vitbn+compile")]


def test_no_verdict_without_a_like_reference(vs_script):
    rows = vs_script.rows_of([_case("vit-pytorch", [1.0]), _case("vitbn+compile", [0.1])])  # no compiled reference
    compiled = next(r for r in rows if r["impl"] == "vitbn+compile")
    assert compiled["vs_ref"] is None and compiled["pairing"] == "vit-pytorch+compile"
    line = vs_script.format_rows(rows).splitlines()[-1]
    assert "- (no vit-pytorch+compile)" in line and "met" not in line
