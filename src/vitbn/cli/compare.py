"""``vitbn compare``: two or more training runs side by side (settings that differ, final metrics, curves)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare two or more runs: settings that differ, final metrics, per-epoch curves (md + html)",
        description="Reads each run's folder (config.yaml and history.json, as `vitbn train` writes them): a run "
        "folder, or a run name under --runs-dir (also one level deeper, where `vitbn experiment` puts its runs).",
    )
    p.add_argument("runs", metavar="RUN", nargs="+", help="run folders or run names (two or more)")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up")
    p.add_argument("--out", default="reports/compare", help="output folder of report.md, report.html, curves.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitbn.report.compare import compare_runs
    from vitbn.report.tables import markdown_table

    md, page, (header, rows) = compare_runs(args.runs, args.out, args.runs_dir)
    print(markdown_table(header, rows))
    print(f"report: {md} and {page}")
    return 0
