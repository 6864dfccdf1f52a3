"""`data.dataset: shards`: a dataset prepared by `scaleforge data prepare`, read lazily from its shards.

The shards are Hugging Face datasets' Arrow files (`datasets.load_from_disk` opens each split), listed with their
rows, sizes and SHA-256 in the dataset's `shards.json`. Building the dataset reads the manifest alone; a sample's
shard is opened (memory-mapped, and fetched into the local cache first when the dataset lives in an object store)
by the process or data-loader worker that reads the sample, so memory does not grow with the dataset: the pages of
a memory map belong to the file, not to the process.

The order of the samples is scaleforge's own plan (data/loading.py), a function of the seed, the epoch and the
shards' sizes: each epoch permutes the shards, groups them into windows of at least `shuffle_window` samples and
permutes the samples of each window. A window's shards are all that the readers need at a time, so a remote
dataset reads each shard once per epoch when the cache holds two windows; shards written from class-sorted folders
still give mixed batches when a window spans several shards.
"""

from __future__ import annotations

import bisect
import io
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from scaleforge.data.base import DataInfo, DatasetSplits, ImageInput
from scaleforge.data.storage import MANIFEST, ShardStore, format_size, is_remote, parse_size
from scaleforge.data.transforms import Transforms
from scaleforge.errors import ConfigError, DataError
from scaleforge.registry import register_dataset

FORMAT = "scaleforge-shards"
VERSION = 1
KINDS = ("images", "table", "text")
OPEN_TABLES = 32  # memory maps each reader keeps open (a window's shards, usually)
DEFAULT_CACHE_LIMIT = "20GB"


@dataclass(frozen=True)
class Shard:
    """One shard file of a split, as the manifest lists it."""

    file: str
    rows: int
    bytes: int
    sha256: str
    tokens: int = 0  # text: the tokens the shard holds (in one row)


