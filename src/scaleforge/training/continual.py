"""Learning tasks one after another without forgetting the earlier ones (`training.continual`).

A sequence of tasks is a sequence of runs, each starting from the weights of the one before
(`training.init_from`) and training on its own data (such as `data.classes`, for class-incremental tasks).

`replay` (experience replay, as Avalanche's ReplayPlugin): a run keeps a buffer of `buffer_size` training samples
in its `final/replay.safetensors` (in the manifest, so verified like the weights); the next run of the sequence
adds that buffer to its own training data, and keeps a buffer drawn from both: every task so far, in equal shares
per class (`class_balanced`) or at random. The buffer is data (tensors in safetensors), never code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from scaleforge.config import ContinualSection
from scaleforge.data.base import DatasetSplits, InMemoryDataset
from scaleforge.errors import ConfigError, UsageError

REPLAY_FILE = "replay.safetensors"


def earlier_buffer(init_from: str | None, signing_key_env: str | None = None) -> InMemoryDataset | None:
    """The buffer the run `init_from` kept (its final/replay.safetensors, checked against its manifest); None when
    there is no run to start from or it kept none (a first task trained without replay)."""
    from safetensors.torch import load

    from scaleforge.runs import verify_final

    if init_from is None or Path(init_from).is_file():  # weights alone: no buffer beside them
        return None
    try:
        final = verify_final(init_from, signing_key_env)  # every file of final/, the buffer included
    except UsageError as error:
        raise ConfigError(f"training.init_from: {error}") from error
    if not (final / REPLAY_FILE).is_file():
        return None
    tensors = load((final / REPLAY_FILE).read_bytes())
    return InMemoryDataset(tensors["inputs"], tensors["targets"])


def with_buffer(splits: DatasetSplits, buffer: InMemoryDataset) -> DatasetSplits:
    """`splits` whose training split also holds `buffer`'s samples (in memory at once when both are tensors)."""
    import dataclasses

    train = splits.train
    if isinstance(train, InMemoryDataset):
        if buffer.inputs.shape[1:] != train.inputs.shape[1:]:
            raise ConfigError(
                f"training.continual: the replay buffer's inputs are {tuple(buffer.inputs.shape[1:])}, this "
                f"dataset's {tuple(train.inputs.shape[1:])}"
            )
        joined: Dataset = InMemoryDataset(
            torch.cat([train.inputs, buffer.inputs.to(train.inputs.dtype)]),
            torch.cat([train.targets, buffer.targets.to(train.targets.dtype)]),
        )
    else:
        joined = torch.utils.data.ConcatDataset([train, buffer])
    return dataclasses.replace(splits, train=joined)


def select_buffer(dataset: Dataset, section: ContinualSection, seed: int) -> dict[str, torch.Tensor]:
    """`section.buffer_size` samples of `dataset` (this task's training data with the earlier buffer), as the
    tensors of `replay.safetensors`: the same number from every class (those with fewer give all they have), or at
    random, drawn with the run's seed."""
    targets = _labels(dataset)
    generator = torch.Generator().manual_seed(seed)
    if section.selection == "random":
        chosen = torch.randperm(len(targets), generator=generator)[: section.buffer_size]
    else:
        classes = targets.unique().tolist()
        chosen_parts = []
        for position, label in enumerate(classes):  # the remainder of the division goes to the first classes
            share = section.buffer_size // len(classes) + (position < section.buffer_size % len(classes))
            members = (targets == label).nonzero().flatten()
            chosen_parts.append(members[torch.randperm(len(members), generator=generator)[:share]])
        chosen = torch.cat(chosen_parts)
    chosen = chosen.sort().values
    samples = [dataset[int(i)] for i in chosen] if not isinstance(dataset, InMemoryDataset) else None
    if samples is None:
        assert isinstance(dataset, InMemoryDataset)
        inputs, labels = dataset.inputs[chosen], dataset.targets[chosen]
    else:
        inputs, labels = torch.stack([s[0] for s in samples]), torch.stack([torch.as_tensor(s[1]) for s in samples])
    return {"inputs": inputs.detach().cpu().contiguous(), "targets": labels.detach().cpu().contiguous()}


def _labels(dataset: Dataset) -> torch.Tensor:
    """Every sample's label, from the tensor in memory or read sample by sample."""
    if isinstance(dataset, InMemoryDataset):
        return dataset.targets.cpu()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def check_continual(section: ContinualSection, task: str) -> None:
    """A config error for a strategy the data cannot take."""
    if section.strategy == "replay" and task != "classification":
        raise ConfigError(f"training.continual.strategy: replay keeps samples of classification data, not {task}")
