"""Tabular data from a CSV file: numeric feature columns and a `target` column of class labels."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from scaleforge.data.base import DataInfo, DatasetSplits, InMemoryDataset
from scaleforge.errors import DataError
from scaleforge.registry import register_dataset


def read_table(path: Path, target: str) -> tuple[list[list[float]], list[str]]:
    """Feature rows and target labels; every problem names the file (and line)."""
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist")
    with path.open(newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if not header:
            raise DataError(f"data.path: {path} is empty")
        if target not in header:
            raise DataError(f"{path}: no '{target}' column (data.target); the columns are: {', '.join(header)}")
        target_index = header.index(target)
        rows: list[list[float]] = []
        labels: list[str] = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(row)} values, but the header has {len(header)}")
            features = []
            for i, value in enumerate(row):
                if i == target_index:
                    continue
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number):
                    raise DataError(f"{path}:{reader.line_num}: column '{header[i]}' has a non-numeric value {value!r}")
                features.append(number)
            rows.append(features)
            labels.append(row[target_index].strip())
    if not rows:
        raise DataError(f"data.path: {path} has a header but no rows")
    return rows, labels


def class_order(labels: set[str]) -> list[str]:
    """Integer labels in numeric order (so '10' follows '9'), any others alphabetically."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


@register_dataset("csv")
def csv_table(path: str, target: str = "target", val_fraction: float = 0.2, split_seed: int = 0) -> DatasetSplits:
    """Rows split at random (fixed by `split_seed`); features standardised with training-split statistics only."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    rows, labels = read_table(Path(path), target)
    classes = class_order(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    features = torch.tensor(rows, dtype=torch.float32)  # (N, F)
    targets = torch.tensor([index[label] for label in labels], dtype=torch.long)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(split_seed))
    num_val = round(len(rows) * val_fraction)
    val_idx, train_idx = order[:num_val], order[num_val:]
    mean = features[train_idx].mean(dim=0)
    std = features[train_idx].std(dim=0, unbiased=False).clamp_min(1e-8)
    features = (features - mean) / std
    info = DataInfo(
        task="classification",
        input_shape=(features.shape[1],),
        num_classes=len(classes),
        class_names=tuple(str(label) for label in classes),
    )
    return DatasetSplits(
        train=InMemoryDataset(features[train_idx], targets[train_idx]),
        val=InMemoryDataset(features[val_idx], targets[val_idx]),
        info=info,
    )
