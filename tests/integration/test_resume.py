"""Runs killed at a random step resume from their newest good checkpoint and end bitwise equal to runs that
were never interrupted: one process, two with ddp, and two restarted by the launcher on their own."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scaleforge import load_config
from scaleforge.training.checkpoint import list_checkpoints, newest_good_checkpoint
from scaleforge.training.trainer import train
from tests.conftest import REPO, gone, run_subprocess
from tests.integration.distributed_runs import (
    GPT,
    HSDP,
    MODEL,
    TOLERANCE,
    max_difference,
    read_weights,
    single_process_run,
)
from tests.integration.distributed_runs import RUN as SHARED_RUN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # multi-process runs, each several seconds

# Dropout, momentum and a cosine schedule all carry state that a resumed run must restore exactly; 40 steps
# cross the end of the first epoch (25 steps). Later overrides win over the shared ones.
RUN = [*MODEL, *SHARED_RUN, "model.dropout=0.1", "training.max_steps=40", "training.scheduler=cosine"]
RUN += ["logging.every_steps=1", "checkpoint.every_steps=3", "checkpoint.keep=2"]


# A user's dataset read one sample at a time (the data-loader path, with worker processes) that augments each
# sample with Python's, NumPy's and torch's random numbers.
AUGMENTED_TOKENS = """
import random
import numpy as np
import torch
from torch.utils.data import Dataset
from scaleforge.data.base import DatasetSplits
from scaleforge.data.synthetic import synthetic
from scaleforge.registry import register_dataset

class RandomlyReplaced(Dataset):
    def __init__(self, source, vocab_size):
        self.source, self.vocab_size = source, vocab_size

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        inputs, targets = self.source[index]
        inputs = inputs.clone()
        if torch.rand(()) < 0.5:
            inputs[random.randrange(len(inputs))] = int(np.random.randint(self.vocab_size))
        return inputs, targets

@register_dataset("augmented_tokens")
def augmented_tokens(kind="tokens", seq_len=16, vocab_size=64, num_samples=512):
    splits = synthetic(kind=kind, seq_len=seq_len, vocab_size=vocab_size, num_samples=num_samples)
    return DatasetSplits(RandomlyReplaced(splits.train, vocab_size), splits.val, splits.info)
"""
WORKERS = ["imports=[augmented_tokens]", "data.dataset=augmented_tokens", "data.num_workers=2"]

# Imported by a run that is to die while it writes a checkpoint: SIGKILL once the shards of the checkpoint of
# step KILL_IN_CHECKPOINT are on disk, before its manifest is written and it is renamed into place.
KILL_IN_CHECKPOINT = """
import os, signal
from scaleforge.training.checkpoint import Checkpointer

commit = Checkpointer._commit

def dying_commit(self, staging, final, files):
    if staging.name == f"step-{int(os.environ['KILL_IN_CHECKPOINT']):08d}.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self, staging, final, files)

Checkpointer._commit = dying_commit
"""


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the user files above, on the PYTHONPATH of every run started from here on."""
    folder = tmp_path_factory.mktemp("user-files")
    (folder / "augmented_tokens.py").write_text(AUGMENTED_TOKENS)
    (folder / "kill_in_checkpoint.py").write_text(KILL_IN_CHECKPOINT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
        patch.syspath_prepend(str(folder))
        yield folder


def assert_bitwise_equal(a: Path, b: Path) -> None:
    first, second = read_weights(a), read_weights(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first), "weights differ"


def logged(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines) if "loss" in record]


def start(
    run_dir: Path, *flags: str, env: dict[str, str] | None = None, new_session: bool = False
) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "scaleforge", "train", *RUN, "--run-dir", str(run_dir), *flags]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=new_session,
    )


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


