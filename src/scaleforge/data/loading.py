"""Global batches: a pure function of (seed, epoch, position), sliced per process and per micro-step.

The order in which samples are seen depends on the config alone. Every process computes the same
permutation for an epoch, cuts it into global batches of `training.batch_size`, and takes its own
contiguous slice of each; that slice is cut again into `grad_accum_steps` micro-batches. Changing the
number of processes therefore changes who computes what, never what is computed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scaleforge.data.base import InMemoryDataset
from scaleforge.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")


@dataclass(frozen=True)
class BatchPlan:
    """How one global batch is divided among processes and accumulation micro-steps."""

    global_batch_size: int
    grad_accum_steps: int = 1
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        parts = self.world_size * self.grad_accum_steps
        if self.global_batch_size % parts:
            raise ConfigError(
                f"training.batch_size: {self.global_batch_size} does not split into {self.world_size} processes x "
                f"{self.grad_accum_steps} accumulation steps = {parts} equal micro-batches"
            )

    @property
    def micro_batch_size(self) -> int:
        """Samples per forward pass on one process."""
        return self.global_batch_size // (self.world_size * self.grad_accum_steps)

    def rank_slice(self, global_batch: torch.Tensor) -> list[torch.Tensor]:
        """This process's micro-batches (index tensors) of one global batch."""
        per_rank = self.global_batch_size // self.world_size
        mine = global_batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return list(mine.split(self.micro_batch_size))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the samples in `epoch`: the same on every process and for any number of processes."""
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(epoch_seed))


class TrainBatches:
    """Per optimizer step, this process's micro-batches of the next global batch, already on `device`.

    In-memory datasets take the fast path: each micro-batch is one indexed gather from tensors that live on
    the device, with no per-sample collation. Other datasets go through a `DataLoader` with workers, fed by
    the same index plan.
    """

    def __init__(
        self, dataset: Dataset, plan: BatchPlan, *, seed: int, device: torch.device, num_workers: int = 0
    ) -> None:
        self.plan = plan
        self.seed = seed
        self.device = device
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.steps_per_epoch = self.num_samples // plan.global_batch_size  # the incomplete last batch is dropped
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"training.batch_size: {plan.global_batch_size} is larger than the training split "
                f"({self.num_samples} samples)"
            )
        self.in_memory = isinstance(dataset, InMemoryDataset)
        self.dataset = dataset.to(device) if isinstance(dataset, InMemoryDataset) else dataset
        self.num_workers = num_workers

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Batch]]:
        """The micro-batches of each step of `epoch`, from step `start_step` on."""
        order = epoch_permutation(self.num_samples, self.seed, epoch)
        usable = order[: self.steps_per_epoch * self.plan.global_batch_size]
        global_batches = usable.view(self.steps_per_epoch, self.plan.global_batch_size)[start_step:]
        index_plan = [self.plan.rank_slice(batch) for batch in global_batches]
        if self.in_memory:
            dataset = self.dataset
            for micro_indices in index_plan:
                yield [dataset[indices.to(self.device)] for indices in micro_indices]  # type: ignore[index]
            return
        yield from self._from_loader(index_plan)

    def _from_loader(self, index_plan: list[list[torch.Tensor]]) -> Iterator[list[Batch]]:
        flat = [indices.tolist() for step in index_plan for indices in step]
        loader = DataLoader(
            self.dataset,
            batch_sampler=flat,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        micro_batches: list[Batch] = []
        for inputs, targets in loader:
            micro_batches.append(
                (inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))
            )
            if len(micro_batches) == self.plan.grad_accum_steps:
                yield micro_batches
                micro_batches = []


def eval_batches(dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0) -> Iterator[Batch]:
    """The whole validation split in order, in batches of `batch_size`, on `device`."""
    if isinstance(dataset, InMemoryDataset):
        for start in range(0, len(dataset), batch_size):
            inputs, targets = dataset[start : start + batch_size]  # type: ignore[index]
            yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for inputs, targets in loader:
        yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


class DataWaitClock:
    """Accumulates the time the training loop spends waiting for its next batch."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield from `batches`, adding the time each `next` takes to `seconds`."""
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - started
            yield item
