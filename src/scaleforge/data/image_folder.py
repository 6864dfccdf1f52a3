"""Images in `path/<class>/<image>` folders, decoded once into a cache of uint8 pixels and read from it per sample.

The first use of a folder decodes, converts and resizes every image in parallel (one process per CPU), each
process writing its images straight into a memory-mapped file of (N, C, S, S) bytes; later runs map that file
and decode nothing. The training and validation splits read their samples from the mapping as they are asked for
them, so the pages they touch belong to the file (the page cache) and not to any process: a run's own memory
grows with the number of images by their listing alone (paths and indices, a few hundred bytes an image), not by
their pixels. The temporary files of a decode killed outright are removed by the next one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import torch
from torch.utils.data import Dataset

from scaleforge.components import factory_of
from scaleforge.config import ComponentSpec
from scaleforge.data.base import DataInfo, DatasetSplits, ImageInput, InMemoryDataset
from scaleforge.data.transforms import RandomCrop, Transforms
from scaleforge.errors import DataError
from scaleforge.files import cache_home, remove_unless_locked
from scaleforge.processes import ParentDeathGuard
from scaleforge.registry import TRANSFORMS, register_dataset

Transform = Callable[[torch.Tensor], torch.Tensor]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Part of every cache's key: a change to how images are decoded or stored invalidates the caches written before it.
CACHE_FORMAT = 1


def list_images(folder: Path, root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Class names (the sorted sub-folders of `folder`), each image's path relative to `root` (class by class, in
    sorted order) and its class index. Paths are kept as strings and indices as one array, the least memory a
    listing of many images takes."""
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[str] = []
    counts = []
    for name in classes:
        images = sorted(image for image in (folder / name).rglob("*") if image.suffix.lower() in IMAGE_SUFFIXES)
        files.extend(str(image.relative_to(root)) for image in images)
        counts.append(len(images))
    if not files:
        raise DataError(f"data.path: {folder} holds no images in <class>/<image> folders")
    return classes, files, np.repeat(np.arange(len(classes), dtype=np.int64), counts)


# ------------------------------------------------------------------------------------------ the decoded cache


