"""A process started with the guard ends when its parent dies, SIGKILL included, and one whose parent died
before the guard was set exits at once: real processes, and a parent the test kills."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scaleforge.processes import ParentDeathGuard
from tests.conftest import gone

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's"),
    pytest.mark.timeout(120),
]

# The parent: starts `python CHILD...` (with a `ParentDeathGuard` of signal HOW; HOW "self": none, "env": SIGTERM
# and a 1 s grace asked for in the child's environment), the argument PARENT_PID replaced by its own pid; prints
# the child's pid, then sleeps until it is killed.
PARENT = """
import os, signal, subprocess, sys, time
from scaleforge.processes import ParentDeathGuard, parent_environment

how, child = sys.argv[1], [str(os.getpid()) if arg == "PARENT_PID" else arg for arg in sys.argv[2:]]
guard = ParentDeathGuard(int(how)) if how not in ("self", "env") else None
env = {**os.environ, **parent_environment(signal.SIGTERM, grace_s=1.0)} if how == "env" else None
process = subprocess.Popen([sys.executable, *child], preexec_fn=guard, env=env)
print(process.pid, flush=True)
time.sleep(600)
"""

# Guards itself against the parent it was told of, as a training rank does, and says so.
SELF_GUARDED = """
import signal, sys, time
from scaleforge.processes import die_with_parent

die_with_parent(int(sys.argv[1]), signal.SIGTERM)
print("guarded", flush=True)
time.sleep(600)
"""

# Ignores SIGTERM (a stop that would take too long), then sets the guard its environment asks for.
FROM_ENVIRONMENT = """
import os, signal, time
from scaleforge.processes import PARENT, guard_from_environment

signal.signal(signal.SIGTERM, signal.SIG_IGN)
guard_from_environment()
assert PARENT not in os.environ  # not handed on to what this process starts
print("guarded", flush=True)
time.sleep(600)
"""

# Sets the guard only once its parent is gone; then writes a marker, if it goes on.
LATE = """
import os, signal, sys, time
from pathlib import Path
from scaleforge.processes import die_with_parent

parent, marker = int(sys.argv[1]), Path(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.05)
die_with_parent(parent, signal.SIGTERM)
marker.write_text("outlived its parent")
"""


@contextlib.contextmanager
def parent_of(how: str, *child: str) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """The parent above, started with `HOW CHILD...`: yields it, its child's pid and a reader of what else they
    print; both are killed after."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how, *child], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    lines: list[str] = []
    line = parent.stdout.readline()
    while not line.strip().isdigit():  # the child may print before its parent does
        assert line, "the parent ended: " + "".join(lines)
        lines.append(line)
        line = parent.stdout.readline()
    child_pid = int(line)
    try:
        yield parent, child_pid, lines
    finally:
        parent.kill()
        parent.wait(timeout=30)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(child_pid).kill()


def kill(parent: subprocess.Popen[str]) -> None:
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_child_started_with_the_guard_ends_when_its_parent_is_killed(sig: signal.Signals) -> None:
    with parent_of(str(int(sig)), "-c", "import time; time.sleep(600)") as (parent, child, _):
        assert psutil.Process(child).ppid() == parent.pid
        kill(parent)
        assert gone(child, within_s=10)


@pytest.mark.parametrize(
    ("how", "script", "child_args"),
    # the second ignores SIGTERM, so only the kill that follows the grace its environment asks for can end it
    [("self", SELF_GUARDED, ["PARENT_PID"]), ("env", FROM_ENVIRONMENT, [])],
    ids=["told-its-parent", "from-its-environment"],
)
def test_a_child_that_guards_itself_ends_when_its_parent_is_killed(
    tmp_path: Path, how: str, script: str, child_args: list[str]
) -> None:
    path = tmp_path / "child.py"
    path.write_text(script)
    with parent_of(how, str(path), *child_args) as (parent, child, lines):
        assert parent.stdout is not None
        while "guarded\n" not in lines:  # the guard is set before the parent dies
            line = parent.stdout.readline()
            assert line, "the child ended: " + "".join(lines)
            lines.append(line)
        kill(parent)
        assert gone(child, within_s=10)


def test_a_child_whose_parent_died_before_the_guard_was_set_exits_at_once(tmp_path: Path) -> None:
    script, marker = tmp_path / "late.py", tmp_path / "outlived"
    script.write_text(LATE)
    with parent_of("self", str(script), "PARENT_PID", str(marker)) as (parent, child, _):
        kill(parent)
        assert gone(child, within_s=10)
    assert not marker.exists()


def test_a_guarded_child_whose_parent_lives_runs_to_its_end() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "print('done')"],
        preexec_fn=ParentDeathGuard(signal.SIGKILL),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "done\n")


def test_the_guard_against_a_parent_it_does_not_have_exits_with_128_plus_the_signal() -> None:
    # what a child finds when its parent died before the guard: another process (init) has taken it
    code = f"from scaleforge.processes import die_with_parent; die_with_parent(1, {int(signal.SIGTERM)}); print('on')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (128 + signal.SIGTERM, "")
