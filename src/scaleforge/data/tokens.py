"""Token streams read in windows, and a corpus tokenized once into a memory-mapped cache.

A stream is one or more 1-D arrays of token ids (pieces: a corpus's files, a cache file, a shard's column)
read as their concatenation. `TokenWindows` slices a training sample out of it only when the sample is asked
for, so memory holds the pages being read, never the corpus: the pieces are memory-mapped files.

`tokenize_corpus` writes a text corpus's tokens once (files cut into chunks at line ends, encoded by a pool of
processes) into `<cache_dir>/<key>.tokens`, the smallest unsigned type that holds the vocabulary, and maps it.
The key hashes the files' names, sizes and modification times, the tokenizer and the split, so an edited
corpus or another tokenizer gets its own file and an unchanged one is read back without encoding.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from scaleforge.data.tokenizers import Tokenizer, build_tokenizer
from scaleforge.files import cache_home

CHUNK_BYTES = 4 * 2**20  # text encoded by one task of the pool
TRAINING_CHUNK_BYTES = 2**16  # text handed to BPE training at a time (it holds 256 of them at once)
LINE_SEARCH_BYTES = 2**20  # how far past a chunk's end its last line may run before the chunk is cut mid-line
CACHE_VERSION = 1  # part of every cache key: a change of the file layout gets new files


class TokenWindows(Dataset):
    """Non-overlapping windows of `seq_len` tokens over a token stream: sample i's inputs are tokens
    [i*T, (i+1)*T) and its targets the same window shifted by one, as int64 tensors made when it is read."""

    def __init__(self, tokens: np.ndarray | Sequence[np.ndarray], seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        pieces = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
        for piece in pieces:
            if piece.ndim != 1:
                raise ValueError(f"token pieces must be 1-D arrays, got one of shape {piece.shape}")
        self.pieces = [piece for piece in pieces if len(piece)]
        self.starts = np.cumsum([0, *(len(piece) for piece in self.pieces)], dtype=np.int64)
        self.seq_len = seq_len
        self.num_tokens = int(self.starts[-1])
        self.count = max(0, (self.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = operator.index(index)
        if position < 0:
            position += self.count
        if not 0 <= position < self.count:
            raise IndexError(f"window {index} of {self.count}")
        start = position * self.seq_len
        window = torch.from_numpy(self.read(start, start + self.seq_len + 1).astype(np.int64))  # (T + 1,)
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        # memory-mapped pieces travel as their file and place (to a data-loader worker a process spawns), not as
        # a copy of their tokens
        return {**self.__dict__, "pieces": [_portable(piece) for piece in self.pieces]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        pieces = [piece.open() if isinstance(piece, MappedPiece) else piece for piece in state["pieces"]]
        self.__dict__.update({**state, "pieces": pieces})

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream, read across pieces where they meet."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            offset = start - int(self.starts[first])
            take = min(stop - start, len(self.pieces[first]) - offset)
            parts.append(self.pieces[first][offset : offset + take])
            start += take
            first += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass(frozen=True)
class MappedPiece:
    """Where a memory-mapped piece lies: `length` tokens of `dtype` at byte `offset` of the file `path`."""

    path: str
    dtype: str
    offset: int
    length: int

    def open(self) -> np.ndarray:
        """The piece, mapped again."""
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=self.offset, shape=(self.length,))


def _portable(piece: np.ndarray) -> np.ndarray | MappedPiece:
    """A contiguous view of a memory-mapped file as a `MappedPiece`; any other array as it is."""
    root = piece
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(piece, np.memmap) or not isinstance(root, np.memmap) or not piece.flags.c_contiguous:
        return piece
    if piece.filename is None:
        return piece
    offset = root.offset + piece.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return MappedPiece(str(piece.filename), piece.dtype.str, int(offset), len(piece))


def split_stream(pieces: Sequence[np.ndarray], at: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The stream's first `at` tokens and the rest, as pieces (views of the given ones: nothing is copied)."""
    head: list[np.ndarray] = []
    tail: list[np.ndarray] = []
    for piece in pieces:
        take = max(0, min(len(piece), at))
        head.append(piece[:take])
        tail.append(piece[take:])
        at -= take
    return [p for p in head if len(p)], [p for p in tail if len(p)]


def file_tokens(files: Sequence[Path]) -> list[np.ndarray]:
    """The bytes of `files` memory-mapped as uint8 token pieces (the `bytes` tokenizer's tokens, read in place)."""
    return [np.memmap(path, dtype=np.uint8, mode="r") for path in files if path.stat().st_size]


