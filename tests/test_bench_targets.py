"""The bench's target table, the training step's operator profile and the vit-pytorch reference cases."""

from __future__ import annotations

import textwrap

import pytest
import torch

from vitbn.bench.reference import load_reference, reference_cases
from vitbn.bench.suite import Spec
from vitbn.bench.targets import against_reference, format_targets, profiler_check, target_rows, top_ops
from vitbn.bench.timing import Case, paired_ratio
from vitbn.cli import main
from vitbn.errors import UserError

CPU = torch.device("cpu")


def _row(model, depth, mode, compiled=False, util=None, loader=None, status="ok", bound="compute", roof=None):
    return {"model": model, "depth": depth, "precision": "fp32", "mode": mode, "compiled": compiled,
            "util_pct": util, "loader_pct": loader, "status": status, "bound": bound, "roof_pct": roof}  # fmt: skip


def _cmp(what, a, ratio, target):
    return {"what": what, "a": a, "b": "b", "ratio": ratio, "target": target, "met": ratio >= target}


def test_target_rows_judge_every_target_from_the_result():
    result = {
        "rows": [_row("vit", 6, "train", util=45.7, loader=0.04), _row("vit", 6, "train", True, util=52.0),
                 _row("vit", 1, "train", util=99.0), _row("vitbn", 6, "infer_folded")],
        "comparisons": [_cmp("bf16 / fp32 training", "vit@6 bf16 train", 2.5, 3.0),
                        _cmp("BN folded / ViT inference", "vitbn@6 fp32 infer_folded", 0.96, 1.0),
                        _cmp("compiled / eager", "vit@6 fp32 train compiled", 1.7, 0.0)],
        "norms": {"ratios": [{"what": "bn / ln infer_folded fp32 b1", "variant": "bn", "ratio": 1.05},
                             {"what": "rms / ln infer fp32 b1", "variant": "rms", "ratio": 0.9}]},
    }  # fmt: skip
    rows = {r["what"]: r for r in target_rows(result)}
    assert rows["train vs vit-pytorch plain loop"]["met"] is None
    assert "give --reference PATH" in rows["train vs vit-pytorch plain loop"]["detail"]
    assert (rows["fp32 matmul peak used by vit@6 train"]["measured"], rows["fp32 matmul peak used by vit@6 train"]
            ["met"]) == (45.7, False)  # fmt: skip
    assert rows["fp32 matmul peak used by vit@6 train compiled"]["met"] is True
    assert rows["bf16 / fp32 training (vit@6 bf16 train)"]["met"] is False
    assert rows["bf16 / fp32 training (vit@6 bf16 train)"]["goal"] == ">= 3x"  # the comparison's own target
    assert rows["folded BN / ViT inference (vitbn@6 fp32 infer_folded)"]["measured"] == 0.96
    assert rows["folded bn / ln infer_folded fp32 b1"]["met"] is True
    assert rows["loader share of a training epoch (largest)"]["measured"] == 0.04
    assert len(rows) == 7  # the depth-1 ViT, compiled/eager and the RMSNorm ratio are not targets
    text = format_targets(list(rows.values()))
    assert text.splitlines()[0] == "targets (measured in this run):"
    line = next(x for x in text.splitlines() if "matmul peak used by vit@6 train " in x)
    assert line.split()[-5:] == ["45.700", ">=", "50%", "NOT", "met"]


def test_a_memory_bound_step_is_judged_against_its_roofline():
    rows = target_rows({"rows": [_row("vit", 6, "train", util=30.0, bound="memory", roof=75.0)], "comparisons": []})
    (row,) = [r for r in rows if "vit@6 train" in r["what"]]
    assert (row["what"], row["measured"], row["goal"], row["met"]) == (
        "roofline bound (memory) reached by vit@6 train", 75.0, ">= 70%", True)  # fmt: skip
    rows = target_rows({"rows": [_row("vit", 6, "train", util=30.0, bound="memory", roof=60.0)], "comparisons": []})
    assert next(r for r in rows if "vit@6 train" in r["what"])["met"] is False


def _timed(name: str, seconds: list[float]) -> Case:
    return Case(name, lambda: None, images=10, device=CPU, seconds=seconds)


def test_against_reference_pairs_like_with_like():
    measured = {Spec("vit", 6, "fp32", "train", False): _timed("ours", [1.0, 2.0, 1.0]),
                Spec("vit", 6, "fp32", "train", True): _timed("ours compiled", [0.5, 0.5, 0.5]),
                Spec("vit", 1, "fp32", "train", False): _timed("shallow", [0.1, 0.1, 0.1])}  # fmt: skip
    refs = {("fp32", False): _timed("ref", [1.5, 2.0, 1.0]), ("fp32", True): _timed("ref c", [0.5, 0.6, 0.5])}
    out = against_reference(measured, refs)
    assert [(c["a"], c["b"]) for c in out] == [("ours", "ref"), ("ours compiled", "ref c")]
    ratio = paired_ratio(measured[Spec("vit", 6, "fp32", "train", False)], refs[("fp32", False)])
    assert out[0]["ratio"] == ratio == 1.0 and out[0]["met"] is False  # per-round ratios 1.5, 1, 1: median 1
    assert out[1]["met"] is False and out[1]["ratio"] == pytest.approx(1.0)


