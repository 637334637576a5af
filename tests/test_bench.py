"""``vitbn bench``: the figures it prints are present and consistent with each other, with the analytic FLOP
count and with the JSON it writes; the timing primitives interleave, pair and summarize as documented.
Nothing here asserts that a speed was reached."""

from __future__ import annotations

import contextlib
import io
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vitbn.bench import (
    BenchOptions,
    Case,
    format_table,
    interleave,
    load_json,
    paired_ratio,
    run_bench,
    save_json,
    warm_up,
)
from vitbn.bench.cases import categorize, op_shares, peak_memory
from vitbn.bench.roofline import roofline
from vitbn.bench.suite import MNIST_TRAIN_IMAGES, Spec, make_row, model_depths, plan, time_loader
from vitbn.bench.system import cpu_features
from vitbn.bench.timing import matmul_case
from vitbn.cli import main
from vitbn.errors import UserError
from vitbn.models import create_model

TINY = dict(dim=16, heads=2, dim_head=8, mlp_dim=32)
TINY_ARGS = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
FAST = ["--repeats", "2", "--warmup", "1", "--min-repeat-s", "0", "--peak-size", "128", "--batch-size", "8"]
FAST += ["--infer-batch-size", "16", "--no-loader", "--bandwidth-mib", "8"]
CPU = torch.device("cpu")


def analytic_forward_flops(depth: int, embed_norm: str = "layer", **kw) -> int:
    """Matrix-product FLOPs of one forward pass of an MNIST-shaped ViT (2 FLOPs per multiply-add)."""
    c = create_model("vit", depth=depth, embed_norm=embed_norm, **kw).config
    d, m, heads, dh, n, p = c.dim, c.mlp_dim, c.heads, c.dim_head, c.num_tokens, c.num_patches
    inner, patch_dim = heads * dh, c.channels * c.patch_size**2
    per_block = 2 * n * (d * 3 * inner + inner * d + d * m + m * d) + 4 * heads * n * n * dh
    return 2 * p * patch_dim * d + depth * per_block + 2 * d * c.num_classes


def analytic_train_flops(depth: int, embed_norm: str = "layer", **kw) -> int:
    """Forward + backward = 3 x forward, less the patch projection's input gradient when nothing before the
    projection needs a gradient (no norm with parameters on the pixels)."""
    c = create_model("vit", depth=depth, **kw).config
    skipped = 2 * c.num_patches * c.channels * c.patch_size**2 * c.dim if embed_norm == "none" else 0
    return 3 * analytic_forward_flops(depth, embed_norm, **kw) - skipped


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One tiny ``vitbn bench --quick`` through the CLI (quick's defaults: no compile; the rest overridden):
    ViT and ViTBN at depth 1, fp32; its stdout and JSON."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--quick", "--models", "vit,vitbn", "--depths", "1", "--precisions", "fp32"]
    buffer = io.StringIO()  # capsys is function-scoped; this fixture runs once for the module
    with contextlib.redirect_stdout(buffer):
        code = main([*argv, *FAST, *TINY_ARGS, "--out", str(out)])
    assert code == 0
    return buffer.getvalue(), load_json(out)


def test_rows_cover_the_planned_configurations(cli_run):
    _, result = cli_run
    options = result["meta"]["options"]
    assert (options["compile"], options["repeats"], options["depths"]) == (False, 2, [1])
    assert options["overrides"] == TINY and result["meta"]["compile"] == "disabled"
    keys = [(r["model"], r["depth"], r["precision"], r["mode"], r["compiled"]) for r in result["rows"]]
    assert keys == [
        ("vit", 1, "fp32", "train", False),
        ("vit", 1, "fp32", "infer", False),
        ("vitbn", 1, "fp32", "train", False),
        ("vitbn", 1, "fp32", "infer", False),
        ("vitbn", 1, "fp32", "infer_folded", False),
    ]
    assert all(r["status"] == "ok" for r in result["rows"])
    assert [r["batch"] for r in result["rows"]] == [8, 16, 8, 16, 16]


def test_flops_per_image_equal_the_analytic_count(cli_run):
    _, result = cli_run
    fwd, train = analytic_forward_flops(1, **TINY), analytic_train_flops(1, **TINY)
    assert train == 3 * fwd  # the pixels' LayerNorm has parameters: the projection's input gradient is needed
    for row in result["rows"]:
        assert row["flops_img"] == (train if row["mode"] == "train" else fwd), row


