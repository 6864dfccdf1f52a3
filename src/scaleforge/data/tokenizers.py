"""Tokenizers for text: `bytes` (one token per byte, vocabulary 256, nothing to train or ship) and `bpe`
(byte-level BPE trained with Hugging Face `tokenizers`, from the [data] extra).

A byte-level BPE token stands for a fixed string of bytes, so any text encodes without unknown tokens and the
bytes a token stands for are known from the vocabulary alone (`token_bytes`), which is what bits per byte is
measured with. A tokenizer is saved as JSON (`to_json`), as the run's `final/tokenizer.json`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scaleforge.errors import DataError

TokenizerKind = Literal["bytes", "bpe"]
KINDS: tuple[str, ...] = ("bytes", "bpe")
BYTE_VOCAB_SIZE = 256  # one token per byte value
DEFAULT_BPE_VOCAB_SIZE = 4096
FORMAT = "scaleforge-tokenizer/1"  # the `format` of a saved tokenizer's JSON


def token_dtype(vocab_size: int) -> type[np.unsignedinteger[Any]]:
    """The smallest unsigned type that holds every token id below `vocab_size`."""
    if vocab_size <= 2**8:
        return np.uint8
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class Tokenizer:
    """Text to token ids and back. `vocab_size` is the number of ids a model's embedding has rows for; a `bpe`
    tokenizer wraps a Hugging Face `tokenizers.Tokenizer` (ByteLevel pre-tokenizer and decoder, BPE model)."""

    def __init__(self, kind: TokenizerKind, vocab_size: int, backend: Any = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"tokenizer must be one of: {', '.join(KINDS)}; got {kind!r}")
        if kind == "bytes" and vocab_size != BYTE_VOCAB_SIZE:
            raise ValueError(f"the bytes tokenizer has {BYTE_VOCAB_SIZE} tokens, not vocab_size={vocab_size}")
        if kind == "bpe" and backend is None:
            raise ValueError("a bpe tokenizer needs its trained Hugging Face tokenizer")
        self.kind: TokenizerKind = kind
        self.vocab_size = vocab_size
        self.backend = backend

    @property
    def dtype(self) -> type[np.unsignedinteger[Any]]:
        """The type token ids are stored in (`token_dtype`)."""
        return token_dtype(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        """`text`'s token ids (bytes are read as UTF-8 by `bpe`, an invalid sequence as U+FFFD)."""
        if self.kind == "bytes":
            data = text.encode() if isinstance(text, str) else bytes(text)
            return np.frombuffer(data, dtype=np.uint8).copy()
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        # line by line, as one batch: half the time of the whole text at once; a token never spans a line's end
        encodings = self.backend.encode_batch(text.splitlines(keepends=True))
        ids = itertools.chain.from_iterable(encoding.ids for encoding in encodings)
        return np.fromiter(ids, dtype=self.dtype, count=sum(len(encoding.ids) for encoding in encodings))

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text of token ids (bytes that are not valid UTF-8 become U+FFFD)."""
        values = [int(i) for i in ids]
        if self.kind == "bytes":
            return bytes(values).decode("utf-8", errors="replace")
        return str(self.backend.decode(values))

    def token_bytes(self) -> np.ndarray:
        """The number of bytes each token id stands for (0 for ids the vocabulary leaves unused)."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        if self.kind == "bytes":
            lengths[:] = 1
            return lengths
        # a ByteLevel token is spelt with one printable character per byte
        for token, index in self.backend.get_vocab().items():
            if index < self.vocab_size:
                lengths[index] = len(token)
        return lengths

    def token_byte_strings(self) -> list[bytes]:
        """The bytes each token id stands for (empty for ids the vocabulary leaves unused): text decoded as
        tokens arrive joins these, so that a character split between tokens waits for its last byte."""
        if self.kind == "bytes":
            return [bytes([value]) for value in range(BYTE_VOCAB_SIZE)]
        strings = [b""] * self.vocab_size
        byte_of = _byte_level_bytes()
        for token, index in self.backend.get_vocab().items():
            if index < self.vocab_size:
                strings[index] = bytes(byte_of[character] for character in token)
        return strings

    def to_json(self) -> str:
        """The tokenizer as JSON, as `final/tokenizer.json` holds it; `from_json` reads it back."""
        data: dict[str, Any] = {"format": FORMAT, "kind": self.kind, "vocab_size": self.vocab_size}
        if self.backend is not None:
            data["backend"] = json.loads(self.backend.to_str())
        return json.dumps(data, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """A tokenizer from `to_json`'s output; `ValueError` says what does not fit."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a scaleforge tokenizer (its format is not {FORMAT!r})")
        kind, vocab_size = data.get("kind"), data.get("vocab_size")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if kind != "bpe":
            return cls(kind, vocab_size)
        backend = _backend_module().Tokenizer.from_str(json.dumps(data.get("backend")))
        if backend.get_vocab_size() > vocab_size:
            raise ValueError(f"its BPE vocabulary has {backend.get_vocab_size()} tokens, more than {vocab_size}")
        return cls("bpe", vocab_size, backend)


def bytes_tokenizer() -> Tokenizer:
    """One token per byte value."""
    return Tokenizer("bytes", BYTE_VOCAB_SIZE)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of `vocab_size` tokens (the 256 byte values and the merges learnt from
    `texts`); the same texts give the same tokenizer, merges and ids alike."""
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"a bpe vocab_size must be at least {BYTE_VOCAB_SIZE} (one token per byte), got {vocab_size}")
    hf = _backend_module()
    backend = hf.Tokenizer(hf.models.BPE())
    backend.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer("bpe", vocab_size, backend)


