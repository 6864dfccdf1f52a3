"""Images in `path/<class>/<image>` folders, decoded with Pillow and held in memory as tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from scaleforge.components import factory_of
from scaleforge.config import ComponentSpec
from scaleforge.data.base import DataInfo, DatasetSplits, ImageInput, InMemoryDataset
from scaleforge.data.transforms import RandomCrop, Transforms
from scaleforge.errors import DataError
from scaleforge.registry import TRANSFORMS, register_dataset

Transform = Callable[[torch.Tensor], torch.Tensor]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folders) and (image path, class index) pairs."""
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [
        (image, index)
        for index, name in enumerate(classes)
        for image in sorted((root / name).rglob("*"))
        if image.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise DataError(f"data.path: {root} holds no images in <class>/<image> folders")
    return classes, samples


def load_images(samples: list[tuple[Path, int]], image_size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode, convert and resize every image: (N, C, S, S) floats in [0, 1] and (N,) labels."""
    from PIL import Image, UnidentifiedImageError

    spec = ImageInput(size=image_size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels)
    images = torch.empty(len(samples), channels, image_size, image_size)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as image:
                images[i] = spec.pixels(image)
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{path}: not a readable image ({error})") from error
    return images, torch.tensor([label for _, label in samples], dtype=torch.long)


class AugmentedImages(Dataset):
    """Training images read one at a time through the data loader, each passed through `transforms` as pixels in
    [0, 1] and then normalised: the loader seeds each sample's random numbers from (seed, epoch, sample index)."""

    def __init__(
        self, pixels: torch.Tensor, targets: torch.Tensor, transforms: Sequence[Transform], spec: ImageInput
    ) -> None:
        self.pixels = pixels  # (N, C, S, S)
        self.targets = targets
        self.transforms = list(transforms)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.pixels[index]  # (C, S, S)
        for transform in self.transforms:
            image = transform(image)
        return self.spec.normalise(image), self.targets[index]


def build_transforms(augment: bool | Sequence[ComponentSpec]) -> list[Transform]:
    """The transforms `augment` names; `true` is random crops alone, `false` none."""
    if isinstance(augment, bool):
        return [RandomCrop()] if augment else []
    return [factory_of(spec.factory, TRANSFORMS, spec.name)(**spec.params) for spec in augment]


@register_dataset("image_folder")
def image_folder(
    path: str,
    image_size: int = 32,
    channels: Literal[1, 3] = 3,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    augment: bool | Transforms = True,
) -> DatasetSplits:
    """`path/<class>/<image>`; validation from `path/val/` when `path/train/` and `path/val/` exist, else by fraction.

    Images are resized to `image_size` squares and normalised per channel with the training split's mean and
    standard deviation. `augment` lists the transforms applied to each training sample (data/transforms.py);
    `true` is padded random crops alone (nothing that could change what an image shows, as a mirror does to a
    digit), `false` or `[]` none.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1, got {image_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    transforms = build_transforms(augment)  # before the images load, so that a bad setting fails at once
    root = Path(path)
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train_samples = list_images(root / "train")
        val_classes, val_samples = list_images(root / "val")
        if val_classes != classes:
            raise DataError(f"{root / 'val'}: classes {val_classes} differ from {root / 'train'}'s {classes}")
    else:
        classes, samples = list_images(root)
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(split_seed)).tolist()
        num_val = round(len(samples) * val_fraction)
        val_samples = [samples[i] for i in order[:num_val]]
        train_samples = [samples[i] for i in order[num_val:]]
    train_images, train_labels = load_images(train_samples, image_size, channels)
    val_images, val_labels = load_images(val_samples, image_size, channels)
    mean = train_images.mean(dim=(0, 2, 3))
    std = train_images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    spec = ImageInput(size=image_size, channels=channels, mean=tuple(mean.tolist()), std=tuple(std.tolist()))
    info = DataInfo(
        task="classification",
        input_shape=(channels, image_size, image_size),
        num_classes=len(classes),
        class_names=tuple(classes),
        image=spec,
    )
    return DatasetSplits(
        train=AugmentedImages(train_images, train_labels, transforms, spec)
        if transforms
        else InMemoryDataset(spec.normalise(train_images), train_labels),
        val=InMemoryDataset(spec.normalise(val_images), val_labels),
        info=info,
    )
