"""Tests for scaleforge.serve.server and the application it serves, in this process: a stop signal turns
readiness off before uvicorn shuts down; liveness answers while a large body decodes, and turns 503 while the
model's thread is hung; the default body limit follows the model's input; the Gate's fast path and FastAPI's route
give every predict body the same answer."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from scaleforge import load_config
from scaleforge.serve.app import INLINE_BODY_BYTES, Gate, ServeSettings, create_app
from scaleforge.serve.model import ServedModel
from scaleforge.serve.server import DrainingServer
from scaleforge.training.trainer import train
from tests.conftest import until

IMAGE = [[[0.5] * 8 for _ in range(8)]]  # one digits instance, (1, 8, 8)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    quick = ["training.max_steps=2", "logging.progress=none", "logging.tensorboard=false", "logging.plot=false"]
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    train(load_config(None, quick), run_dir)
    return run_dir


@asynccontextmanager
async def serving(gate: Gate) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `gate`, started as uvicorn starts it (the batcher running), in this event loop."""
    async with gate.app.router.lifespan_context(gate.app):
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client


def test_a_stop_signal_turns_readiness_off_and_the_server_exits_cleanly(digits_run: Path) -> None:
    gate = create_app(ServedModel(digits_run), ServeSettings())
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


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"], ids=["fast-path", "route"])
def test_liveness_answers_while_a_large_body_decodes(digits_run: Path, tmp_path: Path, content_type: str) -> None:
    model = ServedModel(digits_run)
    # files, not events: the decoding may run in a process of its own (on Linux, forked with the model)
    decoding, hold, finished = tmp_path / "decoding", tmp_path / "hold", tmp_path / "finished"
    decode = model.decode

    def held_decode(inputs: list) -> list:  # as a body of a large model's instances takes long to decode
        decoding.touch()
        deadline = time.monotonic() + 20
        while hold.exists() and time.monotonic() < deadline:  # on the event loop, it would hold up every request
            time.sleep(0.01)
        finished.touch()
        return decode(inputs)

    model.decode = held_decode  # type: ignore[method-assign]
    gate = create_app(model, ServeSettings())
    batch = json.dumps({"inputs": [IMAGE] * 32})
    body = (batch[:-1] + " " * 2 * INLINE_BODY_BYTES + "}").encode()  # above the size decoded on the event loop
    hold.touch()

    async def scenario() -> tuple[httpx.Response, bool, httpx.Response]:
        async with serving(gate) as client:
            headers = {"content-type": content_type}
            predicted = asyncio.ensure_future(client.post("/v1/predict", content=body, headers=headers))
            deadline = time.monotonic() + 20
            while not decoding.exists():
                assert time.monotonic() < deadline, "the body was never decoded"
                await asyncio.sleep(0.01)
            live = await client.get("/health/live")
            answered_while_decoding = not finished.exists()
            hold.unlink()
            return live, answered_while_decoding, await predicted

    live, answered_while_decoding, predicted = asyncio.run(scenario())
    assert live.status_code == 200 and answered_while_decoding
    assert predicted.status_code == 200 and len(predicted.json()["outputs"]) == 32


