"""The two attention paths side by side: the plain batched path against PyTorch's fused
``scaled_dot_product_attention``, and what ``attn_impl="auto"`` (measured at first use) makes of them, on the study's
ViT and ViTBN (depth 6, 17 tokens, 8 heads of 64), for a training step (the engine's ``train_step``) and an
inference batch, timed in interleaved rounds; medians of img/s and the paired ratio to the plain path (> 1: faster
than the plain path).

    python benchmarks/attention_impl.py [--models vit vitbn] [--precisions fp32] [--modes train infer]
        [--batch 100] [--infer-batch 1000] [--repeats 9] [--min-repeat-s 0.5] [--threads 2] [--device auto]
        [--markdown PAGE.md]

Both paths compute the same attention (tests/test_models_attention.py checks values and gradients against the
textbook formula); the ratio printed is measured, side by side, on this machine, and the row "auto" shows what
the default picks here (unset ``VITBN_ATTN_AUTO``, which pins it).
"""

from __future__ import annotations

import argparse
import os

import torch

from vitbn.bench.cases import infer_case, train_case
from vitbn.bench.report import markdown_page, write_page
from vitbn.bench.system import device_name
from vitbn.bench.timing import Case, add_round_arguments, paired_ratio, run_rounds, summarize
from vitbn.engine.device import resolve_device
from vitbn.models import create_model
from vitbn.provenance import command_line, current

IMPLS = ("plain", "fused", "auto")


def make_case(model_name: str, impl: str, mode: str, precision: str, batch: int, device, compile: bool) -> Case:
    torch.manual_seed(0)
    model = create_model(model_name, depth=6, attn_impl=impl)
    make = train_case if mode == "train" else infer_case
    return make(f"{model_name} {mode} {impl}", model, precision=precision, batch=batch, device=device, compile=compile)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit", "vitbn"])
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=("fp32", "bf16", "fp16"))
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=("train", "infer"))
    p.add_argument("--batch", type=int, default=100, help="training batch")
    p.add_argument("--infer-batch", type=int, default=1000)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every case (auto then takes captured_path)")  # fmt: skip
    add_round_arguments(p, repeats=9)
    p.add_argument("--markdown", metavar="FILE", help="also write the table as a page under its provenance line")
    args = p.parse_args()
    made = current(command_line())  # the code and the start of the measurement
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    keys = [(m, mode, prec, impl) for m in args.models for mode in args.modes for prec in args.precisions
            for impl in IMPLS]  # fmt: skip
    cases = {k: make_case(k[0], k[3], k[1], k[2], args.batch if k[1] == "train" else args.infer_batch, device,
                          args.compile) for k in keys}  # fmt: skip
    run_rounds(list(cases.values()), args)
    lines = [
        f"# {device_name(device)}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
        f"{device}, train batch {args.batch}, infer batch {args.infer_batch}, {args.repeats} interleaved "
        f"rounds{', torch.compile' if args.compile else ', eager'}",  # fmt: skip
        f"{'model':<7}{'mode':<7}{'prec':<6}{'attention':<10}{'img/s':>9}{'min':>9}{'max':>9}{'vs plain':>13}",
    ]
    for (m, mode, prec, impl), case in cases.items():
        s = summarize(case.samples)
        ratio = paired_ratio(case, cases[(m, mode, prec, "plain")])
        lines.append(f"{m:<7}{mode:<7}{prec:<6}{impl:<10}{s['median']:>9.0f}{s['min']:>9.0f}{s['max']:>9.0f}"
                     f"{ratio:>12.3f}x")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        title = f"Attention: plain vs fused{', compiled' if args.compile else ''}"
        print(f"wrote {write_page(markdown_page(title, [made.line()], text), args.markdown)}")


if __name__ == "__main__":
    main()