@pytest.fixture(scope="module")
def uninterrupted_workers(tmp_path_factory: pytest.TempPathFactory, user_files: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted-workers") / "run"
    train(load_config(None, [*RUN, *WORKERS]), run_dir)
    return run_dir


@pytest.mark.parametrize("seed", [5, 6])
def test_a_run_with_data_loader_workers_killed_at_a_random_step_resumes_bitwise(
    uninterrupted_workers: Path, tmp_path: Path, seed: int
) -> None:
    kill_at = random.Random(seed).randint(2, 38)
    run_dir = tmp_path / "run"
    process = start(run_dir, *WORKERS)
    wait_for_step(process, kill_at)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_subprocess("train", *RUN, *WORKERS, "--run-dir", str(run_dir))
    assert resumed.code == 0, resumed.err
    assert_bitwise_equal(uninterrupted_workers, run_dir)
    assert logged(run_dir) == logged(uninterrupted_workers)


@pytest.mark.parametrize(("nproc", "saves"), [("1", "sync"), ("1", "async"), ("2", "async")])
def test_a_run_killed_while_it_writes_a_checkpoint_resumes_bitwise(
    uninterrupted: Path, uninterrupted_ddp: Path, tmp_path: Path, user_files: Path, nproc: str, saves: str
) -> None:
    run_dir = tmp_path / "run"
    dying = {**os.environ, "KILL_IN_CHECKPOINT": "12"}  # rank 0, which commits, dies
    flags = ["imports=[kill_in_checkpoint]", f"checkpoint.async={saves == 'async'}", "--nproc", nproc]
    process = start(run_dir, *flags, env=dying)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == (-signal.SIGKILL if nproc == "1" else 1), out
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step-00000012.tmp").is_dir()  # its shards written, never committed
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000006", "step-00000009"]  # kept: keep=2
    resumed = run_subprocess("train", *RUN, "--nproc", nproc, "--run-dir", str(run_dir), timeout=300)
    assert resumed.code == 0, resumed.err
    assert "resumed at step 9" in resumed.out
    assert_bitwise_equal(uninterrupted if nproc == "1" else uninterrupted_ddp, run_dir)
    assert logged(run_dir) == logged(uninterrupted if nproc == "1" else uninterrupted_ddp)


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


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`, with its size and modification time."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns) for path in
            sorted(folder.rglob("*")) if path.is_file()}  # fmt: skip


@pytest.mark.slow
def test_a_killed_launcher_leaves_no_worker_and_the_same_command_resumes_at_once_bitwise(
    uninterrupted_ddp: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    launcher = start(run_dir, "--nproc", "2", new_session=True)  # a group of its own, as a shell gives a job
    wait_for_step(launcher, 20)
    workers = workers_of(launcher)
    assert len(workers) == 2
    os.killpg(launcher.pid, signal.SIGKILL)  # the workers are not in its group: torch starts each in a session
    launcher.wait(timeout=30)
    after_kill = snapshot(run_dir)  # as the launcher died: its workers, if they lived, would write on
    assert [pid for pid in workers if not gone(pid, within_s=10)] == []  # within 10 s of the launcher
    time.sleep(1)
    assert snapshot(run_dir) == after_kill  # nothing written after the launcher died: no checkpoint, no final/
    assert not (run_dir / "final").exists()
    resumed = run_subprocess("train", *RUN, "--nproc", "2", "--run-dir", str(run_dir), timeout=300)
    assert resumed.code == 0, resumed.err
    assert "resumed at step" in resumed.out
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
        files = [path for path in checkpoint.iterdir() if path.name != "manifest.json"]
        manifest = {
            p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files
        }
        (checkpoint / "manifest.json").write_text(json.dumps({"files": manifest}))
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


ONE = []  # one process, strategy single
DDP, FSDP = ["parallel.strategy=ddp", "--nproc", "2"], ["parallel.strategy=fsdp", "--nproc", "2"]
TP, PP = ["parallel.strategy=tp", "--nproc", "2"], ["parallel.strategy=pp", "--nproc", "2"]
HYBRID = ["parallel.strategy=hybrid", "parallel.dp=2", "parallel.tp=2", "--nproc", "4"]
HSDP_4 = [*HSDP, "--nproc", "4"]


@pytest.fixture(scope="module")
def reshard_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # without dropout, so that one process and several compute the same thing (to float rounding)
    return single_process_run(tmp_path_factory.mktemp("reshard") / "reference", "checkpoint.every_steps=10")


@pytest.mark.parametrize(
    ("written_by", "resumed_on"),
    # a replicated (ddp) checkpoint read by one process is the 2-to-1 case with the least to get wrong: left out
    [(ONE, DDP), (ONE, FSDP), (FSDP, ONE), (TP, ONE), (PP, ONE), (HYBRID, FSDP), (HSDP_4, TP), (ONE, HSDP_4)],
    ids=[
        "ddp-1-to-2",
        "fsdp-1-to-2",
        "fsdp-2-to-1",
        "tp-2-to-1",
        "pp-2-to-1",
        "hybrid-4-to-fsdp-2",
        "hsdp-4-to-tp-2",
        "hsdp-1-to-4",
    ],
)
def test_a_checkpoint_resumes_on_another_number_of_processes(
    reshard_reference: Path, tmp_path: Path, written_by: list[str], resumed_on: list[str]
) -> None:
    def launch_on(flags: list[str], run_dir: Path, *resume: str) -> None:
        command = ["train", *GPT, "checkpoint.every_steps=10", *flags, "--run-dir", str(run_dir), *resume]
        result = run_subprocess(*command, timeout=300)
        assert result.code == 0, result.err

    writer = reshard_reference if written_by == ONE else tmp_path / "writer"
    if written_by != ONE:
        launch_on(written_by, writer)
    checkpoint = writer / "checkpoints" / "step-00000010"
    launch_on(resumed_on, tmp_path / "resumed", "--resume", str(checkpoint))
    assert max_difference(read_weights(reshard_reference), read_weights(tmp_path / "resumed")) <= TOLERANCE


def test_a_tied_checkpoint_of_one_process_resumes_under_pp(tmp_path: Path) -> None:
    # one process keeps the tied weight's optimizer state once, under the embedding's name; the last stage's copy
    # is the head's
    tied = ["model.tie_embeddings=true", "checkpoint.every_steps=10"]
    reference = single_process_run(tmp_path / "reference", *tied)
    checkpoint = reference / "checkpoints" / "step-00000010"
    command = ["train", *GPT, *tied, "parallel.strategy=pp", "--nproc", "2", "--run-dir", str(tmp_path / "pp")]
    result = run_subprocess(*command, "--resume", str(checkpoint), timeout=300)
    assert result.code == 0, result.err
    assert max_difference(read_weights(reference), read_weights(tmp_path / "pp")) <= TOLERANCE


def test_bench_checkpoint_measures_against_torch_save(cli, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = cli("bench", "checkpoint", *GPT, "--repeats", "1", "--out", str(out), "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    seconds = report["seconds"]
    assert set(seconds) >= {"torch.save + fsync (reference)", "checkpoint, async: training blocked"}
    assert all(value > 0 for value in seconds.values())
    sync = seconds["checkpoint, sync (write + SHA-256 + fsync + manifest + rename)"]
    assert report["save_throughput_vs_torch_save"] == pytest.approx(seconds["torch.save + fsync (reference)"] / sync)
    assert json.loads((out / "checkpoint.json").read_text()) == report


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    process = start(run_dir, "logging.tensorboard=true")
    wait_for_step(process, 14)  # after the checkpoint of step 12: steps 13 and 14 are logged again
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_subprocess("train", *RUN, "logging.tensorboard=true", "--run-dir", str(run_dir))
    assert resumed.code == 0, resumed.err
    assert len(list((run_dir / "tensorboard").iterdir())) == 2  # the killed run's events, the resumed run's
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    shown = [(event.step, pytest.approx(event.value)) for event in events.Scalars("train/loss")]
    assert shown == logged(run_dir)  # steps 1 to 40, each once, with the values of metrics.jsonl
