"""A language model trained on text with a BPE tokenizer, from the CLI to evaluation and serving."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from scaleforge.data.tokenizers import Tokenizer, train_bpe
from scaleforge.generation.language_model import generate_stream
from scaleforge.runs import write_manifest
from scaleforge.serve.app import ServeSettings, create_app
from scaleforge.serve.model import InvalidInput, ServedModel
from tests.unit.test_server import serving

pytestmark = pytest.mark.timeout(300)

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
    "and",
    "then",
    "some",
    "more",
    "words",
    "about",
    "foxes",
]
GPT = ["model.architecture=gpt", "model.n_layers=1", "model.d_model=32", "model.n_heads=2"]
QUICK = ["training.max_steps=3", "training.batch_size=8", "checkpoint.every_steps=0", "logging.progress=none"]
QUICK += ["logging.tensorboard=false", "logging.plot=false"]


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def bpe_data(tmp_path: Path) -> list[str]:
    """A small corpus and the overrides that read it with a BPE tokenizer of 300 tokens."""
    generator = random.Random(0)
    lines = (" ".join(generator.choice(WORDS) for _ in range(10)) for _ in range(600))
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    return ["data.dataset=text", f"data.path={tmp_path / 'corpus.txt'}", "data.seq_len=16", "data.tokenizer=bpe"]


def test_a_bpe_run_saves_its_tokenizer_and_is_evaluated_and_served_with_it(tmp_path: Path, cli) -> None:
    data = [*bpe_data(tmp_path), "data.vocab_size=300"]
    trained = cli("train", *GPT, *data, *QUICK, "--run-dir", str(tmp_path / "run"))
    assert trained.code == 0, trained.err
    final = tmp_path / "run" / "final"
    assert "tokenizer.json" in json.loads((final / "manifest.json").read_text())["files"]
    info = json.loads((final / "data_info.json").read_text())
    assert info["tokenizer"] == "bpe" and info["vocab_size"] == 300 and info["bytes_per_token"] > 1.5

    cached = sorted(path.name for path in (tmp_path / "cache" / "scaleforge" / "tokens").iterdir())
    evaluated = cli("eval", str(tmp_path / "run"))
    assert evaluated.code == 0, evaluated.err
    assert "perplexity: " in evaluated.out and "bits_per_byte: " in evaluated.out
    assert sorted(path.name for path in (tmp_path / "cache" / "scaleforge" / "tokens").iterdir()) == cached

    served = ServedModel(tmp_path / "run")
    assert served.card.input_schema["tokenizer"] == "bpe"
    instances = served.decode(["the quick brown fox", [1, 2, 3], "words " * 40])
    assert len(instances[0]) < len("the quick brown fox") and len(instances[2]) == 16  # its last 16 tokens
    answers = served.answer(instances)
    assert all(isinstance(answer["next_text"], str) and 0 <= answer["next_token"] < 300 for answer in answers)
    with pytest.raises(InvalidInput, match="the text is empty"):
        served.decode([""])

    async def predict() -> list[dict]:
        async with serving(create_app(served, ServeSettings())) as client:
            texts = await client.post("/v1/predict", json={"inputs": ["the lazy", "a fox"]})
            card = await client.get("/v1/models")
        assert texts.status_code == 200, texts.text
        assert card.json()["data"][0]["input_schema"]["tokenizer"] == "bpe"
        return texts.json()["outputs"]

    outputs = asyncio.run(predict())
    assert len(outputs) == 2 and all("next_text" in output for output in outputs)

    stream = generate_stream(tmp_path / "run", "the quick", max_new_tokens=12, temperature=0)
    text = "".join(stream)  # BPE tokens of several bytes each, streamed
    strings = Tokenizer.from_json((final / "tokenizer.json").read_text()).token_byte_strings()
    generated = b"".join(strings[token] for token in stream.tokens)
    assert len(stream.tokens) == 12 and len(generated) > 12 and text == generated.decode(errors="replace")


def test_a_model_smaller_than_its_tokenizer_is_a_one_line_error(tmp_path: Path, cli) -> None:
    data = [*bpe_data(tmp_path), "data.vocab_size=300"]
    result = cli("train", *GPT, "model.vocab_size=280", *data, *QUICK, "--run-dir", str(tmp_path / "run"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert result.err.startswith("data error: the tokenizer data.tokenizer=bpe has 300 tokens, more than the model's")
    assert "(model.vocab_size=280)" in result.err


def test_a_run_whose_tokenizer_outgrows_its_model_is_refused_naming_the_file(tmp_path: Path, cli) -> None:
    trained = cli("train", *GPT, *bpe_data(tmp_path), "data.vocab_size=300", *QUICK, "--run-dir", str(tmp_path / "r"))
    assert trained.code == 0, trained.err
    final = tmp_path / "r" / "final"
    (final / "tokenizer.json").write_text(train_bpe(["any text at all"], vocab_size=400).to_json())
    write_manifest(final)  # a consistent run, whose tokenizer the model cannot take
    result = cli("eval", str(tmp_path / "r"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert result.err.startswith(f"data error: {final / 'tokenizer.json'} has 400 tokens")
    assert "more than the model's 300 embedding rows" in result.err


def test_a_byte_level_run_serves_text_too(tmp_path: Path, cli) -> None:
    (tmp_path / "corpus.txt").write_text("a small corpus of plain bytes\n" * 40)
    data = ["data.dataset=text", f"data.path={tmp_path / 'corpus.txt'}", "data.seq_len=16"]
    trained = cli("train", *GPT, *data, *QUICK, "--run-dir", str(tmp_path / "run"))
    assert trained.code == 0, trained.err
    served = ServedModel(tmp_path / "run")
    assert served.card.input_schema["tokenizer"] == "bytes"
    (answer,) = served.answer(served.decode(["a small"]))
    assert answer["next_text"] == bytes([answer["next_token"]]).decode(errors="replace")
