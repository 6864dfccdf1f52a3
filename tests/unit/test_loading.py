"""Tests for scaleforge.data.loading: global batches are a function of the config, not of the process layout."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from scaleforge.data.base import InMemoryDataset
from scaleforge.data.loading import (
    BatchPlan,
    EpochIndexPlan,
    EvalBatches,
    TrainBatches,
    epoch_permutation,
    eval_batches,
    sample_seeds,
    shard_windows,
    windowed_permutation,
)
from scaleforge.errors import ConfigError
from tests.conftest import gone

NUM_SAMPLES = 100
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = NUM_SAMPLES // GLOBAL_BATCH  # 6; the last 4 samples are dropped
CPU = torch.device("cpu")


class PlainDataset(Dataset):
    """The same samples one at a time, so the loader takes the DataLoader path."""

    def __init__(self, source: InMemoryDataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.inputs[index], self.source.targets[index]


def _indexed_dataset(num_samples: int = NUM_SAMPLES) -> InMemoryDataset:
    """Sample i has input [i, -i] and target i, so every batch shows which samples it holds."""
    index = torch.arange(num_samples)
    return InMemoryDataset(torch.stack([index, -index], dim=1).float(), index)


def _steps(dataset: Dataset, plan: BatchPlan, *, epoch: int = 0, start_step: int = 0, seed: int = 0) -> list:
    return list(TrainBatches(dataset, plan, seed=seed, device=CPU).epoch(epoch, start_step=start_step))


def _global_batches(world_size: int, grad_accum_steps: int, *, epoch: int = 0) -> list[torch.Tensor]:
    """Per step, the targets of all ranks' micro-batches concatenated in rank, then micro-step, order."""
    dataset = _indexed_dataset()
    per_rank = []
    for rank in range(world_size):
        plan = BatchPlan(GLOBAL_BATCH, grad_accum_steps=grad_accum_steps, world_size=world_size, rank=rank)
        steps = _steps(dataset, plan, epoch=epoch, seed=3)
        assert len(steps) == STEPS_PER_EPOCH
        for micro_batches in steps:
            assert len(micro_batches) == grad_accum_steps
            for inputs, targets in micro_batches:
                assert inputs.shape == (plan.micro_batch_size, 2)
                assert torch.equal(inputs[:, 0].long(), targets)  # inputs and targets stay paired
        per_rank.append(steps)
    return [torch.cat([targets for steps in per_rank for _, targets in steps[step]]) for step in range(STEPS_PER_EPOCH)]


@pytest.mark.parametrize(("world_size", "grad_accum_steps"), [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)])
def test_global_batch_is_the_same_for_any_world_size(world_size: int, grad_accum_steps: int) -> None:
    expected = epoch_permutation(NUM_SAMPLES, seed=3, epoch=1)[: STEPS_PER_EPOCH * GLOBAL_BATCH]
    batches = _global_batches(world_size, grad_accum_steps, epoch=1)
    assert torch.equal(torch.stack(batches), expected.view(STEPS_PER_EPOCH, GLOBAL_BATCH))


def test_micro_batch_size() -> None:
    assert BatchPlan(32, grad_accum_steps=2, world_size=4).micro_batch_size == 4
    assert BatchPlan(32).micro_batch_size == 32


def test_rank_slice_is_contiguous_per_rank() -> None:
    global_batch = torch.arange(100, 116)
    plan = BatchPlan(16, grad_accum_steps=2, world_size=2, rank=1)
    slices = plan.rank_slice(global_batch)
    assert [s.tolist() for s in slices] == [[108, 109, 110, 111], [112, 113, 114, 115]]


