"""Global batches: a pure function of (seed, epoch, position), sliced per process and per micro-step.

The order in which samples are seen depends on the config alone. Every process computes the same
permutation for an epoch, cuts it into global batches of `training.batch_size`, and takes its own
contiguous slice of each; that slice is cut again into `grad_accum_steps` micro-batches. Changing the
number of processes therefore changes who computes what, never what is computed.

Samples read through the data loader draw their random numbers (augmentations) from streams seeded by (seed,
epoch, sample index), not from a stream that runs on across samples: what a sample draws does not depend on
which worker reads it, how many there are (none included), how many processes train, or where the run was
resumed, so a checkpoint's data cursor alone restores the workers' random state.
"""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from scaleforge.data.base import InMemoryDataset
from scaleforge.errors import ConfigError, DataError, ScaleforgeError
from scaleforge.processes import ParentDeathGuard

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


def stream_seed(*entropy: int) -> int:
    """A 32-bit seed mixed from `entropy` (a run's seed, an epoch, ...): distinct inputs, unrelated streams."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the samples in `epoch`: the same on every process and for any number of processes."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(stream_seed(seed, epoch)))


def windowed_permutation(shard_sizes: Sequence[int], window: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of a sharded dataset's samples in `epoch`: its shards permuted, grouped in that order into windows
    of at least `window` samples (`shard_windows`), and the samples of each window permuted. A function of the seed,
    the epoch and the shards' sizes alone, like `epoch_permutation`; readers need only one window's shards at a
    time. Written into one preallocated tensor: besides it, memory holds one window's indices."""
    generator = torch.Generator().manual_seed(stream_seed(seed, epoch))
    starts = np.cumsum([0, *shard_sizes]).tolist()
    order = torch.empty(int(starts[-1]), dtype=torch.int64)
    filled = 0
    for shards in _grouped_shards(shard_sizes, window, generator):
        together = torch.cat([torch.arange(starts[shard], starts[shard + 1]) for shard in shards])
        count = len(together)
        order[filled : filled + count] = together[torch.randperm(count, generator=generator)]
        filled += count
    return order


def shard_windows(shard_sizes: Sequence[int], window: int, seed: int, epoch: int) -> list[list[int]]:
    """The shards of each window of `windowed_permutation(shard_sizes, window, seed, epoch)`, in the order the
    windows are read: what a reader of remote shards can fetch ahead."""
    generator = torch.Generator().manual_seed(stream_seed(seed, epoch))
    return _grouped_shards(shard_sizes, window, generator)


def _grouped_shards(shard_sizes: Sequence[int], window: int, generator: torch.Generator) -> list[list[int]]:
    """The shards permuted (the epoch's first draw from `generator`) and grouped in that order into windows of at
    least `window` samples, the last one possibly smaller."""
    groups: list[list[int]] = []
    count = 0
    for shard in torch.randperm(len(shard_sizes), generator=generator).tolist():
        if not groups or count >= window:
            groups.append([])
            count = 0
        groups[-1].append(shard)
        count += shard_sizes[shard]
    return groups


