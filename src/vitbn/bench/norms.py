"""The bench's norms section: the norms of ``vitbn experiment norms`` (LayerNorm, RMSNorm, DyT, BN in the
feed-forward block, BN everywhere, PRepBN) on the study's depth-6 ViT, timed side by side.

Per norm and precision: a training step at the training batch (PRepBN at lambda = 0.5, mid-ramp, where it
computes both LayerNorm and RepBN), and inference at batch 1, the training batch and the inference batch, eager,
compiled, folded (``fuse_bn``; PRepBN at lambda = 0, what training leaves) and folded then compiled. All cases are
timed in the same interleaved rounds, so every ratio to LayerNorm is paired (``paired_ratio``). The FLOPs are
those of the matrix products, the same for every norm; the norms' own element-wise work is what the times add.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vitbn.bench import cases as C
from vitbn.bench.timing import Case, interleave, paired_ratio, summarize, warm_up
from vitbn.experiments.presets import NORM_VARIANTS
from vitbn.models import count_params, create_model, forward_flops
from vitbn.models.norms import set_prepbn_lambda

REFERENCE = "ln"
TRAIN_LAMBDA = 0.5  # PRepBN's training cost mid-ramp: LayerNorm and RepBN both computed
MODES = ("train", "infer", "infer_compiled", "infer_folded", "infer_folded_compiled")


@dataclass(frozen=True)
class NormOptions:
    """What the norms section measures."""

    variants: tuple[str, ...] = tuple(NORM_VARIANTS)
    depth: int = 6
    precisions: tuple[str, ...] = ("fp32", "bf16")
    batches: tuple[int, ...] = (1, 100, 1000)  # inference
    train_batch: int = 100
    train: bool = True  # the training steps too (the bench's --modes without train leaves them out)
    compile: bool = True  # the compiled inference cases (and a compiled training step)
    overrides: tuple[tuple[str, object], ...] = ()  # ModelConfig fields for every model

    def __post_init__(self) -> None:
        from vitbn.errors import UserError

        bad = [v for v in self.variants if v not in NORM_VARIANTS]
        if bad or not self.variants:
            raise UserError(f"norm variants {list(self.variants)} must be a non-empty subset of "
                            f"{', '.join(NORM_VARIANTS)}")  # fmt: skip


def norm_model(variant: str, depth: int, overrides: dict, lam: float | None = None):
    """The model of a norm variant (``NORM_VARIANTS``) at ``depth``, PRepBN's lambda set to ``lam``."""
    name, own = NORM_VARIANTS[variant]
    model = create_model(name, depth=depth, **{**overrides, **own})
    if lam is not None:
        set_prepbn_lambda(model, lam)
    return model


def _build(variant: str, mode: str, model, precision: str, batch: int, device, compile_error: str | None) -> Case:
    name = f"{variant} {mode} {precision} b{batch}"
    compiled = mode.endswith("compiled")
    if compiled and compile_error:
        return Case(name, lambda: None, images=batch, device=device, error=compile_error)
    if mode.startswith("train"):
        return C.train_case(name, model, precision=precision, batch=batch, device=device, compile=compiled)
    return C.infer_case(name, model, precision=precision, batch=batch, device=device, compile=compiled)


def _warm(case: Case, warmup: int, min_repeat_s: float) -> None:
    if case.error is None:
        try:
            warm_up(case, warmup, min_repeat_s)
        except Exception as exc:  # a compiler failure surfaces at the first call: reported, not fatal
            case.error = C.first_line(exc)


