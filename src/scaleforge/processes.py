"""No process outlives its parent: the one way every process scaleforge starts ends when whatever started it dies.

Linux's `PR_SET_PDEATHSIG` has the kernel send a process a signal when its parent dies, however the parent dies,
SIGKILL included. Two details make it safe to use:

- The signal fires when the parent *thread* that started the child exits, not the parent process: start children
  that use it from a thread that lives as long as they should (the main thread, or a long-lived worker thread),
  never from a short-lived one.
- A parent that died before the child set the signal is never signalled for: the child checks, after setting it,
  that its parent is still the one it expects, and exits at once otherwise.

A child either guards itself as it starts (`die_with_parent`; a `scaleforge` command started by another one reads
the guard it is to set from its environment, `guard_from_environment`, since code we do not control may start it:
torch's elastic agent starts the training ranks), or is given a `ParentDeathGuard` to run before it starts
(`preexec_fn` of `subprocess.Popen`, `worker_init_fn` of a DataLoader).

A child told to stop cleanly (SIGTERM: a search's trial checkpoints at its next step) may take longer than its
parent's death allows; `guard_from_environment` then also bounds it, killing it `grace_s` after its parent died.

Elsewhere than on Linux this is a no-op: a child whose parent is killed there runs on to its own end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

# Looked up once, in the parent: a `preexec_fn` runs between fork and exec, where loading a library is unsafe.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1
# Set for a `scaleforge` command this process starts: "PID SIGNAL [GRACE_S]" (`parent_environment`).
PARENT = "SCALEFORGE_PARENT"
# How long a child stopping cleanly after its parent's death may take before it is killed: within the 10 s in
# which every process scaleforge starts ends after its parent, with room for the half-second watch.
ORPHAN_GRACE_S = 8.0
_WATCH_S = 0.5


def die_with_parent(expected_parent_pid: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Have this process receive `sig` when its parent dies (Linux; elsewhere nothing happens).

    `expected_parent_pid` is the process that started this one, as that process knew itself: if it died before
    the guard was set, this process has already been handed to another parent and exits at once, with
    128 + `sig` (how a shell reports a death by `sig`). None takes the parent of the moment, which cannot tell
    that its parent is already gone: pass the pid whenever the parent can give it.
    """
    if _PRCTL is None:
        return
    expected = os.getppid() if expected_parent_pid is None else expected_parent_pid
    if _PRCTL(_PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig))) != 0:  # arg2 is an unsigned long
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != expected:  # the parent died before the guard was set: nothing will signal its death
        print(f"scaleforge: process {expected}, which started this one, is gone; exiting", file=sys.stderr)
        os._exit(128 + int(sig))


@dataclass(frozen=True)
class ParentDeathGuard:
    """`die_with_parent` for a child that the process making this guard starts: called in the child as it starts,
    as the `preexec_fn` of `subprocess.Popen` or the `worker_init_fn` of a DataLoader (any arguments are
    ignored). Picklable, for children started by spawning a new interpreter."""

    sig: int = signal.SIGTERM
    parent_pid: int = field(default_factory=os.getpid)

    def __call__(self, *_: object) -> None:
        die_with_parent(self.parent_pid, self.sig)


def parent_environment(sig: int, grace_s: float | None = None) -> dict[str, str]:
    """The environment that has a `scaleforge` command started by this process guard itself against this
    process's death (`guard_from_environment`): `sig` when it dies and, with `grace_s`, SIGKILL that long after."""
    value = f"{os.getpid()} {int(sig)}" + (f" {grace_s:g}" if grace_s is not None else "")
    return {PARENT: value}


def guard_from_environment() -> None:
    """First thing in a `scaleforge` command: the guard its starter asked for in `parent_environment` (none when
    started by a person). Taken out of the environment, so that the processes this one starts do not inherit it."""
    value = os.environ.pop(PARENT, None)
    if value is None:
        return
    pid, sig, *grace = value.split()
    if os.getppid() != int(pid) and _alive(int(pid)):
        return  # left in the environment of a process that the one it names did not start: not this one's parent
    die_with_parent(int(pid), int(sig))
    if grace and _PRCTL is not None:
        threading.Thread(target=_kill_after, args=(int(pid), float(grace[0])), name="parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _kill_after(parent_pid: int, grace_s: float) -> None:
    """Once the parent is gone, give this process `grace_s` to end on the signal it was sent, then kill it."""
    while os.getppid() == parent_pid:
        time.sleep(_WATCH_S)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)
