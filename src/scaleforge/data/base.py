"""What every dataset returns: its splits and a description of itself that models and losses are chosen from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import Dataset

Task = Literal["classification", "language_modeling", "regression"]


@dataclass(frozen=True)
class DataInfo:
    """What a dataset says about itself. Models receive the fields their signatures name."""

    task: Task
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None


class InMemoryDataset(Dataset):
    """Inputs and targets held as tensors; indexing with a tensor of indices gathers a whole batch at once."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def to(self, device: torch.device) -> InMemoryDataset:
        """The same data on `device` (no copy when it is already there)."""
        return InMemoryDataset(self.inputs.to(device), self.targets.to(device))


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's training and validation splits with its `DataInfo`."""

    train: Dataset
    val: Dataset
    info: DataInfo