def test_train_flops_skip_the_patch_input_gradient_without_a_pixel_norm():
    from vitbn.models import forward_flops

    model = create_model("vit", depth=1, embed_norm="none", **TINY)
    assert forward_flops(model) == analytic_forward_flops(1, "none", **TINY)
    assert forward_flops(model, train=True) == analytic_train_flops(1, "none", **TINY) < 3 * forward_flops(model)


def test_derived_figures_are_consistent(cli_run):
    _, result = cli_run
    peak = result["peaks"]["fp32"]
    assert peak["size"] == 128 and len(peak["samples"]) == 2
    assert_close(peak["median"], statistics.median(peak["samples"]))
    for row in result["rows"]:
        assert len(row["samples"]) == 2
        assert_close(row["img_s"], statistics.median(row["samples"]))
        assert_close(row["gflops"], row["flops_img"] * row["img_s"] / 1e9)
        assert_close(row["peak_gflops"], peak["median"])
        assert_close(row["util_pct"], row["gflops"] / row["peak_gflops"] * 100)
        bound = roofline(row["flops_img"], row["bytes_img"], peak["median"], result["meta"]["bandwidth_gb_s"])
        assert row["bytes_img"] > 0 and (row["roof_img_s"], row["bound"]) == (bound["roof_img_s"], bound["bound"])
        assert_close(row["roof_pct"], 100 * row["img_s"] / row["roof_img_s"])
        assert row["mem_mb"] > 0 and row["mem_method"] == "torch.profiler tensor allocations"
        if row["mode"] == "train":
            assert_close(row["epoch_s"], MNIST_TRAIN_IMAGES / row["img_s"])
        else:
            assert row["epoch_s"] is None
        assert_close(sum(row["op_shares"].values()), 100.0)
        assert row["norm_pct"] == row["op_shares"]["norm"]
        assert row["matmul_pct"] == row["op_shares"]["matmul"] and 0 < row["matmul_pct"] < 100
        if row["mode"] == "infer_folded":
            assert row["norm_pct"] == 0.0  # every norm of ViTBN is a BatchNorm, all folded
        else:
            assert 0 < row["norm_pct"] < 100


def test_paired_ratios_are_medians_of_per_round_ratios(cli_run):
    _, result = cli_run
    rows = {(r["model"], r["mode"]): r for r in result["rows"]}
    by_what = {c["what"]: c for c in result["comparisons"]}
    folded, vit = rows[("vitbn", "infer_folded")]["samples"], rows[("vit", "infer")]["samples"]
    expected = statistics.median(a / b for a, b in zip(folded, vit))
    assert_close(by_what["BN folded / ViT inference"]["ratio"], expected)
    assert by_what["BN folded / ViT inference"]["target"] == 1.0
    assert by_what["BN folded / ViT inference"]["met"] == (expected >= 1.0)
    unfolded = rows[("vitbn", "infer")]
    assert_close(by_what["folded / unfolded inference"]["bound"], 100 / (100 - unfolded["norm_pct"]))


def test_json_read_back_equals_the_printed_rows(cli_run):
    printed, result = cli_run
    first = printed.splitlines()[0]
    assert f"commit {result['meta']['commit']}" in first and f"[{cpu_features()}]" in first
    assert f"memory bandwidth (large copy, median) {result['meta']['bandwidth_gb_s']:.1f} GB/s" in printed
    assert format_table(result["rows"]) in printed
    assert "peak (dense matmul, median): fp32" in printed
    assert "BN folded / ViT inference" in printed


def test_loader_share_of_an_epoch():
    loader = time_loader(batch_size=100, device=CPU, epochs=1, max_batches=20)
    assert loader["status"] == "ok" and loader["images"] == 2000 and len(loader["samples"]) == 1
    spec = Spec("vit", 1, "fp32", "train", False)
    case = Case("x", lambda: None, images=100, device=CPU, seconds=[0.1, 0.2, 0.3])
    peaks = {"fp32": Case("peak", lambda: None, images=1.0, device=CPU, seconds=[0.01])}
    row = make_row(spec, case, {"flops_img": 10**6, "mem_mb": 1.0, "mem_method": "m", "op_shares": None}, peaks, loader)
    load_s = loader["epoch_s"] * MNIST_TRAIN_IMAGES / 2000
    train_s = MNIST_TRAIN_IMAGES / 500.0  # median of 1000, 500, 333 img/s
    assert_close(row["loader_pct"], 100 * load_s / (load_s + train_s))
    assert_close(row["util_pct"], 100 * (10**6 * 500 / 1e9) / 100.0)


