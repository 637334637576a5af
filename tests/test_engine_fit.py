"""fit(): the numbers it reports against a manual loop, resume, divergence, compile fallback, options."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tolerance import reduction_tol
from vitbn.config import DataConfig, ModelConfig, RunConfig, flatten
from vitbn.data import InMemoryLoader, prepare_data
from vitbn.engine import evaluate, export_model, fit, load_model, seed_everything
from vitbn.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint
from vitbn.errors import UserError
from vitbn.models import attention, build_model
from vitbn.tracking import MemoryTracker

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)
DATA = dict(train_subset=200, test_subset=100, val_size=40)


@pytest.fixture(scope="module")
def data():
    return prepare_data(DataConfig(**DATA))  # real MNIST from $VITBN_DATA (tests/conftest.py)


def make_config(tmp_path, model="vitbn", run_name="run", **train) -> RunConfig:
    train = {"epochs": 1, "batch_size": 40, "eval_batch_size": 64, "lr": 1e-3, "device": "cpu", "threads": 1,
             "out_dir": str(tmp_path), **train}  # fmt: skip
    return RunConfig.from_dict({"model": {"name": model, **TINY}, "data": DATA, "train": train,
                                "track": {"enabled": False, "run_name": run_name}})  # fmt: skip


def manual_run(cfg: RunConfig, data) -> tuple[torch.nn.Module, float, float]:
    """A plain loop with the same seed, data order and optimizer: the reference for fit's numbers."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)  # as the engine does on CPU
    loader = InMemoryLoader(data.train, batch_size=cfg.train.batch_size, mean=data.info.mean, std=data.info.std,
                            shuffle=True, seed=cfg.train.seed, max_batches=cfg.train.max_steps_per_epoch)  # fmt: skip
    loader.set_epoch(1)
    losses, correct, seen = [], 0, 0
    model.train()
    for x, y in loader:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(y)
    return model, sum(losses) / len(losses), correct / seen


def test_fit_reports_the_numbers_of_a_manual_loop(tmp_path, data):
    cfg = make_config(tmp_path, max_steps_per_epoch=3, lr=1e-2)  # 3 steps at 1e-2: a model that names 4 classes
    tracker = MemoryTracker()
    result = fit(cfg, tracker=tracker, data=data, progress="none")
    assert result.status == "finished"
    model, mean_loss, acc = manual_run(cfg, data)
    (record,) = result.history
    # the mean over batches, not over images: a float32 total here, a float64 one in the manual loop
    torch.testing.assert_close(record["train/loss"], mean_loss, **reduction_tol(3))
    assert record["train/acc"] == acc and record["epoch"] == 1
    torch.testing.assert_close(result.model.state_dict(), model.state_dict())
    model.eval()
    for split in ("val", "test"):
        loader = InMemoryLoader(getattr(data, split), batch_size=1000, mean=data.info.mean, std=data.info.std)
        x, y = next(iter(loader))
        with torch.no_grad():
            logits = model(x)
        # batches of 64 summed in float32 against one mean over the whole split
        torch.testing.assert_close(record[f"{split}/loss"], F.cross_entropy(logits, y).item(), **reduction_tol(len(y)))
        pred = logits.argmax(-1)
        assert record[f"{split}/acc"] == (pred == y).sum().item() / len(y)
        # per class: images of class k named k / images of class k, counted exactly (NaN for a class absent here)
        per_class = [int((pred[y == k] == k).sum()) / int((y == k).sum()) if (y == k).any() else math.nan
                     for k in range(10)]  # fmt: skip
        assert any(0 < a < 1 for a in per_class) and len(pred.unique()) >= 3  # not a model that names one class
        assert [record[f"{split}/acc_class_{k}"] for k in range(10)] == pytest.approx(per_class, nan_ok=True, abs=0)
    assert record["time/eval_epoch_s"] == record["time/val_epoch_s"] + record["time/test_epoch_s"]
    torch.testing.assert_close(record["throughput/train_img_s"], 3 * 40 / record["time/train_epoch_s"])
    assert record["lr"] == 1e-2
    # what the tracker got equals the history
    run = tracker.run
    for key, value in record.items():
        if key != "epoch":
            assert run.metrics[key] == [(1, value)], key
    assert run.params["train.lr"] == "0.01" and "train.resume" not in run.params
    assert set(flatten(cfg.to_dict())) - {"train.resume"} <= set(run.params)
    assert int(run.params["model.num_params"]) == sum(p.numel() for p in model.parameters())
    assert int(run.params["model.flops_per_image"]) > 0
    assert run.status == "FINISHED" and run.tags["vitbn.status"] == "finished"
    assert {p.name for p, _ in run.artifacts} == {"config.yaml", "history.json", "history.csv", "model.pt", "best.pt"}


