"""vitbn's ViT against vit-pytorch's ``ViT`` of the same configuration, timed side by side in one run.

vit-pytorch is the de-facto reference and NOT a dependency of vitbn (it pulls in torchvision). Make a throwaway
copy outside the project's environment and point the script at it:

    pip install --no-deps --target /tmp/vp vit-pytorch einops
    .venv/bin/python benchmarks/vs_vit_pytorch.py --vit-pytorch /tmp/vp --out vs_vit_pytorch.json

``--markdown PAGE.md`` also writes a page: the provenance line (command, date, commit, machine, torch) and the text
printed, with the JSON next to it (``PAGE.json``, or ``--out``); ``--render PAGE.json --markdown PAGE.md`` writes
the page again from that JSON without timing anything (and needs no vit-pytorch).

The script loads ``/tmp/vp/vit_pytorch/vit.py`` by file path (the package's ``__init__`` imports modules that
need torchvision) with ``/tmp/vp`` on ``sys.path`` for einops. Both models get the same weights (vit-pytorch's,
converted) and must give the same logits before anything is timed.

Timed on the CPU, per precision (fp32, bf16 autocast), on the same fixed batch, interleaved in rounds (every round times
every implementation once, so load on a shared machine hits all alike), after warm-up:

- ``vit-pytorch``: the reference trained the plain way: ``Adam(model.parameters())`` with PyTorch's default
  implementation choice, ``zero_grad()``, ``F.cross_entropy``, ``backward()``, ``step()``;
- ``vitbn, plain step``: vitbn's model in that same plain step (what the model code alone buys);
- ``vitbn``: vitbn's model in vitbn's step (``vitbn.engine.step.train_step`` with the engine's optimizer);
- with ``--compile`` (the default): the reference (plain step) and vitbn (its own step) under ``torch.compile``
  (each compiles in its first warm-up call: minutes on 2 cores with a cold compiler cache);
- inference (``--infer-batch-size`` images, eval mode, ``inference_mode``): the reference and vitbn.

The table gives the median images per second, the spread of the repeats and the ratio to the like reference:
the same precision, mode, batch and threads, eager against eager and compiled against compiled (the median over
rounds of the per-round ratio); each row names its pairing, and a target is judged only on a like pairing.
Targets (issue 7): vitbn training >= 1.2x the like reference in fp32 and in bf16;
vitbn bf16 training >= 2x vitbn fp32. With ``--profile`` it also prints the share of operator time per category
(matrix products, norms, softmax, copies, optimizer, elementwise, other) of each eager training step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.testing import assert_close

from vitbn.bench.cases import OP_CATEGORIES, batch_for, first_line, op_shares
from vitbn.bench.reference import AUTOCAST_DTYPES, REF, STUDY, autocast_dtype, load_reference, plain_step
from vitbn.bench.report import as_saved, markdown_page, provenance_line, publish, render_saved
from vitbn.bench.system import environment, tune_cpu_allocator
from vitbn.bench.timing import Case, interleave, paired_ratio, summarize, warm_up
from vitbn.config import TrainConfig
from vitbn.engine.device import make_amp
from vitbn.engine.optim import build_optimizer
from vitbn.engine.step import make_loss, train_step
from vitbn.errors import UserError
from vitbn.models.convert import vit_from_vit_pytorch

TITLE = "vitbn vs vit-pytorch"
PAGE_KEYS = ("meta", "rows", "profile", "provenance")  # what a page needs of the JSON
TARGETS = {("train", "vitbn"): 1.2, ("train", "vitbn+compile"): 1.2}


def vitbn_step(model, precision: str, x, y, compile: bool):
    """vitbn's training step: the engine's ``train_step`` with the engine's optimizer."""
    net = torch.compile(model) if compile else model
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    amp, loss_fn = make_amp(precision, x.device), make_loss()
    return lambda: train_step(net, x, y, optimizer, loss_fn, amp=amp)


