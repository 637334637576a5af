"""Shared fixtures. Tests use the official MNIST files in ../shared/data (or $VITBN_DATA) and never the network."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models run fastest on one thread, and a loaded 2-core machine makes 2 threads spin: child processes
# (CLI tests, torchrun) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

if not os.environ.get("VITBN_DATA") and SHARED_DATA.is_dir():
    os.environ["VITBN_DATA"] = str(SHARED_DATA)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
torch.set_num_threads(1)


@pytest.fixture
def data_root() -> Path:
    """The folder holding mnist/ with the official files."""
    root = Path(os.environ["VITBN_DATA"])
    if not (root / "mnist").is_dir():
        pytest.fail(f"MNIST not found under {root}; set VITBN_DATA to a folder with mnist/")
    return root


@pytest.fixture
def tiny_overrides() -> dict:
    """ModelConfig overrides for a tiny, fast model of the MNIST shape."""
    return dict(dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