def test_resume_gives_the_numbers_of_an_uninterrupted_run(tmp_path, data):
    # dropout (RNG), BatchNorm (running stats), a cosine schedule and Adam state must all be restored
    def config(name, **kw):
        cfg = make_config(
            tmp_path, run_name=name, epochs=3, schedule="cosine", warmup_epochs=1, max_steps_per_epoch=2, **kw
        )
        cfg.model.dropout = 0.1
        return cfg

    whole = fit(config("whole"), tracker=MemoryTracker(), data=data, progress="none")

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    tracker = MemoryTracker()
    killed = fit(config("parts"), tracker=tracker, data=data, on_epoch=stop_after_two, progress="none")
    assert killed.status == "killed" and len(killed.history) == 2
    assert tracker.run.status == "KILLED" and tracker.run.tags["vitbn.status"] == "killed"
    assert load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)["epoch"] == 2
    resumed = fit(config("parts", resume=True), tracker=tracker, data=data, progress="none")
    assert resumed.status == "finished" and resumed.run_id == killed.run_id
    assert tracker.run.status == "FINISHED" and len(tracker.runs) == 1
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    torch.testing.assert_close(resumed.final, whole.final, rtol=0, atol=0)
    torch.testing.assert_close(resumed.model.state_dict(), whole.model.state_dict(), rtol=0, atol=0)
    strip = [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in whole.history]
    assert tracker.run.metric("train/loss") == [r["train/loss"] for r in whole.history]


def test_auto_attention_is_tagged_checkpointed_and_kept_by_a_resumed_run(tmp_path, data, monkeypatch):
    """attn_impl="auto" (chosen here by a fake measurement): the choices are tagged on the run and kept in the
    checkpoint; resumed in a fresh process (the cache emptied) where the measurement now prefers the other path,
    the run takes the checkpoint's path and ends with the numbers of an uninterrupted run on it, bit for bit."""
    faster = {"path": "plain"}
    monkeypatch.delenv(attention.AUTO_ENV, raising=False)
    monkeypatch.setattr(attention, "_CHOICES", {})
    monkeypatch.setattr(
        attention, "measure_paths", lambda calls, device: {p: 1.0 + (p != faster["path"]) for p in calls}
    )

    def config(name, impl="auto", **kw):
        cfg = make_config(tmp_path, run_name=name, epochs=2, max_steps_per_epoch=2, **kw)
        cfg.model.attn_impl = impl
        return cfg

    whole = fit(config("whole", impl="plain"), tracker=MemoryTracker(), data=data, progress="none")

    def stop_after_one(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    tracker = MemoryTracker()
    fit(config("parts"), tracker=tracker, data=data, on_epoch=stop_after_one, progress="none")
    tagged = json.loads(tracker.run.tags["vitbn.attn_choices"])
    assert tagged["cpu float32 1x40x2x17x8 grad"] == "plain"  # training: batch 40, grad mode
    assert tagged["cpu float32 1x40x2x17x8 no_grad"] == "plain"  # validation: 40 images
    assert set(tagged.values()) == {"plain"}
    assert load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)["attn_choices"] == tagged
    attention.clear_attention_choices()
    faster["path"] = "fused"
    resumed = fit(config("parts", resume=True), tracker=tracker, data=data, progress="none")
    assert json.loads(tracker.run.tags["vitbn.attn_choices"])["cpu float32 1x40x2x17x8 grad"] == "plain"
    torch.testing.assert_close(resumed.model.state_dict(), whole.model.state_dict(), rtol=0, atol=0)
    assert [r["train/loss"] for r in resumed.history] == [r["train/loss"] for r in whole.history]


def test_a_compiled_models_auto_attention_is_tagged_as_the_captured_path():
    from types import SimpleNamespace

    from vitbn.engine.runlog import ATTN_TAG, log_attention_choices

    tracker = MemoryTracker()
    tracker.start_run("r")
    model = build_model(ModelConfig.from_preset("vitbn", **TINY))  # attn_impl="auto"
    run = SimpleNamespace(model=model, net=SimpleNamespace(compiled=True), tracker=tracker, attn_choices={},
                          attn_tagged={})  # fmt: skip
    log_attention_choices(run)
    assert json.loads(tracker.run.tags[ATTN_TAG]) == {"torch.compile": "plain"}  # a training graph on the CPU
    assert run.attn_choices == {}  # nothing for a checkpoint to load: a captured graph's path is fixed


