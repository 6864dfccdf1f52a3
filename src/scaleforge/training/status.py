"""Where a run stands, for `scaleforge runs`: `status.json` in the run directory, written by rank 0 when the run
starts (running, with its process id and host, and every process of the run: `ranks`), stops on a signal
(stopped), fails (failed, with the error's first line) and finishes (finished), and read back with what the
directory holds: a run whose processes are gone while its status still says running was killed; one with a
checkpoint can be resumed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from scaleforge.training.callbacks import Callback, RunState

STATUS = "status.json"
STALE_S = 900.0  # a run on another host whose status has not been rewritten for this long is taken to be gone
ENDING_WAIT_S = 15.0  # how long a new run waits for the ending processes of the previous run of its directory


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
    # final/ is renamed into place once complete (`runs.save_final`; compress renames its whole run); whether its
    # files still match their manifest is checked where a run is opened or resumed, not for a listing
    if (run_dir / "final" / "manifest.json").is_file():
        return "finished"
    record = read_status(run_dir)
    if record.get("state") == "running" and _alive(record):
        return "running"
    from scaleforge.training.checkpoint import list_checkpoints

    return "resumable" if list_checkpoints(run_dir / "checkpoints") else "failed"


def _alive(record: dict[str, Any]) -> bool:
    """Whether the run that wrote `record` still runs: on this host, one of its processes (not another that
    reuses its id); on another, one whose last word (every 30 s: `StatusHeartbeat`) is recent."""
    if record.get("host") != socket.gethostname():
        return time.time() - float(record.get("time", 0)) < STALE_S
    return bool(_live(_local_processes(record)))


def this_process() -> dict[str, Any]:
    """This process as `status.json` names the processes of a run (`ranks`): host, pid, start time, and the
    parent whose death ends it (a launcher's worker; a process a person started has none: nothing ends it when the
    shell that started it goes)."""
    from scaleforge.distributed.launch import is_launched_worker

    pid = os.getpid()
    parent = os.getppid() if is_launched_worker() else None
    return {"host": socket.gethostname(), "pid": pid, "started": process_start_time(pid), "parent": parent}


def _local_processes(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The processes of this host that `record` names: its `ranks`, or the process that wrote it (a status
    written before the ranks were recorded)."""
    writer = {"host": record.get("host"), "pid": record.get("pid"), "started": record.get("process_started")}
    processes = record.get("ranks") or [writer]
    here = socket.gethostname()
    return [process for process in processes if isinstance(process, dict) and process.get("host") == here]


def _live(processes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [process for process in processes if process_alive(process.get("pid"), process.get("started"))]


def wait_for_ending_run(run_dir: Path) -> None:
    """When the run `run_dir`'s status names as running is ending, wait up to `ENDING_WAIT_S` for its processes
    of this host to end, saying so in one line on stderr. It is ending when one of its processes has gone, or has
    lost the parent that started it (its launcher was killed: its guard is ending it); a run whose
    processes all run under their parents is being trained, and is not waited for."""
    record = read_status(run_dir)
    if record.get("state") != "running" or record.get("host") != socket.gethostname():
        return
    processes = _local_processes(record)
    live = _live(processes)
    if not live or (len(live) == len(processes) and not any(map(_orphaned, live))):
        return
    count = f"{len(live)} process{'es' if len(live) > 1 else ''}"
    print(f"waiting up to {ENDING_WAIT_S:g} s for the {count} of the previous run of {run_dir} to end", file=sys.stderr)
    deadline = time.monotonic() + ENDING_WAIT_S
    while _live(live) and time.monotonic() < deadline:
        time.sleep(0.1)


def _orphaned(process: dict[str, Any]) -> bool:
    """Whether a live process of a run has another parent than the one it recorded (None: not recorded)."""
    import psutil

    if process.get("parent") is None:
        return False
    try:
        return psutil.Process(int(process["pid"])).ppid() != process["parent"]
    except (psutil.Error, TypeError, ValueError):
        return False


def process_alive(pid: Any, started: Any) -> bool:
    """Whether process `pid` of this host runs and is the one that started at `started` (not a later process
    that reuses its id; None: not known). A process that has exited but is not yet reaped (a zombie) does not
    run."""
    import psutil

    try:
        pid = int(pid)
        if pid <= 0:  # not a process: kill() would signal a whole group
            return False
        os.kill(pid, 0)
    except PermissionError:  # it exists, as another user's
        return True
    except (OSError, TypeError, ValueError, OverflowError):
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        now = process.create_time()
    except psutil.NoSuchProcess:  # gone since (a zombie's details included)
        return False
    except psutil.Error:  # it exists, but cannot be looked at
        return True
    return started is None or abs(now - float(started)) < 1.0


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if it is gone."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


HEARTBEAT_S = 30.0  # how often a running run rewrites status.json: well inside STALE_S


class StatusHeartbeat(Callback):
    """Rewrites `status.json` (running, now) at the first log line `every_s` seconds after it last did, so that
    another host can tell a run that still trains from one whose node went down (after `STALE_S` without one).
    Not at every log line: a rewrite (the file, its rename, the process's start time from /proc) costs about 0.7 ms,
    which a small model's log lines would pay 50 steps apart."""

    def __init__(self, every_s: float = HEARTBEAT_S) -> None:
        self.details: dict[str, Any] = {}
        self.every_s = every_s
        self.written = 0.0  # time.monotonic() of the last rewrite

    def on_train_start(self, state: RunState) -> None:
        status = read_status(state.run_dir)  # as the trainer wrote it when the run started
        self.details = {key: status[key] for key in ("strategy", "processes", "ranks") if key in status}
        self.written = time.monotonic()

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        if time.monotonic() - self.written >= self.every_s:
            write_status(state.run_dir, "running", step=record["step"], **self.details)
            self.written = time.monotonic()