@dataclass(frozen=True)
class ImageCache:
    """A folder's images decoded once: `pixels` holds (N, C, S, S) uint8 in the order of the files it was built
    from, `sums` (N, C, 2) int64 each image's per-channel sum of pixel values and of their squares."""

    pixels_path: Path
    sums_path: Path
    shape: tuple[int, int, int, int]

    def pixels(self) -> np.memmap:
        """The pixels, mapped from the file: the pages read belong to the file, not to the process. (Copy-on-write,
        which nothing here writes: torch takes such arrays without a copy, as it does not take read-only ones.)"""
        return np.memmap(self.pixels_path, dtype=np.uint8, mode="c", shape=self.shape)

    def normalisation(self, rows: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation (with Bessel's correction, floored at 1e-6) of the pixels in
        [0, 1] of the images at `rows`: exact sums of integers, whatever the order in which the images were read."""
        sums = np.load(self.sums_path, mmap_mode="r")[np.sort(rows)].sum(axis=0, dtype=np.int64)  # (C, 2)
        count = len(rows) * self.shape[2] * self.shape[3]
        means, stds = [], []
        for total, squares in sums.tolist():  # Python integers: the variance's difference loses nothing
            means.append(total / count / 255)
            variance = (count * squares - total * total) / (count * max(1, count - 1))
            stds.append(max(variance**0.5 / 255, 1e-6))
        return tuple(means), tuple(stds)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/scaleforge/images`, `~/.cache/scaleforge/images` when the variable is not set."""
    return cache_home("images")


def cache_key(root: Path, files: Sequence[str], image_size: int, channels: int) -> str:
    """A hash of what the decoded pixels depend on: the folder, each file's path in it (in order), size and
    modification time, the image size and the channels. A changed, added or removed file gives a new key."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, str(root.resolve()), image_size, channels]).encode())
    for name in files:
        status = os.stat(os.path.join(root, name))
        digest.update(f"{name}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def decoded_cache(
    root: Path, files: Sequence[str], image_size: int, channels: int, cache_dir: Path, processes: int
) -> ImageCache:
    """The cache of `files` (paths relative to `root`) in `cache_dir`: reused when one was written for the same files,
    else decoded now by `processes` processes and written under temporary names renamed into place, the
    description (`<key>.json`) last. Processes that ask at the same time (the ranks of one run) take turns: the
    first decodes, the others find its cache."""
    key = cache_key(root, files, image_size, channels)
    shape = (len(files), channels, image_size, image_size)
    cache = ImageCache(cache_dir / f"{key}.pixels", cache_dir / f"{key}.sums.npy", shape)
    description = cache_dir / f"{key}.json"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = f"cannot hold the decoded images ({error}); name a folder to write to"
        raise DataError(f"data.cache_dir: {cache_dir} {reason}") from error
    remove_abandoned_temporaries(cache_dir)
    with _locked(cache_dir / f"{key}.lock"):
        if _complete(cache, description):
            return cache
        _write_cache(cache, root, files, processes)
        meta = {"format": CACHE_FORMAT, "root": str(root.resolve()), "shape": list(shape)}
        temporary = description.with_name(f"{description.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(temporary, description)
        _remove_replaced(cache_dir, key, meta)
    return cache


def remove_abandoned_temporaries(cache_dir: Path) -> None:
    """Delete the temporary files (`<key>.<name>.<pid>.tmp`) of decodes killed outright. A decode writes them
    holding its cache's lock (`<key>.lock`) throughout, so the files of one in progress, in any process, are
    left alone."""
    for temporary in cache_dir.glob("*.tmp"):
        key = temporary.name.split(".", 1)[0]
        remove_unless_locked(temporary, cache_dir / f"{key}.lock")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _complete(cache: ImageCache, description: Path) -> bool:
    try:
        meta = json.loads(description.read_text())
        size = cache.pixels_path.stat().st_size
    except (OSError, ValueError):
        return False
    return meta.get("shape") == list(cache.shape) and size == int(np.prod(cache.shape)) and cache.sums_path.exists()


def _remove_replaced(cache_dir: Path, key: str, meta: dict[str, Any]) -> None:
    """Delete the caches of an earlier state of the same folder at the same size (files changed since): each is
    as large as this one and would never be read again. A run still reading one keeps its mapping."""
    for description in cache_dir.glob("*.json"):
        other = description.name.removesuffix(".json")
        if other == key:
            continue
        try:
            old = json.loads(description.read_text())
        except (OSError, ValueError):
            continue
        if old.get("root") == meta["root"] and old.get("shape", [])[1:] == meta["shape"][1:]:
            for suffix in (".json", ".pixels", ".sums.npy", ".lock"):
                (cache_dir / f"{other}{suffix}").unlink(missing_ok=True)


def _write_cache(cache: ImageCache, root: Path, files: Sequence[str], processes: int) -> None:
    """Decode `files` into temporary files, then rename them to the cache's names; a failure leaves nothing."""
    suffix = f".{os.getpid()}.tmp"
    pixels_tmp = cache.pixels_path.with_name(cache.pixels_path.name + suffix)
    sums_tmp = cache.sums_path.with_name(cache.sums_path.name + suffix)
    try:
        np.memmap(pixels_tmp, dtype=np.uint8, mode="w+", shape=cache.shape).flush()  # the file, at its full size
        sums = decode_all(pixels_tmp, root, files, cache.shape, processes)
        with sums_tmp.open("wb") as stream:
            np.save(stream, sums)
        os.replace(pixels_tmp, cache.pixels_path)
        os.replace(sums_tmp, cache.sums_path)
    finally:
        pixels_tmp.unlink(missing_ok=True)
        sums_tmp.unlink(missing_ok=True)


def decode_all(
    pixels_path: Path, root: Path, files: Sequence[str], shape: tuple[int, int, int, int], processes: int
) -> np.ndarray:
    """Decode `files` (relative to `root`) into the `shape` (N, C, S, S) uint8 file at `pixels_path`, in chunks
    shared by `processes` processes (forked on Linux, so that they start at once), each writing its chunk straight
    into the file; returns the (N, C, 2) per-image sums. Chunks are handed out a few per process at a time, so
    the paths waiting to be decoded are never all spelled out at once. The first unreadable file, in the files'
    order, raises a `DataError` naming it."""
    processes = max(1, min(processes, len(files)))
    chunk = max(1, min(256, -(-len(files) // (8 * processes))))
    sums = np.empty((len(files), shape[1], 2), dtype=np.int64)
    progress = DecodeProgress(len(files), processes)
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    # the guard is made here, in the parent, whose pid it holds; the processes start on this thread, at the first submit
    guard = ParentDeathGuard(signal.SIGKILL)
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_decoder, initargs=(guard,)) as pool:
        in_flight: deque[tuple[int, Future[np.ndarray | str]]] = deque()
        try:
            for start in range(0, len(files), chunk):
                paths = [os.path.join(root, name) for name in files[start : start + chunk]]
                in_flight.append((start, pool.submit(_decode_chunk, (str(pixels_path), shape, start, paths))))
                if len(in_flight) >= 4 * processes:
                    _collect(*in_flight.popleft(), sums, progress)
            while in_flight:
                _collect(*in_flight.popleft(), sums, progress)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            progress.close()
    return sums


def _collect(start: int, future: Future[np.ndarray | str], sums: np.ndarray, progress: DecodeProgress) -> None:
    result = future.result()
    if isinstance(result, str):
        raise DataError(result)
    sums[start : start + len(result)] = result
    progress.advance(len(result))


def _start_decoder(guard: ParentDeathGuard) -> None:
    """In each decoding process: one torch thread (the processes are the parallelism), and death with the parent."""
    torch.set_num_threads(1)
    guard()


def _decode_chunk(task: tuple[str, tuple[int, int, int, int], int, list[str]]) -> np.ndarray | str:
    """Decode one chunk of files into rows `start...` of the pixel file: their (n, C, 2) sums, or the error
    message of the first file that is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    pixels_path, shape, start, files = task
    _, channels, size, _ = shape
    spec = ImageInput(size=size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels)
    pixels = np.memmap(pixels_path, dtype=np.uint8, mode="r+", shape=shape)
    sums = np.empty((len(files), channels, 2), dtype=np.int64)
    for offset, file in enumerate(files):
        try:
            with Image.open(file) as image:
                # the same conversion and resizing as serving's, back to the bytes it scaled to [0, 1]
                decoded = spec.pixels(image).mul(255).round().to(torch.uint8).numpy()  # (C, S, S)
        except (UnidentifiedImageError, OSError) as error:
            return f"{file}: not a readable image ({error})"
        pixels[start + offset] = decoded
        values = decoded.reshape(channels, -1).astype(np.int64)
        sums[offset, :, 0] = values.sum(axis=1)
        sums[offset, :, 1] = (values * values).sum(axis=1)
    pixels.flush()
    return sums


class DecodeProgress:
    """The decode pass's progress on stderr, once it has taken `delay_s` (a small folder's passes in silence): a
    bar on a terminal, else a line every `every_s` seconds, and a last line with the time it took."""

    def __init__(
        self, total: int, processes: int, stream: TextIO | None = None, delay_s: float = 2.0, every_s: float = 10.0
    ) -> None:
        self.total, self.processes, self.done = total, processes, 0
        self.stream = stream or sys.stderr
        self.delay_s, self.every_s = delay_s, every_s
        self.start = self.last_line = time.monotonic()
        self.bar: Any = None
        self.task: Any = None
        self.shown = False

    def advance(self, count: int) -> None:
        """`count` more images decoded."""
        self.done += count
        now = time.monotonic()
        if not self.shown and now - self.start >= self.delay_s:
            self.shown = True
            self._show()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.shown and now - self.last_line >= self.every_s:
            self.last_line = now
            self._line(f"decoded {self.done:,}/{self.total:,} images")

    def _show(self) -> None:
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.bar = Progress(*columns, console=Console(file=self.stream), transient=True)
            self.task = self.bar.add_task("decode", total=self.total)
            self.bar.start()
        else:
            self._line(f"decoding {self.total:,} images with {self.processes} processes, once: later runs reuse them")

    def _line(self, text: str) -> None:
        print(f"image_folder: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        """The last line, when progress was shown."""
        if self.bar is not None:
            self.bar.stop()
        if self.shown:
            self._line(f"decoded {self.done:,}/{self.total:,} images in {time.monotonic() - self.start:.0f} s")


# ------------------------------------------------------------------------------------------ the splits


class FolderImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A training split with transforms: the uint8 images at `rows` of `pixels` ((N, C, S, S), the memory-mapped
    cache), each read when the data loader asks for it, scaled to [0, 1], passed through `transforms` and
    normalised by `spec`. A sample's random transforms draw from torch's default generator, which the data loader
    seeds per sample from (seed, epoch, sample index)."""

    def __init__(
        self,
        pixels: np.ndarray,
        rows: np.ndarray,
        targets: torch.Tensor,
        spec: ImageInput,
        transforms: Sequence[Transform],
    ) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        self.pixels = pixels
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = targets
        self.spec = spec
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.pixels[self.rows[index]]).float() / 255  # (C, S, S)
        for transform in self.transforms:
            image = transform(image)
        return self.spec.normalise(image), self.targets[index]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if isinstance(self.pixels, np.memmap):  # a worker started by spawning maps the file again, not a copy
            state["pixels"] = (str(self.pixels.filename), self.pixels.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["pixels"], tuple):
            path, shape = state["pixels"]
            state["pixels"] = np.memmap(path, dtype=np.uint8, mode="c", shape=shape)
        self.__dict__.update(state)


class GatheredImages(InMemoryDataset):
    """A split without transforms (validation, or training with `augment: false`), taken by the data loader's
    fast path for tensors in memory without being held in memory: indexing with a tensor of indices gathers those
    images' bytes from `pixels` (the memory-mapped cache, rows `rows`) in one read, scales them to [0, 1],
    normalises them by `spec` and hands them over on `device`. Unlike other `InMemoryDataset`s it holds no
    `inputs` tensor: the inputs exist a batch at a time."""

    def __init__(
        self,
        pixels: np.ndarray,
        rows: np.ndarray,
        targets: torch.Tensor,
        spec: ImageInput,
        device: torch.device | None = None,
    ) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        self.pixels = pixels
        self.rows = np.asarray(rows, dtype=np.int64)
        self.device = device or torch.device("cpu")
        self.targets = targets.to(self.device)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[index.cpu().numpy() if isinstance(index, torch.Tensor) else index]
        images = torch.from_numpy(self.pixels[rows]).float() / 255  # (B, C, S, S), or (C, S, S) for one index
        return self.spec.normalise(images).to(self.device, non_blocking=True), self.targets[index]

    def to(self, device: torch.device) -> GatheredImages:
        """The same split, its batches handed over on `device` (the pixels stay in the mapped file)."""
        return GatheredImages(self.pixels, self.rows, self.targets, self.spec, device)


def build_transforms(augment: bool | Sequence[ComponentSpec]) -> list[Transform]:
    """The transforms `augment` names; `true` is random crops alone, `false` none."""
    if isinstance(augment, bool):
        return [RandomCrop()] if augment else []
    return [factory_of(spec.factory, TRANSFORMS, spec.name)(**spec.params) for spec in augment]


def split_samples(
    root: Path, val_fraction: float, split_seed: int
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Classes, image paths (relative to `root`), their class indices, and the indices into those of the training
    and the validation split: `root/train/` and `root/val/` when both exist, else `root`'s images split at random
    by `val_fraction` (seeded by `split_seed`)."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train_files, train_labels = list_images(root / "train", root)
        val_classes, val_files, val_labels = list_images(root / "val", root)
        if val_classes != classes:
            raise DataError(f"{root / 'val'}: classes {val_classes} differ from {root / 'train'}'s {classes}")
        rows = np.arange(len(train_files) + len(val_files))
        labels = np.concatenate([train_labels, val_labels])
        return classes, train_files + val_files, labels, rows[: len(train_files)], rows[len(train_files) :]
    classes, files, labels = list_images(root, root)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(split_seed)).numpy()
    num_val = round(len(files) * val_fraction)
    return classes, files, labels, order[num_val:], order[:num_val]


def decoding_processes() -> int:
    """One decoding process per CPU this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@register_dataset("image_folder")
def image_folder(
    path: str,
    image_size: int = 32,
    channels: Literal[1, 3] = 3,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    augment: bool | Transforms = True,
    cache_dir: str | None = None,
) -> DatasetSplits:
    """`path/<class>/<image>`; validation from `path/val/` when `path/train/` and `path/val/` exist, else by fraction.

    Images are resized to `image_size` squares and normalised per channel with the training split's mean and
    standard deviation. `augment` lists the transforms applied to each training sample (data/transforms.py);
    `true` is padded random crops alone (nothing that could change what an image shows, as a mirror does to a
    digit), `false` or `[]` none. The decoded images are cached in `cache_dir` (default: `default_cache_dir()`)
    for the next run over the same files.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1, got {image_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    transforms = build_transforms(augment)  # before the images load, so that a bad setting fails at once
    root = Path(path)
    classes, files, labels, train_rows, val_rows = split_samples(root, val_fraction, split_seed)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = decoded_cache(root, files, image_size, channels, directory, decoding_processes())
    del files  # the listing's memory, before the splits are read
    mean, std = cache.normalisation(train_rows)
    spec = ImageInput(size=image_size, channels=channels, mean=mean, std=std)
    info = DataInfo(
        task="classification",
        input_shape=(channels, image_size, image_size),
        num_classes=len(classes),
        class_names=tuple(classes),
        image=spec,
    )
    pixels = cache.pixels()
    train_labels, val_labels = torch.from_numpy(labels[train_rows]), torch.from_numpy(labels[val_rows])
    return DatasetSplits(
        train=FolderImages(pixels, train_rows, train_labels, spec, transforms)
        if transforms
        else GatheredImages(pixels, train_rows, train_labels, spec),
        val=GatheredImages(pixels, val_rows, val_labels, spec),
        info=info,
    )
