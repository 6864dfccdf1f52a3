"""`status.json` names every process of a run: a new run into its directory waits (bounded, in one line) for the
processes of a run that is ending, and is refused by a run that is being trained."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scaleforge.errors import UsageError
from scaleforge.training import status
from scaleforge.training.run_dir import resume_point
from scaleforge.training.status import process_alive, process_start_time, run_state, this_process, write_status

pytestmark = pytest.mark.timeout(120)


def sleeping(seconds: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this test's that runs for 3 s, as a rank still ending would."""
    yield from sleeping(3)


@pytest.fixture
def runner() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this test's that runs on for as long as the test needs, as a rank still training would."""
    yield from sleeping(600)


def named(process: subprocess.Popen[bytes], parent: int | None) -> dict:
    """`process` as `status.json` names a rank, recorded with `parent`."""
    return {**this_process(), "pid": process.pid, "started": process_start_time(process.pid), "parent": parent}


def test_a_run_whose_process_lost_its_parent_is_waited_for_in_one_line(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    # recorded under another parent: its launcher died, and it was taken by another process
    write_status(tmp_path, "running", ranks=[named(sleeper, parent=1)])
    assert run_state(tmp_path) == "running"
    assert resume_point(tmp_path, "auto") is None  # waited until it ended, then went on as a new run
    assert sleeper.poll() is not None
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"waiting up to 15 s for the 1 process of the previous run of {tmp_path} to end"]


def test_a_run_missing_a_process_is_waited_for_and_refused_if_the_rest_outlive_the_wait(
    tmp_path: Path,
    runner: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(status, "ENDING_WAIT_S", 0.5)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    write_status(tmp_path, "running", ranks=[named(runner, parent=os.getpid()), named(gone, parent=os.getpid())])
    started = time.monotonic()
    with pytest.raises(UsageError, match="is being trained now"):
        resume_point(tmp_path, "auto")
    assert time.monotonic() - started >= 0.5
    assert "waiting up to 0.5 s for the 1 process of the previous run" in capsys.readouterr().err


def test_a_run_whose_processes_all_run_under_their_parents_is_refused_at_once(
    tmp_path: Path, runner: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    write_status(tmp_path, "running", ranks=[named(runner, parent=os.getpid()), named(runner, parent=None)])
    started = time.monotonic()
    with pytest.raises(UsageError, match="is being trained now"):
        resume_point(tmp_path, "auto")
    assert time.monotonic() - started < 10  # refused without waiting the 15 s
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_exited_process_not_yet_reaped_does_not_run() -> None:
    process = subprocess.Popen([sys.executable, "-c", ""])
    started = process_start_time(process.pid)
    deadline = time.monotonic() + 60
    while process_alive(process.pid, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Path(f"/proc/{process.pid}").exists()  # a zombie until waited for
    assert not process_alive(process.pid, started)
    process.wait()


def test_the_heartbeat_rewrites_the_status_once_its_interval_has_passed(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from scaleforge.training.callbacks import RunState

    clock = [1000.0]
    monkeypatch.setattr(status.time, "monotonic", lambda: clock[0])
    write_status(tmp_path, "running", strategy="single", processes=1)
    heartbeat = status.StatusHeartbeat(every_s=30)
    state = RunState(tmp_path, 100, 10, 8)
    heartbeat.on_train_start(state)
    written = []
    monkeypatch.setattr(status, "write_status", lambda run_dir, state, **details: written.append(details["step"]))
    for step, now in ((10, 1001.0), (20, 1029.9), (30, 1030.0), (40, 1031.0), (50, 1061.0)):
        clock[0] = now
        heartbeat.on_log(state, {"step": step})
    assert written == [30, 50]  # 30 s after the start, then 30 s after that rewrite
