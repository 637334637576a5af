"""The bench's export section: inference throughput of the ONNX file ``vitbn export`` writes (BatchNorms folded),
run by onnxruntime, against the eager torch model (unfolded) and the folded torch model (``fuse_bn``).

Everything runs on the CPU in fp32 with the same thread count (onnxruntime's intra-op threads set to
``torch.get_num_threads()``, one inter-op thread), on the same fixed batch, and all cases are timed in the same
interleaved rounds, so each ratio over eager torch is paired (``paired_ratio``). Each export is checked against
the eager model before it is timed (``max_abs``), so the speed is that of a file that computes the same logits.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vitbn.bench import cases as C
from vitbn.bench.timing import Case, interleave, paired_ratio, summarize, warm_up
from vitbn.models import count_params, create_model

ENGINES = ("eager", "folded", "onnx")  # eager torch (unfolded), folded torch, onnxruntime on the folded export
ENGINE_NAMES = {"eager": "eager torch", "folded": "folded torch", "onnx": "onnxruntime"}
TINY = dict(dim=16, heads=2, dim_head=8, mlp_dim=32)  # the quick bench's models: the export is what is measured
CPU = torch.device("cpu")


@dataclass(frozen=True)
class ExportOptions:
    """What the export section measures: (model, depth) pairs at each inference batch."""

    models: tuple[tuple[str, int], ...] = (("vit", 6), ("vitbnffn", 1), ("vitbn", 1))
    batches: tuple[int, ...] = (1, 1000)
    overrides: tuple[tuple[str, object], ...] = ()  # ModelConfig fields for every model


def unavailable() -> str | None:
    """Why the section cannot run here (a package of the export extra is missing), else None."""
    from vitbn.export import EXTRA_HINT, missing_extra

    missing = missing_extra()
    return f"{', '.join(missing)} not installed; the section {EXTRA_HINT}" if missing else None


def onnx_case(name: str, session, model, batch: int) -> Case:
    """One onnxruntime run of ``session`` on the fixed batch the torch cases use (``cases.batch_for``)."""
    from vitbn.export import INPUT_NAME, OUTPUT_NAME

    feed = {INPUT_NAME: C.batch_for(model, batch, CPU)[0].numpy()}
    return Case(name, lambda: session.run([OUTPUT_NAME], feed), images=batch, device=CPU)


def _exported(model, threads: int, folder: Path) -> tuple[object, dict]:
    """An onnxruntime session of the model's folded export, with the export's time and its max abs logit
    difference against the eager model (``vitbn.export.parity`` at batch 8 and 1)."""
    from vitbn import export as E

    started = time.perf_counter()
    path = E.export_onnx(model, folder / f"{model.config.name}.onnx", fuse=True)
    seconds = time.perf_counter() - started
    session = E.onnx_session(path, threads)
    check = E.parity(lambda x: E.onnx_logits(session, x), model, E.example_input(model, 8))
    return session, {"export_s": seconds, "max_abs": check["max_abs_eager"]}


def _cases(options: ExportOptions, threads: int, folder: Path, log: Callable[[str], None]) -> tuple[dict, dict]:
    """The cases per (model label, engine, batch), and per model label what was measured about its export."""
    cases: dict[tuple[str, str, int], Case] = {}
    models: dict[str, dict] = {}
    for name, depth in options.models:
        label = f"{name}@{depth}"
        model = create_model(name, depth=depth, **dict(options.overrides)).eval()
        log(f"export: exporting {label} to ONNX ...")
        session, info = _exported(model, threads, folder)
        has_bn = model.config.uses_batchnorm
        models[label] = {"name": model.config.name, "params": count_params(model), "folded": has_bn, **info}
        folded = C.fold(model) if has_bn else None  # without a BatchNorm, folding changes nothing: not timed
        for batch in options.batches:
            cases[(label, "eager", batch)] = C.infer_case(f"{label} eager b{batch}", model, precision="fp32",
                                                          batch=batch, device=CPU, compile=False)  # fmt: skip
            if folded is not None:
                cases[(label, "folded", batch)] = C.infer_case(f"{label} folded b{batch}", folded, precision="fp32",
                                                               batch=batch, device=CPU, compile=False)  # fmt: skip
            cases[(label, "onnx", batch)] = onnx_case(f"{label} onnx b{batch}", session, model, batch)
    return cases, models


def run_export(
    options: ExportOptions, repeats: int, warmup: int, min_repeat_s: float,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict:  # fmt: skip
    """Measures the export cases; returns ``{"threads", "rows", "ratios", "models"}``, or ``{"skipped": why}``
    when onnx, onnxruntime or onnxscript is missing."""
    reason = unavailable()
    if reason:
        return {"skipped": reason}
    import onnxruntime

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="vitbn-bench-export-") as folder:
        cases, models = _cases(options, threads, Path(folder), log)
    log(f"export: warming up {len(cases)} cases")
    for case in cases.values():
        warm_up(case, warmup, min_repeat_s)
    log(f"export: timing {len(cases)} cases in {repeats} interleaved rounds ...")
    interleave(list(cases.values()), repeats)
    rows = []
    for (label, engine, batch), case in cases.items():
        stats = summarize(case.samples)
        rows.append({"model": label, "engine": engine, "batch": batch, "img_s": stats["median"],
                     "spread_pct": stats["spread_pct"], "samples": case.samples})  # fmt: skip
    ratios = []
    for (label, engine, batch), case in cases.items():
        if engine != "eager":
            eager = cases[(label, "eager", batch)]
            ratios.append({"model": label, "engine": engine, "batch": batch, "ratio": paired_ratio(case, eager)})
    return {"threads": threads, "onnxruntime": onnxruntime.__version__, "rows": rows, "ratios": ratios,
            "models": models}  # fmt: skip


def format_export(section: dict) -> str:
    """The export section as text: per model the export's time and check, then one row per model and batch with
    img/s of each engine and the paired ratios over eager torch; one line when the section was skipped."""
    if section.get("skipped"):
        return f"export: skipped ({section['skipped']})"
    lines = [f"export (CPU, fp32, {section['threads']} thread(s) for torch and onnxruntime {section['onnxruntime']} "
             "(intra-op; 1 inter-op); img/s, median of interleaved rounds ± (max - min) / median %; onnx = the file "
             "`vitbn export` writes, BatchNorms folded; ratios paired, over eager torch):"]  # fmt: skip
    for label, m in section["models"].items():
        lines.append(f"  {label:<12} {m['name']:<10} {m['params']:>9,} params  exported in {m['export_s']:.1f} s  "
                     f"max |onnx - eager| {m['max_abs']:.1e}")  # fmt: skip
    rows = {(r["model"], r["engine"], r["batch"]): r for r in section["rows"]}
    ratios = {(r["model"], r["engine"], r["batch"]): r["ratio"] for r in section["ratios"]}
    head = "".join(f"{ENGINE_NAMES[e]:>16}" for e in ENGINES) + f"{'folded/eager':>14}{'onnx/eager':>12}"
    lines += ["", f"  {'model':<12}{'batch':>6}{head}"]
    for label, batch in dict.fromkeys((r["model"], r["batch"]) for r in section["rows"]):
        cells = [f"{_speed(rows.get((label, engine, batch))):>16}" for engine in ENGINES]
        cells += [
            f"{_ratio(ratios.get((label, engine, batch))):>{width}}" for engine, width in (("folded", 14), ("onnx", 12))
        ]
        lines.append(f"  {label:<12}{batch:>6}{''.join(cells)}")
    lines.append("  (folded torch: '-' for a model without BatchNorm, which folding leaves as it is)")
    return "\n".join(lines)


def _speed(row: dict | None) -> str:
    return "-" if row is None else f"{row['img_s']:,.1f} ±{row['spread_pct']:.0f}"


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"