def test_extending_a_finished_run(tmp_path, data):
    whole = fit(make_config(tmp_path, run_name="w", epochs=2, max_steps_per_epoch=2), tracker=MemoryTracker(),
                data=data, progress="none")  # fmt: skip
    fit(make_config(tmp_path, run_name="e", max_steps_per_epoch=2), tracker=MemoryTracker(), data=data, progress="none")
    more = fit(make_config(tmp_path, run_name="e", epochs=2, max_steps_per_epoch=2, resume=True),
               tracker=MemoryTracker(), data=data, progress="none")  # fmt: skip
    torch.testing.assert_close(more.model.state_dict(), whole.model.state_dict(), rtol=0, atol=0)


def test_extending_a_cosine_run_rescales_the_schedule_to_the_new_total(tmp_path, data):
    # 160 training images / batch 40 = 4 steps an epoch: 2 epochs end the cosine at lr 0; 2 more must not stay there
    cosine = dict(schedule="cosine", lr=1e-3)
    whole = fit(make_config(tmp_path, run_name="w", epochs=4, **cosine), tracker=MemoryTracker(), data=data,
                progress="none")  # fmt: skip
    fit(make_config(tmp_path, run_name="e", epochs=2, **cosine), tracker=MemoryTracker(), data=data, progress="none")
    with pytest.warns(UserWarning, match=r"lr schedule rescaled from 8 to 16 total steps .*at step 8 the lr factor "
                      r"is now 0\.5"):  # fmt: skip
        more = fit(make_config(tmp_path, run_name="e", epochs=4, resume=True, **cosine), tracker=MemoryTracker(),
                   data=data, progress="none")  # fmt: skip
    lrs = [r["lr"] for r in more.history]
    assert lrs[1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))  # the old run's last step
    assert lrs[2:] == pytest.approx([r["lr"] for r in whole.history][2:]) and min(lrs[2:]) > 0
    assert lrs[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 11 / 16)))


def test_an_absurd_learning_rate_diverges_without_raising(tmp_path, data):
    tracker = MemoryTracker()
    result = fit(make_config(tmp_path, epochs=3, optimizer="sgd", lr=1e6), tracker=tracker, data=data, progress="none")
    assert result.status == "diverged"
    assert len(result.history) == 1 and math.isnan(result.history[0]["train/loss"])
    assert math.isnan(tracker.run.metric("train/loss")[0])
    assert tracker.run.status == "FAILED" and tracker.run.tags["vitbn.status"] == "diverged"
    assert not (tmp_path / "run" / "model.pt").exists()


def test_run_folder_rules(tmp_path, data):
    with pytest.raises(UserError, match="resume needs the name of the run"):
        fit(make_config(tmp_path, run_name=None, resume=True), tracker=MemoryTracker(), data=data)
    fit(make_config(tmp_path, max_steps_per_epoch=1), tracker=MemoryTracker(), data=data, progress="none")
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        fit(make_config(tmp_path, max_steps_per_epoch=1), tracker=MemoryTracker(), data=data)


def test_precision_options(tmp_path, data):
    with pytest.raises(UserError, match="precision='fp16' needs a CUDA device"):
        fit(make_config(tmp_path, precision="fp16"), tracker=MemoryTracker(), data=data)
    runs = {p: fit(make_config(tmp_path, run_name=p, precision=p, max_steps_per_epoch=2), tracker=MemoryTracker(),
                   data=data, progress="none") for p in ("fp32", "bf16")}  # fmt: skip
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16.status == "finished"
    # bf16 autocast keeps 8 significant bits: the losses of the same 2 steps and evaluations agree to about one bf16
    # epsilon (2**-7) of their size, and differ from fp32's (bf16 was really used, in training and in evaluation).
    for key in ("train/loss", "val/loss", "test/loss"):
        assert bf16.final[key] == pytest.approx(fp32.final[key], rel=torch.finfo(torch.bfloat16).eps), key
        assert bf16.final[key] != fp32.final[key], key


