"""Deterministic generated data of any size and kind, for benchmarks and tests."""

from __future__ import annotations

from typing import Literal

import torch

from scaleforge.data.base import DataInfo, DatasetSplits, ImageInput, InMemoryDataset
from scaleforge.registry import register_dataset


@register_dataset("synthetic")
def synthetic(
    kind: Literal["rows", "images", "tokens"] = "rows",
    num_samples: int = 4096,
    num_features: int = 64,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    seq_len: int = 64,
    vocab_size: int = 256,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetSplits:
    """`rows` of `num_features` or `images` of `channels` x `image_size`^2, whose class is a fixed random linear
    function of the input (images are also taken from files and frames: `DataInfo.image`); or `tokens`:
    sequences of `seq_len` that mostly count up by one modulo `vocab_size` (one token in ten is random), so that a
    language model has something to learn."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if min(num_samples - 1, num_features, num_classes - 1, image_size, channels, seq_len, vocab_size - 1) < 1:
        raise ValueError("sizes must be positive, with at least 2 samples, 2 classes and a vocabulary of 2")
    generator = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        start = torch.randint(0, vocab_size, (num_samples, 1), generator=generator)
        sequences = (start + torch.arange(seq_len + 1)) % vocab_size  # (N, T + 1)
        noise = torch.rand(sequences.shape, generator=generator) < 0.1
        sequences = torch.where(noise, torch.randint(0, vocab_size, sequences.shape, generator=generator), sequences)
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        info = DataInfo(task="language_modeling", input_shape=(seq_len,), vocab_size=vocab_size, seq_len=seq_len)
    else:
        shape = (num_features,) if kind == "rows" else (channels, image_size, image_size)
        inputs = torch.randn(num_samples, *shape, generator=generator)
        weights = torch.randn(inputs[0].numel(), num_classes, generator=generator)
        targets = (inputs.flatten(1) @ weights).argmax(dim=1)
        # an image file or video frame becomes an input of about the same range: pixels in [0, 1] -> [-2, 2]
        image = None if kind == "rows" else ImageInput(image_size, channels, (0.5,) * channels, (0.25,) * channels)
        info = DataInfo(task="classification", input_shape=shape, num_classes=num_classes, image=image)
    num_val = max(1, round(num_samples * val_fraction))
    return DatasetSplits(
        train=InMemoryDataset(inputs[num_val:], targets[num_val:]),
        val=InMemoryDataset(inputs[:num_val], targets[:num_val]),
        info=info,
    )
