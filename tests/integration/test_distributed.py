"""Real multi-process training on CPU (gloo): every strategy ends with the weights of one process.

Each test launches `scaleforge train --nproc N` (or `torchrun`) as a user would and compares the run's
`final/model.safetensors` with a single-process run of the same config.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaleforge import load_config
from scaleforge.training.trainer import train
from tests.conftest import REPO, run_subprocess
from tests.integration.distributed_runs import (
    GPT,
    HSDP,
    MODEL,
    RUN,
    TOLERANCE,
    launch,
    logged_losses,
    max_difference,
    read_weights,
    single_process_run,
)
from tests.support_matrix import record_cell

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # multi-process runs, each several seconds


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process run every multi-process run is compared with."""
    with record_cell("single", "eager", "32"):
        return single_process_run(tmp_path_factory.mktemp("reference") / "run")


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("ddp", []),
        ("ddp", ["training.grad_accum_steps=2"]),
        ("fsdp", []),
        ("tp", []),
        ("pp", []),
        ("pp", ["parallel.schedule=gpipe", "parallel.microbatches=4"]),
        ("pp", ["training.grad_accum_steps=2"]),
    ],
    ids=["ddp", "ddp-accumulation", "fsdp", "tp", "pp-1f1b", "pp-gpipe", "pp-accumulation"],
)
def test_two_processes_end_with_the_weights_of_one(
    reference: Path, tmp_path: Path, strategy: str, extra: list[str]
) -> None:
    with record_cell(strategy, "eager", "32") if not extra else contextlib.nullcontext():
        check_equivalent_run(reference, tmp_path / strategy, strategy, extra)


