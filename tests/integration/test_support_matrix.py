"""Strategy x compile x activation checkpointing x precision: each cell trains the small GPT and must match a
single-process eager run of the same precision, or be refused up front with a config error.

`make test` runs the cells in CORE (the ones most likely to break together; hybrid meshes are trained by
tests/integration/test_distributed.py and resumed by test_resume.py; hybrid with hsdp inside, on 8 processes,
runs here only); `make support-matrix` runs every
cell (SCALEFORGE_MATRIX=all) and renders `docs/support-matrix.md` from the outcomes. The eager fp32 cells of the
multi-process strategies are recorded by tests/integration/test_distributed.py.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.distributed_runs import launch, max_difference, read_weights, single_process_run
from tests.support_matrix import MODES, PRECISIONS, STRATEGIES, record_cell

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

TOLERANCES = {"32": 1e-4, "fp16-mixed": 1e-3, "bf16-mixed": 1e-2}  # bf16 keeps 8 bits of mantissa
# fp16 needs a gradient scaler these do not support
REFUSED = {"fp16-mixed": ("fsdp", "hsdp", "tp", "pp", "hybrid", "hybrid + hsdp")}
MESHES = {
    "hsdp": ["parallel.strategy=hsdp", "parallel.dp_replicate=2"],
    "hybrid": ["parallel.strategy=hybrid", "parallel.dp=2", "parallel.tp=2"],
    "hybrid + hsdp": ["parallel.strategy=hybrid", "parallel.dp=4", "parallel.dp_replicate=2", "parallel.tp=2"],
}
CORE = {
    ("single", "compiled + checkpointing", "32"),
    ("ddp", "compiled + checkpointing", "32"),
    ("fsdp", "compiled + checkpointing", "32"),
    ("tp", "compiled + checkpointing", "32"),
    ("pp", "compiled + checkpointing", "32"),
    ("fsdp", "eager", "bf16-mixed"),
    ("tp", "eager", "bf16-mixed"),
    ("pp", "eager", "bf16-mixed"),
    ("ddp", "eager", "fp16-mixed"),
    ("pp", "eager", "fp16-mixed"),
}
RECORDED_ELSEWHERE = {(strategy, "eager", "32") for strategy in ("single", "ddp", "fsdp", "hsdp", "tp", "pp")}
ALL = os.environ.get("SCALEFORGE_MATRIX") == "all"
CELLS = [
    (strategy, mode, precision)
    for precision in PRECISIONS
    for strategy in STRATEGIES
    for mode in MODES
    if (strategy, mode, precision) not in RECORDED_ELSEWHERE and (ALL or (strategy, mode, precision) in CORE)
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The single-process eager run of a precision, made when first asked for."""

    @functools.cache
    def run(precision: str) -> Path:
        return single_process_run(
            tmp_path_factory.mktemp(f"reference-{precision}") / "run", f"training.precision={precision}"
        )

    return run


@pytest.mark.parametrize(("strategy", "mode", "precision"), CELLS, ids=["/".join(cell) for cell in CELLS])
def test_cell(reference: Callable[[str], Path], tmp_path: Path, strategy: str, mode: str, precision: str) -> None:
    mesh = MESHES.get(strategy, [f"parallel.strategy={strategy}"])
    overrides = [*mesh, f"training.precision={precision}", *MODES[mode]]
    run_dir = tmp_path / "run"
    with record_cell(strategy, mode, precision) as cell:
        if strategy in REFUSED.get(precision, ()):
            result = launch(run_dir, *overrides, nproc=STRATEGIES[strategy], expect=2)
            message = result.err.strip()
            assert message.startswith("config error: training.precision: fp16-mixed needs a gradient scaler")
            cell.outcome = f"refused: {message.removeprefix('config error: ')}"
            return
        launch(run_dir, *overrides, nproc=STRATEGIES[strategy])
        difference = max_difference(read_weights(reference(precision)), read_weights(run_dir))
        assert difference <= TOLERANCES[precision]