def read_manifest(store: ShardStore) -> dict[str, Any]:
    """The dataset's manifest, checked for the fields every reader relies on."""
    raw = store.read_manifest()
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT or manifest.get("kind") not in KINDS:
            raise ValueError(f"not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise ValueError(f"version {manifest.get('version')}, this scaleforge reads version {VERSION}")
        for split in ("train", "val"):
            shards = [Shard(**entry) for entry in manifest["splits"][split]["shards"]]
            if not shards or sum(s.rows for s in shards) != manifest["splits"][split]["rows"]:
                raise ValueError(f"the {split} split's shards do not add up to its rows")
            manifest["splits"][split]["shards"] = shards
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{store.url(MANIFEST)}: not a valid shard index ({error})") from None
    return manifest


class ShardReader:
    """The shards of one split, opened on first use in each process and kept open (up to `OPEN_TABLES`)."""

    def __init__(self, store: ShardStore, shards: Sequence[Shard]) -> None:
        self.store = store
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [s.rows for s in self.shards]).tolist()
        self._open: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row within it) of sample `index`."""
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def table(self, shard: int) -> Any:
        """Shard `shard` as a memory-mapped Arrow table."""
        table = self._open.get(shard)
        if table is not None:
            self._open.move_to_end(shard)
            return table
        import datasets

        entry = self.shards[shard]
        path = self.store.path(entry.file, entry.bytes, entry.sha256)
        try:
            table = datasets.Dataset.from_file(str(path), in_memory=False).data.table
        except Exception as error:  # Arrow's errors for a damaged file have no common base
            raise DataError(f"{self.store.url(entry.file)}: not a readable shard ({error})") from None
        if table.num_rows != entry.rows:
            raise DataError(f"{self.store.url(entry.file)}: {table.num_rows} rows, the manifest says {entry.rows}")
        self._open[shard] = table
        if len(self._open) > OPEN_TABLES:
            self._open.popitem(last=False)
        return table

    def row(self, index: int, column: str) -> Any:
        """Column `column` of sample `index`, as a Python value."""
        shard, row = self.locate(index)
        return self.table(shard).column(column)[row].as_py()

    def __getstate__(self) -> dict[str, Any]:  # a worker opens its own maps
        return {**self.__dict__, "_open": OrderedDict()}


class ShardedDataset(Dataset):
    """A split read from shards: what the training plan needs to shuffle by shard (`shard_sizes`, `shuffle_window`),
    and samples counted as skipped when `on_error` is `skip`."""

    on_error: Literal["raise", "skip"] = "raise"

    def __init__(self, reader: ShardReader, shuffle_window: int) -> None:
        self.reader = reader
        self.shuffle_window = shuffle_window

    @property
    def shard_sizes(self) -> list[int]:
        """Samples per shard, in the order of the index."""
        return [s.rows for s in self.reader.shards]

    def __len__(self) -> int:
        return len(self.reader)


class ImageShards(ShardedDataset):
    """Encoded images decoded, converted and resized as they are read, then passed through `transforms` and
    normalised: what `image_folder` gives for the same files."""

    def __init__(
        self,
        reader: ShardReader,
        shuffle_window: int,
        spec: ImageInput,
        transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
    ) -> None:
        super().__init__(reader, shuffle_window)
        self.spec = spec
        self.transforms = list(transforms)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        from PIL import Image, UnidentifiedImageError

        shard, row = self.reader.locate(index)
        table = self.reader.table(shard)
        encoded = table.column("image")[row].as_py()
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                pixels = self.spec.pixels(image)
        except (UnidentifiedImageError, OSError) as error:
            if self.on_error == "skip":
                return None
            name = self.reader.shards[shard].file
            raise DataError(f"{self.reader.store.url(name)}: row {row} is not a readable image ({error})") from None
        for transform in self.transforms:
            pixels = transform(pixels)
        return self.spec.normalise(pixels), torch.tensor(table.column("label")[row].as_py())


class TableShards(ShardedDataset):
    """Feature rows standardised with the training split's statistics, and their class labels."""

    def __init__(self, reader: ShardReader, shuffle_window: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(reader, shuffle_window)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, row = self.reader.locate(index)
        table = self.reader.table(shard)
        features = torch.tensor(table.column("features")[row].as_py(), dtype=torch.float32)
        return (features - self.mean) / self.std, torch.tensor(table.column("label")[row].as_py())


class TextShards(ShardedDataset):
    """Windows of `seq_len` tokens over the split's token stream (one row of tokens per shard), sliced from the
    memory-mapped shards as they are read; the targets are the window shifted by one token."""

    def __init__(self, reader: ShardReader, shuffle_window: int, seq_len: int) -> None:
        super().__init__(reader, shuffle_window)
        self.seq_len = seq_len
        self.token_starts = np.cumsum([0] + [s.tokens for s in reader.shards]).tolist()
        total = self.token_starts[-1]
        self.count = max(0, (total - 1) // seq_len)
        # the windows that start in each shard: the plan shuffles them shard by shard
        starts = np.arange(self.count, dtype=np.int64) * seq_len
        self._sizes = np.bincount(
            np.searchsorted(np.asarray(self.token_starts[1:]), starts, side="right"), minlength=len(reader.shards)
        ).tolist()

    @property
    def shard_sizes(self) -> list[int]:
        return self._sizes

    def __len__(self) -> int:
        return self.count

    def tokens(self, shard: int) -> np.ndarray:
        """Shard `shard`'s tokens, a view of its memory map."""
        column = self.reader.table(shard).column("tokens")
        return column.chunk(0).values.to_numpy(zero_copy_only=True)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        begin, end = index * self.seq_len, index * self.seq_len + self.seq_len + 1
        pieces = []
        shard = bisect.bisect_right(self.token_starts, begin) - 1
        while begin < end:
            offset = begin - self.token_starts[shard]
            piece = self.tokens(shard)[offset : offset + end - begin]
            pieces.append(piece)
            begin += len(piece)
            shard += 1
        window = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        return window[:-1], window[1:]


def window_for(manifest: dict[str, Any], store: ShardStore, shuffle_window: int | None, cache_limit: int | None) -> int:
    """The training split's shuffle window in samples: as given, else the whole split for local shards and as many
    shards as half the cache holds for remote ones; a remote window that does not fit is refused."""
    shards = manifest["splits"]["train"]["shards"]
    rows = manifest["splits"]["train"]["rows"]
    if shuffle_window is not None and shuffle_window < 1:
        raise ConfigError(f"data.shuffle_window: must be at least 1, got {shuffle_window}")
    if not store.remote or cache_limit is None:
        return shuffle_window or rows
    largest = max(s.bytes for s in shards)
    mean_rows = rows / len(shards)
    if shuffle_window is None:
        fit = max(1, cache_limit // (2 * largest))
        return max(1, int(fit * mean_rows))
    per_window = -(-shuffle_window // max(1, min(s.rows for s in shards))) + 1  # shards a window can span
    needed = 2 * per_window * largest
    if needed > cache_limit:
        raise ConfigError(
            f"data.cache_limit: {format_size(cache_limit)} cannot hold two shuffle windows of {shuffle_window} "
            f"samples ({per_window} shards of up to {format_size(largest)}); raise data.cache_limit to "
            f"{format_size(needed)} or lower data.shuffle_window"
        )
    return shuffle_window


def _image_splits(manifest: dict[str, Any], readers: dict[str, ShardReader], window: int, options: dict[str, Any]):
    from scaleforge.data.image_folder import build_transforms

    channels, image_size = options["channels"], options["image_size"]
    images = manifest["images"]
    stats = images["stats"]["grey" if channels == 1 else "rgb"]
    spec = ImageInput(size=image_size, channels=channels, mean=tuple(stats["mean"]), std=tuple(stats["std"]))
    info = DataInfo(
        task="classification",
        input_shape=(channels, image_size, image_size),
        num_classes=len(images["class_names"]),
        class_names=tuple(images["class_names"]),
        image=spec,
    )
    transforms = build_transforms(options["augment"])
    train = ImageShards(readers["train"], window, spec, transforms)
    return DatasetSplits(train=train, val=ImageShards(readers["val"], len(readers["val"]), spec), info=info)


def _table_splits(manifest: dict[str, Any], readers: dict[str, ShardReader], window: int) -> DatasetSplits:
    table = manifest["table"]
    info = DataInfo(
        task="classification",
        input_shape=(len(table["features"]),),
        num_classes=len(table["class_names"]),
        class_names=tuple(table["class_names"]),
    )
    train = TableShards(readers["train"], window, table["mean"], table["std"])
    return DatasetSplits(
        train=train, val=TableShards(readers["val"], len(readers["val"]), table["mean"], table["std"]), info=info
    )


def _text_splits(manifest: dict[str, Any], readers: dict[str, ShardReader], window: int, seq_len: int):
    from scaleforge.data.tokenizers import Tokenizer

    text = manifest["text"]
    train, val = TextShards(readers["train"], window, seq_len), TextShards(readers["val"], 1, seq_len)
    for name, split in (("training", train), ("validation", val)):
        if len(split) == 0:
            raise DataError(f"data.path: the {name} split is too short for one sequence of seq_len={seq_len}")
    store = readers["train"].store
    entry = text["tokenizer_file"]
    path = store.path(entry["file"], entry["bytes"], entry["sha256"])
    try:
        tokenizer = Tokenizer.from_json(path.read_text())
    except ValueError as error:
        raise DataError(f"{store.url(entry['file'])}: not a readable tokenizer ({error})") from None
    info = DataInfo(
        task="language_modeling",
        input_shape=(seq_len,),
        vocab_size=tokenizer.vocab_size,
        seq_len=seq_len,
        tokenizer=tokenizer.kind,
        bytes_per_token=float(text["bytes_per_token"]),
    )
    return DatasetSplits(train=train, val=val, info=info, tokenizer=tokenizer)


KIND_OPTIONS = {"images": ("image_size", "channels", "augment"), "text": ("seq_len",), "table": ()}


@register_dataset("shards")
def shards(
    path: str,
    image_size: int | None = None,
    channels: Literal[1, 3] | None = None,
    augment: bool | Transforms | None = None,
    seq_len: int | None = None,
    shuffle_window: int | None = None,
    cache_dir: str | None = None,
    cache_limit: str | int = DEFAULT_CACHE_LIMIT,
    on_error: Literal["raise", "skip"] = "raise",
) -> DatasetSplits:
    """A dataset prepared by `scaleforge data prepare`, in a folder or an object store (`s3://bucket/prefix`).

    Images take `image_size` (32), `channels` (3) and `augment` (true: padded random crops), as `image_folder`;
    text takes `seq_len` (128). `shuffle_window` is the number of training samples shuffled together (default: all
    of them for local shards, as many as half of `cache_limit` holds for remote ones); remote shards are kept in
    `cache_dir` (default: `~/.cache/scaleforge/shards/...`), at most `cache_limit` bytes (`20GB`). `on_error: skip`
    leaves out the images that cannot be decoded (counted in the metrics and the summary) instead of stopping.
    """
    from scaleforge.extras import require

    require("data", "data.dataset: shards")
    limit = parse_size(cache_limit, "data.cache_limit")
    store = ShardStore(path, cache_dir=cache_dir, cache_limit=limit if is_remote(path) else None)
    manifest = read_manifest(store)
    kind = manifest["kind"]
    given = {"image_size": image_size, "channels": channels, "augment": augment, "seq_len": seq_len}
    stray = [name for name, value in given.items() if value is not None and name not in KIND_OPTIONS[kind]]
    if stray:
        raise ConfigError(f"data.{stray[0]}: does not apply to {path}, which holds {kind}")
    readers = {split: ShardReader(store, manifest["splits"][split]["shards"]) for split in ("train", "val")}
    window = window_for(manifest, store, shuffle_window, store.cache_limit)
    if kind == "images":
        size = 32 if image_size is None else image_size
        if size < 1:
            raise ValueError(f"image_size must be at least 1, got {size}")
        options = {"image_size": size, "channels": channels or 3, "augment": True if augment is None else augment}
        splits = _image_splits(manifest, readers, window, options)
        for split in (splits.train, splits.val):
            split.on_error = on_error  # type: ignore[attr-defined]
        return splits
    if kind == "table":
        return _table_splits(manifest, readers, window)
    length = 128 if seq_len is None else seq_len
    if length < 1:
        raise ValueError(f"seq_len must be at least 1, got {length}")
    return _text_splits(manifest, readers, window, length)