def sample_seeds(base: int, indices: np.ndarray) -> np.ndarray:
    """32-bit seeds, one per sample index, from an epoch's `base`: splitmix64's finaliser over (base, index), a
    bijection of 64-bit values, so that no two (epoch, sample) pairs share a stream by construction (as
    `base + index` would whenever two epochs' bases lie closer than the dataset's size)."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64, as intended
        value = (np.uint64(base) << np.uint64(32)) | indices.astype(np.uint64)
        value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        value ^= value >> np.uint64(31)
    return (value >> np.uint64(32)).astype(np.uint32)


class SeededSamples(Dataset):
    """`dataset` indexed by `(index, draw_seed)`: Python's, NumPy's and torch's random states are set from
    `draw_seed` before the sample is read, so its random augmentations are a function of the seed alone. In the
    main process (no workers) the run's own streams, which dropout draws from and checkpoints hold, are put back
    afterwards. Each sample is read on its own (a dataset's `__getitems__`, batched reading, is not used here),
    since each has its own seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> object:
        index, draw_seed = key
        if get_worker_info() is not None:
            _seed_streams(draw_seed)
            return self.dataset[index]
        run_streams = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        _seed_streams(draw_seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(run_streams[0])
            np.random.set_state(run_streams[1])
            torch.random.set_rng_state(run_streams[2])


def _seed_streams(draw_seed: int) -> None:
    random.seed(draw_seed)
    np.random.seed(draw_seed)
    # not torch.manual_seed, which costs 100x more (~0.1 ms) as it seeds every device type too
    torch.random.default_generator.manual_seed(draw_seed)


class EpochIndexPlan:
    """This process's micro-batch index tensors, step by step, for one epoch: the order every loader follows.

    Also a `batch_sampler` for `DataLoader` over `SeededSamples`: it yields lists of `(index, draw_seed)` for the
    epoch (and first step) chosen by `set_epoch`, so one loader with persistent workers serves every epoch.
    """

    def __init__(
        self, num_samples: int, plan: BatchPlan, seed: int, order: Callable[[int, int], torch.Tensor] | None = None
    ) -> None:
        self.num_samples = num_samples
        self.plan = plan
        self.seed = seed
        self.order = order or (lambda seed, epoch: epoch_permutation(num_samples, seed, epoch))
        self.steps_per_epoch = num_samples // plan.global_batch_size  # the incomplete last batch is dropped
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"training.batch_size: {plan.global_batch_size} is larger than the training split "
                f"({num_samples} samples)"
            )
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch (and the step within it) that the next iteration yields."""
        self.epoch, self.start_step = epoch, start_step

    def steps(self) -> list[list[torch.Tensor]]:
        """Per remaining step of the chosen epoch, this process's micro-batch index tensors."""
        order = self.order(self.seed, self.epoch)
        usable = order[: self.steps_per_epoch * self.plan.global_batch_size]
        global_batches = usable.view(self.steps_per_epoch, self.plan.global_batch_size)[self.start_step :]
        return [self.plan.rank_slice(batch) for batch in global_batches]

    def step_table(self, device: torch.device) -> torch.Tensor:
        """`steps` as one tensor on `device`, (remaining steps, accumulation steps, micro-batch size): the same
        indices, cut in one view rather than a list a step."""
        plan = self.plan
        order = self.order(self.seed, self.epoch)[: self.steps_per_epoch * plan.global_batch_size].to(device)
        table = order.view(self.steps_per_epoch, plan.world_size, plan.grad_accum_steps, plan.micro_batch_size)
        return table[self.start_step :, plan.rank]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        draw_base = stream_seed(self.seed, self.epoch, 1)  # apart from the order's stream, (seed, epoch)
        for micro_indices in self.steps():
            for indices in micro_indices:
                draw_seeds = sample_seeds(draw_base, indices.numpy())
                yield list(zip(indices.tolist(), draw_seeds.tolist(), strict=True))

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.plan.grad_accum_steps


def plain_in_memory(dataset: Dataset) -> bool:
    """Whether `dataset` is an `InMemoryDataset` whose samples are its tensors' rows (a subclass that computes its
    samples in `__getitem__` is not): its batches can be cut from the tensors directly."""
    return type(dataset).__getitem__ is InMemoryDataset.__getitem__


def epoch_order(dataset: Dataset) -> Callable[[int, int], torch.Tensor] | None:
    """A sharded dataset's order (`windowed_permutation` over its `shard_sizes` and `shuffle_window`), or None
    for the plain permutation of every sample."""
    sizes, window = getattr(dataset, "shard_sizes", None), getattr(dataset, "shuffle_window", None)
    if sizes is None or window is None:
        return None
    return lambda seed, epoch: windowed_permutation(sizes, window, seed, epoch)


class TrainBatches:
    """Per optimizer step, this process's micro-batches of the next global batch, already on `device`.

    In-memory datasets take the fast path: each micro-batch is one indexed gather from tensors that live on
    the device, with no per-sample collation. Other datasets go through one `DataLoader` fed by the same
    index plan, with worker processes that persist across epochs, prefetching, and pinned memory with
    non-blocking copies on a GPU.
    """

    def __init__(
        self, dataset: Dataset, plan: BatchPlan, *, seed: int, device: torch.device, num_workers: int = 0
    ) -> None:
        self.plan = plan
        self.device = device
        self.index_plan = EpochIndexPlan(len(dataset), plan, seed, epoch_order(dataset))  # type: ignore[arg-type]
        self.steps_per_epoch = self.index_plan.steps_per_epoch
        self.in_memory = isinstance(dataset, InMemoryDataset)
        self.dataset = dataset.to(device) if isinstance(dataset, InMemoryDataset) else dataset
        self.loader = None
        self.skipped = 0  # samples a dataset with `on_error: skip` could not read, in this process
        if not self.in_memory:
            self.loader = DataLoader(
                SeededSamples(self.dataset),
                batch_sampler=self.index_plan,
                collate_fn=collate_for(self.dataset),
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=num_workers > 0,
                prefetch_factor=4 if num_workers > 0 else None,
                # its own generator for the workers' seeds: iterating never draws from the global stream that
                # dropout uses, so a resumed run draws the same numbers as an uninterrupted one
                generator=torch.Generator().manual_seed(seed),
                worker_init_fn=worker_guard(),
                multiprocessing_context=worker_context(num_workers),
            )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Batch]]:
        """The micro-batches of each step of `epoch`, from step `start_step` on."""
        self.index_plan.set_epoch(epoch, start_step)
        if self.loader is None:
            dataset, table = self.dataset, self.index_plan.step_table(self.device)
            if plain_in_memory(dataset):  # gathered with index_select: half the time of indexing with a tensor
                inputs, targets = dataset.inputs, dataset.targets
                for micro_indices in table:  # (accumulation steps, micro-batch) a step
                    yield [(inputs.index_select(0, i), targets.index_select(0, i)) for i in micro_indices]
                return
            for micro_indices in table:  # a subclass may compute its samples
                yield [dataset[indices] for indices in micro_indices]  # type: ignore[index]
            return
        batches = iter(self.loader)  # forks the workers on the first epoch: before the prefetcher's thread exists
        position = start_step * self.plan.global_batch_size
        with fetching_ahead(self.dataset, self.index_plan.seed, epoch, position) as read_up_to:
            micro_batches: list[Batch] = []
            for inputs, targets, *skipped in worker_errors(batches):
                self.skipped += int(skipped[0]) if skipped else 0
                micro_batches.append(
                    (inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))
                )
                if len(micro_batches) == self.plan.grad_accum_steps:
                    yield micro_batches
                    micro_batches = []
                    position += self.plan.global_batch_size
                    read_up_to(position)


