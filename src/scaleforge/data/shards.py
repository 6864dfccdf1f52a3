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
import hashlib
import io
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from scaleforge.data.base import DataInfo, DatasetSplits, ImageInput
from scaleforge.data.loading import shard_windows
from scaleforge.data.storage import (
    MANIFEST,
    Prefetcher,
    ShardStore,
    StoredFile,
    check_name,
    format_size,
    is_remote,
    parse_size,
)
from scaleforge.data.transforms import Transforms
from scaleforge.errors import ConfigError, DataError
from scaleforge.registry import register_dataset

FORMAT = "scaleforge-shards"
VERSION = 1
KINDS = ("images", "table", "text")
OPEN_TABLES = 256  # memory maps each reader keeps open
DEFAULT_CACHE_LIMIT = "20GB"
DEFAULT_WINDOW_BYTES = 2 * 10**9


@dataclass(frozen=True)
class Shard:
    """One shard file of a split, as the manifest lists it."""

    file: str
    rows: int
    bytes: int
    sha256: str
    tokens: int = 0  # text: the tokens the shard holds (in one row)


def read_manifest(store: ShardStore) -> dict[str, Any]:
    """The dataset's manifest, checked for every field the readers rely on: a damaged one is a `data error:`."""
    raw = store.read_manifest()
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") not in KINDS:
            raise ValueError(f"not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise ValueError(f"version {manifest.get('version')}, this scaleforge reads version {VERSION}")
        for split in ("train", "val"):
            entries = _field(manifest, f"splits.{split}.shards", list)
            shards = [_shard(entry, manifest["kind"]) for entry in entries]
            if not shards or sum(s.rows for s in shards) != _field(manifest, f"splits.{split}.rows", int):
                raise ValueError(f"the {split} split's shards do not add up to its rows")
            manifest["splits"][split]["shards"] = shards
        CHECKS[manifest["kind"]](manifest)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise DataError(f"{store.url(MANIFEST)}: not a valid shard index ({error})") from None
    return manifest


def _field(data: Any, dotted: str, kind: type | tuple[type, ...]) -> Any:
    """`data`'s value at `dotted` (`splits.train.rows`), which must be a `kind`."""
    value = data
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"no {dotted}")
        value = value[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{dotted} is not {getattr(kind, '__name__', 'a number')}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{dotted} is negative")
    return value


def _shard(entry: Any, kind: str) -> Shard:
    file = check_name(_field({"shard": entry}, "shard.file", str))
    digest = _field({"shard": entry}, "shard.sha256", str)
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"shard {file}: sha256 is not a SHA-256")
    rows, size = (_field({"shard": entry}, f"shard.{key}", int) for key in ("rows", "bytes"))
    tokens = _field({"shard": entry}, "shard.tokens", int) if kind == "text" else 0
    return Shard(file=file, rows=rows, bytes=size, sha256=digest, tokens=tokens)


def _numbers(manifest: dict[str, Any], dotted: str, length: int | None = None) -> list[float]:
    values = _field(manifest, dotted, list)
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{dotted} is not a list of numbers")
    if length is not None and len(values) != length:
        raise ValueError(f"{dotted} has {len(values)} values, not {length}")
    return values


def _class_names(manifest: dict[str, Any], dotted: str) -> None:
    names = _field(manifest, dotted, list)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{dotted} is not a list of names")


def _check_images(manifest: dict[str, Any]) -> None:
    _class_names(manifest, "images.class_names")
    for mode, channels in (("rgb", 3), ("grey", 1)):
        for stat in ("mean", "std"):
            _numbers(manifest, f"images.stats.{mode}.{stat}", channels)


def _check_table(manifest: dict[str, Any]) -> None:
    _class_names(manifest, "table.class_names")
    features = _field(manifest, "table.features", list)
    for stat in ("mean", "std"):
        _numbers(manifest, f"table.{stat}", len(features))


def _check_text(manifest: dict[str, Any]) -> None:
    _field(manifest, "text.vocab_size", int)
    _field(manifest, "text.bytes_per_token", int | float)
    check_name(_field(manifest, "text.tokenizer_file.file", str))
    _field(manifest, "text.tokenizer_file.bytes", int)
    _field(manifest, "text.tokenizer_file.sha256", str)


CHECKS = {"images": _check_images, "table": _check_table, "text": _check_text}


