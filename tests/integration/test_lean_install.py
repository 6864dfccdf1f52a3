"""The core install: training and looking at runs need no extra (`pip install scaleforge` alone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaleforge.extras import EXTRAS
from tests.conftest import REPO

# Runs the core commands in one process in which every extra's modules fail to import, as in a core install.
CORE_COMMANDS = """
import sys
for name in {modules!r}:
    sys.modules[name] = None
from scaleforge.cli import main
run = sys.argv[1]
commands = [
    ["train", "training.max_steps=5", "logging.progress=none", "--run-dir", run],
    ["eval", run],
    ["plot", run],
    ["runs", run + "/.."],
    ["config", "show", "--explain"],
    ["list"],
    ["export", run, "--format", "torch-export"],
    ["serve", run],
]
print([main(command) for command in commands])
"""


def test_the_core_commands_need_no_extra(tmp_path: Path) -> None:
    modules = sorted(
        {name for names in EXTRAS.values() for name in names}
        | {"pydantic", "starlette", "httptools", "uvloop", "multipart", "lightning", "litserve"}
    )
    result = subprocess.run(
        [sys.executable, "-c", CORE_COMMANDS.format(modules=modules), str(tmp_path / "run")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0, 0, 0, 0, 2]", result.stdout + result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("usage error: scaleforge serve needs the [serve] extra: pip install 'scaleforge[serve]'")
    )


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SCALEFORGE_LEAN_INSTALL"), reason="set SCALEFORGE_LEAN_INSTALL=1: pip, minutes")
def test_a_fresh_core_install(tmp_path: Path) -> None:
    """tests/lean_install.sh: `pip install scaleforge` into a new virtual environment, then train, eval, and the
    one-line message of each command whose extra is missing."""
    result = subprocess.run(
        ["bash", str(REPO / "tests" / "lean_install.sh"), str(tmp_path / "venv")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
