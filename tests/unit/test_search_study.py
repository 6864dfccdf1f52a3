"""Tests for scaleforge.search.study and .objectives: objectives as given on the command line, a study's record
of what it optimises, its budget of trials, and trials whose search process is gone."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import optuna
import pytest

from scaleforge.errors import ConfigError, UsageError
from scaleforge.search.objectives import Objective, parse_objective
from scaleforge.search.study import (
    StudyRecord,
    default_storage,
    open_storage,
    open_study,
    progress,
    quiet_optuna,
    requeue_orphans,
    worker_attrs,
)


@pytest.mark.parametrize(
    ("text", "objective"),
    [
        ("val_accuracy", Objective("val_accuracy", "maximize")),
        ("val_loss", Objective("val_loss", "minimize")),
        ("val_f1:max", Objective("val_f1", "maximize")),
        ("params", Objective("params", "minimize")),
        ("latency_ms:min", Objective("latency_ms", "minimize")),
        ("int8_size_kib", Objective("int8_size_kib", "minimize")),
    ],
)
def test_objectives_know_which_way_is_better(text: str, objective: Objective) -> None:
    assert parse_objective(text) == objective


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("val_f1", "say whether higher is better: val_f1:max or val_f1:min"),
        ("accuracy", "expected a validation metric"),
        ("parms", "(did you mean 'params'?)"),
        ("params:max", "params is a cost, which is always minimised"),
        ("val_accuracy:up", "the direction after ':' is max or min"),
    ],
)
def test_a_bad_objective_is_a_usage_error(text: str, message: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_objective(text)
    assert message in str(error.value)


def _record(*objectives: str) -> StudyRecord:
    return StudyRecord(tuple(parse_objective(o) for o in objectives), config="", overrides=(), space="x: 1\n")


def _open(tmp_path: Path, *objectives: str) -> optuna.Study:
    storage = open_storage(default_storage(tmp_path))
    study, _ = open_study(
        "s", storage, _record(*objectives), optuna.samplers.RandomSampler(0), optuna.pruners.NopPruner()
    )
    return study


def test_a_study_is_continued_only_for_the_objectives_it_began_with(tmp_path: Path) -> None:
    study = _open(tmp_path, "val_accuracy", "params")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert _open(tmp_path, "val_accuracy", "params").study_name == "s"
    with pytest.raises(ConfigError) as error:
        _open(tmp_path, "val_loss")
    assert "the study optimises val_accuracy:max, params:min, not val_loss:min" in str(error.value)


def test_a_trial_whose_search_process_died_is_queued_again_with_its_run_directory(tmp_path: Path) -> None:
    study = _open(tmp_path, "val_loss")
    gone = subprocess.Popen(["true"])
    gone.wait()
    with quiet_optuna():
        orphan, ours, finished = study.ask(), study.ask(), study.ask()
    orphan.suggest_float("training.learning_rate", 1e-4, 1e-2)
    for key, value in {**worker_attrs(), "pid": gone.pid, "run_dir": "/runs/trial-0000"}.items():
        orphan.set_user_attr(key, value)
    for key, value in worker_attrs().items():  # run by this live process: left alone
        ours.set_user_attr(key, value)
    study.tell(finished, 0.5)

    assert progress(study).done == 1 and progress(study).running == 2
    assert requeue_orphans(study) == [0]
    trials = study.get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retry = trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING
    assert retry.params == trials[0].params and retry.user_attrs["run_dir"] == "/runs/trial-0000"
    assert "pid" not in retry.user_attrs and "host" not in retry.user_attrs  # no search holds it until one takes it
    state = progress(study)
    assert (state.done, state.running, state.retries) == (1, 1, 1)  # the failure queued again is not counted
    assert state.may_start(budget=2)  # a retry runs even when the budget is taken
    assert requeue_orphans(study) == []


def test_another_machines_trial_whose_heartbeat_stopped_is_queued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scaleforge.search import study as study_module

    monkeypatch.setattr(study_module, "HEARTBEAT_S", 1)
    monkeypatch.setattr(study_module, "GRACE_S", 1)
    study = _open(tmp_path, "val_loss")
    with quiet_optuna():
        trial = study.ask()
    trial.suggest_float("training.learning_rate", 1e-4, 1e-2)
    for key, value in {"host": "another-machine", "pid": 1, "run_dir": "/elsewhere/trial-0000"}.items():
        trial.set_user_attr(key, value)
    study._storage.record_heartbeat(trial._trial_id)
    assert requeue_orphans(study) == []  # not this machine's to judge, and its heartbeat is fresh
    assert study.get_trials()[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(2.5)  # its heartbeat stops
    requeue_orphans(study)
    first, retry = study.get_trials()
    assert first.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == first.params
    assert retry.user_attrs == {"run_dir": "/elsewhere/trial-0000"}
