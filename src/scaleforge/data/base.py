"""What every dataset returns: its splits and a description of itself that models and losses are chosen from."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils.data import Dataset

from scaleforge.errors import ConfigError

if TYPE_CHECKING:
    from PIL.Image import Image

    from scaleforge.data.tokenizers import Tokenizer

Task = Literal["classification", "language_modeling", "regression"]


@dataclass(frozen=True)
class ImageInput:
    """How an image file becomes one model input, the same way for training and for serving: converted to grey
    (`channels` 1) or RGB (3), resized to a `size` square (bilinear), scaled to [0, 1], then normalised per
    channel with `mean` and `std` (the training split's)."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def pixels(self, image: Image) -> torch.Tensor:
        """`image` converted and resized, as (C, S, S) floats in [0, 1] (before normalisation)."""
        import numpy as np
        from PIL import Image as PILImage

        mode = "L" if self.channels == 1 else "RGB"
        resized = image.convert(mode).resize((self.size, self.size), PILImage.Resampling.BILINEAR)
        data = torch.from_numpy(np.array(resized, dtype=np.uint8)).view(self.size, self.size, self.channels)
        return data.permute(2, 0, 1).float().div_(255)

    @functools.cached_property
    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`mean` and `std` as (C, 1, 1) tensors, made once (a sample's normalisation took 0.1 ms to make them)."""
        return torch.tensor(self.mean).view(-1, 1, 1), torch.tensor(self.std).view(-1, 1, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., C, S, S) pixels in [0, 1] as the model's inputs."""
        mean, std = self._statistics
        return (pixels - mean) / std


@dataclass(frozen=True)
class DataInfo:
    """What a dataset says about itself. Models receive the fields their signatures name; `class_names` names
    the classes in outputs, and `image` says how an image file becomes an input (for serving images). Text says
    which `tokenizer` made its tokens (`bytes` or `bpe`; the run's `final/tokenizer.json` holds it) and how many
    bytes of text a validation token stands for on average (`bytes_per_token`, for bits per byte), and
    `tokenizer_source` names that tokenizer in messages (its file, or `bpe with 300 tokens`; not saved)."""

    task: Task
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    class_names: tuple[str, ...] | None = None
    image: ImageInput | None = None
    tokenizer: str = "bytes"
    bytes_per_token: float | None = None
    tokenizer_source: str | None = dataclasses.field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """As written to `final/data_info.json`."""
        fields = dataclasses.asdict(self)
        del fields["tokenizer_source"]  # a path on the machine that trained; a run has its own tokenizer.json
        return fields

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataInfo:
        """Read back from `to_json`'s output (lists as tuples); `TypeError`/`ValueError` when it does not fit."""
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        fields = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        if fields.get("image") is not None:
            image = fields["image"]
            if not isinstance(image, dict):
                raise TypeError(f"image: expected an object, got {type(image).__name__}")
            fields["image"] = ImageInput(
                **{key: tuple(value) if isinstance(value, list) else value for key, value in image.items()}
            )
        return cls(**fields)


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
    """A dataset's training and validation splits with its `DataInfo`, and the tokenizer of a text dataset (saved
    with the run)."""

    train: Dataset
    val: Dataset
    info: DataInfo
    tokenizer: Tokenizer | None = None


def keep_classes(splits: DatasetSplits, classes: list[int]) -> DatasetSplits:
    """`splits` with the samples of `classes` only, in both splits (`data.classes`: one task of a class-incremental
    sequence); the info, and so the model's head, keeps every class of the dataset."""
    info = splits.info
    if info.task != "classification" or info.num_classes is None:
        raise ConfigError(f"data.classes: the dataset is {info.task} data; classes can be kept of classification data")
    outside = sorted({c for c in classes if not 0 <= c < info.num_classes})
    if outside:
        raise ConfigError(f"data.classes: {outside} outside the dataset's classes, 0 to {info.num_classes - 1}")
    if not classes:
        raise ConfigError(f"data.classes: empty; list the classes to keep, of 0 to {info.num_classes - 1}")
    kept = dataclasses.replace(splits, train=_of_classes(splits.train, classes), val=_of_classes(splits.val, classes))
    if len(kept.train) == 0:  # type: ignore[arg-type]
        raise ConfigError(f"data.classes: no training sample is of classes {sorted(set(classes))}")
    return kept


def _of_classes(dataset: Dataset, classes: list[int]) -> Dataset:
    """The samples of `dataset` whose label is one of `classes`: gathered at once from tensors in memory, else
    indexed after reading each sample's label once."""
    wanted = torch.tensor(sorted(set(classes)))
    if type(dataset) is InMemoryDataset:  # exactly: a subclass may hold no `inputs` tensor (GatheredImages)
        keep = torch.isin(dataset.targets, wanted.to(dataset.targets.device))
        return InMemoryDataset(dataset.inputs[keep], dataset.targets[keep])
    indices = torch.isin(labels_of(dataset), wanted).nonzero().flatten().tolist()
    return torch.utils.data.Subset(dataset, indices)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every sample's label, on the CPU: from the dataset's `targets` tensor where it has one, else read sample by
    sample."""
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, torch.Tensor) and len(targets) == len(dataset):  # type: ignore[arg-type]
        return targets.cpu()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def gather(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and targets of the samples at `indices`, as two batched tensors: sliced at once from tensors in
    memory, else read one by one and stacked."""
    if type(dataset) is InMemoryDataset:  # exactly: a subclass may hold no `inputs` tensor (GatheredImages)
        return dataset.inputs[indices], dataset.targets[indices]
    pairs = [dataset[int(i)] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([torch.as_tensor(p[1]) for p in pairs])