def run_norms(
    options: NormOptions, device: torch.device, repeats: int, warmup: int, min_repeat_s: float,
    compile_error: str | None = None, log: Callable[[str], None] = lambda _msg: None,
) -> dict:  # fmt: skip
    """Measures the norm cases; returns ``{"rows", "ratios", "models"}``."""
    from vitbn.bn.fuse import unfolded_norms

    over = dict(options.overrides)
    modes = [m for m in MODES if options.compile or not m.endswith("compiled")]
    train_modes = (["train", "train_compiled"] if options.compile else ["train"]) if options.train else []
    cases: dict[tuple, Case] = {}
    models: dict[str, dict] = {}
    for variant in options.variants:
        trained = norm_model(variant, options.depth, over, TRAIN_LAMBDA)
        deployed = norm_model(variant, options.depth, over, 0.0)
        folded = C.fold(copy.deepcopy(deployed))
        models[variant] = {"name": deployed.config.name, "params": count_params(deployed),
                           "flops_img": forward_flops(deployed), "folded_flops_img": forward_flops(folded),
                           "unfolded": unfolded_norms(folded) or "none"}  # fmt: skip
        for precision in options.precisions:
            for mode in train_modes:
                key = (variant, mode, precision, options.train_batch)
                cases[key] = _build(variant, mode, copy.deepcopy(trained), precision, options.train_batch, device,
                                    compile_error)  # fmt: skip
            for mode in modes[1:]:
                for batch in options.batches:
                    model = folded if mode.startswith("infer_folded") else deployed
                    cases[(variant, mode, precision, batch)] = _build(variant, mode, model, precision, batch, device,
                                                                      compile_error)  # fmt: skip
    log(f"norms: warming up {len(cases)} cases")
    for case in cases.values():
        _warm(case, warmup, min_repeat_s)
    log(f"norms: timing {len(cases)} cases in {repeats} interleaved rounds ...")
    interleave(list(cases.values()), repeats)
    rows = []
    for (variant, mode, precision, batch), case in cases.items():
        stats = summarize(case.samples) if case.samples else {"median": float("nan"), "spread_pct": float("nan")}
        rows.append({"variant": variant, "mode": mode, "precision": precision, "batch": batch,
                     "img_s": stats["median"], "spread_pct": stats["spread_pct"],
                     "ms": 1000.0 * batch / stats["median"] if case.samples else float("nan"),
                     "error": case.error})  # fmt: skip
    return {"rows": rows, "ratios": _ratios(cases), "models": models}


def _ratios(cases: dict[tuple, Case]) -> list[dict]:
    """Paired speed ratios: each norm over LayerNorm in the same mode, precision and batch, and the folded
    inference of each norm over its eager inference."""
    out = []
    for (variant, mode, precision, batch), case in cases.items():
        if case.error:
            continue
        base = cases.get((REFERENCE, mode, precision, batch))
        if variant != REFERENCE and base is not None and base.error is None:
            out.append({"what": f"{variant} / {REFERENCE} {mode} {precision} b{batch}", "variant": variant,
                        "ratio": paired_ratio(case, base)})  # fmt: skip
        unfolded = cases.get((variant, mode.replace("_folded", ""), precision, batch))
        if mode.startswith("infer_folded") and unfolded is not None and unfolded.error is None:
            how = "compiled " if mode.endswith("compiled") else ""
            out.append({"what": f"{variant} folded / unfolded {how}{precision} b{batch}", "variant": variant,
                        "ratio": paired_ratio(case, unfolded)})  # fmt: skip
    return out


def format_norms(section: dict) -> str:
    """The norms section as text: the models, one row per norm with img/s per mode, the paired ratios."""
    from vitbn.experiments.norms import NORM_NAMES

    models, rows = section["models"], section["rows"]
    lines = ["norms (depth 6; img/s, median of interleaved rounds ± (max - min) / median %; PRepBN trains at "
             "lambda 0.5, infers at 0; folded = fuse_bn):"]  # fmt: skip
    for variant, m in models.items():
        lines.append(f"  {NORM_NAMES.get(variant, variant):<22} {m['name']:<16} {m['params']:>9,} params  "
                     f"{m['flops_img'] / 1e6:.2f} MFLOP/img ({m['folded_flops_img'] / 1e6:.2f} folded)  "
                     f"unfolded: {m['unfolded']}")  # fmt: skip
    columns = list(dict.fromkeys((r["mode"], r["batch"]) for r in rows))
    head = " ".join(f"{(mode.replace('infer_', '') + ' b' + str(batch)):>15}" for mode, batch in columns)
    for precision in dict.fromkeys(r["precision"] for r in rows):
        lines += ["", f"{precision:<6} {'norm':<22} {head}"]
        for variant in models:
            cells = []
            for mode, batch in columns:
                match = [r for r in rows if (r["variant"], r["mode"], r["precision"], r["batch"]) ==
                         (variant, mode, precision, batch)]  # fmt: skip
                r = match[0] if match else None
                text = "n/a" if r is None or r["error"] else f"{r['img_s']:,.0f} ±{r['spread_pct']:.0f}"
                cells.append(f"{text:>15}")
            lines.append(f"{'':<6} {NORM_NAMES.get(variant, variant):<22} {' '.join(cells)}")
    errors = sorted({r["error"] for r in rows if r["error"]})
    lines += [f"  n/a: {e}" for e in errors]
    lines += ["", "paired speed ratios (> 1: the first is faster):"]
    lines += [f"  {r['what']:<46} {r['ratio']:.3f}x" for r in section["ratios"]]
    return "\n".join(lines)
