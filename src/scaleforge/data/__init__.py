"""Datasets (registered by name) and the loaders that turn them into global batches."""

from scaleforge.data import csv_table, digits, image_folder, synthetic, text, transforms  # noqa: F401  (registration)
from scaleforge.data.base import DataInfo, DatasetSplits, ImageInput, InMemoryDataset

__all__ = ["DataInfo", "DatasetSplits", "ImageInput", "InMemoryDataset"]