def test_compile_failure_falls_back_to_eager(tmp_path, data, monkeypatch):
    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            raise RuntimeError("compiler exploded")

    monkeypatch.setattr(torch, "compile", Broken)
    with pytest.warns(UserWarning) as caught:
        result = fit(make_config(tmp_path, compile=True, max_steps_per_epoch=2), tracker=MemoryTracker(), data=data,
                     progress="none")  # fmt: skip
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    # one module trains and evaluates: its fallback is decided, and said, once
    assert messages == ["torch.compile failed in train (compiler exploded); using the eager model"]
    assert result.status == "finished"
    eager = fit(make_config(tmp_path, run_name="eager", max_steps_per_epoch=2), tracker=MemoryTracker(), data=data,
                progress="none")  # fmt: skip
    torch.testing.assert_close(result.final, eager.final, rtol=0, atol=0)


def test_compiled_falls_back_per_stage_and_only_on_the_first_call(monkeypatch):
    from vitbn.engine.compiled import Compiled

    class EvalBroken(torch.nn.Module):  # a "compiled" module that works in training and fails in eval mode
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            if not self.training:
                raise RuntimeError("no eval graph")
            return self._orig_mod(x) + 1

    monkeypatch.setattr(torch, "compile", EvalBroken)
    eager = torch.nn.Identity()
    wrapped = Compiled(eager, compile=True)
    x = torch.zeros(2)
    assert wrapped.compiled and wrapped.run("train", lambda m, v: m(v), x).tolist() == [1.0, 1.0]
    wrapped.module.eval()
    with pytest.warns(UserWarning, match=r"torch.compile failed in evaluation \(no eval graph\); using the eager"):
        assert wrapped.run("evaluation", lambda m, v: m(v), x).tolist() == [0.0, 0.0]
    assert not wrapped.compiled and wrapped.module is eager  # for good, both stages
    assert wrapped.run("train", lambda m, v: m(v), x).tolist() == [0.0, 0.0]
    # a stage that ran compiled once is not guarded again: a later error surfaces
    again = Compiled(torch.nn.Identity(), compile=True)
    again.run("train", lambda m, v: m(v), x)
    with pytest.raises(ValueError, match="a real bug"):
        again.run("train", lambda m, v: (_ for _ in ()).throw(ValueError("a real bug")), x)
    assert Compiled(eager, compile=False).module is eager


def test_precise_bn_runs_before_each_evaluation(tmp_path, data, monkeypatch):
    import vitbn.bn

    calls = []
    monkeypatch.setattr(vitbn.bn, "recompute_bn_stats", lambda model, batches, n: calls.append((model, n)))
    result = fit(make_config(tmp_path, epochs=2, precise_bn=True, precise_bn_batches=3, max_steps_per_epoch=1),
                 tracker=MemoryTracker(), data=data, progress="none")  # fmt: skip
    assert [n for _, n in calls] == [3, 3] and calls[0][0] is result.model
    assert all("time/precise_bn_s" in r for r in result.history)


def test_test_set_only_at_the_end(tmp_path, data):
    cfg = make_config(tmp_path, epochs=2, max_steps_per_epoch=1)
    cfg.data.test_every_epoch = False
    tracker = MemoryTracker()
    result = fit(cfg, tracker=tracker, data=data, progress="none")
    assert not any(k.startswith("test/") for r in result.history for k in r)
    assert "val/acc" in result.history[-1]
    assert tracker.run.metrics["test/acc"] == [(2, result.final["test/acc"])]


def test_evaluate_and_model_export(tmp_path, data):
    model = build_model(make_config(tmp_path).model).eval()
    loader = InMemoryLoader(data.test, batch_size=30, mean=data.info.mean, std=data.info.std)
    out = evaluate(model, loader)
    x, y = next(iter(InMemoryLoader(data.test, batch_size=1000, mean=data.info.mean, std=data.info.std)))
    with torch.no_grad():
        pred = model(x).argmax(-1)
    expected = torch.zeros(10, 10, dtype=torch.long)
    for t, p in zip(y.tolist(), pred.tolist()):
        expected[t, p] += 1
    assert torch.equal(out["confusion"], expected) and out["num_samples"] == 100
    assert out["acc"] == (pred == y).sum().item() / len(y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(model(x), y).item(), **reduction_tol(len(y)))
    path = export_model(model, tmp_path / "m.pt")
    loaded = load_model(path)
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(UserError, match="model file .*nope.pt does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"^not a vitbn model file: .*bad.pt \(it holds no PyTorch weights\)$"):
        load_model(tmp_path / "bad.pt")
