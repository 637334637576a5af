"""End to end on real MNIST subsets: a tiny lr-sweep and a tiny tuning in a temporary SQLite MLflow store, their
resume behaviour, and the report built from the tracked runs."""

from __future__ import annotations

import json

import pytest

from vitbn.cli import main
from vitbn.experiments.hpo import OBJECTIVE, ax_client_class, fit_model, run_tuning
from vitbn.experiments.lr_sweep import run_lr_sweep
from vitbn.experiments.presets import ExperimentPreset, ModelSpec, write_preset_yaml
from vitbn.experiments.runs import child_runs, mlflow_client
from vitbn.report import build_report

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
DIVERGING_LR = 1e30  # Adam steps of this size overflow the weights at once: a non-finite loss


def tiny_preset(tmp_path, name: str, models: list[ModelSpec], **run) -> ExperimentPreset:
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    # The experiment is made here so that its artifacts go to tmp_path (MLflow's default is ./mlruns in the cwd).
    mlflow_client(uri).create_experiment("test", artifact_location=(tmp_path / "artifacts").as_uri())
    base = {
        "data": {"train_subset": 300, "test_subset": 200},
        "train": {"epochs": 3, "batch_size": 50, "eval_batch_size": 200, "max_steps_per_epoch": 3, "device": "cpu",
                  "out_dir": str(tmp_path / "runs")},
        "track": {"tracking_uri": uri, "experiment": "test"},
    }  # fmt: skip
    for section, values in run.items():
        base[section] = {**base.get(section, {}), **values}
    return ExperimentPreset(name=name, description="tiny", models=models, lrs=[1e-3, DIVERGING_LR], seeds=[0], run=base)


def children(client, parent_id: str) -> list:
    return child_runs(client, parent_id, client.get_run(parent_id).info.experiment_id)


