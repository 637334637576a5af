"""The Ax loop with a fake objective: Sobol then BoTorch, state saved after every trial, resumed without repeats."""

from __future__ import annotations

import json
import math

import pytest

from vitbn.config import HPOConfig
from vitbn.errors import UserError
from vitbn.experiments.hpo import TrialOutcome, lr_range, new_client, optimize, trial_table

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


def test_diverged_trial_is_completed_with_zero_accuracy(tmp_path):
    hpo = HPOConfig(trials=2, sobol_trials=2, seed=0)
    client = optimize(tmp_path / "ax.json", factory(hpo), Recorder(diverge_over=0.0), trials=2)
    assert [(row["trial_status"], row["val_acc"]) for row in trial_table(client)] == [("COMPLETED", 0.0)] * 2


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