def build_tokenizer(kind: str, vocab_size: int | None, training_texts: Iterable[str]) -> Tokenizer:
    """The tokenizer `data.tokenizer` names: `bytes`, `bpe` trained on `training_texts` (read only for `bpe`),
    or the path of a saved tokenizer's JSON (a run's `final/tokenizer.json`), which `vocab_size` must hold."""
    if kind == "bytes":
        if vocab_size not in (None, BYTE_VOCAB_SIZE):
            raise ValueError(f"the bytes tokenizer has {BYTE_VOCAB_SIZE} tokens; vocab_size={vocab_size} needs bpe")
        return bytes_tokenizer()
    if kind == "bpe":
        from scaleforge.extras import require

        require("data", "data.tokenizer: bpe")
        return train_bpe(training_texts, vocab_size if vocab_size is not None else DEFAULT_BPE_VOCAB_SIZE)
    if not kind.endswith(".json"):
        raise ValueError(f"tokenizer must be bytes, bpe or the path of a tokenizer's .json file; got {kind!r}")
    tokenizer = load_tokenizer(Path(kind))
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(f"{kind} has {tokenizer.vocab_size} tokens, more than data.vocab_size={vocab_size}")
    return tokenizer


def load_tokenizer(path: Path, embedding_rows: int | None = None) -> Tokenizer:
    """A saved tokenizer; `DataError` naming the file when it cannot be read, or when it has more tokens than a
    model's `embedding_rows`."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path} cannot be read as a tokenizer: {error}") from error
    if '"bpe"' in text:
        from scaleforge.extras import require

        require("data", f"{path} (a bpe tokenizer)")
    try:
        tokenizer = Tokenizer.from_json(text)
    except Exception as error:  # noqa: BLE001 - json and tokenizers raise many kinds for a damaged file
        raise DataError(f"{path} is not a tokenizer scaleforge can read: {error}") from error
    if embedding_rows is not None and tokenizer.vocab_size > embedding_rows:
        raise DataError(
            f"{path} has {tokenizer.vocab_size} tokens, more than the model's {embedding_rows} embedding rows"
        )
    return tokenizer


def _byte_level_bytes() -> dict[str, int]:
    """The byte each character of a ByteLevel token spells: GPT-2's table, where printable bytes stand for
    themselves and the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [value for value in range(BYTE_VOCAB_SIZE) if value not in printable]
    table = {chr(value): value for value in printable}
    table.update({chr(BYTE_VOCAB_SIZE + offset): value for offset, value in enumerate(others)})
    return table


def _backend_module() -> Any:
    """Hugging Face `tokenizers`, imported when a `bpe` tokenizer is first needed."""
    import tokenizers

    return tokenizers
