"""`scaleforge bench generate` from the CLI on a tiny gpt and a few tokens: the table, the JSON and the plot have
every way of generating and the targets. Speed is never asserted (the figures depend on the machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaleforge.cli import main
from tests.integration.test_bench_distributed import PNG_MAGIC, table_rows

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]
GPT = ["model.architecture=gpt", "model.n_layers=1", "model.d_model=16", "model.n_heads=2"]
TOKENS = ["data.dataset=synthetic", "data.kind=tokens", "data.seq_len=16", "data.vocab_size=32", "data.num_samples=64"]
TOKENS += ["training.batch_size=16"]
FEW = ["--prompt-tokens", "4", "--repeats", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("gpt") / "run"
    assert main(["train", *QUICK, *GPT, *TOKENS, "training.max_steps=1", "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.timeout(120)
def test_bench_generate_reports_the_cache_recomputation_and_transformers(cli, run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = cli("bench", "generate", str(run), *FEW, "--new-tokens", "8", "--out", str(out))
    assert result.code == 0, result.err
    title = " ".join(result.out.split("┏")[0].split())  # the table's title, wrapped to the terminal's width
    assert title.endswith("(1 layer, width 16, 2 heads, vocabulary 32, context 16): 8 tokens after 4, greedy, CPU, "
                          "1 thread, median of 1")  # fmt: skip
    rows = {row[1]: row for row in table_rows(result.out)}
    assert list(rows) == [
        "kv cache",
        "recompute",
        "onnxruntime full sequence",
        "onnxruntime kv cache",
        "transformers generate",
    ]
    assert all(row[0] == "single" and row[2] == "1" and float(row[3].replace(",", "")) > 0 for row in rows.values())
    assert rows["kv cache"][4] != "-" and rows["transformers generate"][4:] == ["-"] * 4  # no per-token times there
    assert "kv cache >= 5x recomputation at 8 tokens: " in result.out
    assert "kv cache >= 1.0x transformers' generate: " in result.out

    data = json.loads((out / "generate.json").read_text())
    assert data.keys() >= {"benchmark", "run_dir", "threads", "model", "prompt_tokens", "new_tokens", "repeats", "rows"}
    assert data["benchmark"] == "generate" and "targets" in data and "cores" in data
    assert data["model"]["weights"] == "the run's" and data["threads"] == 1 and data["new_tokens"] == 8
    assert set(data["rows"][0]) == {"part", "way", "streams", "tokens_per_s", "ttft_ms", "tpot_ms"}
    assert set(data["rows"][0]["tpot_ms"]) == {"p50", "p99"}
    assert all(verdict.endswith(("met", "not met")) for verdict in data["targets"].values())
    assert (out / "generate.png").read_bytes()[:4] == PNG_MAGIC
    assert {path.name for path in out.glob("*.onnx")} == {
        "generate.onnx",
        "generate.prefill.onnx",
        "generate.decode.onnx",
    }


@pytest.mark.timeout(120)
def test_a_context_too_short_is_widened_on_a_model_of_the_runs_shape(cli, run: Path, tmp_path: Path) -> None:
    result = cli("bench", "generate", str(run), *FEW, "--new-tokens", "20", "--json", "--out", str(tmp_path))
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["model"]["context"] == 24 and data["model"]["layers"] == 1 and data["model"]["width"] == 16
    assert data["model"]["weights"] == "random weights, the run's shape with its context of 16 widened to 24"