@contextlib.contextmanager
def fetching_ahead(dataset: Dataset, seed: int, epoch: int, position: int) -> Iterator[Callable[[int], None]]:
    """For the block, a dataset that reads remote shards (`ShardedDataset.prefetcher`) fetches them ahead of the
    readers of `epoch`, from sample `position` of its order on; yields what to call with the position the training
    loop has read up to. The loop's position, not the sampler's (which runs ahead by the batches in the workers'
    queues): the window it is in is one whose files the cache must keep, beside the next one fetched ahead."""
    make = getattr(dataset, "prefetcher", None)
    prefetcher = make(seed, epoch) if make is not None else None
    if prefetcher is None:
        yield lambda position: None
        return
    prefetcher.start(position)
    try:
        yield prefetcher.advance
    finally:
        prefetcher.stop()


class EvalBatches:
    """Share `shard = (index, count)` of the validation split, in order, on `device`: iterate it for each evaluation.

    Every share yields the same number of batches (of at most `batch_size`), so processes that must compute
    together (sharded or pipelined models) stay in step; the shares together cover each sample once. A split that is
    not in memory goes through one `DataLoader` whose workers serve every evaluation; they are started here, when
    a run builds this before training grows the process: a forked worker keeps, and its resident memory counts
    again, every page its parent had at the fork (forked at each evaluation, late in a run, each worker counted the
    trainer's whole heap). Their first batches wait for the first evaluation.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        index, count = shard
        largest_share = -(-len(dataset) // count)  # type: ignore[arg-type]
        num_batches = max(1, -(-largest_share // batch_size))
        mine = torch.arange(len(dataset)).tensor_split(count)[index]  # type: ignore[arg-type]
        self.pieces = [piece for piece in mine.tensor_split(num_batches) if len(piece)]
        self.ranges = [(int(piece[0]), int(piece[-1]) + 1) for piece in self.pieces]  # each piece is consecutive
        self.dataset, self.device = dataset, device
        self.skipped = 0  # samples of the last evaluation a dataset with `on_error: skip` could not read
        self.loader: DataLoader | None = None
        self._started: Iterator[Any] | None = None
        if not isinstance(dataset, InMemoryDataset):
            self.loader = DataLoader(
                dataset,
                batch_sampler=[piece.tolist() for piece in self.pieces],
                collate_fn=collate_for(dataset),
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                # starting workers draws their seeds from this generator, not from the global stream that
                # dropout uses: a run draws the same numbers with any number of workers
                generator=torch.Generator().manual_seed(0),
                worker_init_fn=worker_guard(),
                multiprocessing_context=worker_context(num_workers),
            )
            if num_workers > 0:
                self._started = iter(self.loader)  # forks the workers now

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = 0
        device = self.device
        if self.loader is None:
            plain = plain_in_memory(self.dataset)
            for piece, (start, end) in zip(self.pieces, self.ranges, strict=True):
                if plain:  # a piece is a run of consecutive samples: views of the tensors, not gathered copies
                    inputs, targets = self.dataset.inputs[start:end], self.dataset.targets[start:end]  # type: ignore[attr-defined]
                else:  # a subclass may compute its samples
                    inputs, targets = self.dataset[piece]  # type: ignore[index]
                yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            return
        started, self._started = self._started, None
        for inputs, targets, *skipped in worker_errors(self.loader if started is None else started):
            self.skipped += int(skipped[0]) if skipped else 0
            yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def eval_batches(
    dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0, shard: tuple[int, int] = (0, 1)
) -> Iterator[Batch]:
    """One pass over `EvalBatches(...)`: for an evaluation that happens once."""
    return iter(EvalBatches(dataset, batch_size, device, num_workers, shard))


def collate_for(dataset: Dataset) -> Callable[[list[object]], object] | None:
    """torch's collation, or, for a dataset that gives None for samples it cannot read (`on_error: skip`), one that
    leaves them out and adds their count to the batch."""
    return collate_skipping if getattr(dataset, "on_error", "raise") == "skip" else None


def collate_skipping(samples: list[object]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples that were read, collated, and how many were not."""
    from torch.utils.data import default_collate

    kept = [sample for sample in samples if sample is not None]
    if not kept:
        raise DataError(f"none of the {len(samples)} samples of a batch could be read (data.on_error: skip)")
    inputs, targets = default_collate(kept)
    return inputs, targets, torch.tensor(len(samples) - len(kept))


def worker_errors(loader: Iterable[T]) -> Iterator[T]:
    """`loader`'s batches; a user error raised in a worker comes out as the worker raised it (torch re-raises it
    with the worker's whole traceback in its message, which is not the one line a user error prints)."""
    try:
        yield from loader
    except ScaleforgeError as error:
        message = str(error)
        marker = f"{type(error).__name__}: "
        if "Original Traceback" in message and marker in message:
            raise type(error)(message.rsplit(marker, 1)[1].strip()) from None
        raise


def worker_guard() -> ParentDeathGuard:
    """The `worker_init_fn` of every DataLoader here: a worker ends when the process that started it dies, however
    it dies (torch's workers look for a dead parent only between samples, so one busy in a long read of a
    dataset's sample runs on). SIGKILL: a worker only prepares samples for that process; nothing of it needs saving. The
    loaders are iterated on the process's main thread, which lives as long as their workers."""
    return ParentDeathGuard(signal.SIGKILL)


def worker_context(num_workers: int) -> str | None:
    """The start method of the workers: fork on Linux (the default of Python before 3.14), so that their parent
    is the process that `worker_guard` expects; a fork server would be their parent instead."""
    return "fork" if num_workers > 0 and sys.platform.startswith("linux") else None


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