@dataclass(frozen=True)
class Span:
    """Bytes [start, stop) of one file of a corpus."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class TokenizedCorpus:
    """A corpus's tokens as training and validation pieces, the tokenizer that made them, and how many bytes of
    text the validation tokens stand for."""

    tokenizer: Tokenizer
    train: list[np.ndarray]
    val: list[np.ndarray]
    val_bytes: int

    @property
    def val_tokens(self) -> int:
        """How many tokens the validation pieces hold."""
        return sum(len(piece) for piece in self.val)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/scaleforge/tokens`, or `~/.cache/scaleforge/tokens`."""
    return cache_home("tokens")


def tokenize_corpus(
    files: Sequence[Path],
    tokenizer: str,
    vocab_size: int | None,
    val_fraction: float,
    cache_dir: Path | None = None,
    workers: int = 0,
) -> TokenizedCorpus:
    """`files` (in order, one stream) tokenized with `data.tokenizer`'s tokenizer and split: the last
    `val_fraction` of the text is validation. `bytes` maps the files as they are; otherwise a BPE tokenizer
    (trained on the training text alone, or read from a saved one) encodes the text with `workers` processes
    (0: one per CPU core) into a cache file under `cache_dir` (`default_cache_dir()`) that later calls read back."""
    sizes = [path.stat().st_size for path in files]
    split = int(sum(sizes) * (1 - val_fraction))
    if tokenizer == "bytes":
        built = build_tokenizer("bytes", vocab_size, ())
        train, val = split_stream(file_tokens(files), split)
        return TokenizedCorpus(built, train, val, sum(len(piece) for piece in val))
    split = _char_boundary(files, sizes, split)
    train_spans, val_spans = _spans(files, sizes, split)
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    corpus_key = _corpus_key(files, val_fraction)
    trained_key = _digest(f"{corpus_key}\nbpe\n{vocab_size}")
    built = _cached_tokenizer(cache / f"{trained_key}.tokenizer.json", tokenizer, vocab_size, train_spans)
    key = _digest(f"{corpus_key}\n{built.to_json()}")  # a tokenizer trained here or read from a run's file alike
    tokens, train_count = _cached_tokens(cache, key, built, train_spans, val_spans, workers)
    val = tokens[train_count:]
    val_bytes = int(sum(span.stop - span.start for span in val_spans))
    return TokenizedCorpus(built, [tokens[:train_count]] if train_count else [], [val] if len(val) else [], val_bytes)


def _corpus_key(files: Sequence[Path], val_fraction: float) -> str:
    """A hash of what the corpus's tokens depend on besides the tokenizer: its files and its split."""
    stats = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    return _digest(json.dumps({"version": CACHE_VERSION, "files": stats, "val_fraction": val_fraction}))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _cached_tokenizer(path: Path, kind: str, vocab_size: int | None, train_spans: list[Span]) -> Tokenizer:
    """`build_tokenizer`'s tokenizer; one trained on this corpus before is read back from `path` instead."""
    if kind == "bpe" and path.is_file():
        try:
            return Tokenizer.from_json(path.read_text())
        except Exception:  # noqa: BLE001, S110 - json and tokenizers raise many kinds; a damaged file is trained again
            pass
    built = build_tokenizer(kind, vocab_size, _texts(train_spans))
    if kind == "bpe":
        _write_atomically(path, built.to_json().encode())
    return built


def _cached_tokens(
    cache: Path, key: str, tokenizer: Tokenizer, train_spans: list[Span], val_spans: list[Span], workers: int
) -> tuple[np.ndarray, int]:
    """The corpus's tokens, memory-mapped from `<key>.tokens` (encoded and written first if it is not there or
    does not match its `<key>.json`), and how many of them are training tokens."""
    tokens_path, meta_path = cache / f"{key}.tokens", cache / f"{key}.json"
    dtype = np.dtype(tokenizer.dtype)
    meta = _read_meta(meta_path)
    if meta is None or not tokens_path.is_file() or tokens_path.stat().st_size != meta["tokens"] * dtype.itemsize:
        meta = _encode_to(tokens_path, tokenizer, train_spans, val_spans, workers)
        _write_atomically(meta_path, (json.dumps(meta) + "\n").encode())
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=dtype), 0
    return np.memmap(tokens_path, dtype=dtype, mode="r"), int(meta["train_tokens"])


