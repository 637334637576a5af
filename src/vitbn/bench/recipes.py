"""The bench's recipe section: parallel against sequential blocks at equal parameters (latency at batch 1,
throughput at larger batches), and the hMLP stem against the linear one (FLOPs analytic and counted, speed).

All cases are eager and timed in the same interleaved rounds, so every ratio is paired (see ``paired_ratio``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitbn.bench import cases as C
from vitbn.bench.timing import Case, interleave, paired_ratio, summarize, warm_up
from vitbn.models import count_params, create_model, forward_flops

# Sequential depth 6 against its parallel layouts: 3 stages x 2 branches, 2 stages x 3 branches.
LAYOUTS = {"sequential 6x1": dict(depth=6, parallel=1), "parallel 3x2": dict(depth=3, parallel=2),
           "parallel 2x3": dict(depth=2, parallel=3)}  # fmt: skip
STEM_PATCH = 4  # hMLP needs a patch with factors: 4 = 2x2 (49 tokens on MNIST)


@dataclass(frozen=True)
class RecipeOptions:
    """What the recipe section measures."""

    models: tuple[str, ...] = ("vit", "vitbn")
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    batches: tuple[int, ...] = (1, 256, 1000)  # inference; batch 1 is the latency
    precisions: tuple[str, ...] = ("fp32", "bf16")
    stem_batch: int = 256  # inference batch of the stem comparison (training uses the bench's batch)
    train_batch: int = 100
    overrides: tuple[tuple[str, object], ...] = ()  # ModelConfig fields for every model

    @classmethod
    def quick(cls, **changes) -> RecipeOptions:
        return cls(**{"layouts": ("sequential 6x1", "parallel 3x2"), "batches": (1, 256), **changes})


def stem_flops(model) -> dict:
    """The stem's FLOPs per image: analytic (``HMLPStem.flops``, or ``2 * patches * patch_dim * D`` for the
    linear embedding) and counted by ``torch.utils.flop_counter`` on the stem alone."""
    c, stem = model.config, model.to_patch_embedding
    if hasattr(stem, "flops"):
        analytic = stem.flops()
    else:
        analytic = 2 * c.num_patches * stem.proj.in_features * stem.proj.out_features
    h, w = (c.image_size, c.image_size) if isinstance(c.image_size, int) else c.image_size
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        stem.eval()(torch.randn(1, c.channels, h, w))
    return {"analytic": analytic, "counted": counter.get_total_flops(), "model": forward_flops(model)}


def _case(name: str, model, mode: str, precision: str, batch: int, device: torch.device) -> Case:
    """A training case trains a copy: ``train_case`` puts its model in training mode and its steps update the
    weights, which would leave the inference cases of the same model running BatchNorm in training mode on
    changing weights."""
    if mode == "train":
        return C.train_case(name, copy.deepcopy(model), precision=precision, batch=batch, device=device, compile=False)
    return C.infer_case(name, model, precision=precision, batch=batch, device=device, compile=False)


def run_recipes(
    options: RecipeOptions, device: torch.device, repeats: int, warmup: int, min_repeat_s: float,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict:  # fmt: skip
    """Measures the recipe cases; returns ``{"rows", "ratios", "stems"}``."""
    cases, rows, stems = recipe_cases(options, device)
    log(f"recipes: warming up {len(cases)} cases")
    for case in cases.values():
        warm_up(case, warmup, min_repeat_s)
    log(f"recipes: timing {len(cases)} cases in {repeats} interleaved rounds ...")
    interleave(list(cases.values()), repeats)
    for row, case in zip(rows, cases.values()):
        stats = summarize(case.samples)
        row.update(img_s=stats["median"], spread_pct=stats["spread_pct"], ms=1000.0 * row["batch"] / stats["median"])
    return {"rows": rows, "ratios": _ratios(cases, options), "stems": stems}


def recipe_cases(options: RecipeOptions, device: torch.device) -> tuple[dict[tuple, Case], list[dict], dict]:
    """The recipe section's cases (keyed ``(what, model, variant, precision, mode, batch)``), their rows in the
    same order, and the stems' FLOPs; nothing timed."""
    over = dict(options.overrides)
    cases: dict[tuple, Case] = {}
    rows: list[dict] = []
    for model_name in options.models:
        for layout in options.layouts:
            model = create_model(model_name, **{**over, **LAYOUTS[layout]})
            for precision in options.precisions:
                for batch in options.batches:
                    key = ("blocks", model_name, layout, precision, "infer", batch)
                    cases[key] = _case(f"{model_name} {layout} {precision} b{batch}", model, "infer", precision, batch,
                                       device)  # fmt: skip
                    rows.append({"what": "blocks", "model": model_name, "variant": layout, "precision": precision,
                                 "mode": "infer", "batch": batch, "params": count_params(model),
                                 "flops_img": forward_flops(model)})  # fmt: skip
    stems = {}
    for model_name in options.models:
        for stem in ("linear", "hmlp"):
            model = create_model(model_name, **{**over, "patch_size": STEM_PATCH, "stem": stem})
            stems[f"{model_name} {stem}"] = {**stem_flops(model), "params": count_params(model)}
            for precision in options.precisions:
                for mode, batch in (("infer", options.stem_batch), ("train", options.train_batch)):
                    key = ("stem", model_name, stem, precision, mode, batch)
                    cases[key] = _case(f"{model_name} {stem} stem {precision} {mode} b{batch}", model, mode, precision,
                                       batch, device)  # fmt: skip
                    rows.append({"what": "stem", "model": model_name, "variant": f"{stem} (patch {STEM_PATCH})",
                                 "precision": precision, "mode": mode, "batch": batch, "params": count_params(model),
                                 "flops_img": stems[f"{model_name} {stem}"]["model"]})  # fmt: skip
    return cases, rows, stems


