from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleforge.data.base import DataInfo
from scaleforge.data.tokenizers import Tokenizer, build_tokenizer, bytes_tokenizer, load_tokenizer, train_bpe
from scaleforge.errors import DataError
from scaleforge.training.objectives import BitsPerByte, default_objective

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog; über naïve café\n" for i in range(200)]
SAMPLE = "the lazy fox, über café 42\nand a line the corpus never held: 漢字 🙂"


def test_a_trained_bpe_tokenizer_encodes_and_decodes_any_text_back_to_itself() -> None:
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    ids = tokenizer.encode(SAMPLE)
    assert ids.dtype == np.uint16 and ids.max() < 300
    assert len(ids) < len(SAMPLE.encode())  # merges learnt: fewer tokens than bytes
    assert tokenizer.decode(ids) == SAMPLE
    assert np.array_equal(tokenizer.encode(SAMPLE.encode()), ids)  # bytes are read as UTF-8


def test_bpe_training_is_deterministic_and_saved_tokenizers_load_back_the_same() -> None:
    first, second = train_bpe(TEXTS, 300), train_bpe(TEXTS, 300)
    assert first.to_json() == second.to_json()
    loaded = Tokenizer.from_json(first.to_json())
    assert (loaded.kind, loaded.vocab_size) == ("bpe", 300)
    assert loaded.to_json() == first.to_json()
    assert np.array_equal(loaded.encode(SAMPLE), first.encode(SAMPLE))


def test_token_bytes_counts_the_bytes_each_token_stands_for() -> None:
    tokenizer = train_bpe(TEXTS, 300)
    ids = tokenizer.encode(SAMPLE)
    assert tokenizer.token_bytes()[ids].sum() == len(SAMPLE.encode())
    assert (bytes_tokenizer().token_bytes() == 1).all()


def test_token_byte_strings_join_into_the_utf8_of_the_text() -> None:
    tokenizer = train_bpe(TEXTS, 300)
    strings = tokenizer.token_byte_strings()
    ids = tokenizer.encode(SAMPLE)
    assert b"".join(strings[i] for i in ids) == SAMPLE.encode()
    assert [len(string) for string in strings] == tokenizer.token_bytes().tolist()
    assert any(len(strings[i]) > 1 and strings[i].startswith(b" ") for i in ids)  # merges, with their spaces
    assert bytes_tokenizer().token_byte_strings()[0xC3] == b"\xc3"


def test_the_bytes_tokenizer_is_one_token_per_byte() -> None:
    tokenizer = bytes_tokenizer()
    ids = tokenizer.encode(SAMPLE)
    assert ids.dtype == np.uint8 and list(ids) == list(SAMPLE.encode())
    assert tokenizer.decode(ids) == SAMPLE
    assert Tokenizer.from_json(tokenizer.to_json()).kind == "bytes"


@pytest.mark.parametrize(
    ("kind", "vocab_size", "message"),
    [("bytes", 300, "vocab_size=300 needs bpe"), ("bpe", 100, "at least 256"), ("wordpiece", None, "bytes, bpe")],
)
def test_a_tokenizer_that_cannot_be_built_says_why(kind: str, vocab_size: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_tokenizer(kind, vocab_size, TEXTS)


def test_a_saved_tokenizer_larger_than_the_models_embedding_is_a_one_line_data_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(train_bpe(TEXTS, 300).to_json())
    assert load_tokenizer(path, 300).vocab_size == 300
    with pytest.raises(DataError) as raised:
        load_tokenizer(path, 256)
    line = raised.value.one_line()
    assert line.startswith(f"data error: {path} has 300 tokens") and "256 embedding rows" in line
    path.write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a tokenizer scaleforge can read"):
        load_tokenizer(path)


def test_bits_per_byte_is_the_summed_loss_in_bits_over_the_bytes_of_text() -> None:
    metric = BitsPerByte(bytes_per_token=2.5)
    targets = torch.zeros(4, 10, dtype=torch.long)
    metric.update(torch.zeros(4, 10, 300), targets, torch.tensor(40 * math.log(2)))  # one bit a token
    assert metric.compute() == {"bits_per_byte": pytest.approx(1 / 2.5)}
    with pytest.raises(ValueError, match="needs text data"):
        BitsPerByte()


def test_text_data_is_evaluated_in_bits_per_byte_as_well_as_perplexity() -> None:
    text = DataInfo("language_modeling", (8,), vocab_size=300, seq_len=8, tokenizer="bpe", bytes_per_token=3.0)
    tokens = DataInfo("language_modeling", (8,), vocab_size=300, seq_len=8)
    assert [type(m).__name__ for m in default_objective(text).metrics] == ["Perplexity", "BitsPerByte"]
    assert [type(m).__name__ for m in default_objective(tokens).metrics] == ["Perplexity"]


def test_data_info_written_before_tokenizers_reads_back_as_bytes() -> None:
    old = {"task": "language_modeling", "input_shape": [8], "vocab_size": 256, "seq_len": 8}
    info = DataInfo.from_json(json.loads(json.dumps(old)))
    assert (info.tokenizer, info.bytes_per_token) == ("bytes", None)
    assert DataInfo.from_json(DataInfo(**{**old, "input_shape": (8,), "tokenizer": "bpe"}).to_json()).tokenizer == "bpe"


def test_bpe_without_the_data_extra_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from scaleforge import extras
    from scaleforge.errors import UsageError

    monkeypatch.setitem(extras.EXTRAS, "data", ("scaleforge_absent_module",))
    with pytest.raises(UsageError) as raised:
        build_tokenizer("bpe", 300, TEXTS)
    assert raised.value.one_line() == (
        "usage error: data.tokenizer: bpe needs the [data] extra: pip install 'scaleforge[data]' "
        "(missing: scaleforge_absent_module)"
    )
