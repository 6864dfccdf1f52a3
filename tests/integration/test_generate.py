"""`scaleforge generate` on a small gpt trained from the CLI on a generated text file, and its user errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import scaleforge
from scaleforge.cli import main

pytestmark = pytest.mark.timeout(300)

QUICK = ["training.batch_size=16", "checkpoint.every_steps=0", "logging.progress=none"]
QUICK += ["logging.tensorboard=false", "logging.plot=false"]
GPT = ["model.architecture=gpt", "model.n_layers=1", "model.d_model=32", "model.n_heads=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gpt trained for 40 steps on words with accented letters (two-byte characters in UTF-8), bytes tokens."""
    folder = tmp_path_factory.mktemp("generate")
    words = ["the", "quick", "brown", "fox", "jumps", "über", "café", "naïve", "dog"]
    rng = random.Random(0)
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    data = ["data.dataset=text", f"data.path={folder / 'corpus.txt'}", "data.seq_len=32"]
    assert main(["train", *GPT, *data, *QUICK, "training.max_steps=40", "--run-dir", str(folder / "run")]) == 0
    return folder / "run"


def test_generate_prints_the_continuation_the_python_api_returns(cli, run: Path, tmp_path: Path) -> None:
    greedy = ["--temperature", "0", "--max-new-tokens", "60"]
    printed = cli("generate", str(run), "--prompt", "the quick", *greedy)
    assert printed.code == 0, printed.err
    assert printed.out == scaleforge.generate(run, "the quick", temperature=0, max_new_tokens=60) + "\n"
    assert 0 < len(printed.out.rstrip("\n")) <= 60 and "\ufffd" not in printed.out

    (tmp_path / "prompt.txt").write_text("the quick")
    from_file = cli("generate", str(run), "--prompt-file", str(tmp_path / "prompt.txt"), *greedy)
    assert from_file.out == printed.out

    sampled = [
        cli("generate", str(run), "--prompt", "the", "--seed", str(seed), "--top-k", "20", "--top-p", "0.95")
        for seed in (1, 1, 2)
    ]
    assert sampled[0].code == 0 and sampled[0].out == sampled[1].out != sampled[2].out

    stop = printed.out[5:7]  # two characters of the greedy text: the text now ends before their first appearance
    stopped = cli("generate", str(run), "--prompt", "the quick", *greedy, "--stop", stop, "never seen")
    assert stopped.code == 0 and stopped.out == printed.out[: printed.out.index(stop)] + "\n"

    at_context = cli("generate", str(run), "--prompt", "the quick", "--max-new-tokens", "100", "--context", "stop")
    assert at_context.code == 0
    stream = scaleforge.generate_stream(run, "the quick", max_new_tokens=100, context="stop", seed=0)
    assert "".join(stream) and stream.finish_reason == "context"
    assert len(stream.tokens) == 32 - len("the quick") + 1  # bytes tokens, 32 of context


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "usage error: one of the arguments --prompt --prompt-file is required"),
        (["--prompt", "a", "--prompt-file", "p.txt"], "argument --prompt-file: not allowed with argument --prompt"),
        (["--prompt", ""], "usage error: the prompt is empty"),
        (["--prompt", "a", "--temperature", "-1"], "argument --temperature: expected a non-negative number"),
        (["--prompt", "a", "--top-p", "0"], "argument --top-p: expected a positive number"),
        (["--prompt", "a", "--top-p", "1.5"], "argument --top-p: expected a number above 0 and at most 1"),
        (["--prompt-file", "missing.txt"], "usage error: --prompt-file missing.txt cannot be read"),
        (["--prompt", "a", "--device", "gpu"], "usage error: --device:"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(cli, run: Path, arguments: list[str], message: str) -> None:
    result = cli("generate", str(run), *arguments)
    assert result.code == 2 and message in result.err and result.err.count("\n") == 1
    assert result.out == ""


def test_a_run_that_is_not_a_language_model_is_refused(cli, tmp_path: Path) -> None:
    trained = cli("train", "training.max_steps=1", *QUICK, "--run-dir", str(tmp_path / "run"))  # the default: digits
    assert trained.code == 0, trained.err
    result = cli("generate", str(tmp_path / "run"), "--prompt", "a")
    assert result.code == 2 and result.err.count("\n") == 1
    assert "is a classification model, not a language model" in result.err
