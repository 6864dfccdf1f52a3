"""Byte-level language modelling on a text file or a folder of text files."""

from __future__ import annotations

from pathlib import Path

import torch

from scaleforge.data.base import DataInfo, DatasetSplits, InMemoryDataset
from scaleforge.errors import DataError
from scaleforge.registry import register_dataset

VOCAB_SIZE = 256  # one token per byte: any file, any language, no tokenizer to ship


def read_corpus(path: Path) -> bytes:
    """The bytes of a file, or of every file under a folder in sorted order."""
    if path.is_file():
        return path.read_bytes()
    if not path.is_dir():
        raise DataError(f"data.path: {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"data.path: {path} is an empty folder")
    return b"".join(p.read_bytes() for p in files)


def _windows(tokens: torch.Tensor, seq_len: int) -> InMemoryDataset:
    """Non-overlapping windows: inputs are `seq_len` tokens, targets the same window shifted by one."""
    count = (len(tokens) - 1) // seq_len
    inputs = tokens[: count * seq_len].view(count, seq_len)  # (N, T)
    targets = tokens[1 : count * seq_len + 1].view(count, seq_len)  # (N, T)
    return InMemoryDataset(inputs, targets)


@register_dataset("text")
def text(path: str, seq_len: int = 128, val_fraction: float = 0.1) -> DatasetSplits:
    """Byte tokens cut into windows of `seq_len`; the validation split is the tail of the text."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    corpus = read_corpus(Path(path))
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    split = int(len(tokens) * (1 - val_fraction))
    needed = int((seq_len + 1) / min(val_fraction, 1 - val_fraction)) + 1
    if split < seq_len + 1 or len(tokens) - split < seq_len + 1:
        raise DataError(
            f"data.path: {path} has {len(tokens)} bytes, too short for one sequence of seq_len={seq_len} in both "
            f"splits (val_fraction={val_fraction}); it needs at least {needed} bytes"
        )
    info = DataInfo(task="language_modeling", input_shape=(seq_len,), vocab_size=VOCAB_SIZE, seq_len=seq_len)
    return DatasetSplits(train=_windows(tokens[:split], seq_len), val=_windows(tokens[split:], seq_len), info=info)
