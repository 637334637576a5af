"""The Ax loop with a fake objective: Sobol then BoTorch, state saved after every trial, resumed without repeats."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from vitbn.config import HPOConfig
from vitbn.errors import UserError
from vitbn.experiments.hpo import (
    TrialOutcome,
    best_parameters,
    last_epochs_mean,
    lr_range,
    new_client,
    optimize,
    trial_table,
)
from vitbn.experiments.runner import ChildResult
from vitbn.experiments.runs import mlflow_client

OBJECTIVE = "val_acc"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pandas 3 deprecations inside Ax


def fake_accuracy(params: dict) -> float:
    """Peaks at lr = 1e-3, batch 60."""
    return 1.0 - 0.1 * (math.log10(params["lr"]) + 3) ** 2 - 1e-5 * (params["batch_size"] - 60) ** 2


class Recorder:
    def __init__(self, diverge_over: float = 1.0) -> None:
        self.calls: list[tuple[int, dict]] = []
        self.diverge_over = diverge_over

    def __call__(self, index: int, params: dict) -> TrialOutcome:
        self.calls.append((index, dict(params)))
        if params["lr"] > self.diverge_over:
            return TrialOutcome("diverged", math.nan)
        return TrialOutcome("finished", fake_accuracy(params))


def factory(hpo: HPOConfig, bounds=(1e-5, 1e-2)):
    return lambda: new_client("fake", bounds, hpo)


def saved_trials(path) -> dict:
    return json.loads(path.read_text())["experiment"]["trials"]


def test_sobol_then_botorch_resumes_without_repeating(tmp_path):
    hpo = HPOConfig(trials=3, sobol_trials=2, seed=0)
    state, saves, first = tmp_path / "ax.json", [], Recorder()
    optimize(state, factory(hpo), first, trials=2, on_save=saves.append)
    assert [i for i, _ in first.calls] == [0, 1]
    assert len(saves) == 4 and set(saves) == {state}  # trial created, then completed, for each trial
    assert len(saved_trials(state)) == 2

    second = Recorder()
    client = optimize(state, factory(hpo), second, trials=3)
    assert [i for i, _ in second.calls] == [2]  # only the new trial
    assert second.calls[0][1] not in [p for _, p in first.calls]
    trials = saved_trials(state)
    assert len(trials) == 3
    assert [trials[str(i)]["generator_run"]["generation_node_name"] for i in range(3)] == ["Sobol", "Sobol", "MBM"]
    assert trials["2"]["generator_run"]["generator_key"] == "BoTorch"
    table = trial_table(client)
    assert [row["trial_status"] for row in table] == ["COMPLETED"] * 3
    for (index, params), row in zip(first.calls + second.calls, table):
        assert row["trial_index"] == index and row["lr"] == params["lr"] and row["batch_size"] == params["batch_size"]
        assert row["val_acc"] == pytest.approx(fake_accuracy(params))


def test_diverged_trials_are_marked_failed_not_observed_as_zero(tmp_path):
    hpo = HPOConfig(trials=4, sobol_trials=3, seed=0)
    recorder = Recorder(diverge_over=3e-4)
    client = optimize(tmp_path / "ax.json", factory(hpo), recorder, trials=4)
    table = trial_table(client)
    assert len(table) == 4 and len(recorder.calls) == 4  # a failed trial counts against the budget
    for (_, params), row in zip(recorder.calls, table):
        if params["lr"] > 3e-4:
            assert row["trial_status"] == "FAILED" and math.isnan(row.get("val_acc", math.nan))
        else:
            assert row["trial_status"] == "COMPLETED" and row["val_acc"] == pytest.approx(fake_accuracy(params))
    assert {row["trial_status"] for row in table} == {"FAILED", "COMPLETED"}  # the seed gives both
    again = optimize(tmp_path / "ax.json", factory(hpo), Recorder(), trials=4)
    assert [r["trial_status"] for r in trial_table(again)] == [r["trial_status"] for r in table]  # state reloaded


def test_best_is_the_model_prediction_among_evaluated_arms(tmp_path):
    # 7 trials: the model fitted on all of them ranks the arms as observed, so Ax keeps its predictions (with a poor
    # leave-one-out fit it falls back on the raw best, which this test would catch).
    hpo = HPOConfig(trials=7, sobol_trials=4, seed=0)
    recorder = Recorder()
    client = optimize(tmp_path / "ax.json", factory(hpo), recorder, trials=7)
    params, value, index = best_parameters(client)
    assert recorder.calls[index][1] == params
    predicted = [p[OBJECTIVE][0] for p in client.predict([p for _, p in recorder.calls])]
    assert index == max(range(len(predicted)), key=predicted.__getitem__)  # the model's pick among evaluated arms
    assert value == pytest.approx(predicted[index], rel=1e-9)
    assert value != fake_accuracy(params)  # a prediction, not the raw observation

    # A process that resumes the finished tuning (no trial left to run, no model fitted yet) picks the same arm.
    again = optimize(tmp_path / "ax.json", factory(hpo), Recorder(), trials=7)
    params_again, value_again, index_again = best_parameters(again)
    assert (params_again, index_again) == (params, index) and value_again == pytest.approx(value, rel=1e-9)


def test_objective_is_the_mean_of_the_last_epochs(tmp_path):
    client = mlflow_client(f"sqlite:///{tmp_path}/mlruns.db")
    exp_id = client.create_experiment("hpo", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id, empty_id = (client.create_run(exp_id).info.run_id for _ in range(2))
    # (epoch, val/acc, timestamp in ms): epoch 3 logged twice, its later value (a resumed epoch) is what counts; the
    # points are logged out of order so that the store's order cannot stand in for the sort.
    points = [(4, 0.7, 5000), (3, 0.9, 4000), (1, 0.5, 1000), (3, 0.6, 3000), (2, 0.8, 2000)]
    for step, value, timestamp in points:
        client.log_metric(run_id, "val/acc", value, timestamp=timestamp, step=step)
    exp = SimpleNamespace(client=client)
    result = ChildResult(("x",), "finished", run_id, {"val/acc": 0.7}, "new")
    assert last_epochs_mean(exp, result, 1) == pytest.approx(0.7)
    assert last_epochs_mean(exp, result, 3) == pytest.approx((0.8 + 0.9 + 0.7) / 3)  # epoch 3's last value
    assert last_epochs_mean(exp, result, 10) == pytest.approx((0.5 + 0.8 + 0.9 + 0.7) / 4)
    assert math.isnan(last_epochs_mean(exp, ChildResult(("x",), "diverged", empty_id, {}, "new"), 3))
    assert last_epochs_mean(exp, ChildResult(("x",), "finished", None, {"val/acc": 0.25}, "new"), 3) == 0.25
    with pytest.raises(ValueError, match="objective_epochs"):
        HPOConfig(objective_epochs=0)


def test_trial_left_running_is_run_again_with_its_parameters(tmp_path):
    hpo = HPOConfig(trials=2, sobol_trials=2, seed=0)
    state = tmp_path / "ax.json"
    client = factory(hpo)()
    ((index, params),) = client.get_next_trials(max_trials=1).items()
    client.save_to_json_file(str(state))  # what an interrupted process leaves behind
    again = Recorder()
    optimize(state, factory(hpo), again, trials=2)
    assert again.calls[0] == (index, params)
    assert [i for i, _ in again.calls] == [0, 1]


def test_lr_range_study_defaults_and_overrides():
    assert lr_range("vit", HPOConfig()) == (1e-5, 1e-3)
    assert lr_range("vitbn", HPOConfig()) == (1e-5, 1e-2)
    assert lr_range("vitbnffn", HPOConfig(lr_min=1e-4, lr_max=0.1)) == (1e-4, 0.1)
    with pytest.raises(UserError, match=r"range \[0.01, 0.001\] must satisfy"):
        lr_range("vitbn", HPOConfig(lr_min=1e-2, lr_max=1e-3))


def test_no_sobol_trials_is_refused():
    with pytest.raises(UserError, match=r"hpo.sobol_trials=0: BoTorch needs observed trials"):
        new_client("x", (1e-5, 1e-3), HPOConfig(sobol_trials=0))
