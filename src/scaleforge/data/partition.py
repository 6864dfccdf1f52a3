"""Cutting a training split into the parts of a federation's clients (`data.partition`).

Three schemes, as federated-learning papers and Flower Datasets' partitioners define them: `iid` (shuffled, cut
evenly), `dirichlet:ALPHA` (each class's samples spread over the parts in proportions drawn from a symmetric
Dirichlet(ALPHA), redrawn until every part holds `MIN_PART` samples) and `by-class:K` (the pathological split:
part i holds class i mod C and K - 1 others drawn at random; each class is cut evenly among the parts that hold
it). Written here rather than taken from Flower Datasets: its partitioners work on a Hugging Face `datasets.Dataset`
only, and flwr-datasets 0.6 pins `datasets<5`, which would take the data extra's engine back a major version; each
scheme is a few lines of numpy over the split's labels, drawn from `seed` alone, so every client computes the same
cut without talking to the others.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from scaleforge.config import PartitionSection
from scaleforge.data.base import DatasetSplits, InMemoryDataset, labels_of
from scaleforge.errors import ConfigError

KEY = "data.partition"
MIN_PART = 10  # samples every part of a Dirichlet split holds (Flower Datasets' default min_partition_size)
DRAWS = 100  # Dirichlet draws tried before a split whose parts cannot all reach MIN_PART is refused


def parse_scheme(scheme: str) -> tuple[str, float]:
    """`("iid", 0)`, `("dirichlet", ALPHA)` or `("by-class", K)`; a `ConfigError` for anything else."""
    name, _, value = scheme.partition(":")
    if name == "iid" and not value:
        return name, 0.0
    if name in ("dirichlet", "by-class") and value:
        try:
            number = float(value) if name == "dirichlet" else int(value)
        except ValueError:
            number = 0
        if number > 0:
            return name, float(number)
    raise ConfigError(
        f"{KEY}.scheme: {scheme!r} is not one of iid, dirichlet:ALPHA (ALPHA > 0) or by-class:K (K a positive integer)"
    )


def part_indices(labels: np.ndarray, scheme: str, parts: int, seed: int, num_classes: int | None) -> list[np.ndarray]:
    """The sample indices of each of `parts` parts (sorted), for samples of `labels` (None-free for the
    label-aware schemes), drawn with `seed`."""
    name, value = parse_scheme(scheme)
    rng = np.random.default_rng(seed)
    if name == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), parts)]
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(classes)]
    if name == "dirichlet":
        return _dirichlet(by_class, parts, value, rng)
    return _by_class(by_class, parts, int(value), rng)


def _dirichlet(by_class: list[np.ndarray], parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    total = sum(len(samples) for samples in by_class)
    least = min(MIN_PART, total // parts)
    for _ in range(DRAWS):
        chosen: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for samples in by_class:
            cuts = (np.cumsum(rng.dirichlet([alpha] * parts))[:-1] * len(samples)).astype(int)
            for part, piece in zip(chosen, np.split(samples, cuts), strict=True):
                part.append(piece)
        result = [np.sort(np.concatenate(part)) for part in chosen]
        if min(len(part) for part in result) >= max(least, 1):
            return result
    raise ConfigError(
        f"{KEY}: {DRAWS} Dirichlet draws left a part with fewer than {max(least, 1)} samples; raise ALPHA or use "
        f"fewer parts"
    )


def _by_class(by_class: list[np.ndarray], parts: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = len(by_class)
    if k > classes:
        raise ConfigError(f"{KEY}.scheme: by-class:{k} asks for more classes than the dataset's {classes}")
    held = []
    for index in range(parts):
        first = index % classes
        others = rng.choice([c for c in range(classes) if c != first], size=k - 1, replace=False)
        held.append({first, *(int(c) for c in others)})
    chosen: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for c, samples in enumerate(by_class):
        holders = [index for index in range(parts) if c in held[index]]
        for index, piece in zip(holders, np.array_split(samples, len(holders)) if holders else [], strict=True):
            chosen[index].append(piece)
    return [np.sort(np.concatenate(part)) if part else np.zeros(0, dtype=np.int64) for part in chosen]


def keep_part(splits: DatasetSplits, section: PartitionSection) -> DatasetSplits:
    """`splits` with part `section.index` of the training split only (the validation split whole)."""
    name, _ = parse_scheme(section.scheme)
    if section.index >= section.parts:
        raise ConfigError(f"{KEY}.index: {section.index} is not a part of 0 to {section.parts - 1}")
    if section.parts == 1:
        return splits
    info = splits.info
    if name != "iid" and (info.task != "classification" or info.num_classes is None):
        raise ConfigError(f"{KEY}.scheme: {name} splits classification data by label, not {info.task} data; use iid")
    size = len(splits.train)  # type: ignore[arg-type]
    labels = np.zeros(size, dtype=np.int64) if name == "iid" else labels_of(splits.train).numpy()
    indices = part_indices(labels, section.scheme, section.parts, section.seed, info.num_classes)[section.index]
    if len(indices) == 0:
        raise ConfigError(f"{KEY}: part {section.index} of {section.parts} ({section.scheme}) holds no sample")
    return dataclasses.replace(splits, train=_subset(splits.train, torch.from_numpy(indices)))


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    if type(dataset) is InMemoryDataset:  # exactly: a subclass may hold no `inputs` tensor (GatheredImages)
        return InMemoryDataset(dataset.inputs[indices], dataset.targets[indices])
    return torch.utils.data.Subset(dataset, indices.tolist())
