"""Datasets (registered by name) and the loaders that turn them into global batches."""

from scaleforge.data import (  # noqa: F401  (registration)
    csv_table,
    digits,
    image_folder,
    shards,
    synthetic,
    text,
    transforms,
)
from scaleforge.data.base import DataInfo, DatasetSplits, ImageInput, InMemoryDataset

__all__ = ["DataInfo", "DatasetSplits", "ImageInput", "InMemoryDataset"]
