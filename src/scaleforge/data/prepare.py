"""`scaleforge data prepare`: an image folder, a CSV table or a text corpus, converted once into shards.

Hugging Face datasets writes them: the source is read by `--workers` processes into Arrow
(`Dataset.from_generator`, `Dataset.from_csv`), split into training and validation as the in-memory datasets split
it, and saved with `save_to_disk` in shards of about `--shard-size` (each split is a folder that
`datasets.load_from_disk` opens). Images keep their encoded bytes (PNG and JPEG are already compressed); tables and
token streams stay uncompressed, so that readers map them into memory with no copy. The manifest, `shards.json`,
lists every shard with its rows, size and SHA-256, and what training needs to know without reading a shard (class
names, the training split's statistics, the vocabulary). A folder is written under a temporary name and renamed
when complete; an object store receives the manifest after every shard. A staging folder that a prepare killed
outright left behind is removed by the next prepare beside it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scaleforge.data.storage import MANIFEST, format_size, is_remote, parse_size, sha256_of, upload_folder
from scaleforge.errors import DataError, UsageError, first_line
from scaleforge.files import owned_folder, remove_abandoned

Kind = Literal["images", "table", "text"]
STAGING_PREFIX = ".scaleforge-prepare-"  # a folder being written, beside --out (or in $TMPDIR for a store)
MOMENTS = 8  # per image: the mean of R, G, B, R², G², B², L, L² over its pixels


@dataclass(frozen=True)
class PrepareOptions:
    """What `data prepare` is asked for; each field is also its command-line option (cli/fields.py)."""

    kind: str | None = field(
        default=None,
        metadata={"help": "what SOURCE holds (default: from its files)", "choices": ["images", "table", "text"]},
    )
    workers: int | None = field(
        default=None,
        metadata={
            "help": "processes reading and writing (default: the CPU count)",
            "range": "positive",
            "metavar": "N",
        },
    )
    shard_size: str = field(default="64MB", metadata={"help": "about this much per shard", "metavar": "SIZE"})
    val_fraction: float | None = field(
        default=None,
        metadata={
            "help": "share held out for validation (images, tables: 0.2, text: 0.1, as the datasets read from sources)",
            "range": "fraction",
            "metavar": "F",
        },
    )
    split_seed: int = field(
        default=0, metadata={"help": "seed of the random split", "range": "non-negative", "metavar": "S"}
    )
    target: str = field(default="target", metadata={"help": "a table's label column", "metavar": "COLUMN"})
    tokenizer: str = field(
        default="bytes",
        metadata={
            "help": "text: bytes, bpe (trained on the training split) or a saved tokenizer's .json",
            "metavar": "NAME",
        },
    )
    vocab_size: int | None = field(
        default=None, metadata={"help": "text: the BPE vocabulary (default 4096)", "range": "positive", "metavar": "N"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a dataset already at DEST"})


def detect_kind(source: Path) -> Kind:
    """`table` for a .csv file, `images` for a folder of class folders of images, else `text`."""
    from scaleforge.data.image_folder import IMAGE_SUFFIXES

    if source.is_file():
        return "table" if source.suffix.lower() == ".csv" else "text"
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    for path in source.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return "images"
    return "text"


def prepare(source: str, out: str, options: PrepareOptions = PrepareOptions()) -> dict[str, Any]:
    """Convert `source` into shards at `out` (a folder or `s3://bucket/prefix`); returns the manifest.

    The shards are saved by processes started by spawn (Hugging Face datasets' choice, on Linux too), which import
    the calling script again: a script that calls this needs `if __name__ == "__main__":` around the call."""
    from scaleforge.extras import require

    require("data", "scaleforge data prepare")
    root = Path(source)
    kind = options.kind or detect_kind(root)
    if not root.exists():
        raise DataError(f"{source}: no such file or folder")
    shard_bytes = parse_size(options.shard_size, "--shard-size")
    workers = max(1, options.workers or os.cpu_count() or 1)
    target = _check_out(out, options.overwrite)
    # an object store has no folder beside it: its shards are staged in $TMPDIR, then uploaded
    parent = Path(tempfile.gettempdir()) if is_remote(out) else Path(out).resolve().parent
    remove_abandoned(parent, STAGING_PREFIX)  # what prepares killed outright left
    started = time.perf_counter()
    try:
        with owned_folder(parent, STAGING_PREFIX) as scratch:
            stage, cache = scratch / "out", scratch / "cache"
            stage.mkdir()
            writer = _Writer(stage, cache, workers, shard_bytes)
            with _quiet_unless_terminal():
                if kind == "images":
                    details = _prepare_images(root, writer, options)
                elif kind == "table":
                    details = _prepare_table(root, writer, options)
                else:
                    details = _prepare_text(root, writer, options)
            manifest = {"format": "scaleforge-shards", "version": 1, "kind": kind, "engine": _engine(), **details}
            manifest["splits"] = {split: writer.index(split) for split in ("train", "val")}
            shutil.rmtree(cache, ignore_errors=True)
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            _publish(stage, out, target)
    except Exception as error:
        if not _disk_full(error):
            raise
        fix = "set TMPDIR to a folder on a larger disk" if target is None else "free space there"
        raise DataError(f"{parent}: no space left on its disk for the shards staged there; {fix}") from None
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    return manifest


def _disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is a full disk (in a worker, or from Arrow, only its text
    says so)."""
    cause: BaseException | None = error
    while cause is not None:
        if getattr(cause, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _engine() -> str:
    import datasets

    return f"datasets {datasets.__version__} (Arrow)"


def _check_out(out: str, overwrite: bool) -> Path | None:
    """The local folder to create (None for an object store); an existing one is refused unless `overwrite`."""
    if is_remote(out):
        from scaleforge.data.storage import check_destination

        check_destination(out, overwrite)
        return None
    path = Path(out)
    if path.is_symlink() or path.is_file():
        raise UsageError(f"--out {out}: is a {'link' if path.is_symlink() else 'file'}; give a folder to create")
    if path.exists() and not overwrite and any(path.iterdir()):
        raise UsageError(f"--out {out}: already exists and is not empty (pass --overwrite to replace it)")
    if not path.resolve().parent.is_dir():
        raise UsageError(f"--out {out}: the folder {path.resolve().parent} does not exist")
    return path


def _publish(stage: Path, out: str, target: Path | None) -> None:
    if target is None:
        total = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        _say(f"uploading {format_size(total)} to {out}")
        upload_folder(stage, out)  # an old index, when replaced, is removed first and the new one written last
        return
    if not target.exists():
        os.replace(stage, target)
        return
    # replaced: the old folder is set aside before the new one takes its name, and removed after
    aside = stage.with_name("replaced")
    os.replace(target, aside)
    os.replace(stage, target)
    shutil.rmtree(aside, ignore_errors=True)


class _Quiet:
    def __enter__(self) -> None:
        import datasets

        self.enabled = datasets.is_progress_bar_enabled()
        if not sys.stderr.isatty():  # a log gets the plain lines of `_say` instead of redrawn bars
            datasets.disable_progress_bars()

    def __exit__(self, *_: object) -> None:
        import datasets

        if self.enabled:
            datasets.enable_progress_bars()


def _quiet_unless_terminal() -> _Quiet:
    return _Quiet()


def _say(line: str) -> None:
    print(f"prepare: {line}", file=sys.stderr, flush=True)


class _Writer:
    """Saves splits with Hugging Face datasets and lists their shards for the manifest."""

    def __init__(self, stage: Path, cache: Path, workers: int, shard_bytes: int) -> None:
        self.stage, self.cache, self.workers, self.shard_bytes = stage, cache, workers, shard_bytes

    def save(self, split: str, dataset: Any, num_shards: int | None = None) -> None:
        if len(dataset) == 0:
            raise DataError(f"the {split} split would be empty: too few samples for --val-fraction")
        started = time.perf_counter()
        dataset.save_to_disk(
            str(self.stage / split),
            max_shard_size=self.shard_bytes if num_shards is None else None,
            num_shards=num_shards,
            num_proc=min(self.workers, num_shards or self.workers, max(1, len(dataset))),
        )
        _say(f"{split}: {len(dataset)} rows in {time.perf_counter() - started:.1f} s")

    def index(self, split: str) -> dict[str, Any]:
        """The split's shards, in order, with their rows, bytes and SHA-256 (and tokens for text)."""
        from scaleforge.data.shards import open_arrow

        state = json.loads((self.stage / split / "state.json").read_text())
        shards = []
        for entry in state["_data_files"]:
            path = self.stage / split / entry["filename"]
            table = open_arrow(path)  # as training opens it
            shard = {
                "file": f"{split}/{entry['filename']}",
                "rows": table.num_rows,
                "bytes": path.stat().st_size,
                "sha256": sha256_of(path),
            }
            if "tokens" in table.column_names:
                shard["tokens"] = int(sum(len(chunk.flatten()) for chunk in table.column("tokens").chunks))
            shards.append(shard)
        return {"rows": sum(s["rows"] for s in shards), "shards": shards}


def generated(generator: Any, **kwargs: Any) -> Any:
    """`datasets.Dataset.from_generator(generator, **kwargs)`; a user error raised by the generator (in whichever
    worker) comes out as itself rather than wrapped in the engine's `DatasetGenerationError`."""
    import datasets

    try:
        return datasets.Dataset.from_generator(generator, **kwargs)
    except datasets.exceptions.DatasetGenerationError as error:
        cause: BaseException | None = error
        while cause is not None:  # in a worker, the error is the text of a `RemoteTraceback` in the chain
            if isinstance(cause, DataError):
                raise DataError(str(cause)) from None
            found = re.search(r"scaleforge\.errors\.DataError: (.*)", str(cause))
            if found:
                raise DataError(found.group(1)) from None
            cause = cause.__cause__ or cause.__context__
        raise


# -------------------------------------------------------------------------------------------------------- images


def _image_rows(items: Sequence[tuple[str, int]]) -> Iterator[dict[str, Any]]:
    """Each image's bytes, label and pixel moments; an unreadable image stops the preparation, named."""
    from PIL import Image, UnidentifiedImageError

    for path, label in items:
        data = Path(path).read_bytes()
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
                grey = np.asarray(image.convert("L"), dtype=np.float64) / 255
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{path}: not a readable image ({error})") from None
        pixels = rgb.reshape(-1, 3)
        moments = [*pixels.mean(0), *(pixels**2).mean(0), grey.mean(), (grey**2).mean()]
        yield {"image": data, "label": label, "moments": moments, "pixels": int(grey.size)}


def _image_sources(root: Path, options: PrepareOptions) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class names and each split's (path, label) pairs in source order, split as `image_folder` splits them."""
    from scaleforge.data.image_folder import split_samples

    fraction = 0.2 if options.val_fraction is None else options.val_fraction
    classes, files, labels, train, val = split_samples(root, fraction, options.split_seed)
    return classes, {
        split: [(str(root / files[i]), int(labels[i])) for i in sorted(rows.tolist())]
        for split, rows in (("train", train), ("val", val))
    }


def _prepare_images(root: Path, writer: _Writer, options: PrepareOptions) -> dict[str, Any]:
    import datasets

    classes, splits = _image_sources(root, options)
    _say(f"{sum(map(len, splits.values()))} images in {len(classes)} classes from {root}")
    features = datasets.Features(
        {
            "image": datasets.Value("binary"),
            "label": datasets.ClassLabel(names=classes),
            "moments": datasets.Sequence(datasets.Value("float64"), length=MOMENTS),
            "pixels": datasets.Value("int64"),
        }
    )
    stats: dict[str, Any] = {}
    for split, items in splits.items():
        dataset = generated(
            _image_rows,
            features=features,
            gen_kwargs={"items": items},
            num_proc=min(writer.workers, len(items)) if len(items) > 1 else None,
            cache_dir=str(writer.cache / split),
            split=datasets.NamedSplit(split),
        )
        if split == "train":
            stats = _image_stats(dataset)
        writer.save(split, dataset)
    return {"images": {"class_names": classes, "stats": stats}}


def _image_stats(dataset: Any) -> dict[str, Any]:
    """The training split's per-channel mean and standard deviation, RGB and grey, from the pixel moments."""
    table = dataset.with_format("numpy", columns=["moments", "pixels"])
    moments = np.zeros(MOMENTS)
    total = 0
    for batch in table.iter(batch_size=4096):
        weights = batch["pixels"].astype(np.float64)
        moments += (np.stack(batch["moments"]) * weights[:, None]).sum(0)
        total += int(weights.sum())
    mean = moments / max(total, 1)
    rgb_std = np.sqrt(np.maximum(mean[3:6] - mean[:3] ** 2, 1e-12)).clip(min=1e-6)
    grey_std = np.sqrt(max(mean[7] - mean[6] ** 2, 1e-12)).clip(min=1e-6)
    return {
        "rgb": {"mean": mean[:3].tolist(), "std": rgb_std.tolist()},
        "grey": {"mean": [float(mean[6])], "std": [float(grey_std)]},
    }


# --------------------------------------------------------------------------------------------------------- table


def _prepare_table(path: Path, writer: _Writer, options: PrepareOptions) -> dict[str, Any]:
    import datasets

    from scaleforge.data.csv_table import class_order

    try:
        source = datasets.Dataset.from_csv(str(path), cache_dir=str(writer.cache / "csv"), num_proc=None)
    except Exception as error:  # pandas' and the engine's parse errors have no common base
        raise DataError(f"{path}: not a readable CSV table ({first_line(error)})") from None
    if options.target not in source.column_names:
        raise DataError(
            f"{path}: no '{options.target}' column (--target); the columns are: {', '.join(source.column_names)}"
        )
    feature_names = [name for name in source.column_names if name != options.target]
    if not feature_names:
        raise DataError(f"{path}: no feature columns besides '{options.target}'")
    if len(source) == 0:
        raise DataError(f"{path}: a header but no rows")
    for name in feature_names:
        dtype = source.features[name]
        if not (isinstance(dtype, datasets.Value) and dtype.dtype.startswith(("int", "float"))):
            raise DataError(f"{path}: column '{name}' has non-numeric values ({dtype.dtype})")
    labels = source.unique(options.target)
    if any(label is None or str(label).strip() == "" for label in labels):
        raise DataError(f"{path}: column '{options.target}' has rows without a label")
    classes = class_order({str(label).strip() for label in labels})
    index = {label: i for i, label in enumerate(classes)}
    features = datasets.Features(
        {"features": datasets.Sequence(datasets.Value("float32")), "label": datasets.ClassLabel(names=classes)}
    )

    def to_rows(batch: dict[str, list[Any]]) -> dict[str, Any]:
        columns = np.stack([np.asarray(batch[name], dtype=np.float64) for name in feature_names], axis=1)
        if not np.isfinite(columns).all():
            row, column = np.argwhere(~np.isfinite(columns))[0]
            raise DataError(f"{path}: column '{feature_names[column]}' has a missing or non-numeric value")
        labels = [index[str(label).strip()] for label in batch[options.target]]
        return {"features": columns.astype(np.float32), "label": labels}

    table = source.map(to_rows, batched=True, remove_columns=source.column_names, features=features)
    split = _row_split(len(table), options)
    train, val = table.select(split["train"]), table.select(split["val"])
    mean, std = _column_stats(train)
    writer.save("train", train.flatten_indices())
    writer.save("val", val.flatten_indices())
    _say(f"{len(table)} rows, {len(feature_names)} features, {len(classes)} classes from {path}")
    return {"table": {"features": feature_names, "class_names": classes, "mean": mean, "std": std}}


def _row_split(count: int, options: PrepareOptions) -> dict[str, list[int]]:
    """Rows of each split in source order, drawn as the `csv` dataset draws them."""
    import torch

    fraction = 0.2 if options.val_fraction is None else options.val_fraction
    order = torch.randperm(count, generator=torch.Generator().manual_seed(options.split_seed))
    num_val = round(count * fraction)
    return {"train": sorted(order[num_val:].tolist()), "val": sorted(order[:num_val].tolist())}


def _column_stats(train: Any) -> tuple[list[float], list[float]]:
    total = count = squares = 0
    for batch in train.with_format("numpy", columns=["features"]).iter(batch_size=65536):
        values = np.stack(batch["features"]).astype(np.float64)
        total = total + values.sum(0)
        squares = squares + (values**2).sum(0)
        count += len(values)
    mean = np.asarray(total) / count
    std = np.sqrt(np.maximum(np.asarray(squares) / count - mean**2, 0)).clip(min=1e-8)
    return mean.tolist(), std.tolist()


# ---------------------------------------------------------------------------------------------------------- text


def _token_blocks(pieces: Sequence[np.ndarray], per_shard: int) -> list[list[tuple[Any, int, int]]]:
    """The stream of `pieces` cut into shards of `per_shard` tokens, each a list of (piece, start, stop) segments,
    with the pieces as small references to their mapped files."""
    from scaleforge.data.tokens import _portable

    blocks: list[list[tuple[Any, int, int]]] = [[]]
    room = per_shard
    for piece in pieces:
        portable, start = _portable(piece), 0
        while start < len(piece):
            take = min(room, len(piece) - start)
            blocks[-1].append((portable, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                blocks.append([])
                room = per_shard
    return [block for block in blocks if block]


def _token_rows(blocks: Sequence[list[tuple[Any, int, int]]], dtype: str) -> Iterator[dict[str, Any]]:
    for block in blocks:
        parts = [(piece.open() if hasattr(piece, "open") else piece)[start:stop] for piece, start, stop in block]
        yield {"tokens": np.concatenate(parts).astype(dtype, copy=False)}


def _prepare_text(root: Path, writer: _Writer, options: PrepareOptions) -> dict[str, Any]:
    import datasets

    from scaleforge.data.text import corpus_files
    from scaleforge.data.tokens import tokenize_corpus

    files = corpus_files(root)
    fraction = 0.1 if options.val_fraction is None else options.val_fraction
    try:
        corpus = tokenize_corpus(files, options.tokenizer, options.vocab_size, fraction, writer.cache / "tokens",
                                 writer.workers)  # fmt: skip
    except ValueError as error:
        raise UsageError(f"--tokenizer: {error}") from None
    tokenizer = corpus.tokenizer
    dtype = np.dtype(tokenizer.dtype).name
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value(dtype))})
    # tokens per shard, one row each; an Arrow list holds fewer than 2**31 values
    per_shard = max(1, min(writer.shard_bytes // np.dtype(dtype).itemsize, 2**31 - 1))
    tokens = {}
    for split, pieces in (("train", corpus.train), ("val", corpus.val)):
        blocks = _token_blocks(pieces, per_shard)
        if not blocks:
            raise DataError(f"{root}: too short for a {split} split (--val-fraction {fraction})")
        dataset = generated(
            _token_rows,
            features=features,
            gen_kwargs={"blocks": blocks, "dtype": dtype},
            cache_dir=str(writer.cache / split),
            split=datasets.NamedSplit(split),
        )
        writer.save(split, dataset, num_shards=len(blocks))
        tokens[split] = sum(len(piece) for piece in pieces)
    (writer.stage / "tokenizer.json").write_text(tokenizer.to_json())
    _say(f"{sum(tokens.values())} {tokenizer.kind} tokens from {len(files)} files")
    return {
        "text": {
            "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "tokens": tokens,
            "bytes_per_token": corpus.val_bytes / max(1, corpus.val_tokens),
            "tokenizer_file": _file_entry(writer.stage, "tokenizer.json"),
        }
    }


def _file_entry(stage: Path, name: str) -> dict[str, Any]:
    path = stage / name
    return {"file": name, "bytes": path.stat().st_size, "sha256": sha256_of(path)}
