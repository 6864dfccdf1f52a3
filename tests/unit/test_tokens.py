from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from scaleforge.data import tokens
from scaleforge.data.text import text
from scaleforge.data.tokens import TokenWindows, split_stream
from scaleforge.errors import DataError

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "über",
    "naïve",
    "café",
    "and",
    "then",
    "some",
    "more",
    "words",
]


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default token cache under the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "scaleforge" / "tokens"


def write_corpus(folder: Path, files: int = 3, lines: int = 300) -> Path:
    generator = random.Random(0)
    folder.mkdir()
    for index in range(files):
        body = "\n".join(" ".join(generator.choice(WORDS) for _ in range(12)) for _ in range(lines))
        (folder / f"{index}.txt").write_text(body + "\n")
    return folder


def test_windows_over_pieces_read_as_one_stream() -> None:
    stream = np.arange(50, dtype=np.uint16)
    pieces = [stream[:7], stream[7:8], stream[8:30], stream[30:]]
    whole, split = TokenWindows(stream, seq_len=6), TokenWindows(pieces, seq_len=6)
    assert len(whole) == len(split) == 8  # (50 - 1) // 6
    for index in range(len(whole)):
        inputs, targets = split[index]
        assert inputs.dtype.is_floating_point is False and inputs.tolist() == whole[index][0].tolist()
        assert inputs.tolist() == list(range(6 * index, 6 * index + 6))
        assert targets.tolist() == list(range(6 * index + 1, 6 * index + 7))
    assert split[-1][0].tolist() == whole[7][0].tolist()
    with pytest.raises(IndexError):
        split[8]


def test_a_stream_splits_into_views_of_its_pieces() -> None:
    pieces = [np.arange(5), np.arange(5, 12), np.arange(12, 20)]
    head, tail = split_stream(pieces, 9)
    assert np.concatenate(head).tolist() == list(range(9)) and np.concatenate(tail).tolist() == list(range(9, 20))
    assert all(np.shares_memory(part, whole) for part, whole in zip(head, pieces, strict=False))


def test_byte_tokens_are_the_corpus_files_mapped_in_place(tmp_path: Path, cache_home: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    splits = text(str(corpus), seq_len=16)
    pieces = splits.train.pieces + splits.val.pieces  # type: ignore[attr-defined]
    assert pieces and all(isinstance(piece, np.memmap) and piece.dtype == np.uint8 for piece in pieces)
    assert splits.info.tokenizer == "bytes" and splits.info.bytes_per_token == 1.0
    assert not cache_home.exists()  # nothing to cache: the files are the tokens


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_windows_travel_to_another_process_as_their_files_not_their_tokens(tmp_path: Path, tokenizer: str) -> None:
    corpus = write_corpus(tmp_path / "corpus", files=2, lines=2000)
    splits = text(str(corpus), seq_len=16, tokenizer=tokenizer, vocab_size=None if tokenizer == "bytes" else 300)
    for windows in (splits.train, splits.val):
        sent = pickle.dumps(windows)
        assert len(sent) < 2000 < windows.num_tokens  # type: ignore[attr-defined]
        received = pickle.loads(sent)
        assert all(isinstance(piece, np.memmap) for piece in received.pieces)
        for index in (0, len(windows) // 2, len(windows) - 1):
            assert received[index][1].tolist() == windows[index][1].tolist()


def test_bpe_tokens_are_memory_mapped_from_a_cache_reused_until_the_corpus_changes(
    tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    encoded: list[int] = []
    real = tokens._encode_to
    monkeypatch.setattr(tokens, "_encode_to", lambda *args: encoded.append(1) or real(*args))
    first = text(str(corpus), seq_len=16, tokenizer="bpe", vocab_size=300)
    pieces = first.train.pieces + first.val.pieces  # type: ignore[attr-defined]
    assert all(isinstance(piece, np.memmap) and piece.dtype == np.uint16 for piece in pieces)
    assert first.info.vocab_size == 300 and first.info.tokenizer == "bpe"
    assert 1.5 < (first.info.bytes_per_token or 0) < 8
    assert first.tokenizer is not None and first.tokenizer.decode(first.val[0][0].tolist())  # tokens of the text
    files = sorted(path.name for path in cache_home.iterdir())
    second = text(str(corpus), seq_len=16, tokenizer="bpe", vocab_size=300)
    assert len(encoded) == 1 and sorted(path.name for path in cache_home.iterdir()) == files  # read back
    assert second.tokenizer is not None and second.tokenizer.to_json() == first.tokenizer.to_json()
    assert second.train[3][0].tolist() == first.train[3][0].tolist()
    (corpus / "0.txt").write_text("the corpus changed\n" * 200)
    text(str(corpus), seq_len=16, tokenizer="bpe", vocab_size=300)
    assert len(encoded) == 2


def test_a_pool_of_processes_encodes_the_same_tokens_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    alone = text(str(corpus), seq_len=16, tokenizer="bpe", vocab_size=300, tokenize_workers=1)
    monkeypatch.setattr(tokens, "CHUNK_BYTES", 3000)  # many chunks, each ending at a line's end
    pooled = text(str(corpus), seq_len=16, tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path / "other"))
    assert len(pooled.train) == len(alone.train) and len(pooled.val) == len(alone.val)
    assert all(pooled.train[i][0].tolist() == alone.train[i][0].tolist() for i in range(len(alone.train)))


def test_bpe_is_trained_on_the_training_split_alone(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("aaaa bbbb " * 900 + "zzzzzzzz " * 100)  # the last tenth is validation
    splits = text(str(corpus), seq_len=8, tokenizer="bpe", vocab_size=270)
    assert splits.tokenizer is not None
    assert "zz" not in "".join(splits.tokenizer.backend.get_vocab())


def test_a_corpus_too_short_for_its_tokens_says_how_long_it_must_be(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("a few words only\n" * 3)
    with pytest.raises(DataError, match="bpe tokens, too short for one sequence of seq_len=64"):
        text(str(tmp_path / "short.txt"), seq_len=64, tokenizer="bpe", vocab_size=260)
