"""Transfer learning: position-table resampling, the channel rule, the trainable parts, delta checkpoints, BN
statistics on the new data, the cost of a step, and the one-line refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tolerance import reduction_tol
from vitbn.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vitbn.data import prepare_data
from vitbn.engine import export_model, load_model
from vitbn.engine.adapt import adapt_model, resample_pos_embedding, resize_data
from vitbn.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint
from vitbn.engine.delta import changed_tensors, load_delta, read_delta, save_delta, tensor_bytes
from vitbn.engine.finetune import (
    PARTS,
    finetune,
    prepare_finetune,
    select_trainable,
    step_peak_memory,
    trainable_parameters,
)
from vitbn.engine.optim import build_optimizer
from vitbn.errors import UserError
from vitbn.models import build_model, create_model
from vitbn.tracking import MemoryTracker

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)
MNIST_SPEC = SimpleNamespace(name="mnist", classes=[str(k) for k in range(10)], mean=(0.1307,), std=(0.3081,))
DIGITS = dict(dataset="digits", train_subset=300, test_subset=100, val_size=50)


def base_file(path, preset="vit", **overrides):
    """A tiny MNIST-shaped model (28x28, patch 4: a 7x7 grid) exported with MNIST's input spec."""
    model = create_model(preset, **{**TINY, "patch_size": 4, **overrides})
    return export_model(model, path, MNIST_SPEC)


def run_config(tmp_path, run_name="ft", **train) -> RunConfig:
    train = {"epochs": 1, "batch_size": 50, "eval_batch_size": 100, "lr": 1e-3, "device": "cpu", "threads": 1,
             "max_steps_per_epoch": 3, "out_dir": str(tmp_path), **train}  # fmt: skip
    return RunConfig.from_dict({"data": DIGITS, "train": train, "track": {"enabled": False, "run_name": run_name}})


# --- position table ---------------------------------------------------------------------------------------------


def test_resample_is_the_identity_on_the_same_grid():
    pos = torch.randn(1 + 4 * 5, 8)
    out = resample_pos_embedding(pos, (4, 5), (4, 5), has_cls=True)
    assert torch.equal(out, pos) and out.data_ptr() != pos.data_ptr()


