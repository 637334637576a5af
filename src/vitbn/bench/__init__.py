"""Throughput, FLOP counting, hardware peak and utilization: ``vitbn bench`` and its building blocks.

``run_bench(BenchOptions(...))`` measures; ``format_report`` prints; ``save_json`` / ``load_json`` store.
``vitbn.bench.timing`` has the interleaved timer that the comparison scripts in ``benchmarks/`` reuse.
"""

from vitbn.bench.report import format_report, format_table, load_json, save_json
from vitbn.bench.suite import STUDY_DEPTHS, BenchOptions, Spec, model_depths, plan, run_bench
from vitbn.bench.system import tune_cpu_allocator
from vitbn.bench.timing import Case, interleave, matmul_case, paired_ratio, warm_up

__all__ = [
    "STUDY_DEPTHS",
    "BenchOptions",
    "Case",
    "Spec",
    "format_report",
    "format_table",
    "interleave",
    "load_json",
    "matmul_case",
    "model_depths",
    "paired_ratio",
    "plan",
    "run_bench",
    "save_json",
    "tune_cpu_allocator",
    "warm_up",
]
