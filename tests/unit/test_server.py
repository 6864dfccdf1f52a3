"""Tests for scaleforge.serve.server: a stop signal turns readiness off before uvicorn shuts down."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import uvicorn

from scaleforge import load_config
from scaleforge.serve.app import ServeSettings, create_app
from scaleforge.serve.model import ServedModel
from scaleforge.serve.server import DrainingServer
from scaleforge.train.trainer import train


def test_a_stop_signal_turns_readiness_off_and_the_server_exits_cleanly(tmp_path: Path) -> None:
    quick = ["training.max_steps=2", "logging.progress=none", "logging.tensorboard=false", "logging.plot=false"]
    train(load_config(None, quick), tmp_path / "run")
    gate = create_app(ServedModel(tmp_path / "run"), ServeSettings())
    server = DrainingServer(uvicorn.Config(gate), gate, banner="")
    gate.state.ready = True  # as after start-up

    async def ready() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://test") as client:
            return await client.get("/health/ready")

    assert asyncio.run(ready()).status_code == 200
    server.handle_exit(signal.SIGTERM, None)
    response = asyncio.run(ready())
    assert response.status_code == 503 and response.json() == {"detail": "draining"}
    assert server.should_exit and not server._captured_signals  # uvicorn drains; nothing raised again after


def test_gpu_figures_that_cannot_be_read_are_left_out_and_cpu_serving_has_none() -> None:
    import torch
    from prometheus_client import CollectorRegistry, generate_latest

    from scaleforge.serve.app import GpuCollector, ServerMetrics

    def no_nvml() -> float:
        raise ModuleNotFoundError("pynvml module not found, please install nvidia-ml-py")

    registry = CollectorRegistry()
    registry.register(GpuCollector({"gpu_a_bytes": ("read", lambda: 2.0**30), "gpu_b_ratio": ("fails", no_nvml)}))
    text = generate_latest(registry).decode()
    assert "gpu_a_bytes 1.073741824e+09" in text and "gpu_b_ratio" not in text
    cpu = generate_latest(ServerMetrics(8, torch.device("cpu")).registry).decode()
    assert "scaleforge_gpu" not in cpu and "process_resident_memory_bytes" in cpu


def test_every_core_goes_to_the_model_only_when_its_compute_dominates_and_they_help() -> None:
    from scaleforge.serve.model import compute_bound, pick_threads

    assert compute_bound(0.30, 32) and not compute_bound(0.0004, 32)  # a ResNet's batch, an MLP's

    assert pick_threads(0.30, 0.17, 32, 2) == 2  # a ResNet: 1.8x faster on both cores
    assert pick_threads(0.30, 0.28, 32, 2) == 1  # no faster: one core left to the event loop
    assert pick_threads(0.0004, 0.0002, 32, 2) == 1  # a small MLP: faster alone, but its requests cost more
    assert pick_threads(0.30, 0.10, 32, 1) == 1 and pick_threads(0.30, 0.10, 32, 16) == 16
