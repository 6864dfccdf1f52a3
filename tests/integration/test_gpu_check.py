"""`make gpu-check` on a machine without a GPU: it says so and exits 0; rehearsed on the CPU (`--rehearse`, every row
small and uncompiled), every row passes and its JSON holds them all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs its rows")
def test_gpu_check_without_a_gpu_says_so_and_exits_0() -> None:
    result = subprocess.run(
        ["make", "gpu-check", f"PYTHON={sys.executable}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA GPU here" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(660)  # beyond the rehearsal's own 600 s: it took over 300 s on a slow 2-core machine
def test_gpu_check_rehearsed_on_the_cpu_passes_every_row_and_writes_its_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scaleforge.bench.gpu_check", "--rehearse", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == [
        "mlp", "resnet18-bf16-compiled", "resume", "async-checkpoints", "bench-overhead", "gpt-1b", "ddp", "fsdp",
        "tp", "pp", "bench-generate",
    ]  # fmt: skip
    assert all(row["status"] == "ok" for row in rows.values()), [r for r in rows.values() if r["status"] != "ok"]
    assert "bitwise" in rows["resume"]["note"] and rows["async-checkpoints"]["figures"]["checkpoints"]
    assert rows["gpt-1b"]["figures"]["flops_method"].startswith("6N + 12LHQT")
    assert "11 of 11 rows passed" in result.stdout