def test_lr_sweep_runs_resumes_and_reports(tmp_path, tiny_overrides):
    tiny = {k: v for k, v in tiny_overrides.items() if k != "depth"}
    models = [ModelSpec("vit", 2, tiny), ModelSpec("vitbnffn", 1, tiny), ModelSpec("vitbn", 1, tiny)]
    preset = tiny_preset(tmp_path, "tiny", models)
    result = run_lr_sweep(preset, progress="none")
    assert [r.action for r in result.results] == ["new"] * 6
    assert [r.status for r in result.results] == ["finished"] * 3 + ["diverged"] * 3  # models innermost

    client = mlflow_client(preset.run["track"]["tracking_uri"])
    parent = client.get_run(result.parent_id)
    assert (parent.info.run_name, parent.info.status) == ("tiny", "FINISHED")
    assert parent.data.tags["vitbn.kind"] == "lr-sweep" and parent.data.tags["vitbn.preset"] == "tiny"
    runs = children(client, result.parent_id)
    assert len(runs) == 6
    by_key = {(r.data.tags["vitbn.label"], float(r.data.tags["vitbn.lr"])): r for r in runs}
    ok, bad = by_key[("vitbn-d1", 1e-3)], by_key[("vitbn-d1", DIVERGING_LR)]
    assert (ok.info.status, ok.data.tags["vitbn.status"]) == ("FINISHED", "finished")
    assert (bad.info.status, bad.data.tags["vitbn.status"]) == ("FAILED", "diverged")
    assert ok.data.params["model.depth"] == "1" and ok.data.params["model.dim"] == "16"
    assert ok.data.params["train.lr"] == "0.001" and ok.data.tags["vitbn.model"] == "vitbn"
    assert [m.step for m in client.get_metric_history(ok.info.run_id, "test/acc")] == [1, 2, 3]

    # A child interrupted after its last checkpoint is resumed (same run), the others are not repeated.
    client.set_terminated(ok.info.run_id, "KILLED")
    again = run_lr_sweep(preset, progress="none")
    assert sorted(r.action for r in again.results) == ["done"] * 5 + ["resume"]
    assert again.parent_id == result.parent_id
    assert client.get_run(ok.info.run_id).info.status == "FINISHED"

    # The same command from the CLI: a re-run finds the parent, trains nothing, and builds the report.
    yaml_path = tmp_path / "tiny.yaml"
    write_preset_yaml(preset, yaml_path)
    assert main(["experiment", "lr-sweep", "--config", str(yaml_path), "--progress", "none",
                 "--report-dir", str(tmp_path / "report")]) == 0  # fmt: skip
    assert sorted(r.info.run_id for r in children(client, result.parent_id)) == sorted(r.info.run_id for r in runs)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| setting | model | depth | seeds | diverged | batch | final acc |" in md
    assert "| r_t | g_t | r_v | g_v | FLOPs ratio |" in md
    assert "ViTBN (depth 1) trains" in md  # depth-1 BN against the depth-2 ViT
    assert (tmp_path / "report" / "report.html").read_text().count("data:image/png;base64,") == 5
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["acc_vs_time_lr0.001.png", "acc_vs_time_lr1e30.png", "epochs_lr0.001.png", "epochs_lr1e30.png",
                    "time_vs_lr.png"]  # fmt: skip
    logged = {a.path for a in client.list_artifacts(result.parent_id, "report")}
    assert {"report/report.md", "report/report.html", "report/time_vs_lr.png", "report/data.json"} <= logged
    commit = client.get_run(ok.info.run_id).data.tags["git_commit"][:7]
    assert f"Made by `vitbn experiment lr-sweep --config {yaml_path}" in md
    assert f"The 6 runs trained at commit {commit} on " in md
    # Rendered again from its data.json alone, the MLflow store gone: the same tables.
    (tmp_path / "mlruns.db").rename(tmp_path / "moved.db")
    assert main(["report", "--from", str(tmp_path / "report" / "data.json"), "--out", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "report.md").read_text()
    table = md[md.index("| setting |") : md.index("Accuracy and times")]
    assert table in again and "Rendered again from data.json by `vitbn report --from" in again


def test_tuning_interrupted_then_resumed(tmp_path, tiny_overrides):
    tiny = {k: v for k, v in tiny_overrides.items() if k != "depth"}
    # Learning rates from 1e-4 (nothing learned in one epoch) to 3e-2 (a third of the digits right): the trials reach
    # different accuracies, so the Gaussian process has a signal and its prediction, not a raw value, is the best.
    hpo = {"trials": 6, "sobol_trials": 4, "epochs": 1, "lr_min": 1e-4, "lr_max": 3e-2, "batch_min": 20,
           "batch_max": 60}  # fmt: skip
    preset = tiny_preset(tmp_path, "tiny-tune", [ModelSpec("vitbn", 1, tiny)], data={"val_size": 100,
                         "train_subset": 1000}, train={"max_steps_per_epoch": None}, hpo=hpo)  # fmt: skip
    preset.final_epochs = 2
    first = run_tuning(preset, trials=3, final=False, progress="none")  # stops after 3 trials
    client = mlflow_client(preset.run["track"]["tracking_uri"])
    assert len(children(client, first.parent_id)) == 3

    second = run_tuning(preset, progress="none")  # hpo.trials = 6: three more trials, then the final run
    assert second.parent_id == first.parent_id
    runs = children(client, first.parent_id)
    trials = sorted(int(r.data.tags["vitbn.trial"]) for r in runs if r.data.tags["vitbn.phase"] == "trial")
    assert trials == list(range(6))
    state_path = tmp_path / "runs" / f"tune-tiny-tune-{preset.shared_hash()}" / "ax_vitbn-d1.json"
    ax_trials = json.loads(state_path.read_text())["experiment"]["trials"]
    assert len(ax_trials) == 6
    assert ax_trials["5"]["generator_run"]["generation_node_name"] == "MBM"
    assert ax_trials["5"]["generator_run"]["generator_key"] == "BoTorch"
    (final,) = [r for r in runs if r.data.tags["vitbn.phase"] == "final"]
    best_params, best_acc, best_trial = second.best["vitbn-d1"]
    assert float(final.data.tags["vitbn.lr"]) == best_params["lr"]
    assert final.data.params["train.batch_size"] == str(best_params["batch_size"])
    assert final.data.params["train.epochs"] == "2"
    trial_runs = {int(r.data.tags["vitbn.trial"]): r for r in runs if r.data.tags["vitbn.phase"] == "trial"}
    observed = {i: r.data.metrics["val/acc"] for i, r in trial_runs.items()}
    assert len(set(observed.values())) >= 3, observed  # an objective that varies, or the model has nothing to fit

    # The model's view, from the saved state: fitted on all six trials, it predicts each evaluated arm; the best is
    # the arm it predicts highest, with that prediction (not the arm's observed accuracy) as its value.
    ax = ax_client_class().load_from_json_file(str(state_path))
    fit_model(ax)
    arms = {i: {"lr": float(r.data.tags["vitbn.lr"]), "batch_size": int(r.data.params["train.batch_size"])}
            for i, r in trial_runs.items()}  # fmt: skip
    predicted = {i: p[OBJECTIVE][0] for i, p in zip(arms, ax.predict(list(arms.values())))}
    assert best_trial == max(predicted, key=predicted.get), (predicted, best_trial)
    assert best_params == arms[best_trial]
    assert best_acc == pytest.approx(predicted[best_trial], rel=1e-6)
    assert best_acc != observed[best_trial]  # a prediction, not the raw fallback Ax takes when the fit is poor
    assert {a.path for a in client.list_artifacts(first.parent_id, "ax")} == {"ax/ax_vitbn-d1.json"}

    report = build_report("tiny-tune", tmp_path / "report", tracking_uri=preset.run["track"]["tracking_uri"])
    md = report.markdown.read_text()
    chosen = f"| vitbn-d1 | 6 | 0 | {best_trial} | {best_params['lr']:.3g} | {best_params['batch_size']} | "
    assert "## Tuning" in md and chosen + f"{best_acc * 100:.2f}% |" in md  # the model's pick, from the parent's tag
    objective = {i: client.get_metric_history(r.info.run_id, "hpo/objective")[-1].value for i, r in trial_runs.items()}
    assert objective == {i: r.data.metrics["val/acc"] for i, r in trial_runs.items()}  # 1 epoch: its val acc
    assert sorted(p.name for p in report.figures) == ["acc_vs_time_tuned2epochs.png", "epochs_tuned2epochs.png",
                                                      "tuning.png", "tuning_lr_batch.png"]  # fmt: skip