def infer(model, precision: str, x, compile: bool):
    """One eval forward pass under ``inference_mode`` and the autocast of ``precision`` (the same for both)."""
    net = torch.compile(model) if compile else model
    dtype = autocast_dtype(precision)

    def run():
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            return net(x)

    return run


def build_models(ref_cls, depth: int, device):
    """A reference model and a vitbn ViT with the same weights; checks that their logits agree."""
    kwargs = {**STUDY, "depth": depth}
    ref = ref_cls(**kwargs).to(device)
    ours = vit_from_vit_pytorch(ref.state_dict(), **kwargs).to(device)
    x, _ = batch_for(ours, 8, device)
    with torch.no_grad():
        assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
    return ref.train(), ours.train()


def make_cases(args, ref_cls, device) -> list[tuple[dict, Case]]:
    """Every implementation x precision x mode to time, each with fresh models of the same weights."""
    out = []
    for precision in args.precisions:
        variants = [(REF, "plain", False), ("vitbn, plain step", "plain", False), ("vitbn", "vitbn", False)]
        if args.compile:
            variants += [(REF + "+compile", "plain", True), ("vitbn+compile", "vitbn", True)]
        for impl, step, compile in variants if "train" in args.modes else []:
            ref, ours = build_models(ref_cls, args.depth, device)
            model = ref if impl.startswith(REF) else ours
            x, y = batch_for(ours, args.batch_size, device)
            run = (plain_step if step == "plain" else vitbn_step)(model, precision, x, y, compile)
            out.append(({"precision": precision, "mode": "train", "impl": impl}, Case(impl, run, len(x), device)))
        infer_variants = [(REF, False), ("vitbn", False)] + (
            [(REF + "+compile", True), ("vitbn+compile", True)] if args.compile else []
        )
        for impl, compile in infer_variants if "infer" in args.modes else []:
            ref, ours = build_models(ref_cls, args.depth, device)
            x, _ = batch_for(ours, args.infer_batch_size, device)
            run = infer(ref.eval() if impl.startswith(REF) else ours.eval(), precision, x, compile)
            out.append(({"precision": precision, "mode": "infer", "impl": impl}, Case(impl, run, len(x), device)))
    return out


def warm_all(cases: list[tuple[dict, Case]], args) -> None:
    for key, case in cases:
        print(f"warming up {key['precision']} {key['mode']} {key['impl']}", file=sys.stderr, flush=True)
        try:
            warm_up(case, args.warmup, args.min_repeat_s)
        except Exception as exc:  # a compiler failure: report it, time the rest
            if "compile" not in key["impl"]:
                raise
            case.error = first_line(exc)


def like_reference(impl: str) -> str:
    """The reference a row is compared with: the compiled one for a compiled implementation, else the eager one
    (eager against eager, compiled against compiled; never across)."""
    return REF + "+compile" if impl.endswith("+compile") else REF


