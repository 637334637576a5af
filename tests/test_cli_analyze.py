"""``vitbn analyze`` end to end on tiny trained models: the numbers against independent computations, the
figures, the MLflow run, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitbn.analysis import figures
from vitbn.cli import main
from vitbn.config import DataConfig, ModelConfig, RunConfig
from vitbn.data import InMemoryLoader, load_dataset, prepare_data
from vitbn.engine import fit, load_inference
from vitbn.engine.checkpoint import export_model
from vitbn.models import build_model

# Quick, with the images few and the whole-model iteration tight enough to compare with an eigensolver.
ARGS = ["--quick", "--images", "64", "--batch-size", "40", "--max-iter", "300", "--tol", "1e-6"]
OUTPUTS = ("analysis.json", "attention.png", "attention_heads.png", "attention.npz", "landscape.png", "blocks.png")


def _first_images(model_path, n: int):
    """The first n MNIST training images, normalized as the model was trained, as one batch."""
    model, spec = load_inference(model_path)
    split = prepare_data(DataConfig(dataset="mnist", train_subset=n)).train
    loader = InMemoryLoader(split, batch_size=n, mean=spec.mean, std=spec.std)
    (x, y), = list(loader)  # fmt: skip
    return model, x, y


def _eigsh_lambda_max(model, x, y) -> float:
    """The top eigenvalue by Lanczos (scipy) on forward-over-reverse HVPs of torch.func: independent of
    vitbn.analysis."""
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}

    def loss(weights):
        return F.cross_entropy(functional_call(model, weights, (x,)), y)

    def matvec(v):
        flat = torch.as_tensor(np.ravel(v), dtype=torch.float32)
        tangent, offset = {}, 0
        for n in names:
            k = base[n].numel()
            tangent[n] = flat[offset : offset + k].view_as(base[n])
            offset += k
        with sdpa_kernel([SDPBackend.MATH]):  # forward-mode AD needs the math kernel (not the CPU flash one)
            _, hv = jvp(grad(loss), (base,), (tangent,))
        return torch.cat([hv[n].reshape(-1) for n in names]).double().numpy()

    size = sum(p.numel() for p in base.values())
    op = sla.LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    return float(sla.eigsh(op, k=1, which="LA", tol=1e-6, v0=np.ones(size))[0][0])


# A GELU input within this distance of 0 may change sign between two float32 paths (here all images at once, in the
# analysis in batches: matrix products blocked differently); their rounding differences are about 1e-6.
SIGN_MARGIN = 1e-4


def _direct_active_counts(model, x) -> tuple[int, int, int]:
    """Outputs of each stage's inner norm (the GELU input) by forward hooks, over images x tokens x units:
    (clearly positive, not clearly negative, all)."""
    outs = []
    hooks = [layer.ff.inner_norm.register_forward_hook(lambda m, i, out: outs.append(out)) for layer in
             model.transformer.layers]  # fmt: skip
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return (sum(int((o > SIGN_MARGIN).sum()) for o in outs), sum(int((o > -SIGN_MARGIN).sum()) for o in outs),
            sum(o.numel() for o in outs))  # fmt: skip


def _check_active_fraction(fraction: float, model, x) -> None:
    """``fraction`` is a count of positive GELU inputs over all of them: an integer count between the values
    clearly positive and those not clearly negative (an exact comparison but for values within rounding of 0)."""
    low, high, total = _direct_active_counts(model, x)
    count = fraction * total
    assert count == pytest.approx(round(count), abs=1e-6) and low <= round(count) <= high, (count, low, high)


def _check_outputs(out, result, model) -> None:
    c = model.config
    assert sorted(result["files"]) == sorted(OUTPUTS)
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    sizes = {
        "attention.png": figures.grid_pixels(2, c.depth + 2),
        "attention_heads.png": figures.grid_pixels(c.depth, c.heads * c.parallel),
        "landscape.png": (600, 400),
        "blocks.png": (1000, 400),
    }
    for name, size in sizes.items():
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == size, name
    arrays = np.load(out / "attention.npz")
    n = c.num_tokens
    assert arrays["maps"].shape == (2, c.depth, c.heads, n, n)
    assert arrays["layer_maps"].shape == (2, c.depth, 4, 4) and arrays["rollout"].shape == (2, 4, 4)
    np.testing.assert_allclose(arrays["rollout"].sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert result["attention"]["images"] == [0, 1] and result["attention"]["class_token"] is True


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func.jvp's own
def test_analyze_quick_matches_independent_computations(demo_models, tmp_path, capsys):
    run_dir = demo_models["paths"][0].parent  # the LayerNorm ViT, given as its run folder
    out = tmp_path / "out"
    assert main(["analyze", str(run_dir), *ARGS, "--out", str(out), "--no-track"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "analysis.json").read_text())
    assert result["images"] == 64 and result["dataset"] == "mnist" and result["bn_mode"] == "eval"
    assert result["checkpoint"] == str(run_dir / "model.pt")
    h = result["hessian"]
    assert h["converged"] and h["max_iter"] == 300 and h["tol"] == 1e-6 and h["block_max_iter"] == 5
    assert list(h["blocks"]) == ["embed", "block1.attn", "block1.mlp", "head"]
    model, x, y = _first_images(run_dir / "model.pt", 64)
    assert h["lambda_max"] == pytest.approx(_eigsh_lambda_max(model, x, y), rel=2e-3)
    active = result["active_fraction"]
    _check_active_fraction(active["block1"], model, x)
    assert active["mean"] == active["block1"]
    scape = result["landscape"]
    assert len(scape["alphas"]) == 7 and scape["alphas"][3] == 0.0
    with torch.no_grad():
        assert scape["loss"][3] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
    _check_outputs(out, result, model)
    assert f"lambda    {h['lambda_max']:.5g}" in printed and "not logged (--no-track)" in printed
    assert set(result["seconds"]) >= {"hessian", "blocks", "activity", "landscape", "attention", "figures", "total"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny BatchNorm ViT trained 1 epoch with MLflow on a SQLite store in a temporary folder: (run folder, uri,
    run id). The tests share it (a new SQLite store costs seconds)."""
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root}/mlruns.db"
    config = RunConfig.from_dict(
        {
            "model": {"name": "vitbn", "dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32},
            "data": {"dataset": "mnist", "train_subset": 1000, "test_subset": 100},
            "train": {"epochs": 1, "batch_size": 100, "lr": 3e-3, "out_dir": str(root / "runs"), "threads": 1},
            "track": {"tracking_uri": uri, "experiment": "analyze", "run_name": "bn"},
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's default artifact root (./mlruns, stored as an absolute path) lands here
        result = fit(config, progress="none")
    assert result.status == "finished"
    return result.out_dir, uri, result.run_id


def test_analyze_logs_to_the_training_run_without_changing_its_status(tracked_run, capsys):
    from mlflow import MlflowClient

    run_dir, uri, run_id = tracked_run
    assert main(["analyze", str(run_dir / "model.pt"), *ARGS, "--bn-mode", "train", "--no-blocks"]) == 0
    out = run_dir / "analysis"  # the default: beside the model
    result = json.loads((out / "analysis.json").read_text())
    assert result["bn_mode"] == "train" and result["hessian"]["blocks"] == {}
    model, x, y = _first_images(run_dir / "model.pt", 64)
    _check_active_fraction(result["active_fraction"]["block1"], model, x)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["analysis/lambda_max"] == pytest.approx(result["hessian"]["lambda_max"])
    assert metrics["analysis/active_fraction_mean"] == pytest.approx(result["active_fraction"]["mean"])
    assert {a.path for a in client.list_artifacts(run_id, "analysis")} == {f"analysis/{n}" for n in OUTPUTS}
    assert f"logged to run {run_id}" in capsys.readouterr().out


def test_unreachable_tracking_server_warns_in_one_line_and_keeps_the_files(tracked_run, tmp_path, capsys):
    run_dir, _, _ = tracked_run
    out = tmp_path / "elsewhere"
    argv = ["analyze", str(run_dir), "--quick", "--images", "32", "--no-blocks", "--max-iter", "3",
            "--landscape-points", "3", "--out", str(out), "--tracking-uri", "http://127.0.0.1:9"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    (line,) = [w for w in err.splitlines() if "MLflow" in w]
    assert line.startswith("vitbn analyze: warning: not logged to MLflow: MLflow tracking server http://127.0.0.1:9 ")
    assert (
        "vitbn analyze: warning: lambda_max of all parameters: power iteration did not converge in 3 iterations" in err
    )
    assert all((out / name).is_file() for name in OUTPUTS)


def _tiny_mnist_model(tmp_path, image_size: int):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("vit", image_size=image_size, patch_size=4, dim=8, depth=1, heads=2, dim_head=4,
                                     mlp_dim=8)  # fmt: skip
    return export_model(build_model(config), tmp_path / "model.pt", load_dataset("mnist"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--images", "0"], "--images 0 must be >= 1"),
        (["--max-iter", "0"], "--max-iter 0 must be >= 1"),
        (["--block-max-iter", "-1"], "--block-max-iter -1 must be >= 1"),
        (["--landscape-points", "1"], "--landscape-points 1 must be >= 2"),
        (["--tol", "0"], "--tol 0 must be in (0, 1), e.g. 1e-3"),
        (["--tol", "2"], "--tol 2 must be in (0, 1), e.g. 1e-3"),
    ],
)
def test_bad_option_values_are_one_line_errors(flags, message, tmp_path, capsys):
    path = _tiny_mnist_model(tmp_path, 28)
    assert main(["analyze", str(path), *flags, "--no-track"]) == 2
    assert capsys.readouterr().err == f"vitbn analyze: error: {message}\n"
    assert not (tmp_path / "analysis").exists()


def test_not_a_checkpoint_and_a_dataset_that_does_not_fit_are_one_line_errors(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert main(["analyze", str(tmp_path / "other.pt"), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert err == (f"vitbn analyze: error: model file {tmp_path / 'other.pt'} is not a vitbn model (expected keys "
                   "'config' and 'state_dict')\n")  # fmt: skip
    (tmp_path / "text.pt").write_text("not a model")
    assert main(["analyze", str(tmp_path / "text.pt"), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitbn analyze: error: not a vitbn model file: {tmp_path / 'text.pt'} (")
    assert err.count("\n") == 1

    path = _tiny_mnist_model(tmp_path, 8)  # an 8x8 model whose file says it takes MNIST
    assert main(["analyze", str(path), "--quick", "--no-track"]) == 2
    assert capsys.readouterr().err == (
        "vitbn analyze: error: model 'vit' takes images of shape (1, 8, 8) (C, H, W) but dataset 'mnist' has "
        "(1, 28, 28); set model.channels / model.image_size\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "other.pt", "text.pt"]  # nothing written


def test_analyze_api_on_a_mean_pooled_parallel_model(tmp_path):
    from vitbn.analysis.run import AnalyzeOptions, analyze

    torch.manual_seed(0)
    config = ModelConfig.from_preset("vitbn", dim=8, depth=2, heads=2, dim_head=4, mlp_dim=8, pool="mean", parallel=2)
    model = build_model(config)
    data = prepare_data(DataConfig(dataset="mnist", train_subset=32, test_subset=3))
    options = AnalyzeOptions(images=32, max_iter=3, block_max_iter=2, attention_images=3, landscape_points=3)
    with pytest.warns(UserWarning, match="did not converge"):
        result = analyze(model, data, tmp_path, options)
    assert result["attention"]["class_token"] is False and result["attention"]["pooled"] == "mean token (no CLS)"
    assert list(result["active_fraction"]) == ["block1", "block2", "mean"]
    assert len(result["hessian"]["blocks"]) == 6 and result["images"] == 32
    with Image.open(tmp_path / "attention_heads.png") as image:
        assert image.size == figures.grid_pixels(2, 4)  # 2 stages x (2 branches x 2 heads)
    with Image.open(tmp_path / "attention.png") as image:
        assert image.size == figures.grid_pixels(3, 4)
    arrays = np.load(tmp_path / "attention.npz")
    assert arrays["maps"].shape == (3, 2, 4, 16, 16) and arrays["head_maps"].shape == (3, 2, 4, 4, 4)
    assert model.training  # left as it was