def check_equivalent_run(reference: Path, run_dir: Path, strategy: str, extra: list[str]) -> None:
    result = launch(run_dir, f"parallel.strategy={strategy}", *extra)
    assert f"{strategy} on 2 processes" in result.out
    assert max_difference(read_weights(reference), read_weights(run_dir)) <= TOLERANCE
    # rank 0 logs the loss averaged over the processes: the loss of the whole global batch
    assert logged_losses(run_dir) == pytest.approx(logged_losses(reference), abs=TOLERANCE)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["processes"] == 2
    reference_summary = json.loads((reference / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(reference_summary["val_loss"], abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [["parallel.pp=2", "parallel.tp=2"], ["parallel.dp=2", "parallel.pp=2"]])
def test_hybrid_meshes_with_pipeline_stages_match_one_process(reference: Path, tmp_path: Path, mesh: list[str]) -> None:
    run_dir = tmp_path / "hybrid"
    launch(run_dir, "parallel.strategy=hybrid", *mesh, nproc=4)
    assert max_difference(read_weights(reference), read_weights(run_dir)) <= TOLERANCE


def test_hsdp_shards_within_groups_and_replicates_across_them_and_matches_one_process(
    reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "hsdp"
    with record_cell("hsdp", "eager", "32"):
        result = launch(run_dir, *HSDP, nproc=4)
        assert "hsdp on 4 processes (dp=2 replicas x 2 shards x tp=1 x pp=1)" in result.out
        assert max_difference(read_weights(reference), read_weights(run_dir)) <= TOLERANCE
        assert logged_losses(run_dir) == pytest.approx(logged_losses(reference), abs=TOLERANCE)
    # each process reduce-scatters its whole gradient in its group, then all-reduces its half across the groups
    parameters = sum(tensor.numel() for tensor in read_weights(reference).values())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["grad_sync_bytes"] for r in records if "grad_sync_bytes" in r} == {(parameters + parameters // 2) * 4}


@pytest.fixture(scope="module")
def deep_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, a gpt of 4 blocks: enough for 2 stages on each of 2 pipeline processes."""
    return single_process_run(tmp_path_factory.mktemp("deep") / "run", "model.n_layers=4")


@pytest.mark.parametrize(
    ("mesh", "nproc"),
    [
        (["parallel.strategy=pp", "parallel.schedule=interleaved_1f1b", "parallel.microbatches=4"], 2),
        (["parallel.strategy=pp", "parallel.schedule=zero_bubble", "parallel.microbatches=4"], 2),
        (["parallel.strategy=hybrid", "parallel.dp=2", "parallel.pp=2", "parallel.schedule=interleaved_1f1b"], 4),
    ],
    ids=["interleaved-1f1b", "zero-bubble", "interleaved-under-fsdp"],
)
def test_two_stages_a_process_match_one_process(
    deep_reference: Path, tmp_path: Path, mesh: list[str], nproc: int
) -> None:
    run_dir = tmp_path / "run"
    result = launch(run_dir, "model.n_layers=4", *mesh, nproc=nproc)
    assert "schedule, 4 stages (2 a process)" in result.out
    assert max_difference(read_weights(deep_reference), read_weights(run_dir)) <= TOLERANCE
    assert logged_losses(run_dir) == pytest.approx(logged_losses(deep_reference), abs=TOLERANCE)
    summary = json.loads((run_dir / "summary.json").read_text())
    microbatches = summary["pipeline_microbatches"]
    # below one stage a process at the same micro-batches: 1F1B's (p - 1) / (m + p - 1)
    assert summary["pipeline_stages"] == 4 and 0 < summary["pipeline_bubble"] < 1 / (microbatches + 1)


@pytest.fixture(scope="module")
def tied_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, a gpt whose head is its token embedding."""
    return single_process_run(tmp_path_factory.mktemp("tied") / "run", "model.tie_embeddings=true")


@pytest.mark.parametrize(
    ("mesh", "nproc"),
    [
        (["parallel.strategy=pp"], 2),
        (["parallel.strategy=hybrid", "parallel.dp=2", "parallel.pp=2"], 4),
        (["parallel.strategy=hybrid", "parallel.tp=2", "parallel.pp=2"], 4),
    ],
    ids=["pp", "dp-x-pp", "tp-x-pp"],
)
def test_a_tied_embedding_split_across_stages_matches_one_process(
    tied_reference: Path, tmp_path: Path, mesh: list[str], nproc: int
) -> None:
    run_dir = tmp_path / "run"
    launch(run_dir, "model.tie_embeddings=true", *mesh, nproc=nproc)
    weights = read_weights(run_dir)
    # the first stage's copy and the last one's: one weight, as in the single process's state dict
    assert torch.equal(weights["embed.token.weight"], weights["head.proj.weight"])
    assert max_difference(read_weights(tied_reference), weights) <= TOLERANCE
    assert logged_losses(run_dir) == pytest.approx(logged_losses(tied_reference), abs=TOLERANCE)


def test_the_mlp_tensor_parallel_plan_matches_one_process(tmp_path: Path) -> None:
    # three hidden layers: a column/row pair, then an unpaired column-wise layer gathered for the head
    mlp = ["model.architecture=mlp", "model.hidden_layers=[32, 32, 16]", "model.dropout_rate=0"]
    mlp += ["data.kind=rows", "data.num_features=12", "data.num_classes=4"]
    reference = tmp_path / "single"
    train(load_config(None, [*RUN, *mlp]), reference)
    result = run_subprocess(
        "train", *RUN, *mlp, "parallel.strategy=tp", "--nproc", "2", "--run-dir", str(tmp_path / "tp"), timeout=300
    )
    assert result.code == 0, result.err
    assert max_difference(read_weights(reference), read_weights(tmp_path / "tp")) <= TOLERANCE


def test_a_script_started_by_torchrun_directly_trains(reference: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    run_dir = tmp_path / "torchrun"
    command = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "scaleforge", "train", *GPT]
    proc = subprocess.run(
        [*command, "--run-dir", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("done:") == 1  # rank 0 alone reports
    assert max_difference(read_weights(reference), read_weights(run_dir)) <= TOLERANCE


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "2", "parallel.strategy=single"], "parallel.strategy: single runs one process, but 2 were"),
        (["--nproc", "3", "parallel.strategy=hybrid", "parallel.tp=2"], "3 processes do not divide into parallel.tp=2"),
        (
            ["--nproc", "2", "parallel.strategy=hybrid", "parallel.dp=2", "parallel.tp=2"],
            "dp=2 x tp=2 x pp=1 = 4, but 2 processes were started",
        ),
        (["--nproc", "2", "parallel.strategy=tp", "parallel.tp=4"], "parallel.tp: 4 does not match the 2 processes"),
        (["parallel.strategy=ddp", "parallel.tp=2"], "parallel.tp: sizes a mesh dimension that parallel.strategy=ddp"),
        (["parallel.stages=[2, 1]"], "parallel.stages: expected increasing block indices above 0"),
        (["--nnodes", "2"], "--nnodes above 1 needs --rdzv-endpoint"),
        (["--nnodes", "2:1"], "--nnodes: expected N or MIN:MAX with 1 <= MIN <= MAX, got '2:1'"),
        (["--nnodes", "one"], "--nnodes: expected N or MIN:MAX (positive integers), got 'one'"),
        (["--nproc", "0"], "argument --nproc: expected a positive integer"),
        (["--nproc", "2", "hardware.device=mps"], "hardware.device: 'mps' is one device, but each of the 2"),
        (["parallel.microbatches=4"], "parallel.microbatches: shapes pipeline stages, which parallel.strategy=auto"),
    ],
)
def test_bad_parallel_configs_fail_before_any_process_starts(cli, args: list[str], message: str) -> None:
    result = cli("train", *GPT, *args)
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_a_strategy_that_cannot_apply_to_the_model_is_said_once_by_rank_0(tmp_path: Path) -> None:
    # every such refusal, in tests/unit/test_parallelize.py; here, how the launched job reports one
    overrides = ["parallel.strategy=pp", "model.n_layers=1"]
    result = run_subprocess("train", *MODEL, *RUN, *overrides, "--nproc", "2", "--run-dir", str(tmp_path / "run"))
    assert result.code == 2, result.err
    errors = [line for line in result.err.splitlines() if line.strip()]
    assert errors == [errors[0]] and "need at least 2 blocks" in errors[0], result.err  # one line, said once
