"""What bf16 buys the study ViT's training step on this CPU, and which way of using it buys most.

The study ViT (depth 6, batch 100) trains one step per call in each variant, all timed in interleaved rounds after
warm-up (A B C ... A B C ...), with the fp32 and bf16 matmul peaks measured in the same rounds:

- ``fp32``: the engine's step in fp32 (the baseline of every ratio);
- ``bf16 autocast``: the engine's ``--precision bf16`` (fp32 weights, products cast to bf16 by autocast);
- ``bf16 weights + fp32 master``: the model held in bf16 (no casts in the step), its gradients copied onto fp32
  master weights that Adam updates, the bf16 weights refreshed from them (the mixed-precision recipe without
  autocast);
- ``bf16 autocast, compiled``: ``torch.compile`` of the model (inductor's default CPU kernels);
- ``bf16 autocast, compiled max-autotune``: inductor's ``max-autotune`` mode (its CPU GEMM templates).

    python benchmarks/bf16_step.py [--repeats 5] [--threads 2] [--no-compile] [--markdown docs/bench/bf16.md]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from vitbn.bench.cases import batch_for, train_case
from vitbn.bench.report import markdown_page, write_page
from vitbn.bench.system import cpu_features, cpu_model
from vitbn.bench.timing import Case, add_round_arguments, matmul_case, paired_ratio, run_rounds
from vitbn.models import create_model, forward_flops
from vitbn.provenance import current


def master_weights_case(name: str, batch: int, device: torch.device) -> Case:
    """bf16 model, fp32 master weights updated by Adam; the bf16 weights copied from them after each step."""
    model = create_model("vit", depth=6).to(device).train()
    master = [p.detach().clone().float() for p in model.parameters()]
    model.to(torch.bfloat16)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(master, lr=1e-4, fused=device.type in ("cpu", "cuda"))
    x, y = batch_for(model, batch, device)
    x = x.to(torch.bfloat16)

    def step() -> None:
        loss = F.cross_entropy(model(x).float(), y)
        for p in params:
            p.grad = None
        loss.backward()
        for m, p in zip(master, params):
            m.grad = p.grad.float()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(params, master)

    return Case(name, step, images=batch, device=device)


def compiled_case(name: str, batch: int, device: torch.device, mode: str) -> Case:
    """The engine's step around a ``torch.compile``'d module, as ``--compile`` does; ``mode`` picks inductor's GEMM
    choice (``"default"`` or ``"max-autotune"``)."""
    from vitbn.config import TrainConfig
    from vitbn.engine.device import make_amp
    from vitbn.engine.optim import build_optimizer
    from vitbn.engine.step import make_loss, train_step

    model = create_model("vit", depth=6).to(device).train()
    net = torch.compile(model, mode=mode)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    amp, loss_fn = make_amp("bf16", device), make_loss()
    x, y = batch_for(model, batch, device)
    return Case(name, lambda: train_step(net, x, y, optimizer, loss_fn, amp=amp), images=batch, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_round_arguments(parser, repeats=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.device == "auto" else args.device)
    peaks = {p: matmul_case(d, device) for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    cases = {
        "fp32": train_case("fp32", create_model("vit", depth=6), precision="fp32", batch=args.batch, device=device,
                           compile=False),
        "bf16 autocast": train_case("bf16 autocast", create_model("vit", depth=6), precision="bf16",
                                    batch=args.batch, device=device, compile=False),
        "bf16 weights + fp32 master": master_weights_case("bf16 weights + fp32 master", args.batch, device),
    }  # fmt: skip
    if not args.no_compile:
        for label, mode in (("bf16 autocast, compiled", "default"), ("bf16 autocast, compiled max-autotune",
                                                                     "max-autotune")):  # fmt: skip
            try:
                cases[label] = compiled_case(label, args.batch, device, mode)
                cases[label].run()
            except Exception as exc:  # no C++ compiler, an inductor failure: say so, time the rest
                print(f"{label}: n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})", file=sys.stderr)
                cases.pop(label)
    run_rounds([*peaks.values(), *cases.values()], args)
    flops = forward_flops(create_model("vit", depth=6), train=True)
    base = cases["fp32"]
    lines = [f"{'variant':<38} {'img/s':>8} {'x fp32':>7} {'% of its peak':>14}"]
    for label, case in cases.items():
        peak = peaks["fp32" if label == "fp32" else "bf16"].img_s
        lines.append(f"{label:<38} {case.img_s:8.1f} {paired_ratio(case, base):7.2f} "
                     f"{100 * flops * case.img_s / 1e9 / peak:13.1f}%")  # fmt: skip
    lines.append(f"peaks: fp32 {peaks['fp32'].img_s:.0f} GFLOP/s, bf16 {peaks['bf16'].img_s:.0f} GFLOP/s "
                 f"({peaks['bf16'].img_s / peaks['fp32'].img_s:.1f}x)")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        setup = f"{args.threads} threads, batch {args.batch}, {args.repeats} interleaved rounds"
        notes = [current().line(), f"CPU: {cpu_model()} [{cpu_features()}], {setup}; x fp32 is the median of the "
                 "per-round ratios; % of its peak: matrix-product FLOPs per second over the matmul peak of the "
                 "precision the products run in."]  # fmt: skip
        write_page(markdown_page("bf16 training step of the study ViT", notes, text), args.markdown)


if __name__ == "__main__":
    main()
