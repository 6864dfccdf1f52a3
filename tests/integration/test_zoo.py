"""Every model family trains for a few steps from the CLI on data of its kind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

QUICK = ["training.max_steps=6", "logging.progress=none", "logging.tensorboard=false", "logging.plot=false"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(4000)))
    return path


@pytest.mark.parametrize(
    "model",
    [
        ["model.architecture=cnn", "model.attention_heads=4"],
        ["model.architecture=vit", "model.patch_size=2", "model.depth=2", "model.width=64", "model.heads=4"],
        ["model.architecture=resnet18", "model.width=8"],
        ["model.architecture=lstm", "model.hidden_size=32"],
    ],
    ids=["cnn-attention", "vit", "resnet18", "lstm-classifier"],
)
def test_image_models_train_on_digits(cli, tmp_path: Path, model: list[str]) -> None:
    result = cli("train", *model, *QUICK, "--run-dir", str(tmp_path / "run"))
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 <= summary["val_accuracy"] <= 1


@pytest.mark.parametrize(
    "model",
    [
        ["model.architecture=gpt", "model.n_layers=2", "model.d_model=32"],
        ["model.architecture=lstm", "model.hidden_size=32"],
    ],
    ids=["gpt", "lstm"],
)
def test_language_models_train_on_a_text_file(cli, tmp_path: Path, text_file: Path, model: list[str]) -> None:
    data = ["data.dataset=text", f"data.path={text_file}", "data.seq_len=32", "training.batch_size=16"]
    result = cli("train", *model, *data, *QUICK, "--run-dir", str(tmp_path / "run"))
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_perplexity"] > 1 and "val_accuracy" not in summary
    evaluated = cli("eval", str(tmp_path / "run"))
    assert evaluated.code == 0 and f"val_perplexity: {summary['val_perplexity']:.4f}" in evaluated.out


def test_bad_text_data_names_the_file(cli, tmp_path: Path) -> None:
    gpt = ["model.architecture=gpt", "data.dataset=text"]
    short = tmp_path / "short.txt"
    short.write_text("too short")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, expected in (
        (tmp_path / "missing.txt", f"data.path: {tmp_path / 'missing.txt'} does not exist"),
        (empty, f"data.path: {empty} is an empty folder"),
        (short, f"data.path: {short} has 9 bytes, too short for one sequence of seq_len=128"),
    ):
        result = cli("train", *gpt, f"data.path={path}", "--run-dir", str(tmp_path / "run"))
        assert result.code == 2 and result.err.startswith(f"data error: {expected}"), result.err
