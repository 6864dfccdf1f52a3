"""Where a run stands, for `scaleforge runs`: `status.json` in the run directory, written by rank 0 when the run
starts (running, with its process id and host), stops on a signal (stopped), fails (failed, with the error's
first line) and finishes (finished), and read back with what the directory holds: a run whose process is gone
while its status still says running was killed; one with a checkpoint can be resumed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from scaleforge.train.callbacks import Callback, RunState

STATUS = "status.json"
STALE_S = 900.0  # a run on another host whose status has not been rewritten for this long is taken to be gone


def write_status(run_dir: Path, state: str, **details: Any) -> None:
    """Record `state` (running, stopped, failed, finished) for `run_dir`, replacing the file whole; `time` is
    when, `process_started` tells this process from a later one that reuses its id."""
    record = {
        "state": state,
        "pid": os.getpid(),
        "process_started": process_start_time(os.getpid()),
        "host": socket.gethostname(),
        "time": time.time(),
        **details,
    }
    partial = run_dir / f"{STATUS}.partial"
    partial.write_text(json.dumps(record) + "\n")
    partial.replace(run_dir / STATUS)


def read_status(run_dir: Path) -> dict[str, Any]:
    """`status.json`'s record, or {} when there is none or it cannot be read."""
    try:
        record = json.loads((run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_state(run_dir: Path) -> str:
    """finished, running, resumable (stopped, failed or killed, with a checkpoint to go on from) or failed."""
    if (run_dir / "final" / "model.safetensors").is_file():  # written last by training, and by compress
        return "finished"
    record = read_status(run_dir)
    if record.get("state") == "running" and _alive(record):
        return "running"
    from scaleforge.train.checkpoint import list_checkpoints

    return "resumable" if list_checkpoints(run_dir / "checkpoints") else "failed"


def _alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote `record` still runs: on this host, that process itself (not another that
    reuses its id); on another, one whose last word (every log line: `StatusHeartbeat`) is recent."""
    if record.get("host") != socket.gethostname():
        return time.time() - float(record.get("time", 0)) < STALE_S
    return process_alive(record.get("pid"), record.get("process_started"))


def process_alive(pid: Any, started: Any) -> bool:
    """Whether process `pid` of this host runs and is the one that started at `started` (not a later process
    that reuses its id; None: not known)."""
    try:
        pid = int(pid)
        if pid <= 0:  # not a process: kill() would signal a whole group
            return False
        os.kill(pid, 0)
    except PermissionError:  # it exists, as another user's
        return True
    except (OSError, TypeError, ValueError, OverflowError):
        return False
    now = process_start_time(pid)
    return started is None or now is None or abs(now - float(started)) < 1.0


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if it is gone."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class StatusHeartbeat(Callback):
    """Rewrites `status.json` (running, now) at every log line, so that another host can tell a run that still
    trains from one whose node went down."""

    def __init__(self) -> None:
        self.details: dict[str, Any] = {}

    def on_train_start(self, state: RunState) -> None:
        status = read_status(state.run_dir)  # as the trainer wrote it when the run started
        self.details = {key: status[key] for key in ("strategy", "processes") if key in status}

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        write_status(state.run_dir, "running", step=record["step"], **self.details)
