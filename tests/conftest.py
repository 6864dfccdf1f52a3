"""Shared fixtures: running the CLI in-process and as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from scaleforge.cli import main

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two workers share the two cores, one torch thread each
    torch.set_num_threads(1)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def torch_threads_as_they_were() -> Iterator[None]:
    """Each test leaves torch's thread count as it found it. Serving and streaming in this process set it for
    their model, and runs trained here are compared bit for bit with runs of other processes, which a different
    count (another order of the sums in a matrix product) would break."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches written by the code under test (image_folder's decoded images) go to the test session's own
    folder, for this process and the ones it starts, never to the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache-home"))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `scaleforge ARGS...` in this process; returns exit code, stdout and stderr."""

    def run(*args: str) -> CliResult:
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_subprocess(*args: str, cwd: Path | None = None, timeout: float = 240) -> CliResult:
    """Run `python -m scaleforge ARGS...` as a separate process, the way a user's shell does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "scaleforge", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def gone(pid: int, within_s: float = 20.0) -> bool:
    """Whether `pid` has exited within `within_s`: reaped, or a zombie whose threads have all ended (a killed
    process's main thread shows as a zombie while its other threads still wind down, and its parent cannot see
    it exit, nor its pipes close, until they have)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or ("(Z)" in _state(pid) and _threads(pid) <= 1):
            return True
        time.sleep(0.1)
    return False


def _threads(pid: int) -> int:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])
    return 0


def _state(pid: int) -> str:
    with contextlib.suppress(OSError):
        return "(" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] + ")"
    return "(X)"


async def until(ask: Callable[[], Awaitable[httpx.Response]], status: int, within_s: float = 20) -> httpx.Response:
    """`ask`'s first answer with `status`, asked every 20 ms; fails after `within_s`."""
    deadline = time.monotonic() + within_s
    while (response := await ask()).status_code != status:
        assert time.monotonic() < deadline, f"no {status} within {within_s} s: {response.status_code} {response.text}"
        await asyncio.sleep(0.02)
    return response