@pytest.mark.parametrize("rank", [0, 1])
def test_the_step_table_holds_the_steps_micro_batches(rank: int) -> None:
    plan = BatchPlan(16, grad_accum_steps=2, world_size=2, rank=rank)
    index_plan = EpochIndexPlan(100, plan, seed=3)
    index_plan.set_epoch(2, start_step=1)
    listed = [[indices.tolist() for indices in step] for step in index_plan.steps()]
    table = index_plan.step_table(torch.device("cpu"))
    assert table.shape == (100 // 16 - 1, 2, 4) and table.tolist() == listed


def test_in_memory_batches_gather_the_step_tables_samples() -> None:
    inputs, targets = torch.randn(100, 3), torch.arange(100)
    plan = BatchPlan(16, grad_accum_steps=2, world_size=2, rank=1)
    batches = TrainBatches(InMemoryDataset(inputs, targets), plan, seed=3, device=torch.device("cpu"))
    batches.index_plan.set_epoch(1, 2)
    expected = [[(inputs[i], targets[i]) for i in step] for step in batches.index_plan.steps()]
    got = list(batches.epoch(1, 2))
    assert len(got) == len(expected) == 100 // 16 - 2
    for step, want in zip(got, expected, strict=True):
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(step, want, strict=True))


def test_permutation_depends_on_seed_and_epoch_only() -> None:
    first = epoch_permutation(NUM_SAMPLES, seed=7, epoch=3)
    assert torch.equal(first, epoch_permutation(NUM_SAMPLES, seed=7, epoch=3))
    torch.manual_seed(12345)  # the global generator plays no part
    assert torch.equal(first, epoch_permutation(NUM_SAMPLES, seed=7, epoch=3))
    assert torch.equal(first.sort().values, torch.arange(NUM_SAMPLES))
    assert not torch.equal(first, epoch_permutation(NUM_SAMPLES, seed=7, epoch=4))
    assert not torch.equal(first, epoch_permutation(NUM_SAMPLES, seed=8, epoch=3))


def test_epochs_differ_and_repeat() -> None:
    batches = TrainBatches(_indexed_dataset(), BatchPlan(GLOBAL_BATCH), seed=0, device=CPU)
    epoch0 = [targets for ((_, targets),) in batches.epoch(0)]
    again = [targets for ((_, targets),) in batches.epoch(0)]
    epoch1 = [targets for ((_, targets),) in batches.epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))


@pytest.mark.parametrize(
    ("global_batch_size", "grad_accum_steps", "world_size"), [(10, 3, 1), (16, 1, 3), (16, 2, 3), (12, 4, 2)]
)
def test_batch_that_does_not_split_raises(global_batch_size: int, grad_accum_steps: int, world_size: int) -> None:
    parts = grad_accum_steps * world_size
    with pytest.raises(ConfigError, match=f"training.batch_size: {global_batch_size} does not split") as info:
        BatchPlan(global_batch_size, grad_accum_steps=grad_accum_steps, world_size=world_size)
    assert f"= {parts} equal micro-batches" in str(info.value)


def test_batch_larger_than_dataset_raises() -> None:
    with pytest.raises(ConfigError, match=r"training.batch_size: 16 is larger than the training split \(10 samples\)"):
        TrainBatches(_indexed_dataset(10), BatchPlan(16), seed=0, device=CPU)


def test_batch_equal_to_dataset_gives_one_step() -> None:
    batches = TrainBatches(_indexed_dataset(16), BatchPlan(16), seed=0, device=CPU)
    assert batches.steps_per_epoch == 1
    assert len(list(batches.epoch(0))) == 1


def _assert_same_steps(left: list, right: list) -> None:
    assert len(left) == len(right)
    for left_step, right_step in zip(left, right, strict=True):
        assert len(left_step) == len(right_step)
        for (left_inputs, left_targets), (right_inputs, right_targets) in zip(left_step, right_step, strict=True):
            assert left_inputs.dtype == right_inputs.dtype and left_targets.dtype == right_targets.dtype
            assert torch.equal(left_inputs, right_inputs)
            assert torch.equal(left_targets, right_targets)


