"""Seconds per MNIST training epoch of what a user runs, ``vitbn``'s engine (``vitbn.engine.fit``, the code behind
``vitbn train``, default settings), against vit-pytorch's ``ViT`` of the same configuration in a plain PyTorch loop
(in-memory tensors, a shuffled permutation per epoch, Adam, cross-entropy): whole trainings of each, alternated
(A B A B ...), the median epoch time after epoch 1 of each, and the paired ratio per round.

    pip install --no-deps --target /tmp/vp vit-pytorch einops      # a throwaway copy, not a dependency
    python benchmarks/train_epoch.py --vit-pytorch /tmp/vp [--model vit] [--depth 6] [--train-subset 10000]
        [--epochs 3] [--rounds 3] [--threads 2] [--markdown PAGE.md]

The engine's epoch is its timed training loop (the record's ``time/train_epoch_s``, evaluation excluded); the plain
loop times the same part: the steps of one epoch. Both use fp32, batch 100, lr 0.0005, the study's model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from vs_vit_pytorch import STUDY, load_reference  # the script beside this one (its folder is on sys.path)

from vitbn.bench.report import markdown_page, write_page
from vitbn.bench.system import device_name
from vitbn.config import DataConfig, ModelConfig, RunConfig, TrackConfig, TrainConfig
from vitbn.data import prepare_data
from vitbn.engine import fit
from vitbn.provenance import current
from vitbn.tracking import MemoryTracker


def plain_epochs(ref_cls, depth: int, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> list[float]:
    """A plain training loop of vit-pytorch's ViT; the seconds of each epoch's steps."""
    torch.manual_seed(seed)
    model = ref_cls(**{**STUDY, "depth": depth})
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    model.train()
    seconds = []
    for _ in range(epochs):
        order = torch.randperm(len(y))
        start = time.perf_counter()
        for i in range(0, len(y), 100):
            index = order[i : i + 100]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def engine_epochs(c: ModelConfig, data, epochs: int, seed: int, out: Path) -> list[float]:
    """``fit`` with default training settings (what ``vitbn train`` runs); the engine's own epoch times."""
    config = RunConfig(
        model=c,
        data=DataConfig(dataset="mnist"),
        train=TrainConfig(epochs=epochs, batch_size=100, lr=5e-4, seed=seed, out_dir=str(out)),
        track=TrackConfig(run_name=f"epoch-{seed}-{time.time_ns()}"),
    )
    result = fit(config, tracker=MemoryTracker(), data=data, progress="none")
    return [record["time/train_epoch_s"] for record in result.history]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vit-pytorch", required=True, help="folder with vit_pytorch/ and einops/")
    p.add_argument("--model", default="vit")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/vitbn-train-epoch", help="the engine's run folders")
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args()
    made = current()
    ref_cls = load_reference(args.vit_pytorch)
    torch.set_num_threads(args.threads)
    c = ModelConfig.from_preset(args.model, depth=args.depth)
    data = prepare_data(DataConfig(dataset="mnist", train_subset=args.train_subset))
    mean, std = data.info.mean[0], data.info.std[0]
    x, y = (data.train.images.float() / 255.0 - mean) / std, data.train.labels  # normalized once, as a user would
    rows = []
    for r in range(args.rounds):
        ref = statistics.median(plain_epochs(ref_cls, args.depth, x, y, args.epochs, r)[1:])
        ours = statistics.median(engine_epochs(c, data, args.epochs, r, Path(args.out))[1:])
        rows.append((r, ref, ours))
        print(f"round {r}: vit-pytorch {ref:.2f} s/epoch, vitbn {ours:.2f} s/epoch, ratio {ref / ours:.3f}x",
              file=sys.stderr, flush=True)  # fmt: skip
    lines = [
        f"# {device_name(torch.device('cpu'))}, {args.threads} threads, torch {torch.__version__}; {args.model} depth "
        f"{args.depth}, {args.train_subset} training images, batch 100, fp32, {args.epochs} epochs per training, "
        f"median of epochs 2-{args.epochs}; {args.rounds} rounds, vit-pytorch then vitbn in each",
        f"{'round':>5}  {'vit-pytorch s/epoch':>19}  {'vitbn s/epoch':>13}  {'vitbn speed / ref':>17}",
        *(f"{r:>5}  {ref:>19.2f}  {ours:>13.2f}  {ref / ours:>16.3f}x" for r, ref, ours in rows),
        f"median ratio (paired by round): {statistics.median(ref / ours for _, ref, ours in rows):.3f}x"
        "  (target >= 1.2x)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        page = markdown_page("Training epoch: vitbn vs a plain loop", [made.line()], text)
        print(f"wrote {write_page(page, args.markdown)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
