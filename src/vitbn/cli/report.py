"""``vitbn report``: the report of an experiment, built from its tracked runs, or rendered again from the
``data.json`` an earlier report wrote."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitbn.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="tables and figures of an experiment, from MLflow (md + html)")
    parser.add_argument(
        "run", metavar="RUN", nargs="?", help="the experiment's parent run id, or its preset / run name"
    )
    parser.add_argument("--from", dest="saved", metavar="DATA_JSON", default=None,
                        help="render again from a report's data.json (no MLflow store needed)")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default reports/<RUN>, or the data.json's folder)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite)")
    parser.add_argument("--experiment", default=None, help="look the name up in this MLflow experiment only")
    parser.add_argument("--no-log", action="store_true", help="do not log the files as artifacts of the parent run")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitbn.report import build_report
    from vitbn.report.build import render_saved

    if (args.run is None) == (args.saved is None):
        raise UserError("give either RUN (a parent run id or name) or --from DATA_JSON, not both or neither")
    if args.saved:
        report = render_saved(args.saved, args.out or Path(args.saved).parent)
    else:
        out = args.out or f"reports/{args.run}"
        report = build_report(
            args.run, out, tracking_uri=args.tracking_uri, experiment=args.experiment, log_artifacts=not args.no_log
        )
    print(f"report of parent run {report.parent_id}: {report.markdown}, {report.html}, {len(report.figures)} figure(s)")
    return 0