def open_arrow(path: Path) -> Any:
    """A shard file (Hugging Face datasets' Arrow stream format) as a memory-mapped pyarrow table, read by pyarrow
    directly: 0.03 ms, where `datasets.Dataset.from_file` takes 1.4 ms to build the same table (measured)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


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
        entry = self.shards[shard]
        try:
            table = self.store.open(entry.file, entry.bytes, entry.sha256, open_arrow)
        except (OSError, ValueError) as error:  # pyarrow's errors for a damaged file (ArrowInvalid is a ValueError)
            raise DataError(f"{self.store.url(entry.file)}: not a readable shard ({error})") from None
        if table.num_rows != entry.rows:
            raise DataError(f"{self.store.url(entry.file)}: {table.num_rows} rows, the manifest says {entry.rows}")
        self._open[shard] = table
        if len(self._open) > OPEN_TABLES:
            self._open.popitem(last=False)
        return table

    def __getstate__(self) -> dict[str, Any]:  # a worker opens its own maps
        return {**self.__dict__, "_open": OrderedDict()}


class ShardedDataset(Dataset):
    """A split read from shards: what the training plan needs to shuffle by shard (`shard_sizes`, `shuffle_window`),
    and samples counted as skipped when `on_error` is `skip`."""

    on_error: Literal["raise", "skip"] = "raise"

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader
        self.shuffle_window = 0  # set by `shards`: the training split's window, the whole split for the others

    @property
    def shard_sizes(self) -> list[int]:
        """Samples per shard, in the order of the index."""
        return [s.rows for s in self.reader.shards]

    @property
    def order_digest(self) -> str:
        """What the order of the samples depends on besides the seed and the epoch (the shards' sizes and the
        window), as a checkpoint records it: a run continues only on the same."""
        digest = hashlib.sha256(json.dumps([self.shard_sizes, self.shuffle_window]).encode()).hexdigest()[:16]
        return f"{len(self.shard_sizes)} shards, window {self.shuffle_window}, {digest}"

    def __len__(self) -> int:
        return len(self.reader)

    def prefetcher(self, seed: int, epoch: int) -> Prefetcher | None:
        """What fetches the shards of `epoch` ahead of its readers, window by window as `windowed_permutation` reads
        them, when they live in an object store; None for shards on disk."""
        if not self.reader.store.remote:
            return None
        sizes, shards = self.shard_sizes, self.reader.shards
        windows = shard_windows(sizes, self.shuffle_window, seed, epoch)
        ends = np.cumsum([sum(sizes[shard] for shard in window) for window in windows]).tolist()
        files = [[StoredFile(shards[i].file, shards[i].bytes, shards[i].sha256) for i in window] for window in windows]
        return Prefetcher(self.reader.store, files, ends)


class ImageShards(ShardedDataset):
    """Encoded images decoded, converted and resized as they are read, then passed through `transforms` and
    normalised: what `image_folder` gives for the same files."""

    def __init__(
        self,
        reader: ShardReader,
        spec: ImageInput,
        transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
    ) -> None:
        super().__init__(reader)
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
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            if self.on_error == "skip":
                return None
            name = self.reader.shards[shard].file
            raise DataError(f"{self.reader.store.url(name)}: row {row} is not a readable image ({error})") from None
        for transform in self.transforms:
            pixels = transform(pixels)
        return self.spec.normalise(pixels), torch.tensor(table.column("label")[row].as_py())


class TableShards(ShardedDataset):
    """Feature rows standardised with the training split's statistics, and their class labels."""

    def __init__(self, reader: ShardReader, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(reader)
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

    def __init__(self, reader: ShardReader, seq_len: int) -> None:
        super().__init__(reader)
        self.seq_len = seq_len
        self.token_starts = np.cumsum([0] + [s.tokens for s in reader.shards]).tolist()
        total = self.token_starts[-1]
        self.count = max(0, (total - 1) // seq_len)
        # the windows that start in each shard (window w starts at token w * seq_len): the plan shuffles them
        # shard by shard
        first = [min(self.count, -(-start // seq_len)) for start in self.token_starts]
        self._sizes = [after - before for before, after in zip(first, first[1:], strict=False)]

    @property
    def shard_sizes(self) -> list[int]:
        return self._sizes

    def __len__(self) -> int:
        return self.count

    def tokens(self, shard: int) -> np.ndarray:
        """Shard `shard`'s tokens, a view of its memory map."""
        column = self.reader.table(shard).column("tokens")
        return column.chunk(0).flatten().to_numpy(zero_copy_only=True)

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


def window_for(dataset: ShardedDataset, shuffle_window: int | None, cache_limit: int | None) -> int:
    """The training split's shuffle window in samples: as given, else the samples of about `DEFAULT_WINDOW_BYTES`
    of shards (all of them for a smaller dataset), wherever the shards are; for shards in an object store, a window
    whose shards the cache cannot hold twice is refused."""
    sizes, shards = dataset.shard_sizes, dataset.reader.shards
    rows, total_bytes = sum(sizes), sum(s.bytes for s in shards)
    if shuffle_window is not None and shuffle_window < 1:
        raise ConfigError(f"data.shuffle_window: must be at least 1, got {shuffle_window}")
    window = shuffle_window or min(rows, max(1, -(-DEFAULT_WINDOW_BYTES * rows // max(1, total_bytes))))
    if not dataset.reader.store.remote or cache_limit is None:
        return window
    smallest = min((size for size in sizes if size), default=1)
    spanned = min(len(shards), -(-window // smallest) + 1)  # the most shards one window can draw from
    needed = 2 * spanned * max(s.bytes for s in shards)
    if needed > cache_limit:
        what = "data.shuffle_window" if shuffle_window else "the default window (about 2 GB of shards)"
        raise ConfigError(
            f"data.cache_limit: {format_size(cache_limit)} cannot hold two shuffle windows of {window} samples "
            f"({what}: up to {spanned} shards of up to {format_size(max(s.bytes for s in shards))}); raise "
            f"data.cache_limit to {format_size(needed, up=True)} or lower data.shuffle_window"
        )
    return window


def _image_splits(manifest: dict[str, Any], readers: dict[str, ShardReader], options: dict[str, Any]):
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
    train = ImageShards(readers["train"], spec, transforms)
    return DatasetSplits(train=train, val=ImageShards(readers["val"], spec), info=info)


def _table_splits(manifest: dict[str, Any], readers: dict[str, ShardReader]) -> DatasetSplits:
    table = manifest["table"]
    info = DataInfo(
        task="classification",
        input_shape=(len(table["features"]),),
        num_classes=len(table["class_names"]),
        class_names=tuple(table["class_names"]),
    )
    mean, std = table["mean"], table["std"]
    return DatasetSplits(
        train=TableShards(readers["train"], mean, std), val=TableShards(readers["val"], mean, std), info=info
    )


def _text_splits(manifest: dict[str, Any], readers: dict[str, ShardReader], seq_len: int) -> DatasetSplits:
    from scaleforge.data.tokenizers import Tokenizer

    text = manifest["text"]
    train, val = TextShards(readers["train"], seq_len), TextShards(readers["val"], seq_len)
    for name, split in (("training", train), ("validation", val)):
        if len(split) == 0:
            raise DataError(f"data.path: the {name} split is too short for one sequence of seq_len={seq_len}")
    store = readers["train"].store
    entry = text["tokenizer_file"]
    try:
        tokenizer = store.open(
            entry["file"], entry["bytes"], entry["sha256"], lambda p: Tokenizer.from_json(p.read_text())
        )
    except ValueError as error:
        raise DataError(f"{store.url(entry['file'])}: not a readable tokenizer ({error})") from None
    info = DataInfo(
        task="language_modeling",
        input_shape=(seq_len,),
        vocab_size=tokenizer.vocab_size,
        seq_len=seq_len,
        tokenizer=tokenizer.kind,
        bytes_per_token=float(text["bytes_per_token"]),
        tokenizer_source=store.url(entry["file"]),
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
    text takes `seq_len` (128). `shuffle_window` is the number of training samples shuffled together (default: the
    samples of about 2 GB of shards, all of them in a smaller dataset); shards in an object store are kept in
    `cache_dir` (default: `~/.cache/scaleforge/shards/...`), at most `cache_limit` bytes (`20GB`), which must hold
    two windows. `on_error: skip` leaves out the images that cannot be decoded (counted in the metrics and the
    summary) instead of stopping.
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
    if on_error == "skip" and kind != "images":
        raise ConfigError(f"data.on_error: skip applies to images (undecodable ones); {path} holds {kind}")
    readers = {split: ShardReader(store, manifest["splits"][split]["shards"]) for split in ("train", "val")}
    if kind == "images":
        size = 32 if image_size is None else image_size
        if size < 1:
            raise ValueError(f"image_size must be at least 1, got {size}")
        options = {"image_size": size, "channels": channels or 3, "augment": True if augment is None else augment}
        splits = _image_splits(manifest, readers, options)
    elif kind == "table":
        splits = _table_splits(manifest, readers)
    else:
        length = 128 if seq_len is None else seq_len
        if length < 1:
            raise ValueError(f"seq_len must be at least 1, got {length}")
        splits = _text_splits(manifest, readers, length)
    for split in (splits.train, splits.val):
        split.on_error = on_error  # type: ignore[attr-defined]
        split.shuffle_window = len(split)  # type: ignore[attr-defined,arg-type]  (validation: read in order)
    splits.train.shuffle_window = window_for(splits.train, shuffle_window, store.cache_limit)  # type: ignore[attr-defined,arg-type]
    return splits