@pytest.mark.parametrize("start_step", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_data_loader_path_matches_in_memory_path(rank: int, start_step: int) -> None:
    in_memory = _indexed_dataset()
    plain = PlainDataset(in_memory)
    plan = BatchPlan(GLOBAL_BATCH, grad_accum_steps=2, world_size=2, rank=rank)
    fast = TrainBatches(in_memory, plan, seed=5, device=CPU)
    slow = TrainBatches(plain, plan, seed=5, device=CPU)
    assert fast.in_memory and not slow.in_memory
    fast_steps = list(fast.epoch(2, start_step=start_step))
    assert len(fast_steps) == STEPS_PER_EPOCH - start_step
    _assert_same_steps(fast_steps, list(slow.epoch(2, start_step=start_step)))


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "data-loader"])
def test_start_step_skips_steps(in_memory: bool) -> None:
    dataset = _indexed_dataset() if in_memory else PlainDataset(_indexed_dataset())
    plan = BatchPlan(GLOBAL_BATCH, grad_accum_steps=2)
    everything = _steps(dataset, plan, epoch=1)
    resumed = _steps(dataset, plan, epoch=1, start_step=4)
    assert len(resumed) == STEPS_PER_EPOCH - 4
    _assert_same_steps(resumed, everything[4:])
    assert _steps(dataset, plan, epoch=1, start_step=STEPS_PER_EPOCH) == []


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "data-loader"])
def test_eval_batches_cover_the_split_in_order(in_memory: bool) -> None:
    dataset = _indexed_dataset(10) if in_memory else PlainDataset(_indexed_dataset(10))
    batches = list(eval_batches(dataset, 4, CPU))
    assert [len(targets) for _, targets in batches] == [4, 3, 3]  # as few batches as fit, evened out
    assert torch.equal(torch.cat([targets for _, targets in batches]), torch.arange(10))


@pytest.mark.parametrize(("size", "shares", "batch_size"), [(10, 2, 4), (11, 3, 2), (257, 2, 128), (7, 7, 256)])
def test_eval_shares_cover_the_split_once_in_equal_numbers_of_batches(size: int, shares: int, batch_size: int) -> None:
    dataset = _indexed_dataset(size)
    per_share = [list(eval_batches(dataset, batch_size, CPU, shard=(index, shares))) for index in range(shares)]
    assert len({len(batches) for batches in per_share}) == 1  # processes that compute together stay in step
    assert all(len(targets) <= batch_size for batches in per_share for _, targets in batches)
    seen = torch.cat([targets for batches in per_share for _, targets in batches])
    assert torch.equal(seen, torch.arange(size))


def test_evaluation_workers_start_with_the_batches_and_serve_every_evaluation() -> None:
    import psutil

    before = {child.pid for child in psutil.Process().children()}
    batches = EvalBatches(PlainDataset(_indexed_dataset(10)), 4, CPU, num_workers=2)
    workers = {child.pid for child in psutil.Process().children()} - before
    assert len(workers) == 2  # forked now, while the process is small, not at the first evaluation
    for _ in range(3):  # every evaluation: the same batches, from the same workers
        assert [targets.tolist() for _, targets in batches] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
        assert workers <= {child.pid for child in psutil.Process().children()}


def test_persistent_workers_follow_the_plan_across_epochs() -> None:
    in_memory = _indexed_dataset()
    plan = BatchPlan(GLOBAL_BATCH, grad_accum_steps=2)
    fast = TrainBatches(in_memory, plan, seed=3, device=CPU)
    workers = TrainBatches(PlainDataset(in_memory), plan, seed=3, device=CPU, num_workers=2)
    assert workers.loader is not None and workers.loader.persistent_workers
    for epoch in (0, 1, 2):  # one loader, its worker processes reused, a new order every epoch
        _assert_same_steps(list(fast.epoch(epoch)), list(workers.epoch(epoch)))
    assert not torch.equal(next(fast.epoch(0))[0][1], next(fast.epoch(1))[0][1])


