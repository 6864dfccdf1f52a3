"""`scaleforge search` end to end, as a user runs it: trials trained as normal runs in processes of their own,
pruning, a crashing trial, the Pareto front of two objectives, a killed search resumed, and bad spaces refused.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from scaleforge.config import load_config
from scaleforge.distributed.launch import threads_per_process
from scaleforge.training.trainer import train
from tests.conftest import REPO, run_subprocess

pytestmark = pytest.mark.timeout(300)

# Small, quick runs: no TensorBoard or plot, a checkpoint every 10 steps (22 steps an epoch on digits).
QUICK = ["logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=10", "logging.progress=plain"]

# A user's model that trains nothing: its forward pass fails, as a buggy model of one's own would.
FRAGILE_MODEL = """
from scaleforge.models.mlp import MLP
from scaleforge.registry import register_model

@register_model("fragile")
class Fragile(MLP):
    def forward(self, x):
        raise RuntimeError("the fragile model broke")
"""


def _study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="default", storage=f"sqlite:///{folder / 'study.db'}")


def _by_number(study: optuna.Study) -> dict[int, optuna.trial.FrozenTrial]:
    return {t.number: t for t in study.get_trials()}


@pytest.mark.slow
def test_a_search_over_two_architectures_prunes_records_a_crash_and_its_best_config_trains_to_its_accuracy(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fragile_model.py").write_text(FRAGILE_MODEL)
    space = tmp_path / "space.yaml"
    space.write_text(
        """
model.architecture: {choice: [mlp, cnn, fragile]}
model.channels: {choice: [[8, 16]], when: {model.architecture: cnn}}
training.learning_rate: {log_uniform: [1.0e-7, 1.0e-2]}
training.epochs: {choice: [8, 40]}
# two at a time: a CNN and a model that crashes; then a hopeless learning rate (40 epochs, 880 steps: it still
# trains when its first validation values say to prune it) and an MLP
enqueue:
  - {model.architecture: cnn, model.channels: [8, 16], training.learning_rate: 0.005, training.epochs: 8}
  - {model.architecture: fragile, training.learning_rate: 0.005, training.epochs: 8}
  - {model.architecture: mlp, training.learning_rate: 1.0e-7, training.epochs: 40}
  - {model.architecture: mlp, training.learning_rate: 0.005, training.epochs: 8}
"""
    )
    folder = tmp_path / "study"
    command = ["search", "imports=[fragile_model]", *QUICK, "--space", str(space), "--objective", "val_accuracy"]
    command += ["--trials", "4", "--jobs", "2", "--pruner-startup", "1", "--dir", str(folder)]
    result = run_subprocess(*command, cwd=tmp_path)
    assert result.code == 0, result.err + result.out
    trials = _by_number(_study(folder))
    states = {n: t.state.name for n, t in trials.items()}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "PRUNED", 3: "COMPLETE"}, result.out

    # crashed: recorded with its error, and the search went on
    assert "the fragile model broke" in trials[1].user_attrs["error"]
    assert "trial 1 failed" in result.out and "trial 3 finished" in result.out
    assert json.loads((Path(trials[1].user_attrs["run_dir"]) / "trial.json").read_text())["state"] == "failed"
    # pruned: stopped early, with the trainer's clean stop
    pruned_dir = Path(trials[2].user_attrs["run_dir"])
    steps = [json.loads(line)["step"] for line in (pruned_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 880 and not (pruned_dir / "final").exists()
    assert "stopped by SIGTERM" in (pruned_dir / "train.log").read_text()
    assert re.search(r"^trial 2 pruned at step \d+: val_accuracy 0\.\d+", result.out, re.MULTILINE)

    # each trial is a normal run directory: its own config, weights and summary
    for number in (0, 3):
        run_dir = Path(trials[number].user_attrs["run_dir"])
        assert run_dir.parent == folder.resolve()
        assert {"config.yaml", "final", "summary.json", "trial.yaml", "trial.json"} <= {
            p.name for p in run_dir.iterdir()
        }
    monkeypatch.syspath_prepend(str(tmp_path))  # where the config's `imports:` module is
    assert load_config(Path(trials[0].user_attrs["run_dir"]) / "config.yaml").model.architecture == "cnn"

    # the best config, written by the search, trains to the accuracy the study reports
    best = max((trials[0], trials[3]), key=lambda t: t.values[0])
    assert f"wrote {folder / 'best.yaml'} (trial {best.number}: val_accuracy {best.values[0]:.4g})" in result.out
    assert (folder / "history.png").stat().st_size > 10_000
    threads = threads_per_process(2)  # the trial's share of the cores, two trials at a time
    config = load_config(folder / "best.yaml", [f"hardware.threads={threads}"])
    retrained = train(config, tmp_path / "retrained")
    assert retrained["val_accuracy"] == pytest.approx(best.values[0], abs=1e-9)

    shown = cli("search", "show", str(folder), "--trial", "0", "--out", str(tmp_path / "cnn.yaml"))
    assert shown.code == 0, shown.err
    assert "1 pruned" in shown.out and "1 failed" in shown.out and "2 complete" in shown.out
    assert load_config(tmp_path / "cnn.yaml").model.params["channels"] == [8, 16]


def _dominates(a: list[float], b: list[float]) -> bool:
    """Whether `a` (accuracy up, parameters down) is at least as good as `b` on both and better on one."""
    at_least = a[0] >= b[0] and a[1] <= b[1]
    return at_least and (a[0] > b[0] or a[1] < b[1])


@pytest.mark.slow
def test_a_killed_multi_objective_search_resumes_without_repeating_trials_and_ends_with_a_pareto_front(
    tmp_path: Path,
) -> None:
    space = tmp_path / "space.yaml"
    # trial 0 trains long, trial 1 briefly: the search is killed as trial 2 starts, with trial 0 half done
    space.write_text(
        """