@pytest.mark.parametrize("has_cls", [True, False])
def test_a_linear_ramp_stays_a_ramp_and_the_cls_row_is_kept(has_cls):
    h, w, nh, nw = 4, 5, 9, 12
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    slopes = torch.tensor([[1.0, 2.0], [0.5, 3.0], [2.0, 0.25]], dtype=torch.float64)  # (D, 2): d/di, d/dj
    ramp = (i[..., None] * slopes[:, 0] + j[..., None] * slopes[:, 1] + 1.0).reshape(h * w, 3)  # (h*w, D)
    cls = torch.randn(int(has_cls), 3, dtype=torch.float64)
    out = resample_pos_embedding(torch.cat([cls, ramp]), (h, w), (nh, nw), has_cls=has_cls)
    assert out.shape == (int(has_cls) + nh * nw, 3) and out.dtype == torch.float64
    assert torch.equal(out[: int(has_cls)], cls)
    g = out[int(has_cls) :].reshape(nh, nw, 3)
    assert (g[1:] > g[:-1]).all() and (g[:, 1:] > g[:, :-1]).all()  # increasing along both axes
    # the grid is resampled in float32: 4 x 4 bicubic taps per value, and a difference of two values compared
    atol = 2 * reduction_tol(16)["rtol"] * float(ramp.abs().max())
    steps = g[:, 1:] - g[:, :-1]  # separable: every row has the same steps, every column too
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=0, atol=atol)
    torch.testing.assert_close(g[1:] - g[:-1], (g[1:] - g[:-1])[:, :1].expand(-1, nw, -1), rtol=0, atol=atol)
    # point-symmetric about the grid's centre, so the centre value (the mean of the ramp) is kept
    torch.testing.assert_close(g + g.flip(0, 1), (2 * ramp.mean(0)).expand_as(g), rtol=0, atol=atol)


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D cubic convolution (Keys, a = -0.75 as PyTorch and OpenCV), half-pixel centres
    (align_corners=False), edge samples repeated past the border."""

    def kernel(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        x = (o + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(x)
        for i in range(i0 - 1, i0 + 3):
            m[o, min(max(i, 0), n_in - 1)] += kernel(x - i)
    return m


def test_upsampling_is_bicubic_not_bilinear():
    h, w, nh, nw, d = 4, 5, 9, 12, 3
    pos = torch.randn(1 + h * w, d, dtype=torch.float64)
    out = resample_pos_embedding(pos, (h, w), (nh, nw), has_cls=True)
    grid = pos[1:].reshape(h, w, d)
    expected = torch.einsum("oh,hwd,pw->opd", _cubic_matrix(h, nh), grid, _cubic_matrix(w, nw))  # separable
    torch.testing.assert_close(out[1:].reshape(nh, nw, d), expected, rtol=1e-5, atol=1e-5)  # computed in float32
    bilinear = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=(nh, nw), mode="bilinear")
    assert (out[1:].reshape(nh, nw, d) - bilinear[0].permute(1, 2, 0)).abs().max() > 0.05  # tells the two apart


# --- the channel rule -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("embed_norm", ["layer", "batch", "dyt"])
def test_a_gray_image_gives_the_same_tokens_in_the_rgb_adapted_model(embed_norm):
    base = create_model("vit", **TINY, patch_size=4, embed_norm=embed_norm)
    with torch.no_grad():  # per-pixel affine and statistics that differ by pixel: the rule must carry them
        for t in base.to_patch_embedding.norm_in.state_dict().values():
            if t.is_floating_point() and t.numel() > 1:
                t.copy_(torch.rand_like(t) + 0.5)
    rgb, notes = adapt_model(base.eval(), num_classes=10, image_size=28, channels=3)
    assert rgb.config.channels == 3 and "from 1 to 3 channel(s)" in notes[0]
    gray = torch.rand(4, 1, 28, 28)
    rgb.eval()
    torch.testing.assert_close(rgb.to_patch_embedding(gray.repeat(1, 3, 1, 1)), base.to_patch_embedding(gray))
    torch.testing.assert_close(rgb(gray.repeat(1, 3, 1, 1)), base(gray))  # same head: the whole model agrees
    w, w3 = base.to_patch_embedding.proj.weight, rgb.to_patch_embedding.proj.weight  # (D, 16), (D, 48)
    assert torch.equal(w3.reshape(16, 16, 3)[:, :, 1], w / 3)  # (p1 p2 c) order: the weights repeated, / 3


def test_rgb_to_gray_sums_the_weights():
    base = create_model("vit", **TINY, patch_size=4, channels=3).eval()
    gray, _ = adapt_model(base, num_classes=10, image_size=28, channels=1)
    w3 = base.to_patch_embedding.proj.weight.reshape(16, 16, 3)
    assert torch.equal(gray.to_patch_embedding.proj.weight, w3.sum(-1))
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(gray.eval()(x), base(x.repeat(1, 3, 1, 1)))  # a fresh LayerNorm: same affine


def test_adapt_refuses_a_stem_channel_change_and_a_patch_that_does_not_divide():
    hmlp = create_model("vit", **TINY, patch_size=4, stem="hmlp")
    with pytest.raises(UserError, match=r"stem='hmlp' of model 'vit' takes 1-channel images, the data has 3"):
        adapt_model(hmlp, num_classes=10, image_size=28, channels=3)
    moved, notes = adapt_model(hmlp, num_classes=10, image_size=16, channels=1)  # another size: fine
    assert moved.to_patch_embedding.grid == (4, 4) and "from 7x7 to 4x4" in notes[0]
    seven = create_model("vit", **TINY, patch_size=7)
    with pytest.raises(UserError, match=r"patch size 7x7 of model 'vit' does not divide the image size 8x8.*14 or 28"):
        adapt_model(seven, num_classes=10, image_size=8, channels=1)


def test_a_new_head_is_zero_and_an_unchanged_one_is_kept():
    base = create_model("vit", **TINY, patch_size=4)
    new, notes = adapt_model(base, num_classes=3, image_size=28, channels=1)
    assert new.mlp_head.weight.shape == (3, 16) and not new.mlp_head.weight.any() and not new.mlp_head.bias.any()
    assert notes == ["new head: 10 -> 3 classes (zero-initialized)"]
    same, notes = adapt_model(base, num_classes=10, image_size=28, channels=1)
    assert notes == [] and all(torch.equal(v, base.state_dict()[k]) for k, v in same.state_dict().items())


# --- what trains ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [1, 2])
def test_select_trainable_counts_and_the_optimizer_sees_only_those(parallel):
    model = build_model(ModelConfig.from_preset("vitbn", **{**TINY, "depth": 2}, parallel=parallel))
    counts = {}
    for part in PARTS:
        counts[part] = select_trainable(model, part)
        chosen = trainable_parameters(model, part)
        assert counts[part] == sum(p.numel() for p in chosen.values())
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(chosen)
        optimized = {id(p) for g in build_optimizer(model, TrainConfig()).param_groups for p in g["params"]}
        assert optimized == {id(p) for p in chosen.values()}
        assert {"mlp_head.weight", "mlp_head.bias"} <= set(chosen)
        names = set(chosen) - {"mlp_head.weight", "mlp_head.bias"}
        if part == "attn":
            assert names and all(".attn.to_qkv." in n or ".attn.to_out." in n for n in names)
        elif part == "ffn":
            assert names and all(any(f".ff.{m}" in n for m in ("fc1", "fc2", "inner_norm")) for n in names)
        elif part == "norm":
            assert "to_patch_embedding.norm_in.bn.weight" in names and "transformer.norm.bn.bias" in names
            assert not any(".to_qkv." in n or ".fc1." in n or n == "pos_embedding" for n in names)
        elif part == "head":
            assert names == set()
    assert counts["all"] == sum(p.numel() for p in model.parameters())
    assert counts["head"] < counts["attn"] < counts["all"] and counts["ffn"] < counts["all"]
    select_trainable(model, "attn", pos_embedding=True)
    assert model.pos_embedding.requires_grad and not model.cls_token.requires_grad
    with pytest.raises(UserError, match=r"part='mlp' is not one of 'all', 'attn'"):
        select_trainable(model, "mlp")


def test_step_peak_memory_is_measured_and_attn_only_needs_less(tmp_path):
    model = create_model("vit", **TINY, patch_size=4)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    peaks = {}
    for part in ("all", "attn"):
        select_trainable(model, part)
        peaks[part], method = step_peak_memory(model, x, y, TrainConfig(), torch.device("cpu"))
    assert method.startswith("torch.profiler tensor allocations")
    assert 0 < peaks["attn"] < peaks["all"]
    assert peaks["attn"] > tensor_bytes(model.state_dict()) / 2**20  # the resident model is counted


# --- a fine-tuning run, its delta ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attn_run(tmp_path_factory):
    """A tiny MNIST-shaped ViT fine-tuned attention-only on 300 digits (8x8: the 7x7 grid becomes 2x2)."""
    tmp = tmp_path_factory.mktemp("ft")
    base = base_file(tmp / "base.pt")
    tracker = MemoryTracker()
    result = finetune(base, run_config(tmp), part="attn", tracker=tracker, progress="none")
    return SimpleNamespace(base=base, result=result, tracker=tracker, tmp=tmp)


def test_attn_only_trains_only_the_attention_head_and_resampled_positions(attn_run):
    result, base = attn_run.result, torch.load(attn_run.base, weights_only=True)["state_dict"]
    assert result.status == "finished" and result.part == "attn"
    assert result.notes == ["position table resampled (bicubic) from 7x7 to 2x2 patches"]  # digits keep 0-9's head
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained == {
        "transformer.layers.0.attn.to_qkv.weight",
        "transformer.layers.0.attn.to_out.weight",
        "transformer.layers.0.attn.to_out.bias",
        "mlp_head.weight",
        "mlp_head.bias",
        "pos_embedding",
    }
    state = {k: v.cpu() for k, v in result.model.state_dict().items()}
    for name in state:
        if name in trained:
            assert name == "pos_embedding" or not torch.equal(state[name], base[name]), name
        else:
            assert torch.equal(state[name], base[name]), name  # frozen: bit-identical to the base
    final = result.final
    assert final["finetune/trainable_params"] == sum(state[n].numel() for n in trained)
    assert final["finetune/total_params"] == sum(p.numel() for p in result.model.parameters())
    assert final["finetune/trainable_params"] < final["finetune/total_params"]
    assert final["finetune/peak_step_memory_mb"] > 0 and final["finetune/step_time_ms"] > 0


def test_the_run_logs_the_measurements(attn_run):
    run, final = attn_run.tracker.run, attn_run.result.final
    assert run.status == "FINISHED" and run.tags["vitbn.status"] == "finished"
    for key in ("trainable_params", "total_params", "peak_step_memory_mb", "step_time_ms", "full_mb", "delta_mb"):
        assert run.metric(f"finetune/{key}") == [pytest.approx(final[f"finetune/{key}"])], key
    assert run.params["finetune.part"] == "attn" and run.params["finetune.base"] == str(attn_run.base)
    assert run.params["finetune.memory_method"].startswith("torch.profiler tensor allocations")
    assert run.params["model.image_size"] == "8" and run.params["data.dataset"] == "digits"
    assert (attn_run.result.delta_path, "model") in run.artifacts


def test_the_delta_holds_the_changed_tensors_and_rebuilds_the_model_exactly(attn_run):
    result = attn_run.result
    saved = read_delta(result.delta_path)
    base = torch.load(attn_run.base, weights_only=True)["state_dict"]
    state = {k: v.cpu() for k, v in result.model.state_dict().items()}
    assert set(saved["delta"]) == {
        k for k in state if not torch.equal(state[k], base[k]) or state[k].shape != base[k].shape
    }
    assert set(saved["delta"]) == {n for n, p in result.model.named_parameters() if p.requires_grad}  # a LN model
    assert saved["data"]["dataset"] == "digits" and saved["base"]["name"] == f"{attn_run.tmp.name}/base.pt"
    assert result.final["finetune/delta_mb"] == tensor_bytes(saved["delta"]) / 2**20 < result.final["finetune/full_mb"]
    rebuilt = load_delta(result.delta_path, attn_run.base)
    assert not rebuilt.training and rebuilt.config == result.model.config
    back = rebuilt.state_dict()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    exported = load_model(result.out_dir / "model.pt").state_dict()
    assert all(torch.equal(exported[k], state[k]) for k in state)


def test_load_delta_wants_the_base_it_was_made_from(attn_run, tmp_path):
    delta = attn_run.result.delta_path
    other = base_file(tmp_path / "other.pt")
    with pytest.raises(UserError) as err:
        load_delta(delta, other)
    sha = read_delta(delta)["base"]["sha256"]
    assert str(err.value).startswith(
        f"delta {delta} was made from base {attn_run.tmp.name}/base.pt with sha256 {sha}, "
    )
    assert str(err.value).endswith(": pass the base it was made from") and "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"^base model .*missing.pt does not exist \(delta .* was made from "):
        load_delta(delta, tmp_path / "missing.pt")
    with pytest.raises(UserError, match=r"^delta file .*nope.pt does not exist$"):
        load_delta(tmp_path / "nope.pt", attn_run.base)
    with pytest.raises(UserError, match=r"is not a vitbn delta checkpoint"):
        load_delta(attn_run.base, attn_run.base)
    with pytest.raises(UserError, match=r"is a fine-tuning delta of .*base.pt, not a whole model: .* --base BASE"):
        load_model(delta)


def test_save_delta_of_an_unchanged_model_is_empty(tmp_path):
    path = base_file(tmp_path / "base.pt")
    delta = save_delta(load_model(path), path, tmp_path / "delta.pt")
    assert delta == {} and changed_tensors({"a": torch.ones(2)}, {"a": torch.ones(3)}).keys() == {"a"}
    assert load_delta(tmp_path / "delta.pt", path).state_dict().keys() == load_model(path).state_dict().keys()


# --- BatchNorm statistics, image size ---------------------------------------------------------------------------------


def _bn_buffers(model) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in model.state_dict().items() if "running_" in k}


def _population_stats(model, data, train: TrainConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every token BatchNorm's input over the fine-tuning data's training batches (the batches the engine draws
    for precise BN, the model in training mode: earlier BatchNorms on batch statistics), all rows together:
    {module name: (mean, unbiased variance)} in float64, computed directly from the concatenated rows."""
    import copy

    from vitbn.data import InMemoryLoader
    from vitbn.models.norms import TokenBatchNorm

    model = copy.deepcopy(model).train()
    rows: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, TokenBatchNorm):

            def keep(module, args, name=name):
                rows.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))  # (B, N, D) -> (B*N, D)

            module.register_forward_pre_hook(keep)
    loader = InMemoryLoader(data.train, batch_size=train.batch_size, shuffle=True, seed=train.seed + 1,
                            max_batches=train.precise_bn_batches, mean=data.info.mean, std=data.info.std)  # fmt: skip
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    out = {}
    for name, parts in rows.items():
        x = torch.cat(parts).double()  # (all images * tokens, D)
        out[name] = (x.mean(0), x.var(0, unbiased=True))
    return out


