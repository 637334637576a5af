"""The benchmark pages (``vitbn bench --markdown`` / ``--render``, ``benchmarks/vs_vit_pytorch.py`` the same): the
provenance line, then the very text the terminal prints; a page rendered again from its JSON is the same page with
one line more; a JSON that lacks what the page shows is a one-line error naming the file. Hand-made results (and one
tiny real bench), nothing timed that matters."""

from __future__ import annotations

import copy
import json
import shlex

import pytest
import torch

from vitbn.bench import format_report, save_json
from vitbn.bench.report import as_saved, bench_page, render_page
from vitbn.bench.timing import Case
from vitbn.cli import main
from vitbn.errors import UserError
from vitbn.provenance import Provenance

PROVENANCE = Provenance(
    command="vitbn bench --quick --markdown docs/bench/quick.md",
    date="2026-12-07T11:30:05",
    commit="abc1234def5678",
    dirty=False,
    machine="AMD EPYC 7B13 (2 logical cores visible)",
    torch="2.13.0+cpu",
)
LINE = (
    "Made by `vitbn bench --quick --markdown docs/bench/quick.md` on 2026-12-07 11:30 UTC at commit abc1234 on "
    "AMD EPYC 7B13 (2 logical cores visible), torch 2.13.0+cpu."
)
META = {"date": "2026-12-07 11:28:41 +0000", "device_name": "AMD EPYC 7B13 (2 logical cores visible)",
        "torch": "2.13.0+cpu", "threads": 2, "load_avg": [1.5, 1.2, 0.9], "load_avg_end": [1.6, 1.3, 1.0],
        "allocator_tuned": False, "compile": "disabled", "seconds": 95.2, "device": "cpu"}  # fmt: skip


def _row(model: str, mode: str, img_s: float | None, status: str = "ok") -> dict:
    return {"model": model, "depth": 1, "precision": "fp32", "mode": mode, "compiled": False, "batch": 100,
            "img_s": img_s, "spread_pct": 3.0, "flops_img": 2.5e6, "gflops": 4.2, "peak_gflops": 61.0,
            "util_pct": 6.9, "epoch_s": 48.6, "loader_pct": 0.05, "mem_mb": 12.3, "norm_pct": float("nan"),
            "matmul_pct": 41.0, "status": status}  # fmt: skip


def bench_result() -> dict:
    """A result as ``run_bench`` returns it (a NaN among the figures) with the provenance the CLI adds."""
    return {
        "meta": META,
        "peaks": {"fp32": {"size": 2048, "median": 61.04, "samples": [61.0, 61.04]}},
        "loader": None,
        "rows": [_row("vit", "train", 1234.56), _row("vitbn", "train", 1690.0), _row("vitbn", "infer", None, "n/a")],
        "comparisons": [
            {
                "what": "vitbn / vit train fp32",
                "ratio": 1.3689,
                "a": "vitbn@1",
                "b": "vit@6",
                "target": 1.2,
                "met": True,
                "bound": None,
            }
        ],  # fmt: skip
        "recipes": None,
        "norms": None,
        "export": None,
        "provenance": PROVENANCE.to_dict(),
    }


def _block(page: str) -> str:
    """The text of the page's ```text block."""
    return page.split("```text\n", 1)[1].rsplit("\n```", 1)[0]


def test_bench_page_is_the_provenance_line_and_the_printed_text():
    result = as_saved(bench_result())
    page = bench_page(result)
    assert page.startswith(f"# vitbn bench\n\n{LINE}\n\n```text\n")
    assert _block(page) == format_report(result)  # the terminal's text, by the same function
    row = next(line for line in _block(page).splitlines() if line.lstrip().startswith("vit "))
    assert "1234.6" in row.split() and row.split()[-2:] == ["-", "41"]  # img/s as printed; NaN norm% as "-"
    assert "vitbn / vit train fp32        1.369x  (vitbn@1  vs  vit@6)  target >= 1.2: met" in page
    assert "  n/a\n" in page and "peak (dense matmul, median): fp32 61.0 GFLOP/s (n=2048)" in page


