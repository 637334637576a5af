"""Shared fixtures. Tests use the official MNIST files in ../shared/data (or $VITBN_DATA) and never the network.

Hard waits (a torchrun job, a server's start, a checkpoint to appear) are bounds in seconds multiplied by
$VITBN_TEST_TIME_FACTOR (default 1; tests/waits.py): raise it on a slow or loaded machine, e.g.
``VITBN_TEST_TIME_FACTOR=3 make test``. Tests marked ``slow`` are left out of the default run (pyproject's
addopts); ``pytest -m slow`` runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models run fastest on one thread, and a loaded 2-core machine makes 2 threads spin: child processes
# (CLI tests, torchrun) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# attn_impl="auto" measures which attention path is faster: pinned, every process (CLI tests, torchrun ranks) takes
# the same path, so numbers compared across processes are computed alike. Tests of the measurement unset it.
os.environ.setdefault("VITBN_ATTN_AUTO", "fused")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

if not os.environ.get("VITBN_DATA") and SHARED_DATA.is_dir():
    os.environ["VITBN_DATA"] = str(SHARED_DATA)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
torch.set_num_threads(1)


# Modules whose tests compare float results against references: CI runs them again under the ATen kernels that
# other CPUs get (ATEN_CPU_CAPABILITY=default and avx2; `make test-kernels`), so that a tolerance tuned on one CPU's
# kernels fails in CI rather than on a user's machine.
NUMERICS_MODULES = frozenset(
    {
        "test_analysis_activity", "test_analysis_attention", "test_analysis_hessian", "test_analysis_landscape",
        "test_bn_fuse", "test_bn_stats", "test_bn_study", "test_engine_augment", "test_engine_finetune",
        "test_engine_fit", "test_engine_optim", "test_engine_sam", "test_export", "test_models", "test_models_norms",
        "test_models_recipes",
    }
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.stem in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 (a free port) serving tmp_path/www, with proxies out of the way; yields (base
    URL, the paths requested so far, the folder). Downloads are tested against it: nothing is fetched from outside."""
    import functools
    import http.server
    import threading

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass  # quiet test output

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests, www
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="session")
def vs_script():
    """benchmarks/vs_vit_pytorch.py as a module (a script, not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_vit_pytorch.py"
    spec = importlib.util.spec_from_file_location("vs_vit_pytorch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# (name, preset) of the demo fixture's models: a LayerNorm ViT and a BatchNorm ViT, tiny and quickly trained.
DEMO_MODELS = (("demo-vit", "vit"), ("demo-vitbn", "vitbn"))


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> dict:
    """Tiny vit and vitbn trained 2 epochs on 10,000 MNIST images (a few seconds), their
    model files, and MNIST test digits that both classify correctly: ``{"paths", "images", "labels"}``."""
    from vitbn.config import RunConfig
    from vitbn.data import load_dataset
    from vitbn.engine import fit
    from vitbn.serve import Predictor

    root = os.environ.get("VITBN_DATA") or str(SHARED_DATA)
    out = tmp_path_factory.mktemp("demo-runs")
    paths = []
    for run_name, preset in DEMO_MODELS:
        config = RunConfig.from_dict(
            {
                "model": {"name": preset, "dim": 32, "depth": 1, "heads": 4, "dim_head": 8, "mlp_dim": 64},
                "data": {"dataset": "mnist", "root": root, "train_subset": 10000, "test_subset": 500},
                "train": {"epochs": 2, "batch_size": 100, "lr": 3e-3, "out_dir": str(out), "threads": 1},
                "track": {"enabled": False, "run_name": run_name},
            }
        )
        result = fit(config, progress="none")
        assert result.status == "finished", result.status
        paths.append(result.out_dir / "model.pt")
    test = load_dataset("mnist", root).test
    images, labels = test.images[:200, 0].numpy(), test.labels[:200].numpy()
    predictors = [Predictor.load(p) for p in paths]
    right = [
        all(p.predict([img], top_k=1)[0].top[0][0] == label for p in predictors) for img, label in zip(images, labels)
    ]
    keep = np.flatnonzero(right)
    return {"paths": paths, "images": images[keep], "labels": labels[keep], "dir": out}


def pytest_configure(config):
    from waits import time_factor

    try:
        time_factor()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