def _read_meta(path: Path) -> dict[str, int] | None:
    try:
        meta = json.loads(path.read_text())
        return {"tokens": int(meta["tokens"]), "train_tokens": int(meta["train_tokens"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _encode_to(
    path: Path, tokenizer: Tokenizer, train_spans: list[Span], val_spans: list[Span], workers: int
) -> dict[str, int]:
    """Encode the chunks of both splits in order into `path` (written under a temporary name, then renamed);
    returns the counts `_read_meta` reads."""
    train_chunks, val_chunks = _chunks(train_spans), _chunks(val_spans)
    chunks = train_chunks + val_chunks
    workers = min(workers or _cpu_cores(), len(chunks))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    counts: list[int] = []
    try:
        with temporary.open("wb") as file:
            for ids in _encoded(tokenizer, chunks, workers):
                file.write(np.ascontiguousarray(ids, dtype=tokenizer.dtype).tobytes())
                counts.append(len(ids))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return {"tokens": sum(counts), "train_tokens": sum(counts[: len(train_chunks)])}


def _encoded(tokenizer: Tokenizer, chunks: list[Span], workers: int) -> Iterator[np.ndarray]:
    """Each chunk's token ids, in order: in this process, or in a pool of `workers` processes."""
    if workers <= 1:
        for chunk in chunks:
            yield tokenizer.encode(_read(chunk))
        return
    import multiprocessing

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(tokenizer.to_json(),)) as pool:
        yield from pool.map(_encode_chunk, chunks)


_WORKER_TOKENIZER: Tokenizer | None = None  # the tokenizer a pool process encodes with


def _start_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool's processes are the parallelism: one thread each
    _WORKER_TOKENIZER = Tokenizer.from_json(tokenizer_json)


def _encode_chunk(chunk: Span) -> np.ndarray:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode(_read(chunk))


def _read(span: Span) -> bytes:
    with open(span.path, "rb") as file:
        file.seek(span.start)
        return file.read(span.stop - span.start)


def _texts(spans: list[Span]) -> Iterator[str]:
    """The text of `spans`, a chunk at a time (what BPE is trained on)."""
    for chunk in _chunks(spans, TRAINING_CHUNK_BYTES):
        yield _read(chunk).decode("utf-8", errors="replace")


def _spans(files: Sequence[Path], sizes: Sequence[int], split: int) -> tuple[list[Span], list[Span]]:
    """The corpus's bytes before `split` and from it, as spans of its files."""
    train, val = [], []
    offset = 0
    for path, size in zip(files, sizes, strict=True):
        cut = min(max(split - offset, 0), size)
        if cut:
            train.append(Span(str(path), 0, cut))
        if cut < size:
            val.append(Span(str(path), cut, size))
        offset += size
    return train, val


def _chunks(spans: list[Span], size: int | None = None) -> list[Span]:
    """`spans` cut into chunks of about `size` bytes (`CHUNK_BYTES`), each ending at a line's end where one is
    near."""
    size = size or CHUNK_BYTES
    chunks = []
    for span in spans:
        start = span.start
        while start < span.stop:
            stop = span.stop if span.stop - start <= size else _line_end(span, start + size)
            chunks.append(Span(span.path, start, stop))
            start = stop
    return chunks


def _line_end(span: Span, position: int) -> int:
    """The offset just past the first newline at or after `position` in `span` (within `LINE_SEARCH_BYTES`), or
    else the first UTF-8 character boundary there."""
    limit = min(span.stop, position + LINE_SEARCH_BYTES)
    with open(span.path, "rb") as file:
        file.seek(position)
        at = position
        while at < limit:
            block = file.read(min(2**12, limit - at))
            newline = block.find(b"\n")
            if newline >= 0:
                return at + newline + 1
            at += len(block)
        file.seek(position)
        return min(span.stop, position + _continuation_bytes(file.read(4)))


def _char_boundary(files: Sequence[Path], sizes: Sequence[int], split: int) -> int:
    """`split` moved past any UTF-8 continuation bytes, so that no character is cut between the splits."""
    offset = 0
    for path, size in zip(files, sizes, strict=True):
        if offset <= split < offset + size:
            with open(path, "rb") as file:
                file.seek(split - offset)
                return split + _continuation_bytes(file.read(4))
        offset += size
    return split


def _continuation_bytes(data: bytes) -> int:
    """How many of `data`'s first bytes continue a UTF-8 character begun before them."""
    count = 0
    while count < min(3, len(data)) and data[count] & 0xC0 == 0x80:
        count += 1
    return count


def _write_atomically(path: Path, data: bytes) -> None:
    """`path` written under a temporary name and renamed into place: readers see all of it or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
