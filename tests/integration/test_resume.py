"""Runs killed at a random step resume from their newest good checkpoint and end bitwise equal to runs that
were never interrupted: one process, two with ddp, and two restarted by the launcher on their own."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaleforge import load_config
from scaleforge.train.checkpoint import build_manifest, list_checkpoints, newest_good_checkpoint
from scaleforge.train.trainer import train
from tests.conftest import REPO, run_subprocess
from tests.integration.multiprocess import GPT, MODEL, TOLERANCE, max_difference, read_weights, single_process_run
from tests.integration.multiprocess import RUN as SHARED_RUN

pytestmark = pytest.mark.timeout(600)

# Dropout, momentum and a cosine schedule all carry state that a resumed run must restore exactly; 40 steps
# cross the end of the first epoch (25 steps). Later overrides win over the shared ones.
RUN = [*MODEL, *SHARED_RUN, "model.dropout=0.1", "training.max_steps=40", "training.scheduler=cosine"]
RUN += ["logging.every_steps=1", "checkpoint.every_steps=3", "checkpoint.keep=2"]


def assert_bitwise_equal(a: Path, b: Path) -> None:
    first, second = read_weights(a), read_weights(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first), "weights differ"


def logged(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines) if "loss" in record]


def start(run_dir: Path, *flags: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "scaleforge", "train", *RUN, "--run-dir", str(run_dir), *flags]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(process: subprocess.Popen[str], step: int) -> str:
    """Read the run's output until it logs `step`; returns what it printed."""
    seen = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            return "".join(seen)
    raise AssertionError(f"the run ended before step {step}:\n" + "".join(seen))