def _ratios(cases: dict[tuple, Case], options: RecipeOptions) -> list[dict]:
    """Paired speed ratios: each parallel layout over the sequential one, hMLP over linear stem."""
    out = []
    for (what, model, variant, precision, mode, batch), case in cases.items():
        if what == "blocks" and variant != "sequential 6x1":
            base = cases.get((what, model, "sequential 6x1", precision, mode, batch))
        elif what == "stem" and variant == "hmlp":
            base = cases[(what, model, "linear", precision, mode, batch)]
        else:
            continue
        if base is not None:
            label = f"{model} {variant} / {'sequential 6x1' if what == 'blocks' else 'linear'}"
            out.append({"what": f"{label} {precision} {mode} b{batch}", "ratio": paired_ratio(case, base)})
    return out


def format_recipes(section: dict) -> str:
    """The recipe section as text: the rows, the paired ratios, the stems' FLOPs."""
    lines = ["recipes (eager, interleaved; ms = milliseconds per call):",
             f"{'what':<6} {'model':<6} {'variant':<16} {'prec':<4} {'mode':<5} {'batch':>5} {'params':>9} "
             f"{'MFLOP/img':>9} {'img/s':>9} {'±%':>4} {'ms':>9}"]  # fmt: skip
    for r in section["rows"]:
        lines.append(
            f"{r['what']:<6} {r['model']:<6} {r['variant']:<16} {r['precision']:<4} {r['mode']:<5} {r['batch']:>5} "
            f"{r['params']:>9,} {r['flops_img'] / 1e6:>9.2f} {r['img_s']:>9.1f} {r['spread_pct']:>4.0f} {r['ms']:>9.2f}"
        )
    lines += ["", "paired speed ratios (> 1: the first is faster):"]
    lines += [f"  {r['what']:<58} {r['ratio']:.3f}x" for r in section["ratios"]]
    lines += ["", "stem FLOPs per image (analytic / counted by torch.utils.flop_counter; model = whole forward):"]
    for name, s in section["stems"].items():
        match = "==" if s["analytic"] == s["counted"] else "!="
        lines.append(f"  {name:<12} stem {s['analytic'] / 1e6:.4f} {match} {s['counted'] / 1e6:.4f} MFLOP, "
                     f"model {s['model'] / 1e6:.2f} MFLOP, {s['params']:,} params")  # fmt: skip
    return "\n".join(lines)