def test_a_compiler_failure_is_reported_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    options = BenchOptions(models=("vit",), depths=(1,), precisions=("fp32",), modes=("infer",), compile=True,
                           repeats=1, warmup=1, min_repeat_s=0.0, peak_size=64, infer_batch_size=4, loader=False,
                           profile_norms=False, overrides=TINY)  # fmt: skip
    result = run_bench(options)
    eager, compiled = result["rows"]
    assert eager["status"] == "ok" and eager["img_s"] > 0
    assert compiled["status"] == "n/a (RuntimeError: no C++ compiler found)"
    assert compiled["img_s"] is None and compiled["flops_img"] == eager["flops_img"]
    assert result["meta"]["compile"] == "n/a (RuntimeError: no C++ compiler found)"
    assert "n/a (RuntimeError: no C++ compiler found)" in format_table(result["rows"])


def test_interleave_alternates_the_cases():
    calls = []
    cases = [Case(name, lambda n=name: calls.append(n), images=1, device=CPU) for name in "AB"]
    for case in cases:
        warm_up(case, 1, 0.0)
    calls.clear()
    interleave(cases, repeats=3)
    assert calls == ["A", "B", "A", "B", "A", "B"]
    assert all(len(c.seconds) == 3 and c.iters == 1 for c in cases)


def test_paired_ratio_and_matmul_peak_units():
    a = Case("a", lambda: None, images=10, device=CPU, seconds=[1.0, 2.0, 4.0])  # 10, 5, 2.5 img/s
    b = Case("b", lambda: None, images=10, device=CPU, seconds=[2.0, 2.0, 2.0])  # 5 img/s
    assert paired_ratio(a, b) == 1.0 and a.img_s == 5.0
    peak = matmul_case(torch.float32, CPU, size=64)
    peak.seconds = [0.001]
    assert_close(peak.img_s, 2 * 64**3 / 1e9 / 0.001)  # reads as GFLOP/s


def test_peak_memory_counts_live_tensor_bytes():
    def run():
        a = torch.empty(2**20)  # 4 MiB
        b = torch.empty(2**19)  # 2 MiB  (6 live)
        del a  # 2 live
        c = torch.empty(2**21)  # 8 MiB  (10 live: the peak)
        return b.numel() + c.numel()

    mib, method = peak_memory(run, CPU)
    assert method == "torch.profiler tensor allocations"
    assert mib == pytest.approx(10.0, abs=0.05)


def test_op_shares_split_operator_time_by_category(monkeypatch):
    x, w = torch.randn(256, 64), torch.randn(64, 64)
    only_matmul = op_shares(lambda: x @ w, CPU)
    # how much goes to matmul is the bench's check (targets.profiler_check); here: no norm ran, so none is counted
    assert only_matmul["matmul"] > 0.0 and only_matmul["norm"] == 0.0
    assert sum(only_matmul.values()) == pytest.approx(100.0)
    both = op_shares(lambda: (F.layer_norm(x, (64,)), x @ w), CPU)
    assert 0.0 < both["norm"] < 100.0 and 0.0 < both["matmul"] < 100.0
    assert sum(both.values()) == pytest.approx(100.0)
    assert [categorize(op) for op in ("aten::addmm", "aten::native_batch_norm_backward", "aten::_softmax",
                                      "aten::cat", "aten::_fused_adam_", "aten::gelu", "aten::foo")] == [
        "matmul", "norm", "softmax", "copy", "optimizer", "elementwise", "other"]  # fmt: skip
    # the arithmetic, on given self times (microseconds): per category over the total
    rows = [
        ("aten::addmm", 60.0, 2, "matmul"),
        ("aten::mm", 15.0, 1, "matmul"),
        ("aten::native_layer_norm", 20.0, 1, "norm"),
        ("aten::foo", 5.0, 1, "other"),
    ]
    monkeypatch.setattr("vitbn.bench.cases.profile_rows", lambda run, device, iters: rows)
    shares = op_shares(lambda: None, CPU)
    assert shares == {**dict.fromkeys(shares, 0.0), "matmul": 75.0, "norm": 20.0, "other": 5.0}


def test_the_bench_prints_its_measurement_checks(cli_run):
    printed, result = cli_run
    share = result["profiler_check"]
    (line,) = [x for x in printed.splitlines() if "matmul share of a profiled pure matmul (op shares check)" in x]
    assert line.split()[-5:-2] == [f"{share:.3f}", ">", "95%"] or line.split()[-4:-1] == [f"{share:.3f}", ">", "95%"]
    assert line.endswith("met") and 0.0 < share <= 100.0  # met or NOT met: this machine's verdict


