"""`scaleforge federate`: clients on Flower's simulation runtime (Ray) train their parts of digits with the normal
trainer, the server aggregates with Flower's strategies; the run directory, its rounds' checkpoints and an exact
resume; no process outlives the command; bad arguments exit 2 with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from scaleforge import load_config
from scaleforge.runs import check_manifest
from scaleforge.training.trainer import train
from tests.conftest import REPO, gone, run_subprocess

pytest.importorskip("flwr")

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_four_clients_on_a_dirichlet_split_come_within_three_points_of_centralized_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "federated"
    args = ["--clients", "4", "--rounds", "10", "--local-epochs", "5", "--partition", "dirichlet:0.5"]
    result = run_subprocess("federate", *args, "--run-dir", str(run_dir), timeout=400)
    assert result.code == 0, result.err[-3000:]
    rounds = lines(run_dir)
    assert [line["round"] for line in rounds] == list(range(11))  # round 0: the initial model
    assert all(line["clients"] == 4 and line["failed"] == 0 and line["parts"] == [0, 1, 2, 3] for line in rounds[1:])
    assert all(line["bytes_sent"] == line["bytes_received"] > 50_000 * 4 * 4 for line in rounds[1:])  # 4 B a weight
    check_manifest(run_dir / "final")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0009", "round-0010"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_accuracy"] == rounds[-1]["val_accuracy"]
    # centralized: the same data, and as many steps as the clients took in all (each round the same for a part)
    steps = 10 * sum(json.loads((run_dir / "clients" / str(i) / "run" / "summary.json").read_text())["steps"]
                     for i in range(4))  # fmt: skip
    central = train(load_config(None, [*QUICK, f"training.max_steps={steps}", "training.epochs=1000"]), tmp_path / "c")
    print(f"federated {summary['val_accuracy']:.4f} | centralized {central['val_accuracy']:.4f} | {steps} steps")
    assert summary["val_accuracy"] > central["val_accuracy"] - 0.03


def _descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_a_federation_killed_and_run_again_resumes_from_its_last_round_exactly(tmp_path: Path) -> None:
    args = ["--clients", "2", "--rounds", "4", "--strategy", "fedadam", "--partition", "by-class:6"]
    whole = run_subprocess("federate", *args, "--run-dir", str(tmp_path / "whole"), timeout=300)
    assert whole.code == 0, whole.err[-3000:]
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "scaleforge", "federate", *args, "--run-dir", str(run_dir)]
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline, started = time.monotonic() + 240, []
    while not (run_dir / "checkpoints" / "round-0002").is_dir() and time.monotonic() < deadline:
        started = _descendants(process.pid) or started  # the host, Ray's processes and the clients
        time.sleep(0.2)
    started = _descendants(process.pid) or started
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(started) >= 5  # the host, Ray's GCS server and raylet, its agents and actors
    assert all(gone(pid) for pid in started), [psutil.Process(p).name() for p in started if not gone(p, 0)]
    again = run_subprocess("federate", *args, "--run-dir", str(run_dir), timeout=300)
    assert again.code == 0, again.err[-3000:]
    assert "from round 2" in again.out or "from round 3" in again.out  # the newest checkpoint when it was killed
    expected, got = (
        load_file(tmp_path / "whole" / "final" / "model.safetensors"),
        load_file(run_dir / "final" / "model.safetensors"),
    )
    assert all((expected[k] == got[k]).all() for k in expected)  # FedAdam's moments and the sampling carried exactly
    assert [line["round"] for line in lines(run_dir)] == [0, 1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_round"] in (2, 3)
    other = run_subprocess("federate", *args[:-2], "--partition", "iid", "--run-dir", str(run_dir))
    assert other.code == 2 and other.err.count("\n") == 1
    assert "holds a federation with partition by-class:6, not iid" in other.err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--clients", "0", "--rounds", "1"], "--clients: expected a positive integer, got 0"),
        (["--clients", "4", "--rounds", "1", "--partition", "dirichlet:-1"], "--partition: 'dirichlet:-1' is not one"),
        (["--clients", "4", "--rounds", "1", "--min-clients", "5"], "--min-clients 5 is more than the 4 clients"),
        (["--clients", "4", "--rounds", "1", "--fraction-fit", "0.1"], "--fraction-fit 0.1 of 4 clients samples none"),
        (["--clients", "4", "--rounds", "1", "training.batchsize=3"], "training.batchsize: unknown key"),
        (["--clients", "2", "--rounds", "1", "--partition", "by-class:11"], "more classes than the dataset's 10"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(cli, tmp_path: Path, args: list[str], expected: str) -> None:
    result = cli("federate", *args, "--run-dir", str(tmp_path / "run"))
    assert result.code == 2, result.err
    assert expected in result.err and result.err.count("\n") == 1
