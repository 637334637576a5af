"""Reports built from tracked runs: pure figure functions (``plots``), tables and ratios (``tables``), the
MLflow reader (``runs``) and the Markdown / HTML assembly (``build``)."""

from vitbn.report.build import Report, build_report, report_blocks, to_html, to_markdown, write_report
from vitbn.report.runs import RunSet, load_run_set
from vitbn.report.tables import comparison_sentences, flops_sentence, summary_table

__all__ = [
    "Report",
    "RunSet",
    "build_report",
    "comparison_sentences",
    "flops_sentence",
    "load_run_set",
    "report_blocks",
    "summary_table",
    "to_html",
    "to_markdown",
    "write_report",
]
