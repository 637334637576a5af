"""The CPU runtime's choices measured on this machine (``vitbn.runtime``): threads chosen by load against fixed
``--threads``, OpenMP waiting, and the tuned allocator, each quiet and beside a busy process.

Every variant is a whole ``vitbn train`` process (so that OpenMP and allocator settings take effect from the start),
and the figure is its training epoch (``time/train_epoch_s``, evaluation excluded). The variants run in interleaved
rounds (A B C ... A B C ...), and the "busy" ones run beside one CPU-bound process started just before them.

    python benchmarks/cpu_runtime.py [--rounds 3] [--train-subset 2000] [--depth 6]
        [--markdown docs/bench/cpu-runtime.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitbn.bench.report import markdown_page, write_page
from vitbn.bench.system import cpu_features, cpu_model
from vitbn.provenance import current

BUSY = [sys.executable, "-c", "while True: pass"]
# (name, extra train flags, environment changes); "auto" is vitbn's default: threads by load, short spin, tuned heap
VARIANTS = (
    ("threads auto (default)", [], {}),
    ("--threads 1", ["--threads", "1"], {}),
    ("--threads N", ["--threads", "{n}"], {}),
    ("--threads N, libgomp's spin (300000)", ["--threads", "{n}"], {"GOMP_SPINCOUNT": "300000"}),
    ("--threads N, OMP_WAIT_POLICY=passive", ["--threads", "{n}"], {"OMP_WAIT_POLICY": "passive"}),
    ("threads auto, allocator not tuned", [], {"VITBN_ALLOCATOR": "system"}),
)


def train_epoch_s(flags: list[str], env: dict, busy: bool, folder: Path, args) -> float:
    """One ``vitbn train`` of one epoch; its ``time/train_epoch_s``."""
    name = f"r{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "vitbn", "train", "--model", "vit", "--depth", str(args.depth), "--epochs", "1",
           "--train-subset", str(args.train_subset), "--test-subset", "500", "--no-track", "--progress", "none",
           "--out-dir", str(folder), "--run-name", name, *flags]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    environ.update(env)
    hog = subprocess.Popen(BUSY) if busy else None
    try:
        subprocess.run(cmd, env=environ, check=True, stdout=subprocess.DEVNULL)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    history = json.loads((folder / name / "history.json").read_text())
    return history[-1]["time/train_epoch_s"]


def measure(args) -> dict[tuple[str, bool], list[float]]:
    n = str(len(os.sched_getaffinity(0)))
    times: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for busy in (False, True):
                for name, flags, env in VARIANTS:
                    s = train_epoch_s([f.format(n=n) for f in flags], env, busy, Path(tmp), args)
                    times.setdefault((name, busy), []).append(s)
                    print(f"round {r + 1} {'busy ' if busy else 'quiet'} {name}: {s:.2f} s", file=sys.stderr)
    return times


def table(times: dict[tuple[str, bool], list[float]]) -> str:
    lines = ["| variant | quiet: epoch s (median) | vs best quiet | beside a busy process: epoch s | vs best busy |",
             "|---|---|---|---|---|"]  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {b: min(v for (n, bb), v in med.items() if bb == b) for b in (False, True)}
    for name, _, _ in VARIANTS:
        q, b = med[(name, False)], med[(name, True)]
        lines.append(f"| {name} | {q:.2f} | {q / best[False]:.2f}x | {b:.2f} | {b / best[True]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    times = measure(args)
    text = table(times)
    print(text)
    if args.markdown:
        notes = [current().line(),
                 f"CPU: {cpu_model()} [{cpu_features()}], {len(os.sched_getaffinity(0))} usable cores. Study ViT "
                 f"(depth {args.depth}, batch 100, fp32), one epoch of {args.train_subset} MNIST images per process, "
                 f"{args.rounds} interleaved rounds; 'vs best' is against the fastest variant in the same condition. "
                 "'busy': one CPU-bound Python process (`while True: pass`) ran beside the training."]  # fmt: skip
        write_page(markdown_page("CPU runtime: threads, OpenMP waiting, allocator", notes, text), args.markdown)


if __name__ == "__main__":
    main()
