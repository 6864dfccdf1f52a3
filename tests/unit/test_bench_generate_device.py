"""What `scaleforge bench generate` does with its device, without a GPU: ONNX Runtime's ways are skipped, and said
so, on any device but cpu; the server part's servers serve on the benchmark's device."""

from __future__ import annotations

from pathlib import Path

import torch

from scaleforge.bench.generate import Setup, onnx_skipped, server_ways
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
