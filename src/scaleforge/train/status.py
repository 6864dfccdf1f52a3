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

STATUS = "status.json"


def write_status(run_dir: Path, state: str, **details: Any) -> None:
    """Record `state` (running, stopped, failed, finished) for `run_dir`, replacing the file whole."""
    record = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **details}
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
    """Whether the process that wrote `record` still runs (a process on another host is taken to)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except PermissionError:  # it exists, as another user's
        return True
    except (OSError, ValueError):
        return False
    return True
