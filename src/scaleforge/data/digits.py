"""scikit-learn's digits: 1,797 real 8x8 grey-scale images of hand-written digits, shipped with the package."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from scaleforge.data.base import DataInfo, DatasetSplits, ImageInput, InMemoryDataset
from scaleforge.registry import register_dataset


@register_dataset("digits")
def digits(val_fraction: float = 0.2, split_seed: int = 0) -> DatasetSplits:
    """Images as (1, 8, 8) tensors scaled to [0, 1]; a stratification-free random split fixed by `split_seed`.

    As image files (for serving), a digit is an 8x8 grey image whose brightness is the ink: white on black.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    pixels, targets = _load_digits()
    images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(targets, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    num_val = round(len(labels) * val_fraction)
    val_idx, train_idx = order[:num_val], order[num_val:]
    info = DataInfo(
        task="classification",
        input_shape=(1, 8, 8),
        num_classes=10,
        class_names=tuple(str(digit) for digit in range(10)),
        image=ImageInput(size=8, channels=1, mean=(0.0,), std=(1.0,)),  # ink 0..16 is brightness 0..255
    )
    return DatasetSplits(
        train=InMemoryDataset(images[train_idx], labels[train_idx]),
        val=InMemoryDataset(images[val_idx], labels[val_idx]),
        info=info,
    )


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The (1797, 64) ink values and (1797,) labels of the `digits.csv.gz` scikit-learn ships, read as its
    `load_digits` reads them. Read here without importing scikit-learn, whose import (SciPy with it) takes 2.0 of
    the 5 s a `scaleforge train` process spends before its first step (`python -X importtime`); its own loader
    when the file is not where scikit-learn keeps it."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    roots = spec.submodule_search_locations if spec is not None else None
    file = Path(next(iter(roots))) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if file is None or not file.is_file():
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    with gzip.open(file, "rt") as text:
        data = np.loadtxt(text, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)
