"""vitbn.runtime: threads chosen from the machine's load, OpenMP waiting set before torch loads, the allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vitbn import runtime


def _stat(path, rows):
    """A /proc/stat with the aggregate line and one line per CPU: (user, idle) jiffies."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {user} 0 0 {idle} 0 0 0 0 0 0" for i, (user, idle) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\nintr 1 2 3\n")


def test_idle_cpus_sums_each_cpus_idle_share(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    samples = iter([[(100, 100), (100, 100)], [(200, 100), (125, 175)]])  # cpu0 all busy, cpu1 75% idle

    def sleep(_seconds):
        _stat(stat, next(samples, [(200, 100), (125, 175)]))

    _stat(stat, next(samples))
    monkeypatch.setattr(runtime.time, "sleep", sleep)
    idle = runtime.idle_cpus([0, 1], path=str(stat))
    assert idle == pytest.approx(0.0 + 0.75)
    assert runtime.idle_cpus([0, 7], path=str(stat)) == pytest.approx(1.0)  # no change: idle; cpu7 does not exist
    assert runtime.idle_cpus([0], path=str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("requested", "idle", "expected"),
    [(3, 0.0, (3, "requested")), (None, 1.98, (2, "1.98 of")), (None, 1.0, (1, "1.00 of")), (None, 0.7, (1, "0.70")),
     (None, 0.1, (1, "0.10")), (None, 5.0, (2, "5.00")), (None, None, (2, "default (load unknown)"))],
)  # fmt: skip
def test_choose_threads_takes_one_thread_per_idle_core(monkeypatch, requested, idle, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads, why = runtime.choose_threads(requested, default=2, idle=idle)
    assert threads == expected[0] and why.startswith(expected[1])


def test_omp_num_threads_is_the_users_choice(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.choose_threads(None, default=1, idle=0.0) == (1, "OMP_NUM_THREADS")


def test_configure_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1) == (1, "requested") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_openmp_defaults_leave_the_users_settings_alone():
    env: dict = {}
    assert runtime.openmp_defaults(env) == {"GOMP_SPINCOUNT": runtime.SPINCOUNT} and env["GOMP_SPINCOUNT"] == "10000"
    for mine in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(mine)
        assert runtime.openmp_defaults(env) == {} and env == mine


def test_the_command_sets_openmp_waiting_before_torch_is_loaded():
    code = "import os, sys, vitbn.cli; print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", runtime.SPINCOUNT]


def test_allocator_opt_out():
    assert runtime.tune_cpu_allocator({"VITBN_ALLOCATOR": "system"}) is False
    if sys.platform.startswith("linux"):
        assert runtime.tune_cpu_allocator({}) is True
