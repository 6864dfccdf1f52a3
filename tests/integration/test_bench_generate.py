"""`scaleforge bench generate` from the CLI on a tiny gpt and a few tokens: the table, the JSON and the plot have
every way of generating and the targets. Speed is never asserted (the figures depend on the machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
    assert data["device"] == "cpu"  # the default
    assert set(data["rows"][0]) == {"part", "way", "streams", "tokens_per_s", "ttft_ms", "tpot_ms"}
    assert set(data["rows"][0]["tpot_ms"]) == {"p50", "p99"}
    single_targets = [verdict for name, verdict in data["targets"].items() if not name.startswith("server: ")]
    assert all(verdict.endswith(("met", "not met")) for verdict in single_targets)
    assert data["server"]["skipped"].startswith("not measured: the run has no tokenizer")  # the server completes text
    assert data["targets"]["server: continuous batching >= 3x one at a time at 16 streams"].startswith("not measured")
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


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gpt on text (bytes tokens, context 48): the server completes text, so it needs the run's tokenizer."""
    folder = tmp_path_factory.mktemp("text")
    (folder / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    text = ["data.dataset=text", f"data.path={folder / 'corpus.txt'}", "data.seq_len=48", "training.batch_size=8"]
    assert main(["train", *QUICK, *GPT, *text, "training.max_steps=1", "--run-dir", str(folder / "run")]) == 0
    return folder / "run"


@pytest.mark.timeout(240)
def test_the_server_part_streams_completions_three_ways(cli, text_run: Path, tmp_path: Path) -> None:
    server = ["--streams", "1,2", "--requests-per-stream", "2", "--server-max-tokens", "6", "--server-repeats", "2"]
    result = cli("bench", "generate", str(text_run), *FEW, "--new-tokens", "8", *server, "--out", str(tmp_path))
    assert result.code == 0, result.err
    rows = [row for row in table_rows(result.out) if row[0] == "server"]
    ways = ["continuous batching", "one at a time", "static batching"]
    assert [(row[1], row[2]) for row in rows] == [(way, streams) for way in ways for streams in ("1", "2")]
    assert all(float(row[3].replace(",", "")) > 0 and row[4] != "-" for row in rows)
    assert "server: continuous batching >= 3x one at a time at 2 streams: " in result.out
    assert "server: continuous batching >= 1.5x static batching at 2 streams: " in result.out

    data = json.loads((tmp_path / "generate.json").read_text())
    assert data["server"]["streams"] == [1, 2] and data["server"]["slots"] == 2 and data["server"]["context"] == 48
    assert data["server"]["repeats"] == 2 and "median of 2 interleaved runs" in result.out
    assert 8 <= data["server"]["mean_prompt_tokens"] <= 24 and data["server"]["mean_max_tokens"] <= 6
    server_rows = [row for row in data["rows"] if row["part"] == "server"]
    assert len(server_rows) == 6 and all(set(row["ttft_ms"]) == {"p50", "p99"} for row in server_rows)
    assert all(verdict.endswith(("met", "not met")) for verdict in data["targets"].values())
    assert (tmp_path / "generate.png").read_bytes()[:4] == PNG_MAGIC
    assert {path.name for path in tmp_path.glob("server-*.log")} == {"server-0.log", "server-1.log", "server-2.log"}


def test_no_server_skips_the_server_part_and_streams_must_increase(cli, run: Path, tmp_path: Path) -> None:
    skipped = cli(
        "bench", "generate", str(run), *FEW, "--new-tokens", "4", "--no-server", "--device", "cpu", "--json",
        "--out", str(tmp_path),
    )  # fmt: skip
    data = json.loads(skipped.out)
    assert data["server"] == {"skipped": "not measured (--no-server)"} and data["device"] == "cpu"
    assert not [row for row in data["rows"] if row["part"] == "server"]
    refused = cli("bench", "generate", str(run), "--streams", "4,1", "--out", str(tmp_path))
    assert refused.code != 0 and "--streams: give increasing numbers without repeats" in refused.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_a_usage_error_of_one_line(cli, run: Path, tmp_path: Path) -> None:
    result = cli("bench", "generate", str(run), "--device", "cuda", "--out", str(tmp_path / "bench"))
    assert result.code == 2
    (line,) = result.err.strip().splitlines()  # no traceback
    assert line == "usage error: --device: 'cuda' is not available on this machine"
    assert not (tmp_path / "bench").exists()  # refused before any work
