"""Load test of the demo's API: N POST /api/predict requests of MNIST test digits (as PNGs) at concurrency C
against `vitbn serve` on 127.0.0.1, then p50/p90/p99 latency, throughput and errors. Stops by itself.

    python benchmarks/demo_load.py [--requests 1000] [--concurrency 8] [--checkpoint FILE ...] [--runs-dir runs]

Starts its own server (the newest study models under --runs-dir, or --checkpoint files) on a free loopback
port, or uses --url (loopback addresses only: this is not a tool to load other people's servers).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import platform
import statistics
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from vitbn.data import load_dataset
from vitbn.serve.launch import running_server

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def digit_pngs(n: int = 50) -> list[bytes]:
    """The first ``n`` MNIST test digits as black-on-white 56x56 PNGs, as a user would upload them."""
    out = []
    for digit in load_dataset("mnist").test.images[:n, 0].numpy():
        img = Image.fromarray(255 - digit).resize((56, 56), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def load(url: str, pngs: list[bytes], requests: int, concurrency: int) -> dict:
    parts = urllib.parse.urlsplit(url)

    def one(i: int) -> tuple[float, int]:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        start = time.perf_counter()
        try:
            conn.request("POST", "/api/predict", body=pngs[i % len(pngs)], headers={"Content-Type": "image/png"})
            response = conn.getresponse()
            status = response.status if "predictions" in json.loads(response.read()) else -1
        except (OSError, ValueError):
            status = 0
        finally:
            conn.close()
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ms = sorted(1000 * s for s, _ in results)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "requests": requests, "concurrency": concurrency, "errors": sum(st != 200 for _, st in results),
        "p50_ms": q[49], "p90_ms": q[89], "p99_ms": q[98], "max_ms": ms[-1], "req_per_s": requests / wall,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--checkpoint", action="append", default=[])
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--url", default=None, help="an already running server on a loopback address")
    p.add_argument("--warmup", type=int, default=20, help="requests sent first and not counted")
    args = p.parse_args(argv)
    pngs = digit_pngs()
    print(f"# python benchmarks/demo_load.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if args.url:
        if urllib.parse.urlsplit(args.url).hostname not in LOOPBACK:
            p.error(f"--url {args.url}: only loopback addresses ({', '.join(LOOPBACK)})")
        return report(args.url, pngs, args)
    serve_args = [a for c in args.checkpoint for a in ("--checkpoint", c)] or ["--runs-dir", args.runs_dir]
    with running_server(serve_args) as url:
        return report(url, pngs, args)


def report(url: str, pngs: list[bytes], args: argparse.Namespace) -> int:
    with urllib.request.urlopen(url + "/api/models") as r:
        models = [m["name"] for m in json.load(r)["models"]]
    load(url, pngs, args.warmup, args.concurrency)
    r = load(url, pngs, args.requests, args.concurrency)
    print(f"models: {', '.join(models)} (each request runs all of them, with attention rollout)")
    print(
        f"{r['requests']} requests at concurrency {r['concurrency']}: {r['errors']} errors, {r['req_per_s']:.1f} req/s"
    )
    print(f"latency ms: p50 {r['p50_ms']:.1f}  p90 {r['p90_ms']:.1f}  p99 {r['p99_ms']:.1f}  max {r['max_ms']:.1f}")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
