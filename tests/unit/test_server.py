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
