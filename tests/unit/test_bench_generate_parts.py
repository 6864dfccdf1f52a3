"""Parts of `scaleforge bench generate` without a GPU or servers: ONNX Runtime's ways are skipped, and said so, on
any device but cpu; the server part's servers serve on the benchmark's device; a server row is the median of its
rounds."""

from __future__ import annotations

from pathlib import Path

import torch

from scaleforge.bench.generate import Setup, StreamedLoad, _server_row, onnx_skipped, server_ways
from scaleforge.bench.harness import synchronizer
from scaleforge.models.gpt import GPT
from scaleforge.runs import UNTRUSTED


def setup_on(device: str) -> Setup:
    model = GPT(32, 16, 1, 2, 16)
    return Setup(Path("run"), UNTRUSTED, model, [0], 4, 1, [b""] * 32, Path("out"), device=torch.device(device))


def test_onnx_runtime_is_measured_on_cpu_only() -> None:
    assert onnx_skipped(setup_on("cuda:0")) == (
        "not measured on cuda:0: ONNX Runtime's ways run on cpu only (measure them with --device cpu)"
    )
    on_cpu = onnx_skipped(setup_on("cpu"))
    assert on_cpu is None or "the export extra is not installed" in on_cpu


def test_the_servers_serve_on_the_benchmarks_device() -> None:
    for command in server_ways(setup_on("cuda:1"), slots=4).values():
        assert command[command.index("--device") + 1] == "cuda:1"


def test_a_cpu_has_nothing_to_wait_for() -> None:
    assert synchronizer(torch.device("cpu"))() is None


def test_a_server_row_gives_the_median_round_and_the_latencies_of_every_round() -> None:
    rounds = [
        StreamedLoad(1.0, [100, 200], [0.010], [0.001]),  # 300 tokens/s
        StreamedLoad(2.0, [100], [0.030], [None]),  # 50
        StreamedLoad(1.0, [150], [0.020], [0.003]),  # 150
    ]
    row = _server_row("static batching", 16, rounds)
    assert (row.part, row.way, row.streams, row.tokens_per_s) == ("server", "static batching", 16, 150)
    assert row.ttft_ms is not None and row.ttft_ms.p50 == 20 and row.ttft_ms.p99 > 29
    assert row.tpot_ms is not None and row.tpot_ms.p50 == 2  # the single-token request has none