def test_plan_and_depths():
    assert model_depths(BenchOptions()) == [("vit", 6), ("vitbnffn", 1), ("vitbnffn", 6), ("vitbn", 1), ("vitbn", 6)]
    specs = plan(BenchOptions(models=("vit", "vitbn"), depths=("study",), precisions=("bf16",), compile=True))
    assert [s.name for s in specs] == [
        "vit@6 bf16 train",
        "vit@6 bf16 train compiled",
        "vit@6 bf16 infer",
        "vit@6 bf16 infer compiled",
        "vitbn@1 bf16 train",
        "vitbn@1 bf16 train compiled",
        "vitbn@1 bf16 infer",
        "vitbn@1 bf16 infer compiled",
        "vitbn@1 bf16 infer_folded",
        "vitbn@1 bf16 infer_folded compiled",
    ]
    quick = BenchOptions.quick()
    assert (quick.depths, quick.compile, quick.repeats) == (("study",), False, 3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"models": ("resnet",)},
            r"models=\['resnet'\] must be a non-empty subset of vit, vit-cifar, vitbn, vitbn-cifar, vitbnffn, "
            r"vitbnffn-cifar",
        ),
        ({"precisions": ("fp8",)}, r"precisions=\['fp8'\] must be a non-empty subset of fp32, bf16, fp16"),
        ({"depths": ("deep",)}, r"depth 'deep' is not 'study', 'equal' or a positive integer"),
        ({"repeats": 0}, r"repeats=0 must be a positive integer"),
        ({"overrides": {"depth": 3}}, r"overrides may not set 'depth' or 'name': choose them with depths and models"),
    ],
)
def test_bad_options_name_the_value(changes, message):
    with pytest.raises(UserError, match=message):
        BenchOptions(**changes)


