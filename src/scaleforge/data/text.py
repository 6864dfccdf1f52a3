"""Language modelling on a text file or a folder of text files, with byte tokens or a byte-level BPE tokenizer.

The corpus is never held in memory: byte tokens are the files themselves, memory-mapped; BPE tokens are encoded
once into a memory-mapped cache file (`scaleforge.data.tokens`). Training windows are sliced from those maps as
they are read.
"""

from __future__ import annotations

from pathlib import Path

from scaleforge.data.base import DataInfo, DatasetSplits
from scaleforge.data.tokenizers import BYTE_VOCAB_SIZE
from scaleforge.data.tokens import TokenWindows, tokenize_corpus
from scaleforge.errors import DataError
from scaleforge.registry import register_dataset

VOCAB_SIZE = BYTE_VOCAB_SIZE  # the default tokenizer's: one token per byte


def corpus_files(path: Path) -> list[Path]:
    """The file itself, or every file under a folder (hidden ones aside) in sorted order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"data.path: {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"data.path: {path} is an empty folder")
    return files


@register_dataset("text")
def text(
    path: str,
    seq_len: int = 128,
    val_fraction: float = 0.1,
    tokenizer: str = "bytes",
    vocab_size: int | None = None,
    cache_dir: str | None = None,
    tokenize_workers: int = 0,
) -> DatasetSplits:
    """Tokens cut into windows of `seq_len`; the validation split is the tail of the text. `tokenizer` is
    `bytes` (one token per byte, vocab_size 256), `bpe` (byte-level BPE of `vocab_size` tokens, default 4096,
    trained on the training split) or a saved tokenizer's JSON file (a run's `final/tokenizer.json`). BPE tokens
    are cached under `cache_dir` (default `$XDG_CACHE_HOME/scaleforge/tokens`), encoded by `tokenize_workers`
    processes (0: one per CPU core)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if tokenize_workers < 0:
        raise ValueError(f"tokenize_workers must be 0 (one per CPU core) or more, got {tokenize_workers}")
    files = corpus_files(Path(path))
    corpus = tokenize_corpus(
        files, tokenizer, vocab_size, val_fraction, Path(cache_dir) if cache_dir else None, tokenize_workers
    )
    train, val = TokenWindows(corpus.train, seq_len), TokenWindows(corpus.val, seq_len)
    if len(train) == 0 or len(val) == 0:
        unit = "bytes" if corpus.tokenizer.kind == "bytes" else f"{corpus.tokenizer.kind} tokens"
        total = train.num_tokens + val.num_tokens
        needed = int((seq_len + 1) / min(val_fraction, 1 - val_fraction)) + 1
        raise DataError(
            f"data.path: {path} has {total} {unit}, too short for one sequence of seq_len={seq_len} in both "
            f"splits (val_fraction={val_fraction}); it needs at least {needed} {unit}"
        )
    info = DataInfo(
        task="language_modeling",
        input_shape=(seq_len,),
        vocab_size=corpus.tokenizer.vocab_size,
        seq_len=seq_len,
        tokenizer=corpus.tokenizer.kind,
        bytes_per_token=corpus.val_bytes / corpus.val_tokens,
        tokenizer_source=tokenizer if tokenizer.endswith(".json") else f"data.tokenizer={tokenizer}",
    )
    return DatasetSplits(train=train, val=val, info=info, tokenizer=corpus.tokenizer)