def test_render_gives_the_same_page_with_one_line_more(tmp_path, capsys):
    result = as_saved(bench_result())
    json_path = save_json(result, tmp_path / "quick.json")
    assert main(["bench", "--render", str(json_path), "--markdown", str(tmp_path / "again.md")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'again.md'}\n"
    again = (tmp_path / "again.md").read_text()
    extra = [line for line in again.splitlines() if line.startswith("Rendered again")]
    assert len(extra) == 1 and extra[0].startswith("Rendered again from quick.json by `")
    assert again.replace(f"{extra[0]}\n\n", "") == bench_page(result)
    assert LINE in again  # the measurement's provenance, not the re-render's


def test_tiny_bench_writes_page_and_json_and_render_repeats_it(tmp_path, capsys):
    """The smallest real bench (one tiny inference case, ~2 s): the page holds what the terminal printed, the JSON
    next to it holds the provenance, and ``--render`` of that JSON gives the page back."""
    argv = ["bench", "--quick", "--models", "vit", "--depths", "1", "--precisions", "fp32", "--modes", "infer"]
    argv += ["--no-recipes", "--no-norms", "--no-export", "--no-loader", "--no-norm-profile", "--repeats", "1"]
    argv += ["--warmup", "1", "--min-repeat-s", "0", "--peak-size", "64", "--infer-batch-size", "8"]
    argv += [arg for kv in ("dim=16", "heads=2", "dim_head=8", "mlp_dim=32") for arg in ("--set", kv)]
    argv += ["--markdown", str(tmp_path / "tiny.md")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    page, saved = (tmp_path / "tiny.md").read_text(), json.loads((tmp_path / "tiny.json").read_text())
    assert printed == f"{_block(page)}\n\nwrote {tmp_path / 'tiny.json'}\nwrote {tmp_path / 'tiny.md'}\n"
    assert saved["provenance"]["command"] == f"vitbn {shlex.join(argv)}"
    assert Provenance.from_dict(saved["provenance"]).line() in page
    assert f"{saved['rows'][0]['img_s']:.1f}" in _block(page)
    render_page(tmp_path / "tiny.json", tmp_path / "again.md", command="vitbn bench --render tiny.json")
    again = (tmp_path / "again.md").read_text()
    prefix = "Rendered again from tiny.json by `vitbn bench --render tiny.json` at commit "
    extra = next(line for line in again.splitlines() if line.startswith(prefix))
    assert again.replace(f"{extra}\n\n", "") == page


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("rows"), "has no 'rows': not written by vitbn bench --out or --markdown"),
        (lambda r: r.pop("provenance"), "has no 'provenance': not written by vitbn bench --out or --markdown"),
        (lambda r: r["provenance"].pop("date"), ": provenance record is missing 'date' (expected command, date,"),
        (lambda r: r["meta"].pop("torch"), " lacks what the page shows (KeyError: 'torch')"),
    ],
)
def test_json_without_what_the_page_shows_is_a_one_line_error(tmp_path, capsys, change, message):
    result = copy.deepcopy(as_saved(bench_result()))
    change(result)
    path = save_json(result, tmp_path / "old.json")
    assert main(["bench", "--render", str(path), "--markdown", str(tmp_path / "page.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitbn bench: error: benchmark file {path}") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "page.md").exists()


def test_render_options_are_checked_before_anything_runs(tmp_path, capsys):
    assert main(["bench", "--render", "a.json"]) == 2
    assert "--render a.json needs --markdown OUT" in capsys.readouterr().err
    assert main(["bench", "--render", "a.json", "--markdown", "a.md", "--out", "b.json"]) == 2
    assert "--render measures nothing" in capsys.readouterr().err
    assert main(["bench", "--markdown", "page.json"]) == 2
    assert "--markdown page.json names the page (.md)" in capsys.readouterr().err


# benchmarks/vs_vit_pytorch.py (imported by path: the vs_script fixture of conftest.py)


def vs_saved(vs_script) -> dict:
    """A run of the vs_script as its JSON holds it, from fake cases with known timings."""
    cpu = torch.device("cpu")
    cases = [
        ({"precision": "fp32", "mode": "train", "impl": impl}, Case(impl, lambda: None, 100, cpu, seconds=seconds))
        for impl, seconds in (("vit-pytorch", [1.0, 1.0]), ("vitbn", [0.8, 0.8]))
    ]
    meta = {**META, "depth": 6, "batch_size": 100, "infer_batch_size": 1000, "repeats": 2}
    vs = Provenance(**{**PROVENANCE.to_dict(), "command": "python benchmarks/vs_vit_pytorch.py --markdown vs.md"})
    return as_saved({"meta": meta, "rows": vs_script.rows_of(cases), "profile": [], "provenance": vs.to_dict()})


def test_vs_reference_page_and_render(vs_script, tmp_path, capsys):
    saved = vs_saved(vs_script)
    page = vs_script.page(saved)
    assert page.startswith("# vitbn vs vit-pytorch\n\nMade by `python benchmarks/vs_vit_pytorch.py --markdown vs.md` ")
    assert _block(page) == vs_script.format_text(saved)
    assert "ViT depth 6, dim 64, heads 8x64, mlp 128, 17 tokens; train batch 100, infer batch 1000" in page
    line = next(line for line in _block(page).splitlines() if line.startswith("fp32  train  vitbn "))
    assert "125.0" in line.split() and "1.25x vit-pytorch" in line and "target >= 1.2x vit-pytorch: met" in line
    path = save_json(saved, tmp_path / "vs.json")
    assert vs_script.main(["--render", str(path), "--markdown", str(tmp_path / "again.md")]) == 0
    again = (tmp_path / "again.md").read_text()
    extra = next(line for line in again.splitlines() if line.startswith("Rendered again from vs.json by `"))
    assert extra.startswith("Rendered again from vs.json by `python ") and "vs_vit_pytorch.py --render " in extra
    assert again.replace(f"{extra}\n\n", "") == page
    capsys.readouterr()
    saved.pop("rows")
    save_json(saved, path)
    assert vs_script.main(["--render", str(path), "--markdown", str(tmp_path / "bad.md")]) == 2
    assert capsys.readouterr().err == (
        f"vs_vit_pytorch.py: error: benchmark file {path} has no 'rows': not written by benchmarks/vs_vit_pytorch.py "
        "--out or --markdown\n"
    )
    with pytest.raises(UserError, match=r"benchmark file .*vs.json has no 'rows'"):
        vs_script.render(str(path), str(tmp_path / "bad.md"))


def test_vs_reference_needs_vit_pytorch_only_to_time(vs_script, capsys):
    with pytest.raises(SystemExit):
        vs_script.parse_args([])
    assert "--vit-pytorch DIR is required to time" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vs_script.parse_args(["--render", "vs.json"])
    assert "--render FILE.json takes --markdown OUT" in capsys.readouterr().err