def test_cli_errors_are_one_line(capsys):
    assert main(["bench", "--models", "resnet", "--no-compile"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vitbn bench: error: models=['resnet'] must be a non-empty subset of vit, vit-cifar, vitbn, vitbn-cifar, "
        "vitbnffn, vitbnffn-cifar"
    )
    with pytest.raises(SystemExit):
        main(["bench", "--set", "dim"])
    assert "--set 'dim' must look like KEY=VALUE" in capsys.readouterr().err


def test_json_has_no_nan_and_bad_files_are_one_line_errors(tmp_path):
    path = save_json({"rows": [], "peaks": {"fp32": {"median": float("nan")}}}, tmp_path / "sub" / "b.json")
    assert load_json(path) == {"rows": [], "peaks": {"fp32": {"median": None}}}
    with pytest.raises(UserError, match=r"benchmark file .*missing.json does not exist"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match=r"benchmark file .*bad.json is not valid JSON"):
        load_json(tmp_path / "bad.json")


def test_recipe_section_pairs_parallel_with_sequential_and_hmlp_with_linear(cli_run):
    text, result = cli_run
    section = result["recipes"]
    blocks = [r for r in section["rows"] if r["what"] == "blocks"]
    assert {(r["model"], r["variant"], r["batch"]) for r in blocks} == {
        (m, v, b) for m in ("vit", "vitbn") for v in ("sequential 6x1", "parallel 3x2") for b in (1, 256)
    }
    for r in blocks:  # equal parameters and FLOPs; latency is the time of one call
        seq = next(
            s for s in blocks if (s["model"], s["batch"], s["variant"]) == (r["model"], r["batch"], "sequential 6x1")
        )
        assert (r["params"], r["flops_img"]) == (seq["params"], seq["flops_img"])
        assert r["ms"] == pytest.approx(1000.0 * r["batch"] / r["img_s"])
    stems = section["stems"]
    assert set(stems) == {"vit linear", "vit hmlp", "vitbn linear", "vitbn hmlp"}
    assert all(s["analytic"] == s["counted"] for s in stems.values())
    assert stems["vit linear"]["analytic"] == 2 * 49 * 16 * 16  # 49 patches of 4x4 pixels -> 16 dims
    ratios = {r["what"] for r in section["ratios"]}
    assert "vit parallel 3x2 / sequential 6x1 fp32 infer b1" in ratios
    assert "vitbn hmlp / linear fp32 train b8" in ratios
    assert "recipes (eager, interleaved" in text and "vit    parallel 3x2     fp32 infer     1" in text
    assert "vit parallel 3x2 / sequential 6x1 fp32 infer b1" in text
    assert text.split("stem FLOPs per image")[1].count(" == ") == 4


def test_norms_section_times_every_norm_in_every_mode_against_layernorm(cli_run):
    text, result = cli_run
    section = result["norms"]
    variants = ("ln", "rms", "dyt", "bnffn", "bn", "prepbn")
    assert list(section["models"]) == list(variants)
    cells = {(r["variant"], r["mode"], r["batch"]) for r in section["rows"] if r["precision"] == "fp32"}
    assert cells == {(v, "train", 8) for v in variants} | {
        (v, m, b) for v in variants for m in ("infer", "infer_folded") for b in (1, 8, 16)
    }  # --quick: no compiled cases; batch 1, the training batch and the inference batch
    assert all(r["img_s"] > 0 and r["error"] is None for r in section["rows"])
    models = section["models"]  # the matrix products are the same for every norm, folded or not
    assert len({m["flops_img"] for m in models.values()} | {m["folded_flops_img"] for m in models.values()}) == 1
    assert models["ln"]["flops_img"] == analytic_forward_flops(6, **TINY)
    assert models["bn"]["unfolded"] == "none" and models["prepbn"]["unfolded"] == "none"
    assert models["dyt"]["unfolded"] == "fuse_bn left 15 norm(s) unfolded: 15 DyT (tanh is nonlinear)"
    assert models["bnffn"]["unfolded"].startswith("fuse_bn left 9 norm(s) unfolded: 9 LayerNorm")
    assert (models["prepbn"]["name"], models["bnffn"]["name"]) == ("vit+norm=prepbn", "vitbnffn")
    ratios = {r["what"]: r["ratio"] for r in section["ratios"]}
    assert {f"{v} / ln infer_folded fp32 b1" for v in variants[1:]} <= set(ratios)
    assert "prepbn folded / unfolded fp32 b16" in ratios and all(r > 0 for r in ratios.values())
    assert "norms (depth 6;" in text and "PRepBN everywhere" in text and "prepbn / ln train fp32 b8" in text


def test_quick_bench_leaves_out_bf16_where_the_cpu_has_no_bf16_instructions(monkeypatch):
    from vitbn.bench import system

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx2", "fma"})
    assert BenchOptions.quick().precisions == ("fp32",)
    assert BenchOptions.quick(precisions=("fp32", "bf16")).precisions == ("fp32", "bf16")  # asked for: kept
    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert BenchOptions.quick().precisions == ("fp32", "bf16") and BenchOptions().precisions == ("fp32", "bf16")


def test_norm_ratios_pair_folded_compiled_with_compiled():
    from vitbn.bench.norms import _ratios

    def case(seconds):
        return Case("c", lambda: None, images=10, device=CPU, seconds=seconds)

    cases = {("ln", "infer_compiled", "fp32", 100): case([1.0, 1.0]),
             ("ln", "infer_folded_compiled", "fp32", 100): case([1.0, 1.0]),
             ("bn", "infer_compiled", "fp32", 100): case([2.0, 4.0]),
             ("bn", "infer_folded_compiled", "fp32", 100): case([1.0, 1.0])}  # fmt: skip
    ratios = {r["what"]: r["ratio"] for r in _ratios(cases)}
    assert ratios["bn / ln infer_folded_compiled fp32 b100"] == 1.0
    assert ratios["bn folded / unfolded compiled fp32 b100"] == 3.0  # per-round ratios 2 and 4: their median
    assert ratios["bn / ln infer_compiled fp32 b100"] == 0.375


def test_norms_section_measures_the_chosen_variants_and_modes():
    from vitbn.bench.norms import NormOptions, run_norms
    from vitbn.errors import UserError

    options = NormOptions(variants=("ln", "bn"), precisions=("fp32",), batches=(2,), train=False, compile=False,
                          overrides=tuple(TINY.items()))  # fmt: skip
    section = run_norms(options, CPU, repeats=1, warmup=1, min_repeat_s=0.0)
    assert {(r["variant"], r["mode"]) for r in section["rows"]} == {
        (v, m) for v in ("ln", "bn") for m in ("infer", "infer_folded")
    }
    with pytest.raises(UserError, match=r"norm variants \['ln', 'bogus'\] must be a non-empty subset of ln, rms"):
        NormOptions(variants=("ln", "bogus"))
