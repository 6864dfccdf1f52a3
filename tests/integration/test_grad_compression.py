"""Compressed gradient all-reduce under ddp (2 processes on gloo): each setting trains, logs the bytes it
all-reduced, and resumes bitwise after SIGTERM, PowerSGD's error feedback and factors included; a resume on
another number of processes starts PowerSGD's state afresh and says so."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import run_subprocess
from tests.integration.test_resume import RUN, assert_bitwise_equal, logged, start, wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS: list[str] = []  # the resume tests' 40 steps: a run signalled at step 8 is still training
POWERSGD = ["parallel.grad_compression=powersgd", "parallel.powersgd_rank=2", "parallel.powersgd_start_step=4"]
SETTINGS = {
    "bf16": ["parallel.grad_compression=bf16"],
    "fp16": ["parallel.grad_compression=fp16"],
    # async checkpoints: PowerSGD's tensors change between the checkpoints of steps 3 (before it starts) and 6
    "powersgd": [*POWERSGD, "checkpoint.async=true"],
}


def sync_bytes(run_dir: Path) -> dict[int, int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["grad_sync_bytes"] for r in map(json.loads, lines) if "grad_sync_bytes" in r}


def powersgd_elements(shapes: list[list[int]], rank: int) -> int:
    """What PowerSGD all-reduces a step: each matrix (rows x the rest) as two rank-r factors when that is at
    least twice smaller, anything else whole."""
    total = 0
    for shape in shapes:
        rows = shape[0] if shape else 1
        numel = 1
        for size in shape:
            numel *= size
        columns = numel // rows
        r = min(rows, columns, rank)
        total += (rows + columns) * r if (rows + columns) * r * 2 < numel else numel
    return total


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    result = run_subprocess("train", *RUN, *STEPS, "--nproc", "2", "--run-dir", str(run_dir), timeout=300)
    assert result.code == 0, result.err
    return run_dir


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_each_compression_trains_counts_its_bytes_and_resumes_bitwise(
    plain: Path, tmp_path: Path, setting: str
) -> None:
    overrides = [*STEPS, *SETTINGS[setting]]
    uninterrupted = tmp_path / "uninterrupted"
    result = run_subprocess("train", *RUN, *overrides, "--nproc", "2", "--run-dir", str(uninterrupted), timeout=300)
    assert result.code == 0, result.err

    full = sync_bytes(plain)
    assert len(set(full.values())) == 1  # fp32 all-reduce: every parameter's gradient, every step
    counted = sync_bytes(uninterrupted)
    if setting == "powersgd":
        assert all(counted[step] == full[step] for step in (1, 2, 3))  # plain all-reduce until powersgd_start_step
        weights = load_file(str(uninterrupted / "final" / "model.safetensors"))
        elements = powersgd_elements([list(t.shape) for t in weights.values()], rank=2)
        assert all(counted[step] == elements * 4 for step in range(5, 41))
        assert counted[40] < full[40] / 4
    else:
        assert all(counted[step] * 2 == full[step] for step in counted)
    losses = [loss for _, loss in logged(uninterrupted)]
    assert losses[-1] < losses[0]  # it trains

    run_dir = tmp_path / "run"
    process = start(run_dir, *overrides, "--nproc", "2")
    wait_for_step(process, 8)  # after powersgd_start_step, between checkpoints (every 3 steps)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out
    resumed = run_subprocess("train", *RUN, *overrides, "--nproc", "2", "--run-dir", str(run_dir), timeout=300)
    assert resumed.code == 0, resumed.err
    assert "start afresh" not in resumed.out
    assert_bitwise_equal(uninterrupted, run_dir)
    assert logged(run_dir) == logged(uninterrupted)


def test_fsdp_reduces_gradients_in_the_reduce_dtype(plain: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*STEPS, "parallel.strategy=fsdp", "parallel.reduce_dtype=bf16"]
    result = run_subprocess("train", *RUN, *overrides, "--nproc", "2", "--run-dir", str(run_dir), timeout=300)
    assert result.code == 0, result.err
    halved, full = sync_bytes(run_dir), sync_bytes(plain)
    assert all(halved[step] * 2 == full[step] for step in full)  # every whole gradient, in 2 bytes a value
    assert "grad sync" in result.out
    (_, last), (_, plain_last) = logged(run_dir)[-1], logged(plain)[-1]
    assert abs(last - plain_last) < 0.02 * plain_last


def test_powersgd_resumed_on_another_number_of_processes_starts_afresh_and_says_so(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start(run_dir, *STEPS, *POWERSGD, "--nproc", "2")
    wait_for_step(process, 8)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out
    resumed = run_subprocess("train", *RUN, *STEPS, *POWERSGD, "--nproc", "4", "--run-dir", str(run_dir), timeout=300)
    assert resumed.code == 0, resumed.err
    message = "PowerSGD's error feedback and factors start afresh: the checkpoint's was written by 2 processes, "
    assert message + "this run has 4" in resumed.out
    assert max(step for step, _ in logged(run_dir)) == 40
    counted = sync_bytes(run_dir)
    assert counted[40] < counted[1] / 4  # compressing from the first step resumed: its start step is long past


def test_powersgd_refuses_fp16_loss_scaling(tmp_path: Path) -> None:
    result = run_subprocess(
        "train", *RUN, *POWERSGD, "training.precision=fp16-mixed", "--nproc", "2", "--run-dir", str(tmp_path / "r")
    )
    assert result.code == 2, result.err
    assert "parallel.grad_compression: powersgd cannot run under fp16-mixed" in result.err


def _train_in_buckets(rank: int, store: str, out: str) -> None:
    import gc

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from scaleforge.distributed.compression import GradCompression

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 6))
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.004)  # a bucket for about every layer
    compression = GradCompression("powersgd", ddp, dist.group.WORLD, rank=2, start_step=2)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)  # each process its own batches
    for _ in range(12):
        optimizer.zero_grad()
        inputs, targets = torch.randn(16, 24, generator=generator), torch.randint(0, 6, (16,), generator=generator)
        nn.functional.cross_entropy(ddp(inputs), targets).backward()
        optimizer.step()
    assert compression.powersgd is not None and len(compression.powersgd.layouts) > 1
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(every, flat)
    if rank == 0:
        Path(out).write_text(json.dumps({"equal": torch.equal(every[0], every[1])}))
    del ddp, optimizer, compression
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.timeout(120)  # a mismatch hangs or aborts
def test_powersgd_over_many_buckets_keeps_the_processes_in_step(tmp_path: Path) -> None:
    """Several buckets in flight: each bucket's all-reduces go out in the same order on every process (gloo runs
    PowerSGD's chained all-reduces on its own threads), and the replicas stay identical."""
    import torch.multiprocessing as mp

    out = tmp_path / "result.json"
    mp.start_processes(_train_in_buckets, args=(str(tmp_path / "store"), str(out)), nprocs=2, start_method="spawn")
    assert json.loads(out.read_text()) == {"equal": True}