def test_top_ops_counts_calls_and_shares_per_step():
    a, b = torch.randn(64, 64), torch.randn(64, 64)

    def run():
        torch.mm(a, b)
        torch.mm(a, b)
        torch.relu(a)

    ops = top_ops(run, CPU, iters=3, k=5)
    mm = next(o for o in ops if o["op"] == "aten::mm")
    assert mm["calls"] == 2.0 and ops == sorted(ops, key=lambda o: -o["self_ms"])
    assert 0 < sum(o["pct"] for o in ops) <= 100.0 + 1e-9
    assert len(top_ops(run, CPU, iters=1, k=1)) == 1


def _fake_vit_pytorch(root):
    """A stand-in vit-pytorch copy: ``vit_pytorch/vit.py`` with a ``ViT`` taking its keywords."""
    (root / "vit_pytorch").mkdir()
    (root / "vit_pytorch" / "vit.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        class ViT(nn.Module):
            def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels, dim_head):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size**2, num_classes))

            def forward(self, x):
                return self.net(x)
    """)
    )
    return root


def test_reference_cases_time_the_plain_step_of_the_copy(tmp_path):
    root = _fake_vit_pytorch(tmp_path)
    cases = reference_cases(root, precisions=("fp32",), compile=False, batch=4, device=CPU, warmup=1,
                            min_repeat_s=0.0)  # fmt: skip
    ((key, case),) = cases.items()
    assert key == ("fp32", False) and case.name == "vit-pytorch@6 fp32 train" and case.error is None
    model = load_reference(root)(image_size=28, patch_size=7, num_classes=10, dim=8, depth=1, heads=1, mlp_dim=8,
                                 channels=1, dim_head=8)  # fmt: skip
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_a_missing_reference_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError, match="no vit_pytorch/vit.py under .*pip install --no-deps --target"):
        load_reference(tmp_path)
    argv = ["bench", "--quick", "--models", "vit", "--depths", "1", "--modes", "train", "--no-recipes", "--no-norms",
            "--no-export", "--no-loader", "--repeats", "1", "--warmup", "1", "--min-repeat-s", "0", "--peak-size",
            "32", "--batch-size", "4", "--set", "dim=8", "--set", "heads=1", "--set", "dim_head=8", "--set",
            "mlp_dim=8", "--reference", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vitbn bench: error: no vit_pytorch/vit.py under")


def test_the_loader_is_timed_with_augmentation_and_judged_against_the_study_epoch():
    from vitbn.bench.suite import time_loader

    loader = time_loader(100, CPU, epochs=2, max_batches=3, augment="heavy")
    assert loader["images"] == 300 and loader["augmented"]["images"] == 300 and loader["augmented"]["level"] == "heavy"
    for timed in (loader, loader["augmented"]):  # which is faster is the bench's check, not a unit test's
        assert len(timed["samples"]) == 2 and timed["epoch_s"] == pytest.approx(sum(timed["samples"]) / 2)
    study = _row("vit", 6, "train", util=40.0, loader=0.1)
    result = {"rows": [{**study, "epoch_s": 200.0}], "comparisons": [], "loader": {"augmented": {
        "level": "medium", "epoch_s": 0.5, "images": 6000}}}  # fmt: skip
    row = next(r for r in target_rows(result) if r["what"].startswith("loader + medium"))
    assert row["measured"] == pytest.approx(100 * 5.0 / 205.0) and row["met"] is True


def test_the_measurement_checks_are_rows_of_the_target_table():
    loader = {"epoch_s": 0.2, "images": 300, "augmented": {"level": "heavy", "epoch_s": 0.3, "images": 150}}
    rows = {r["what"]: r for r in target_rows({"rows": [], "comparisons": [], "loader": loader,
                                                "profiler_check": 97.5})}  # fmt: skip
    aug = rows["loader + heavy augmentation / plain loader, per image"]
    assert (aug["measured"], aug["goal"], aug["met"]) == (pytest.approx(3.0), "> 1x", True)  # (0.3/150) / (0.2/300)
    check = rows["matmul share of a profiled pure matmul (op shares check)"]
    assert (check["measured"], check["goal"], check["met"]) == (97.5, "> 95%", True)
    loader["augmented"]["epoch_s"] = 0.05
    rows = {r["what"]: r for r in target_rows({"rows": [], "comparisons": [], "loader": loader,
                                                "profiler_check": 80.0})}  # fmt: skip
    aug = rows["loader + heavy augmentation / plain loader, per image"]
    assert aug["met"] is False and aug["detail"] == "no dearer than slicing: timing noise"
    assert rows["matmul share of a profiled pure matmul (op shares check)"]["met"] is False
    assert not any("augmentation / plain" in r["what"] or "op shares" in r["what"]
                   for r in target_rows({"rows": [], "comparisons": []}))  # fmt: skip
    assert 0.0 < profiler_check(CPU, iters=1) <= 100.0