def test_bn_statistics_are_re_estimated_on_the_new_data_before_the_first_step(tmp_path):
    path = base_file(tmp_path / "bn.pt", "vitbn")
    base = _bn_buffers(load_model(path))
    config = run_config(tmp_path)
    fresh = prepare_finetune(path, config, part="attn", precise_bn=True)
    population = _population_stats(fresh.model, fresh.data, config.train)
    assert len(population) == 5  # vitbn at depth 1: the embedding's two, attention, feed-forward, inner
    after = _bn_buffers(fresh.model)
    assert len(after) == 2 * len(population)  # every BatchNorm's mean and variance checked
    for name, (mean, var) in population.items():
        torch.testing.assert_close(after[f"{name}.bn.running_mean"], mean.float(), msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(after[f"{name}.bn.running_var"], var.float(), msg=lambda m, n=name: f"{n}: {m}")
        assert not torch.allclose(after[f"{name}.bn.running_mean"], base[f"{name}.bn.running_mean"])
    assert "BatchNorm statistics re-estimated on 5 batch(es) of digits" in fresh.notes  # 250 images / 50
    kept = _bn_buffers(prepare_finetune(path, config, part="attn", precise_bn=False).model)
    assert all(torch.equal(kept[k], base[k]) for k in kept if kept[k].shape == base[k].shape)


def test_image_size_resizes_the_data_once(tmp_path):
    data = prepare_data(DataConfig(**DIGITS))
    big = resize_data(data, 28)
    assert big.train.images.shape == (250, 1, 28, 28) and big.val.images.shape[1:] == (1, 28, 28)
    assert big.info.shape == (1, 28, 28) and big.info.mean == data.info.mean and big.train.images.dtype == torch.uint8
    assert torch.equal(big.train.labels, data.train.labels)
    path = export_model(create_model("vit", **TINY), tmp_path / "p7.pt", MNIST_SPEC)  # patch 7
    with pytest.raises(UserError, match=r"does not divide the image size 8x8: .*--image-size 14 or 28"):
        prepare_finetune(path, run_config(tmp_path), part="head")
    setup = prepare_finetune(path, run_config(tmp_path), part="head", image_size=28)
    assert setup.model.config.image_size == 28 and setup.data.info.shape == (1, 28, 28) and setup.notes == []
    assert setup.metrics["finetune/trainable_params"] == 16 * 10 + 10  # the head alone


def test_what_is_not_a_vitbn_model_is_refused(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "timm.pth")
    torch.save({"config": {"arch": "resnet50"}, "state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "rn.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(UserError, match=r"timm.pth is not a vitbn model \(expected keys 'config' and 'state_dict'\)"):
        finetune(tmp_path / "timm.pth", run_config(tmp_path), part="attn")
    with pytest.raises(UserError, match=r"rn.pt does not match its config: unknown ModelConfig field\(s\) \['arch'\]"):
        finetune(tmp_path / "rn.pt", run_config(tmp_path), part="attn")
    with pytest.raises(UserError, match=r"not a vitbn model file: .*text.pt"):
        load_model(tmp_path / "text.pt")
    tracker = MemoryTracker()
    parent = tracker.start_run("sweep")
    result = finetune(base_file(tmp_path / "b.pt"), run_config(tmp_path, "ckpt", max_steps_per_epoch=1), part="head",
                      tracker=tracker, parent_run_id=parent, progress="none")  # fmt: skip
    child = tracker.runs[result.run_id]  # a nested run, reopened and closed for the delta; the parent goes on
    assert child.parent_id == parent and child.status == "FINISHED" and child.metric("finetune/delta_mb")
    assert tracker.stack == [parent]
    load_checkpoint(result.out_dir / CHECKPOINT_NAME)  # a training checkpoint is not a model file
    with pytest.raises(UserError, match=r"checkpoint.pt is not a vitbn model"):
        finetune(result.out_dir / CHECKPOINT_NAME, run_config(tmp_path), part="attn")