class NoisyDataset(PlainDataset):
    """Each sample with random noise from Python's, NumPy's and torch's global streams: an augmentation."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = super().__getitem__(index)
        noise = torch.rand(2) + float(np.random.rand()) + random.random()
        return inputs + noise, targets


def _noise_by_sample(steps: list) -> dict[int, torch.Tensor]:
    noise = {}
    for step in steps:
        for inputs, targets in step:
            clean = torch.stack([targets, -targets], dim=1).float()
            noise.update({int(t): n for t, n in zip(targets, inputs - clean, strict=True)})
    return noise


def test_worker_draws_depend_on_the_sample_not_on_the_worker_or_the_resume_point() -> None:
    dataset = NoisyDataset(_indexed_dataset())
    plan = BatchPlan(GLOBAL_BATCH, grad_accum_steps=2)
    one = list(TrainBatches(dataset, plan, seed=3, device=CPU, num_workers=1).epoch(1))
    two = TrainBatches(dataset, plan, seed=3, device=CPU, num_workers=2)
    _assert_same_steps(one, list(two.epoch(1)))
    _assert_same_steps(one[2:], list(two.epoch(1, start_step=2)))  # a resumed loader draws what the first did
    first, second = _noise_by_sample(one), _noise_by_sample(list(two.epoch(2)))
    shared = first.keys() & second.keys()
    assert len(shared) > 50 and all(first[i].abs().sum() > 0 for i in shared)  # there is noise,
    assert all(not torch.equal(first[i], second[i]) for i in shared)  # drawn anew in each epoch
    assert len({tuple(n.tolist()) for n in first.values()}) == len(first)  # and for each sample


@pytest.mark.parametrize("window", [1, 25, 60, 1000])
def test_shard_windows_are_the_windows_the_order_reads_in_turn(window: int) -> None:
    sizes = [13, 0, 40, 7, 22, 31, 5, 18]
    starts = np.cumsum([0, *sizes])
    for epoch in (0, 1):
        order = windowed_permutation(sizes, window, seed=3, epoch=epoch).tolist()
        windows = shard_windows(sizes, window, seed=3, epoch=epoch)
        assert sorted(shard for shards in windows for shard in shards) == list(range(len(sizes)))
        assert all(sum(sizes[shard] for shard in shards) >= window for shards in windows[:-1])
        read = 0
        for shards in windows:
            samples = {index for shard in shards for index in range(starts[shard], starts[shard + 1])}
            assert set(order[read : read + len(samples)]) == samples
            read += len(samples)


def test_sample_seeds_of_neighbouring_epochs_share_no_stream() -> None:
    indices = np.arange(10_000)
    # bases one apart: `base + index` would give every sample but one the seed of its neighbour in the other
    first, second = sample_seeds(1_000, indices), sample_seeds(1_001, indices)
    assert len(set(first.tolist()) | set(second.tolist())) == 2 * len(indices)


# A process reading a dataset whose every sample takes 10 minutes, through two workers: it prints their pids once
# both are busy, and waits for a batch that never comes.
STUCK_READER = """
import threading, time
import psutil, torch
from torch.utils.data import Dataset
from scaleforge.data.loading import BatchPlan, TrainBatches

class Stuck(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        time.sleep(600)

def report():
    while len(workers := psutil.Process().children()) < 2:
        time.sleep(0.05)
    time.sleep(0.5)  # into their first sample
    print(*[worker.pid for worker in workers], flush=True)

threading.Thread(target=report, daemon=True).start()
batches = TrainBatches(Stuck(), BatchPlan(8), seed=0, device=torch.device("cpu"), num_workers=2)
next(batches.epoch(0))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.timeout(120)
def test_workers_busy_with_a_sample_end_with_the_process_that_started_them() -> None:
    reader = subprocess.Popen([sys.executable, "-c", STUCK_READER], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None
        workers = [int(pid) for pid in reader.stdout.readline().split()]
        assert len(workers) == 2
        reader.kill()  # torch's workers would notice only after their sample, in 10 minutes
        reader.wait(timeout=30)
        assert [pid for pid in workers if not gone(pid, within_s=10)] == []
    finally:
        reader.kill()
