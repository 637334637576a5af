"""What SAM costs per training step: the engine's step (``vitbn.engine.step.train_step``) with Adam, Adam + SAM and
Adam + ASAM (rho 0.05), on the depth-6 ViT and ViTBN of the ``sam`` preset, timed in interleaved rounds (A, B, C,
A, B, C, ...), medians of img/s and the paired ratio to Adam.

    python benchmarks/sam_step.py [--models vit vitbn] [--precision fp32] [--batch 100] [--repeats 7]
        [--min-repeat-s 0.5] [--threads 2] [--device auto]

SAM runs two forward/backward passes per step (plus the perturbation and the restore of the weights), so its
ratio is expected just under 0.5; the ratio printed is measured, side by side, on this machine.
"""

from __future__ import annotations

import argparse
import os

import torch

from vitbn.bench.system import device_name
from vitbn.bench.timing import Case, add_round_arguments, paired_ratio, run_rounds, summarize
from vitbn.config import TrainConfig
from vitbn.engine.device import make_amp, resolve_device
from vitbn.engine.optim import build_optimizer
from vitbn.engine.sam import SAM
from vitbn.engine.step import make_loss, train_step
from vitbn.models import create_model

VARIANTS = {"adam": None, "adam+sam": dict(rho=0.05), "adam+asam": dict(rho=0.05, adaptive=True)}


def step_case(name: str, model_name: str, variant: str, precision: str, batch: int, device) -> Case:
    torch.manual_seed(0)
    model = create_model(model_name, depth=6).to(device).train()
    optimizer = build_optimizer(model, TrainConfig(lr=5e-4))
    sam = SAM(optimizer, **VARIANTS[variant]) if VARIANTS[variant] else None
    amp, loss_fn = make_amp(precision, device), make_loss()
    c = model.config
    x = torch.randn(batch, c.channels, c.image_size, c.image_size, device=device)
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    return Case(name, lambda: train_step(model, x, y, optimizer, loss_fn, amp=amp, sam=sam), images=batch,
                device=device)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit", "vitbn"])
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch", type=int, default=100)
    add_round_arguments(p, repeats=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cases = {(m, v): step_case(f"{m} {v}", m, v, args.precision, args.batch, device)
             for m in args.models for v in VARIANTS}  # fmt: skip
    run_rounds(list(cases.values()), args)
    print(f"# {device_name(device)}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}, {device}, {args.precision}, batch {args.batch}, {args.repeats} interleaved "
          "rounds")  # fmt: skip
    print(f"{'model':<8}{'optimizer':<11}{'img/s':>9}{'min':>9}{'max':>9}{'ms/step':>9}{'vs adam':>9}")
    for (m, v), case in cases.items():
        s = summarize(case.samples)
        ratio = paired_ratio(case, cases[(m, "adam")])
        print(f"{m:<8}{v:<11}{s['median']:>9.0f}{s['min']:>9.0f}{s['max']:>9.0f}"
              f"{1000 * args.batch / s['median']:>9.1f}{ratio:>9.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