model.hidden_layers: {choice: [[8], [16], [32], [64]]}
training.learning_rate: {log_uniform: [1.0e-3, 1.0e-2]}
training.epochs: {choice: [4, 200]}
enqueue:
  - {model.hidden_layers: [16], training.learning_rate: 0.005, training.epochs: 200}
  - {model.hidden_layers: [8], training.learning_rate: 0.005, training.epochs: 4}
"""
    )
    folder = tmp_path / "study"
    quick = [*QUICK, "checkpoint.every_steps=50"]
    command = ["search", *quick, "--space", str(space), "--objective", "val_accuracy,params"]
    command += ["--trials", "5", "--jobs", "2", "--dir", str(folder)]
    first = subprocess.Popen(
        [sys.executable, "-m", "scaleforge", *command],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    assert first.stdout is not None
    for line in first.stdout:
        seen.append(line)
        if line.startswith("trial 2 started"):
            first.send_signal(signal.SIGKILL)  # no chance to say anything to the study
            break
    first.wait(timeout=60)
    trials = _by_number(_study(folder))
    assert trials[1].state.name == "COMPLETE" and trials[0].state.name == "RUNNING", "".join(seen)

    again = run_subprocess(*command)
    assert again.code == 0, again.err + again.out
    assert "trials 0, 2 were cut short by a search that is gone: they run again" in again.out
    study = _study(folder)
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(complete) == 5, again.out
    # no finished trial ran again: each run directory was trained to its end once
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in complete]
    assert len(set(run_dirs)) == 5
    for run_dir in run_dirs:
        assert (run_dir / "train.log").read_text().count("done: ") == 1, run_dir
    assert "trial 1 started" not in again.out
    # trial 0 went on from its own checkpoint, in its own run directory, as the trial that retried it
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == 0]
    assert retry.user_attrs["run_dir"] == trials[0].user_attrs["run_dir"]
    assert "resumed at step" in (Path(retry.user_attrs["run_dir"]) / "train.log").read_text()

    front = study.best_trials
    assert front
    for a in front:
        assert not any(_dominates(b.values, a.values) for b in front if b is not a)
    for trial in complete:
        if trial.number not in {t.number for t in front}:
            assert any(_dominates(t.values, trial.values) for t in front)
    assert "Pareto front" in again.out and (folder / "pareto.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("space", "args", "message"),
    [
        (
            "training.learning_rate: {uniform: [0.1, 0.01]}\n",
            [],
            "training.learning_rate: the range [0.1, 0.01] is empty",
        ),
        (
            "model.architecture: {choice: [mlp, cnn]}\nmodel.hidden_layers: {choice: [[64]]}\n",
            [],
            "model.hidden_layers: CNN takes no parameter 'hidden_layers'",
        ),
        ("training.learnin_rate: {uniform: [0.01, 0.1]}\n", [], "(did you mean 'learning_rate'?)"),
        (
            "training.learning_rate: {uniform: [0.01, 0.1]}\n",
            ["--objective", "val_acc"],
            "say whether higher is better",
        ),
        (
            "training.learning_rate: {uniform: [0.01, 0.1]}\n",
            ["--objective", "val_accuracy,params", "--pruner", "median"],
            "--pruner median: pruning judges one validation metric",
        ),
    ],
)
def test_a_bad_space_or_objective_exits_2_before_any_trial(
    tmp_path: Path, cli, space: str, args: list[str], message: str
) -> None:
    (tmp_path / "space.yaml").write_text(space)
    folder = tmp_path / "study"
    result = cli("search", "--space", str(tmp_path / "space.yaml"), "--trials", "2", "--dir", str(folder), *args)
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert not folder.exists()


def test_a_new_study_in_a_folder_holding_another_studys_trials_is_refused(tmp_path: Path, cli) -> None:
    (tmp_path / "space.yaml").write_text("training.learning_rate: {uniform: [0.01, 0.1]}\n")
    (tmp_path / "study" / "trial-0000" / "final").mkdir(parents=True)
    result = cli("search", "--space", str(tmp_path / "space.yaml"), "--trials", "1", "--dir", str(tmp_path / "study"))
    assert result.code == 2
    assert "holds the trials of an earlier study (trial-0000) that this study does not know" in result.err
