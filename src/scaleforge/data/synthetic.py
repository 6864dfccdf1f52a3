"""Deterministic generated data of any size, for benchmarks and tests."""

from __future__ import annotations

import torch

from scaleforge.data.base import DataInfo, DatasetSplits, InMemoryDataset
from scaleforge.registry import register_dataset


@register_dataset("synthetic")
def synthetic(
    num_samples: int = 4096, num_features: int = 64, num_classes: int = 10, val_fraction: float = 0.2, seed: int = 0
) -> DatasetSplits:
    """Rows of `num_features` Gaussian features whose class is decided by a fixed random linear map."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if num_samples < 2 or num_features < 1 or num_classes < 2:
        raise ValueError("num_samples must be at least 2, num_features at least 1 and num_classes at least 2")
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, num_features, generator=generator)
    weights = torch.randn(num_features, num_classes, generator=generator)
    targets = (inputs @ weights).argmax(dim=1)
    num_val = max(1, round(num_samples * val_fraction))
    info = DataInfo(task="classification", input_shape=(num_features,), num_classes=num_classes)
    return DatasetSplits(
        train=InMemoryDataset(inputs[num_val:], targets[num_val:]),
        val=InMemoryDataset(inputs[:num_val], targets[:num_val]),
        info=info,
    )