def rows_of(cases: list[tuple[dict, Case]]) -> list[dict]:
    """One row per case with its median, spread and paired ratio to its like reference (``like_reference``, same
    precision and mode) and, for bf16, to the same implementation in fp32."""
    by_key = {(k["precision"], k["mode"], k["impl"]): c for k, c in cases}
    rows = []
    for key, case in cases:
        stats = summarize(case.samples)
        pairing = like_reference(key["impl"])
        ref = by_key.get((key["precision"], key["mode"], pairing))
        ratio = paired_ratio(case, ref) if ref is not None and not case.error and not ref.error else None
        base = by_key.get(("fp32", key["mode"], key["impl"]))
        vs_fp32 = paired_ratio(case, base) if key["precision"] == "bf16" and base and not case.error else None
        rows.append(
            {
                **key,
                "img_s": stats["median"] if case.seconds else None,
                "spread_pct": stats["spread_pct"] if case.seconds else None,
                "samples": case.samples,
                "pairing": pairing,
                "vs_ref": ratio,
                "target_vs_ref": TARGETS.get((key["mode"], key["impl"])),
                "bf16_vs_fp32": vs_fp32,
                "status": "ok" if not case.error else f"n/a ({case.error})",
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'prec':<5} {'mode':<6} {'implementation':<20} {'img/s':>9} {'±%':>4} {'vs like ref':>24} {'bf16/fp32':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['precision']:<5} {r['mode']:<6} {r['impl']:<20} {r['status']}")
            continue
        ratio = f"{r['vs_ref']:.2f}x {r['pairing']}" if r["vs_ref"] is not None else f"- (no {r['pairing']})"
        vs_fp32 = f"{r['bf16_vs_fp32']:.2f}x" if r["bf16_vs_fp32"] is not None else "-"
        line = (
            f"{r['precision']:<5} {r['mode']:<6} {r['impl']:<20} {r['img_s']:>9.1f} {r['spread_pct']:>4.0f} "
            f"{ratio:>24} {vs_fp32:>9}"
        )
        notes = []
        if r["target_vs_ref"] is not None and r["vs_ref"] is not None:
            verdict = "met" if r["vs_ref"] >= r["target_vs_ref"] else "NOT met"
            notes.append(f"target >= {r['target_vs_ref']}x {r['pairing']}: {verdict}")
        if r["bf16_vs_fp32"] is not None and r["mode"] == "train" and r["impl"].startswith("vitbn"):
            notes.append(f"target bf16/fp32 >= 2: {'met' if r['bf16_vs_fp32'] >= 2 else 'NOT met'}")
        lines.append(line + ("  " + "; ".join(notes) if notes else ""))
    return "\n".join(lines)


def profile_rows(cases: list[tuple[dict, Case]], iters: int) -> list[dict]:
    """Operator-time shares per category (``vitbn.bench.cases.op_shares``) of every eager training case: where
    a step's time goes, and so what bounds it."""
    rows = []
    for key, case in cases:
        if key["mode"] == "train" and "compile" not in key["impl"] and not case.error:
            rows.append({**key, **op_shares(case.run, case.device, iters)})
    return rows


def format_profile(rows: list[dict]) -> str:
    names = [c for c, _ in OP_CATEGORIES] + ["other"]
    head = f"{'prec':<5} {'implementation':<20} " + " ".join(f"{n:>11}" for n in names)
    lines = ["share of operator time per training step, % (torch.profiler self time):", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['precision']:<5} {r['impl']:<20} " + " ".join(f"{r[n]:>11.1f}" for n in names))
    return "\n".join(lines)


def format_text(saved: dict) -> str:
    """Everything the script prints of a run (``{"meta", "rows", "profile"}`` as its JSON holds them): the
    environment, the configuration, the table and, with ``--profile``, the operator-time shares."""
    env = saved["meta"]
    out = [
        f"vitbn vs vit-pytorch  {env['date']}  {env['device_name']}  torch {env['torch']}  "
        f"threads {env['threads']}  load avg {env['load_avg']}  allocator tuned: {env['allocator_tuned']}",
        f"ViT depth {env['depth']}, dim 64, heads 8x64, mlp 128, 17 tokens; train batch {env['batch_size']}, "
        f"infer batch {env['infer_batch_size']}; medians of {env['repeats']} interleaved rounds",
        "",
        format_rows(saved["rows"]),
    ]
    if saved["profile"]:
        out += ["", format_profile(saved["profile"])]
    return "\n".join(out)


def page(saved: dict, notes: list[str] | None = None) -> str:
    """The ``--markdown`` page: the provenance line, ``notes``, then ``format_text`` (what the terminal showed)."""
    return markdown_page(TITLE, [provenance_line(saved), *(notes or [])], format_text(saved))


def render(path: str, out: str, command: str | None = None) -> Path:
    """``--render FILE.json --markdown OUT``: the page of a run saved earlier, measuring nothing."""
    return render_saved(path, out, page, PAGE_KEYS, "benchmarks/vs_vit_pytorch.py --out or --markdown", command)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vit-pytorch", metavar="DIR", help="folder with vit_pytorch/ and einops/ (not with --render)")
    p.add_argument("--precisions", default="fp32,bf16", type=lambda s: s.split(","), help="default fp32,bf16")
    p.add_argument("--modes", default="train,infer", type=lambda s: s.split(","), help="default train,infer")
    p.add_argument("--depth", type=int, default=6, help="blocks (the study's ViT: 6)")
    p.add_argument("--batch-size", type=int, default=100, help="training batch (the study's: 100)")
    p.add_argument("--infer-batch-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per case")
    p.add_argument("--min-repeat-s", type=float, default=0.5, help="seconds one timed repeat lasts at least")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also torch.compile")
    p.add_argument("--tune-allocator", action="store_true", help="vitbn.bench.tune_cpu_allocator() first (both)")
    p.add_argument("--profile", action="store_true", help="also print where eager training steps spend time")
    p.add_argument("--profile-steps", type=int, default=5, help="profiled steps per implementation")
    p.add_argument("--out", help="write the rows as JSON (with --markdown: default its name, .json)")
    p.add_argument("--markdown", metavar="FILE", help="also write a Markdown page: the provenance and the text printed")
    p.add_argument("--render", metavar="FILE.json", help="time nothing: write the --markdown page again from a JSON")
    args = p.parse_args(argv)
    if args.markdown and Path(args.markdown).suffix == ".json":
        p.error(f"--markdown {args.markdown} names the page (.md); its JSON goes next to it (or to --out)")
    if args.render and (not args.markdown or args.out):
        p.error("--render FILE.json takes --markdown OUT (the page to write) and no --out")
    if not args.render and not args.vit_pytorch:
        p.error("--vit-pytorch DIR is required to time (see the script's docstring)")
    unknown = [name for name in args.precisions if name not in AUTOCAST_DTYPES]
    if unknown:
        p.error(f"--precisions {','.join(unknown)}: not one of {', '.join(AUTOCAST_DTYPES)}")
    if "fp16" in args.precisions:  # vitbn's fp16 needs CUDA (a GradScaler); both sides must run what they are named
        p.error("--precisions fp16 needs CUDA, and this script times on the CPU: use fp32 and bf16")
    return args


def main(argv=None) -> int:
    from vitbn.provenance import command_line, current

    args = parse_args(argv)
    command = command_line([__file__, *(sys.argv[1:] if argv is None else argv)])  # as typed, also when imported
    if args.render:
        try:
            print(f"wrote {render(args.render, args.markdown, command)}")
        except UserError as exc:
            print(f"vs_vit_pytorch.py: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        ref_cls = load_reference(args.vit_pytorch)
    except UserError as exc:
        sys.exit(f"vs_vit_pytorch.py: error: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = tune_cpu_allocator() if args.tune_allocator else False
    device = torch.device("cpu")
    made = current(command)  # the code and the start of the measurement
    started = time.perf_counter()
    cases = make_cases(args, ref_cls, device)
    warm_all(cases, args)
    print(f"timing {len(cases)} cases in {args.repeats} interleaved rounds ...", file=sys.stderr, flush=True)
    interleave([c for _, c in cases], args.repeats)
    rows = rows_of(cases)
    env = {
        **environment(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "allocator_tuned": tuned,
        "seconds": round(time.perf_counter() - started, 1),
        "depth": args.depth,
        "batch_size": args.batch_size,
        "infer_batch_size": args.infer_batch_size,
        "repeats": args.repeats,
    }
    profile = profile_rows(cases, args.profile_steps) if args.profile else []
    # what is printed, saved and put on the page: the run as its JSON holds it, with the measurement's provenance
    saved = as_saved({"meta": env, "rows": rows, "profile": profile, "provenance": made.to_dict()})
    publish(saved, format_text(saved), args.out, args.markdown, page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