class HeldForward(torch.nn.Module):
    """`model`, whose forward pass waits until `release` is set (`entered` says it has started)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.release.wait(timeout=60)
        return self.model(batch)


def test_a_hung_batch_on_the_models_thread_turns_liveness_and_requests_to_503_until_it_answers(
    digits_run: Path,
) -> None:
    model = ServedModel(digits_run)
    held = HeldForward(model.model)  # type: ignore[arg-type]
    model.model = held
    gate = create_app(model, ServeSettings(batch_timeout_s=0.3))
    body = {"inputs": [IMAGE]}

    async def scenario() -> dict[str, httpx.Response]:
        async with serving(gate) as client:
            seen = {"live before": await client.get("/health/live")}
            stuck = asyncio.ensure_future(client.post("/v1/predict", json=body))
            assert await asyncio.to_thread(held.entered.wait, 20)
            seen["live while hung"] = await until(lambda: client.get("/health/live"), 503)
            seen["new request"] = await client.post("/v1/predict", json=body)
            seen["hung request"] = await stuck
            assert not stuck.cancelled() and held.entered.is_set() and not held.release.is_set()
            held.release.set()
            seen["live after"] = await until(lambda: client.get("/health/live"), 200)
            seen["served after"] = await client.post("/v1/predict", json=body)
            seen["metrics"] = await client.get("/metrics")
        return seen

    seen = asyncio.run(scenario())
    assert seen["live before"].status_code == 200
    hung = seen["live while hung"].json()["detail"]
    assert "has not answered its batch within 0.3 s (--batch-timeout-s)" in hung
    for name in ("new request", "hung request"):
        assert seen[name].status_code == 503 and seen[name].json() == {"detail": hung}, name
        assert seen[name].headers["retry-after"] == "1"
    assert seen["served after"].status_code == 200
    assert 'scaleforge_rejections_total{reason="model_hung"} 2.0' in seen["metrics"].text


def test_the_default_body_limit_takes_a_full_batch_at_its_largest_and_refuses_more(digits_run: Path) -> None:
    limit = 2 * 4 * 64 * 32 + 64 * 2**10  # twice 4 instances of 64 numbers at 32 bytes, and 64 KiB for the rest
    longest = [[[-2.2250738585072014e-308] * 8 for _ in range(8)]]  # the longest way JSON writes a float64
    full = json.dumps({"inputs": [longest] * 4})

    def padded(size: int) -> bytes:
        return (full[:-1] + " " * (size - len(full)) + "}").encode()

    async def answers(settings: ServeSettings, bodies: list[bytes]) -> list[httpx.Response]:
        async with serving(create_app(ServedModel(digits_run), settings)) as client:
            headers = {"content-type": "application/json"}
            return [await client.post("/v1/predict", content=body, headers=headers) for body in bodies]

    derived = ServeSettings(max_batch_size=4)
    full_batch, at_limit, above = asyncio.run(answers(derived, [full.encode(), padded(limit), padded(limit + 1)]))
    assert full_batch.status_code == 200 and at_limit.status_code == 200, at_limit.text
    assert above.status_code == 413
    detail = above.json()["detail"]
    assert detail.startswith("the body is larger than this endpoint's limit of 80 KiB (twice --max-batch-size 4 ")
    assert "--max-body-mb sets another" in detail and "\n" not in detail
    (given,) = asyncio.run(answers(ServeSettings(max_batch_size=4, max_body_mb=1), [padded(limit + 1)]))
    assert given.status_code == 200  # a limit given overrides the model's


def predict_bodies() -> dict[str, bytes]:
    """`POST /v1/predict` bodies good and bad, for a server of `--max-batch-size 4` (its body limit 80 KiB)."""
    one, four = json.dumps({"inputs": [IMAGE]}), json.dumps({"inputs": [IMAGE] * 4})
    shape = json.dumps({"inputs": [[[1, 2, 3]]]})

    def padded(body: str, size: int) -> bytes:  # decoded away from the event loop above INLINE_BODY_BYTES
        return (body[:-1] + " " * (size - len(body)) + "}").encode()

    return {
        "one": one.encode(),
        "four": four.encode(),
        "large": padded(four, INLINE_BODY_BYTES + 1000),
        "bad-json": b"{not json",
        "empty-body": b"",
        "shape": shape.encode(),
        "large-shape": padded(shape, INLINE_BODY_BYTES + 1000),
        "nan": json.dumps({"inputs": [[[[float("nan")] * 8] * 8]]}).encode(),
        "no-inputs": b'{"input": [1]}',
        "empty-inputs": b'{"inputs": []}',
        "not-an-object": b'[{"inputs": [1]}]',
        "too-deep": b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "too-many": json.dumps({"inputs": [IMAGE] * 5}).encode(),
        "too-large": padded(four, 90 * 2**10),
    }


@pytest.mark.parametrize("cache_size", [0, 8], ids=["no-cache", "cache"])
def test_the_fast_path_and_the_route_give_every_body_the_same_answer(digits_run: Path, cache_size: int) -> None:
    model = ServedModel(digits_run)
    settings = ServeSettings(max_batch_size=4, cache_size=cache_size)
    content_types = ["application/json", "Application/JSON; charset=utf-8", "text/plain", None]
    counted = ("scaleforge_requests_total", "scaleforge_rejections_total", "scaleforge_cache_total")

    async def answers(gate: Gate) -> tuple[list[tuple], list[str], list[str]]:
        """Every body with every content type: status, headers and body of each; the paths FastAPI routed; the
        request, refusal and cache counts."""
        seen, routed = [], []
        async with serving(gate) as client:
            app = gate.app

            async def route(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
                routed.append(scope["path"])
                await app(scope, receive, send)

            gate.app = route  # type: ignore[assignment]
            for name, body in predict_bodies().items():
                for content_type in content_types:
                    headers = {} if content_type is None else {"content-type": content_type}
                    response = await client.post("/v1/predict", content=body, headers=headers)
                    seen.append(
                        (name, content_type, response.status_code, response.headers.multi_items(), response.text)
                    )
            metrics = (await client.get("/metrics")).text.splitlines()
        return seen, routed, [line for line in metrics if line.startswith(counted)]

    fast, fast_routed, fast_counts = asyncio.run(answers(create_app(model, settings)))
    route, route_routed, route_counts = asyncio.run(answers(create_app(model, settings, fast_path=False)))
    assert fast == route and fast_counts == route_counts
    statuses = {(name, content_type): status for name, content_type, status, _, _ in fast}
    assert {name for (name, _), status in statuses.items() if status == 200} == {"one", "four", "large"}
    assert {name for (name, _), status in statuses.items() if status == 413} == {"too-large"}
    assert all(status in (200, 413, 422) for status in statuses.values())
    # FastAPI saw none of the JSON bodies the Gate answered itself, and every other one within the limit
    within_limit = len(predict_bodies()) - 1
    assert fast_routed == ["/v1/predict"] * within_limit * 2 + ["/metrics"]
    assert route_routed == ["/v1/predict"] * within_limit * 4 + ["/metrics"]