def workers_of(launcher: subprocess.Popen[str]) -> list[int]:
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(load_config(None, RUN), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted_ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted-ddp") / "run"
    result = run_subprocess("train", *RUN, "--nproc", "2", "--run-dir", str(run_dir), timeout=300)
    assert result.code == 0, result.err
    return run_dir


@pytest.mark.parametrize(("seed", "saves"), [(1, "sync"), (2, "sync"), (3, "async"), (4, "async")])
def test_a_run_killed_at_a_random_step_resumes_bitwise(
    uninterrupted: Path, tmp_path: Path, seed: int, saves: str
) -> None:
    kill_at = random.Random(seed).randint(2, 38)  # before, on and between checkpoints, in either epoch
    run_dir = tmp_path / "run"
    process = start(run_dir, f"checkpoint.async={saves == 'async'}")
    wait_for_step(process, kill_at)
    process.send_signal(signal.SIGKILL)  # whatever it was doing: a step, a log line, a checkpoint write
    process.wait()
    resumed = run_subprocess("train", *RUN, "--run-dir", str(run_dir))
    assert resumed.code == 0, resumed.err
    assert_bitwise_equal(uninterrupted, run_dir)
    assert logged(run_dir) == logged(uninterrupted)  # each step logged once, with the same loss


def test_a_killed_ddp_worker_resumes_bitwise_on_the_next_launch(uninterrupted_ddp: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    launcher = start(run_dir, "--nproc", "2", "checkpoint.async=true")
    wait_for_step(launcher, 17)
    worker = workers_of(launcher)[-1]
    subprocess.run(["kill", "-KILL", str(worker)], check=True)
    assert launcher.wait(timeout=120) == 1
    assert launcher.stdout is not None and "was killed by SIGKILL" in launcher.stdout.read()
    resumed = run_subprocess("train", *RUN, "--nproc", "2", "--run-dir", str(run_dir), timeout=300)
    assert resumed.code == 0, resumed.err
    assert "resumed at step" in resumed.out
    assert_bitwise_equal(uninterrupted_ddp, run_dir)


def test_the_launcher_restarts_a_killed_worker_and_the_run_resumes_bitwise(
    uninterrupted_ddp: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    launcher = start(run_dir, "--nproc", "2", "--max-restarts", "1")
    wait_for_step(launcher, 11)
    subprocess.run(["kill", "-KILL", str(workers_of(launcher)[0])], check=True)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out
    assert "restart 1: the workers failed and were started again; resuming from" in out
    assert_bitwise_equal(uninterrupted_ddp, run_dir)
    assert logged(run_dir) == logged(uninterrupted_ddp)


def test_a_damaged_newest_checkpoint_is_reported_and_skipped(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    older, newest = list_checkpoints(run_dir / "checkpoints")
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped on disk
    shard.write_bytes(bytes(data))
    unfinished = run_dir / "checkpoints" / "step-00000099"  # renamed into place without a manifest
    shutil.copytree(older, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.warns(UserWarning) as warned:
        assert newest_good_checkpoint(run_dir / "checkpoints") == older
    messages = [str(w.message) for w in warned]
    assert any("step-00000099 is damaged" in m and "no manifest" in m for m in messages)
    assert any(f"{newest.name} is damaged" in m and "does not match its SHA-256" in m for m in messages)
    resumed = run_subprocess("train", *RUN, "--run-dir", str(run_dir))
    assert resumed.code == 0, resumed.err
    assert f"resumed at step {int(older.name[5:])}" in resumed.out
    assert_bitwise_equal(uninterrupted, run_dir)


def test_resume_never_and_finished_runs_are_refused(uninterrupted: Path, tmp_path: Path, cli) -> None:
    finished = cli("train", *RUN, "--run-dir", str(uninterrupted))
    assert finished.code == 2 and "already holds a finished run" in finished.err
    partial = tmp_path / "partial"
    shutil.copytree(uninterrupted, partial)
    shutil.rmtree(partial / "final")
    never = cli("train", *RUN, "--run-dir", str(partial), "--resume", "never")
    assert never.code == 2 and "already holds a run" in never.err
    missing = cli("train", *RUN, "--run-dir", str(tmp_path / "new"), "--resume", str(tmp_path / "nothing"))
    assert missing.code == 2 and "--resume: " in missing.err and "is not a checkpoint folder" in missing.err


def test_resume_from_a_path_starts_a_new_run_from_that_checkpoint(uninterrupted: Path, tmp_path: Path) -> None:
    checkpoint = list_checkpoints(uninterrupted / "checkpoints")[0]
    result = run_subprocess("train", *RUN, "--run-dir", str(tmp_path / "run"), "--resume", str(checkpoint))
    assert result.code == 0, result.err
    assert f"resumed at step {int(checkpoint.name[5:])}" in result.out
    assert_bitwise_equal(uninterrupted, tmp_path / "run")


class _Exploit:
    """Unpickling this runs a shell command: what a crafted checkpoint would try."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused(uninterrupted: Path, tmp_path: Path, nproc: str) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "final")
    for checkpoint in list_checkpoints(run_dir / "checkpoints"):
        # an attacker rewrites the metadata and, knowing the format, the manifest that lists it
        (checkpoint / ".metadata").write_bytes(pickle.dumps(_Exploit(tmp_path / "pwned")))
        (checkpoint / "manifest.json").write_text(json.dumps(build_manifest(checkpoint)))
    result = run_subprocess("train", *RUN, "--run-dir", str(run_dir), "--nproc", nproc, timeout=300)
    assert not (tmp_path / "pwned").exists()
    assert result.code == 2, result.err  # every checkpoint is refused: the run is not resumed, nor overwritten
    refusal = "is damaged and is skipped: its metadata is refused: posix.system is not part of a checkpoint's metadata"
    assert refusal in result.err
    assert "already holds a run" in result.err


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_sigterm_checkpoints_at_the_next_step_and_the_run_resumes(
    uninterrupted: Path, uninterrupted_ddp: Path, tmp_path: Path, nproc: str
) -> None:
    run_dir = tmp_path / "run"
    process = start(run_dir, "--nproc", nproc)
    wait_for_step(process, 8)  # between checkpoints (every 3 steps)
    process.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to its workers
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out
    assert not (run_dir / "final").exists()
    stopped_at = max(step for step, _ in logged(run_dir))
    assert newest_good_checkpoint(run_dir / "checkpoints").name == f"step-{stopped_at:08d}"
    if nproc == "1":
        assert f"stopped by SIGTERM after step {stopped_at}; checkpoint" in out
    resumed = run_subprocess("train", *RUN, "--nproc", nproc, "--run-dir", str(run_dir), timeout=300)
    assert resumed.code == 0, resumed.err
    assert_bitwise_equal(uninterrupted if nproc == "1" else uninterrupted_ddp, run_dir)


@pytest.mark.parametrize(
    ("strategy", "written_by", "resumed_on"),
    [("ddp", 1, 2), ("ddp", 2, 1), ("fsdp", 1, 2), ("fsdp", 2, 1)],
    ids=["ddp-1-to-2", "ddp-2-to-1", "fsdp-1-to-2", "fsdp-2-to-1"],
)
def test_a_checkpoint_resumes_on_another_number_of_processes(
    tmp_path: Path, strategy: str, written_by: int, resumed_on: int
) -> None:
    # without dropout, so that one process and two compute the same thing (to float rounding)
    reshard = [*GPT, "checkpoint.every_steps=10"]
    reference = single_process_run(tmp_path / "reference", "checkpoint.every_steps=10")

    def launch_on(nproc: int, run_dir: Path, *flags: str) -> None:
        strategy_flags = [f"parallel.strategy={strategy}", "--nproc", str(nproc)] if nproc > 1 else []
        result = run_subprocess("train", *reshard, *strategy_flags, "--run-dir", str(run_dir), *flags, timeout=300)
        assert result.code == 0, result.err

    writer = tmp_path / "writer"
    if written_by == 1:
        writer = reference
    else:
        launch_on(written_by, writer)
    checkpoint = writer / "checkpoints" / "step-00000010"
    launch_on(resumed_on, tmp_path / "resumed", "--resume", str(checkpoint))
    assert max_difference(read_weights(reference), read_weights(tmp_path / "resumed")) <= TOLERANCE
