"""The HTTP layer (FastAPI): it translates requests for the batcher and the model's contract, and nothing more.

One pure ASGI middleware in front of every route counts requests by endpoint and status, times them, asks for
the API key, and refuses a body larger than the limit (413) before reading it whole; it answers a JSON
`POST /v1/predict` itself (FastAPI's routing costs more than the rest of a small model's request), with the same
method as the route (`ServingApp.answer_predict`). Every answer to a bad request is a 4xx with a one-line `detail`;
the model only ever sees checked input. Bodies larger than `INLINE_BODY_BYTES` are decoded away from the event
loop (`BodyDecoder`), so that it answers other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import multiprocessing
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import orjson
import torch
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaleforge.generation.engine import Engine, slot_model_for
from scaleforge.processes import ParentDeathGuard
from scaleforge.serve.batching import Batcher, Closed, DeadlineExceeded, ModelHung, QueueFull, Result, Ticket
from scaleforge.serve.completions import (
    OPENAI_PATHS,
    CompletionRequest,
    Completions,
    EngineLoop,
    GenerationMetrics,
    openai_error,
    validation_error,
)
from scaleforge.serve.model import MAX_IMAGE_BYTES, InvalidInput, OnnxRuntimeModel, ServedModel
from scaleforge.serve.settings import ServeSettings
from scaleforge.serve.worker import ModelFailed, ModelPool, WorkerDied

Scope = MutableMapping[str, Any]
# told a request's outputs once answered: the fields and headers to add to its answer (a request id, say)
OnAnswer = Callable[[list[Any]], tuple[dict[str, Any], dict[str, str]]]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ENDPOINTS = frozenset(  # counted by name in metrics; any other path counts as "other"
    {
        "/v1/predict",
        "/v1/predict/image",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/openapi.json",
        "/docs",
    }
)
# a model repository's routes, counted by their template (`/v1/models/{name}/versions/{version}/predict`)
MODEL_ROUTE = re.compile(r"^/v1/models/[^/]+(/versions/[^/]+)?/(predict|predict/image|completions|ab)$")
REJECTIONS = (
    "queue_full",
    "deadline",
    "too_large",
    "invalid",
    "unauthorized",
    "shutting_down",
    "model_error",
    "model_hung",
    "not_ready",
)
WATCH_AFTER_S = 0.02  # a request waiting longer has its connection watched, to drop it if the client goes away
# a body up to this size is decoded on the event loop: a hand-over would cost a small request more than its
# decoding; a larger one is decoded by `BodyDecoder`, so that the loop answers other requests meanwhile
INLINE_BODY_BYTES = 64 * 2**10
ENVELOPE_BYTES = 64 * 2**10  # room in the default body limit for the rest of a body: keys, whitespace, form fields
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class PredictRequest(BaseModel):
    """`POST /v1/predict`: instances shaped like the model's input (see `GET /v1/models`)."""

    inputs: list[Any] = Field(min_length=1, description="instances: nested numbers, lists of token ids, or texts")


def read_inputs(body: bytes) -> list[Any]:
    """A `POST /v1/predict` body's `inputs` list, unchecked; `InvalidInput` says what is wrong with the body."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        # what orjson refuses but JSON's grammar or Python allows (NaN, integers past 64 bits, deep nesting) is
        # read again, so that the answer names the number or says how the body is wrong
        try:
            parsed = json.loads(body)
        except ValueError as error:
            raise InvalidInput(f"body: JSON decode error ({error})") from None
        except RecursionError:
            raise InvalidInput("the body cannot be read as JSON: it is nested too deep") from None
    if type(parsed) is dict and type(parsed.get("inputs")) is list and parsed["inputs"]:
        return parsed["inputs"]
    try:
        return PredictRequest.model_validate(parsed).inputs
    except ValidationError as error:
        problems = [f"{'.'.join(['body', *map(str, e['loc'])])}: {e['msg']}" for e in error.errors()]
        raise InvalidInput("; ".join(problems)) from None


def decode_body(model: ServedModel, body: bytes, max_rows: int) -> list[np.ndarray] | int:
    """A `POST /v1/predict` body's instances, checked (`InvalidInput` says what is wrong), or how many it holds
    when that is more than `max_rows`."""
    inputs = read_inputs(body)
    return len(inputs) if len(inputs) > max_rows else model.decode(inputs)


_FORKED: ServedModel | None = None  # the model a decoding process was forked with


def _decode_forked(body: bytes, max_rows: int) -> list[np.ndarray] | int:
    assert _FORKED is not None
    return decode_body(_FORKED, body, max_rows)


class BodyDecoder:
    """Decodes the bodies above `INLINE_BODY_BYTES`. JSON's parse and the conversion of its lists to arrays each
    hold the interpreter lock from start to end (17 and 10 ms for a 2 MB body): on a thread they would still stop
    the event loop that long. On Linux they run in a process of their own, forked from the server (with the model
    whose `decode` it runs) when the first such body comes, and killed with it; elsewhere, and for the body whose
    decoding that process died in, on a thread. `scaleforge bench serve --beside-large` measures the difference."""

    def __init__(self, model: ServedModel, max_rows: int) -> None:
        self.model, self.max_rows = model, max_rows
        self._pool: ProcessPoolExecutor | None = None

    async def decode(self, body: bytes) -> list[np.ndarray] | int:
        """`decode_body` of `body`, away from the event loop."""
        if sys.platform.startswith("linux"):
            forking = self._pool is None
            if self._pool is None:
                self._pool = self._fork()
            try:
                future = self._pool.submit(_decode_forked, body, self.max_rows)  # forks on the first submit
                if forking:
                    global _FORKED
                    _FORKED = None  # the process has its copy: this one need not keep the model alive
                return await asyncio.wrap_future(future)
            except BrokenProcessPool:  # the process died (out of memory, say): a new one for the next body
                self._pool = None
        return await run_in_threadpool(decode_body, self.model, body, self.max_rows)

    def _fork(self) -> ProcessPoolExecutor:
        global _FORKED
        _FORKED = self.model  # what the process forked now inherits (it is forked on the first submit)
        # from the event loop's thread, which lives as long as the server: the guard's signal follows that thread
        guard = ParentDeathGuard(signal.SIGKILL)
        return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=guard)

    def close(self) -> None:
        """Stop the decoding process, if one was started."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes of body an endpoint reads (a larger body gets 413), and what set it, for that answer."""

    max_bytes: int
    source: str


def body_limits(model: ServedModel, settings: ServeSettings) -> tuple[BodyLimit, BodyLimit]:
    """The body limit of `/v1/predict` (and of every other endpoint) and of `/v1/predict/image`: `--max-body-mb`
    if given; else from the model's input, twice `--max-batch-size` instances at their largest JSON encoding
    (`ServedModel.json_instance_bytes`), and one uncompressed RGB image of the largest size taken, each with
    `ENVELOPE_BYTES` more."""
    if settings.max_body_mb is not None:
        given = BodyLimit(int(settings.max_body_mb * 2**20), f"--max-body-mb {settings.max_body_mb:g}")
        return given, given
    instance = model.json_instance_bytes()
    batch = settings.max_batch_size
    predict = BodyLimit(
        2 * batch * instance + ENVELOPE_BYTES,
        f"twice --max-batch-size {batch} instances of up to {_size(instance)} as JSON, plus {_size(ENVELOPE_BYTES)};"
        " --max-body-mb sets another",
    )
    image = BodyLimit(
        MAX_IMAGE_BYTES + ENVELOPE_BYTES,
        f"a 4096x4096 RGB image uncompressed, plus {_size(ENVELOPE_BYTES)}; --max-body-mb sets another",
    )
    return predict, image


def _size(count: int) -> str:
    """`count` bytes for a person: 512 bytes, 192 KiB, 48.1 MiB."""
    if count < 2**10:
        return f"{count} bytes"
    return f"{count / 2**10:.3g} KiB" if count < 2**20 else f"{count / 2**20:.3g} MiB"


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, max_batch_size: int, device: torch.device | None = None, *, allocator: bool = True) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process CPU seconds and resident memory
        if device is not None and device.type == "cuda":
            self.registry.register(GpuCollector.of(device, allocator=allocator))
        r = self.registry
        self.requests = Counter(
            "scaleforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "scaleforge_request_seconds", "request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "scaleforge_queue_wait_seconds", "time a request waited for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "scaleforge_inference_seconds", "time a batch ran on the model", buckets=LATENCY_BUCKETS, registry=r
        )
        sizes = sorted({1, *(2**i for i in range(1, max_batch_size.bit_length() + 1) if 2**i < max_batch_size)})
        self.batch_size = Histogram(
            "scaleforge_batch_size", "instances per batch", buckets=[*sizes, max_batch_size], registry=r
        )
        self.queue_depth = Gauge("scaleforge_queue_depth", "requests waiting for a batch", registry=r)
        self.in_flight = Gauge("scaleforge_in_flight", "requests being answered", registry=r)
        self.cache = Counter("scaleforge_cache", "result cache lookups by outcome", ["outcome"], registry=r)
        self.rejections = Counter("scaleforge_rejections", "requests refused, by reason", ["reason"], registry=r)
        self.model_load = Gauge("scaleforge_model_load_seconds", "time the model took to load", registry=r)
        for reason in REJECTIONS:
            self.rejections.labels(reason)  # present from the start, at 0
        self.generation = GenerationMetrics(r)

    def refuse(
        self, reason: str, status: int, detail: str, headers: dict[str, str] | None = None, *, openai: bool = False
    ) -> Response:
        """The answer to a request refused for `reason`, counted; in OpenAI's error shape with `openai`."""
        self.rejections.labels(reason).inc()
        return openai_error(status, detail, None, reason, headers) if openai else _error(status, detail, headers)


class GpuCollector:
    """A GPU's figures, read when Prometheus scrapes: utilisation, memory used and power from NVML (through
    `torch.cuda`, which needs the `nvidia-ml-py` package: the `gpu` extra), and the memory torch's allocator holds.
    A figure that cannot be read (no NVML, a driver that does not report it) is left out, never an error."""

    def __init__(self, readings: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.readings = readings  # metric name -> (help, read)

    @classmethod
    def of(cls, device: torch.device, *, allocator: bool = True) -> GpuCollector:
        """`device`'s figures; the allocator's only when the model is in this process (`allocator`)."""
        cuda = torch.cuda
        readings: dict[str, tuple[str, Callable[[], float]]] = {
            "scaleforge_gpu_utilization_ratio": ("GPU busy share (NVML)", lambda: cuda.utilization(device) / 100),
            "scaleforge_gpu_memory_used_bytes": (
                "device memory in use (NVML)",
                lambda: cuda.device_memory_used(device),
            ),
            "scaleforge_gpu_power_watts": ("power draw (NVML)", lambda: cuda.power_draw(device) / 1000),
        }
        if allocator:
            readings["scaleforge_gpu_memory_allocated_bytes"] = (
                "memory torch holds in tensors",
                lambda: cuda.memory_allocated(device),
            )
            readings["scaleforge_gpu_memory_reserved_bytes"] = (
                "memory torch's allocator reserved",
                lambda: cuda.memory_reserved(device),
            )
        return cls(readings)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (description, read) in self.readings.items():
            try:
                value = float(read())
            except Exception:  # noqa: BLE001, S112 - NVML missing or failing: that figure is left out
                continue
            yield GaugeMetricFamily(name, description, value=value)


class _PoolBatches(Collector):
    """`scaleforge_model_process_batches_total{process="i"}`: the batches each model process of a pool answered."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "scaleforge_model_process_batches", "batches answered, by model process (--workers)", labels=["process"]
        )
        for index, count in enumerate(self.pool.batches):
            family.add_metric([str(index)], count)
        yield family


class _ResultCache:
    """An LRU of outputs keyed by model version and an instance's bytes."""

    def __init__(self, size: int, version: str) -> None:
        self.size = size
        self.version = version
        self._entries: collections.OrderedDict[bytes, Any] = collections.OrderedDict()

    def key(self, instance: np.ndarray) -> bytes:
        digest = hashlib.sha256(self.version.encode())
        digest.update(f"{instance.dtype}{instance.shape}".encode())
        digest.update(instance.tobytes())
        return digest.digest()

    def get(self, key: bytes) -> Any | None:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, key: bytes, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class _Json(JSONResponse):
    """A JSON response rendered by orjson (a tenth of the standard library's time for a classifier's answer)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return _Json({"detail": detail}, status_code=status, headers=headers)


OPENAI_REFUSALS: dict[int | str, dict[str, Any]] = {  # the completions endpoints', in OpenAI's error shape
    400: {"description": "a request this server cannot answer (unsupported fields, prompts too long, ...)"},
    404: {"description": "no model of that name"},
    422: {"description": "a body that does not match the schema"},
    503: {"description": "too many sequences waiting, or shutting down"},
    504: {"description": "waited for a slot longer than --timeout-ms"},
}
COMPLETION_SCHEMA = CompletionRequest.model_json_schema()
REFUSALS: dict[int | str, dict[str, Any]] = {  # documented in the OpenAPI schema of the predict endpoints
    413: {"description": "body too large"},
    422: {"description": "inputs the model cannot take"},
    503: {"description": "queue full, the model not answering, or shutting down"},
    504: {"description": "deadline passed"},
}
# the predict route reads its body itself (`ServingApp.answer_predict`, as the `Gate`'s fast path does): its schema
# is documented rather than declared
PREDICT_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}
}


class ServingApp:
    """`model` served with `settings`: the batcher, the result cache, the metrics and the body decoder, and the
    FastAPI application (`api`) whose routes and lifespan are this object's methods. A `POST /v1/predict` body
    is answered by one method, `answer_predict`, whether it came through FastAPI's route or the `Gate`'s fast path.
    """

    def __init__(
        self,
        model: ServedModel,
        settings: ServeSettings,
        run_batch: Callable[[list[np.ndarray]], list[dict[str, Any]]] | None = None,
        load_seconds: float | None = None,
        timed_batches: Sequence[tuple[int, float]] = (),
        *,
        identity: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        self.model, self.settings = model, settings
        # what every answer says produced it (beside its outputs), and the name completions answer for
        # `version` is the weights' digest, under the name it had before model repositories gave answers a
        # `model_version`: kept for the clients that read it
        card = model.card
        self.identity = (
            dict(identity)
            if identity is not None
            else {"model": card.name, "version": card.version, "digest": card.version}
        )
        self.name = name if name is not None else model.card.name
        self.answer_headers = (
            {"X-Model-Version": str(self.identity["model_version"])} if "model_version" in self.identity else None
        )
        self.metrics = ServerMetrics(settings.max_batch_size, model.device, allocator=run_batch is None)
        self.metrics.model_load.set(model.load_seconds if load_seconds is None else load_seconds)
        self.batcher = Batcher(
            run_batch or model.answer,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue=settings.max_queue,
            timeout_s=settings.timeout_ms / 1000,
            on_batch=self._observe_batch,
            latency_target_s=settings.latency_target_ms / 1000,
            timed_batches=timed_batches,
            # a model process is watched by `ModelProcess`, which restarts it; a thread cannot be stopped, only awaited
            hung_after_s=settings.batch_timeout_s if run_batch is None else 0.0,
            parallel=len(run_batch.processes) if isinstance(run_batch, ModelPool) else 1,
        )
        if isinstance(run_batch, ModelPool):
            self.metrics.registry.register(_PoolBatches(run_batch))
        self.metrics.queue_depth.set_function(lambda: self.batcher.queued)
        self.cache = _ResultCache(settings.cache_size, model.card.version) if settings.cache_size > 0 else None
        self.decoder = BodyDecoder(model, settings.max_batch_size)
        self.completions = self._completions(run_batch is None)
        self.api = self._build_api()

    def _completions(self, in_process: bool) -> Completions | None:
        """The completions endpoints of a language model on text whose weights are in this process, else None."""
        model, settings = self.model, self.settings
        if (
            model.info.task != "language_modeling"
            or model.tokenizer is None
            or not in_process
            or model.model is None
            or isinstance(model.model, OnnxRuntimeModel)
        ):
            return None
        slots = slot_model_for(model.model, settings.max_batch_size, model.info.seq_len)
        engine = Engine(slots, model.tokenizer.token_byte_strings(), settings.max_step_tokens, settings.batching)
        loop = EngineLoop(
            engine,
            max_waiting=settings.max_queue,
            timeout_s=settings.timeout_ms / 1000,
            hung_after_s=settings.batch_timeout_s,
        )
        return Completions(
            loop,
            self.metrics.generation,
            name=self.name,
            encode=model.tokenizer.encode,
            context=slots.context,
            max_prompts=settings.max_batch_size,
            refused=lambda reason: self.metrics.rejections.labels(reason).inc(),
        )

    def gate(self, *, fast_path: bool = True) -> Gate:
        """The application behind its `Gate` (what uvicorn runs); with `fast_path`, the `Gate` answers a JSON
        `POST /v1/predict` itself (`answer_predict`), else FastAPI's route does."""
        body_limit, image_body_limit = body_limits(self.model, self.settings)
        return Gate(
            self.api,
            self.metrics,
            body_limit=body_limit,
            image_body_limit=image_body_limit,
            api_key=self.settings.api_key,
            predict_fast=self.answer_predict if fast_path else None,
        )

    def _build_api(self) -> FastAPI:
        """The FastAPI application: this object's routes, error handlers and lifespan; not ready, not draining."""
        card = self.model.card
        api = FastAPI(
            title="scaleforge", summary=f"{card.name} ({card.task}), version {card.version}", lifespan=self.lifespan
        )
        api.state.ready = False
        api.state.draining = False
        api.add_exception_handler(StarletteHTTPException, self._http_error)  # type: ignore[arg-type]
        api.add_exception_handler(RequestValidationError, self._invalid_request)  # type: ignore[arg-type]
        api.add_api_route("/v1/predict", self.predict, methods=["POST"], responses=REFUSALS, openapi_extra=PREDICT_BODY)
        if self.model.info.image is not None:
            api.add_api_route("/v1/predict/image", self.predict_image, methods=["POST"], responses=REFUSALS)
        api.add_api_route("/v1/models", self.models, methods=["GET"])
        completions = self.completions
        body = {"requestBody": {"required": True, "content": {"application/json": {"schema": COMPLETION_SCHEMA}}}}
        api.add_api_route(
            "/v1/completions",
            completions.complete if completions is not None else self._no_completions,
            methods=["POST"],
            responses=OPENAI_REFUSALS,
            openapi_extra=body,
        )
        api.add_api_route(
            "/v1/chat/completions",
            completions.chat if completions is not None else self._no_completions,
            methods=["POST"],
            responses=OPENAI_REFUSALS,
        )
        hung = {503: {"description": "the model has not answered its batch in time"}}
        api.add_api_route("/health/live", self.live, methods=["GET"], responses=hung)
        api.add_api_route(
            "/health/ready", self.ready, methods=["GET"], responses={503: {"description": "loading or draining"}}
        )
        api.add_api_route("/metrics", self.prometheus, methods=["GET"])
        return api

    @asynccontextmanager
    async def lifespan(self, api: FastAPI) -> AsyncIterator[None]:
        """The batcher runs while the server does; what was admitted is answered before the process ends."""
        self.batcher.start()
        if self.completions is not None:
            self.completions.loop.start()
        api.state.ready = True
        yield
        api.state.ready = False
        await self.batcher.close()
        if self.completions is not None:
            await self.completions.loop.close()
        self.decoder.close()

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.inference.observe(seconds)

    async def _http_error(self, request: Request, error: StarletteHTTPException) -> Response:
        if request.url.path in OPENAI_PATHS:
            return openai_error(error.status_code, str(error.detail), None, None, getattr(error, "headers", None))
        if error.status_code == 400:  # a body FastAPI could not parse (a broken multipart upload, say): malformed
            return self.metrics.refuse("invalid", 422, f"the body cannot be read: {error.detail}")
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    async def _invalid_request(self, request: Request, error: RequestValidationError) -> Response:
        if request.url.path in OPENAI_PATHS:
            self.metrics.rejections.labels("invalid").inc()
            return validation_error(error.errors())
        problems = [f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()]
        return self.metrics.refuse("invalid", 422, "; ".join(problems))

    async def predict(self, request: Request) -> Response:
        """Outputs for a list of instances, batched with other requests'."""
        return await self.answer_predict(await request.body(), request.receive)

    async def answer_predict(self, body: bytes, receive: Receive, on_answer: OnAnswer | None = None) -> Response:
        """The answer to a `POST /v1/predict` body (status, `detail` or outputs, headers), whichever path it came by:
        FastAPI's route, or the `Gate`'s fast path, which skips FastAPI's routing (it costs more than the rest of a
        small model's request). `receive` is watched for the client going away while the request waits;
        `on_answer` is told the outputs of a request answered and gives fields and headers to add to its answer."""
        instances = await self._checked_instances(body)
        if isinstance(instances, Response):
            return instances
        return await self._answer(instances, receive, on_answer)

    async def _checked_instances(self, body: bytes) -> list[np.ndarray] | Response:
        """`body`'s instances, checked, or the refusal: 422 for what the model cannot take, 503 for what the batcher
        would not admit now."""
        decoded: list[np.ndarray] | int | None = None
        try:
            if len(body) > INLINE_BODY_BYTES:  # parsed and checked at once, away from the event loop
                decoded = await self.decoder.decode(body)
                rows = decoded if isinstance(decoded, int) else len(decoded)
            else:
                inputs = read_inputs(body)
                rows = len(inputs)
            if rows > self.settings.max_batch_size:
                raise InvalidInput(
                    f"inputs: {rows} instances, more than --max-batch-size {self.settings.max_batch_size}"
                )
            # admission is asked before a small body's inputs are checked: under overload, most are refused
            refused = self._admitted(rows) if self.cache is None else None
            if refused is not None:
                return refused
            instances = self.model.decode(inputs) if decoded is None else decoded
        except InvalidInput as error:
            return self.metrics.refuse("invalid", 422, str(error))
        assert not isinstance(instances, int)  # a count only when more than --max-batch-size
        return instances

    def _admitted(self, rows: int) -> Response | None:
        """None if the batcher would take `rows` more now, else the refusal."""
        try:
            self.batcher.admit(rows)
        except (QueueFull, Closed, ModelHung) as error:
            return self._refusal(error)
        return None

    def _refusal(self, error: QueueFull | Closed | ModelHung) -> Response:
        reasons = {QueueFull: "queue_full", Closed: "shutting_down", ModelHung: "model_hung"}
        return self.metrics.refuse(reasons[type(error)], 503, str(error), {"Retry-After": "1"})

    async def predict_image(
        self, request: Request, file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, ...)")]
    ) -> Response:
        """The output for one uploaded image, preprocessed as the training images were."""
        return await self.answer_image(request, file)

    async def answer_image(self, request: Request, file: UploadFile, on_answer: OnAnswer | None = None) -> Response:
        """`predict_image`'s answer (`on_answer` as for `answer_predict`)."""
        data = await file.read()
        try:  # decoding takes a while for large images: off the event loop
            instance = await run_in_threadpool(self.model.decode_image, data)
        except InvalidInput as error:
            return self.metrics.refuse("invalid", 422, str(error))
        return await self._answer([instance], request.receive, on_answer)

    def _answered(self, outputs: list[Any], on_answer: OnAnswer | None) -> Response:
        fields, headers = on_answer(outputs) if on_answer is not None else ({}, {})
        headers = {**(self.answer_headers or {}), **headers}
        return _Json({"outputs": outputs, **self.identity, **fields}, headers=headers or None)

    async def _answer(self, instances: list[np.ndarray], receive: Receive, on_answer: OnAnswer | None) -> Response:
        """The response for checked instances: from the cache where it has them, else through the batcher."""
        outputs = await self.outputs_for(instances, receive)
        return outputs if isinstance(outputs, Response) else self._answered(outputs, on_answer)

    async def outputs_for(self, instances: list[np.ndarray], receive: Receive) -> list[Any] | Response:
        """The outputs for checked instances (from the cache where it has them, else through the batcher), or the
        response that says why there are none."""
        if self.cache is None:
            return await self._batched(instances, receive)
        keys = [self.cache.key(instance) for instance in instances]
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, output in enumerate(found) if output is None]
        self.metrics.cache.labels("hit").inc(len(instances) - len(missing))
        self.metrics.cache.labels("miss").inc(len(missing))
        if missing:
            computed = await self._batched([instances[i] for i in missing], receive)
            if isinstance(computed, Response):
                return computed
            for i, output in zip(missing, computed, strict=True):
                found[i] = output
                self.cache.put(keys[i], output)
        return found

    async def _batched(self, instances: list[np.ndarray], receive: Receive) -> list[Any] | Response:
        """The outputs for `instances` from the batcher, or the response that says why there are none."""
        try:
            ticket = self.batcher.enqueue(instances)
        except (QueueFull, Closed, ModelHung) as error:
            return self._refusal(error)
        try:
            result = await _unless_disconnected(receive, ticket, self.batcher)
        except DeadlineExceeded as error:
            return self.metrics.refuse("deadline", 504, str(error))
        except ModelHung as error:
            return self._refusal(error)
        except WorkerDied as error:
            return self.metrics.refuse("model_error", 503, str(error), {"Retry-After": "1"})
        except Exception as error:  # noqa: BLE001 - the model failed on the batch: said, never a crash
            failure = str(error) if isinstance(error, ModelFailed) else f"{type(error).__name__}: {error}"
            return self.metrics.refuse("model_error", 500, f"the model failed on this batch: {failure}")
        if result is None:
            return _error(499, "the client went away")  # never sent: counted as 499
        self.metrics.queue_wait.observe(result.queue_wait_s)
        return result.outputs

    async def models(self) -> dict[str, Any]:
        """The models served, in OpenAI's list shape: each one's name as `id`, with its version, task and input
        schema (and, for a language model on text, the completions endpoint)."""
        card = self.model.card
        entry = {"id": card.name, "object": "model", "created": card.created, "owned_by": "scaleforge"}
        entry |= {"version": card.version, "digest": card.version, "task": card.task, "input_schema": card.input_schema}
        if self.completions is not None:
            entry["completions"] = {"endpoint": "/v1/completions", "context": self.completions.context}
        return {"object": "list", "data": [entry]}

    async def _no_completions(self, request: Request) -> Response:
        """The completions endpoints of a model that cannot serve them."""
        info, card = self.model.info, self.model.card
        if info.task != "language_modeling":
            why = f"{card.name} is a {info.task} model, not a language model: it answers /v1/predict"
        elif self.model.tokenizer is None:
            why = f"{card.name} was trained on token ids without a tokenizer: it answers /v1/predict with token ids"
        else:
            why = f"{card.name} is served with --backend {self.settings.backend}: completions need --backend torch"
        return self.metrics.refuse("invalid", 400, why, openai=True)

    def hung(self) -> str | None:
        """Why the model is taken for hung (a batch, or a language model's decoding step, has outlived
        --batch-timeout-s), or None."""
        if self.batcher.hung:
            return self.batcher.hung_message()
        if self.completions is not None and self.completions.loop.hung:
            return self.completions.loop.hung_message()
        return None

    async def live(self) -> Response:
        """200 while the process answers and its model answers its batches (and a language model its decoding
        steps) within --batch-timeout-s; 503 while a batch or a step on the model's thread has outlived it (requests
        get 503 too, until the model answers)."""
        hung = self.hung()
        return _Json({"status": "live"}) if hung is None else _error(503, hung)

    async def ready(self) -> Response:
        """200 once the model is loaded and serving; 503 before, and while draining for shutdown."""
        return readiness(self.api.state)

    async def prometheus(self) -> PlainTextResponse:
        """Prometheus text exposition."""
        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def readiness(state: Any) -> Response:
    """`/health/ready`'s answer for an application's `state`: 200 once serving, 503 before and while draining."""
    if state.ready and not state.draining:
        return _Json({"status": "ready"})
    return _error(503, "draining" if state.draining else "loading")


def create_app(
    model: ServedModel,
    settings: ServeSettings,
    run_batch: Callable[[list[np.ndarray]], list[dict[str, Any]]] | None = None,
    load_seconds: float | None = None,
    timed_batches: Sequence[tuple[int, float]] = (),
    *,
    fast_path: bool = True,
) -> Gate:
    """The application serving `model` (already loaded) with `settings`: FastAPI behind the `Gate` (see
    `ServingApp`). Batches run in `run_batch` (a `ModelPool` of model processes, say; `model.answer` on the model's
    thread by default); `fast_path=False` sends every request through FastAPI's routes."""
    return ServingApp(model, settings, run_batch, load_seconds, timed_batches).gate(fast_path=fast_path)


async def _unless_disconnected(receive: Receive, ticket: Ticket, batcher: Batcher) -> Result | None:
    """`ticket`'s result, or None if the client went away first (its request is then dropped if still queued).
    The disconnect is watched only once the request has waited `WATCH_AFTER_S`: most are answered sooner, and
    a watch for each (a task reading the connection) costs more than the rest of a small model's request."""
    loop = asyncio.get_running_loop()
    watch: asyncio.Task[None] | None = None

    def start_watching() -> None:
        nonlocal watch
        watch = loop.create_task(_disconnected(receive))
        watch.add_done_callback(lambda done: ticket.future.cancel() if _disconnect_seen(done) else None)

    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        return await batcher.wait(ticket)
    except asyncio.CancelledError:
        if watch is not None and _disconnect_seen(watch):
            return None  # the client's disconnect cancelled the ticket
        raise
    finally:
        timer.cancel()
        if watch is not None:
            watch.cancel()


def _disconnect_seen(watch: asyncio.Task[None]) -> bool:
    return watch.done() and not watch.cancelled() and watch.exception() is None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _endpoint(path: str) -> str:
    """The `endpoint` label of a request to `path`: the path of a known endpoint, the template of a repository
    model's route, else "other" (the label's values stay few, whatever paths are asked for)."""
    if path in ENDPOINTS:
        return path
    found = MODEL_ROUTE.match(path)
    if found is None:
        return "other"
    return "/v1/models/{name}" + ("/versions/{version}" if found.group(1) else "") + "/" + found.group(2)


_READ = frozenset({b"content-type", b"content-length", b"x-api-key", b"authorization"})
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def _sent(response: Response, scope: Scope, receive: Receive, send: Send) -> int:
    """Send `response`; its status."""
    await response(scope, receive, send)
    return response.status_code


class Gate:
    """ASGI middleware: metrics per request, the API key, and the body-size limits, before the application; a JSON
    `POST /v1/predict` goes straight to `predict_fast` (when given), which answers it as the route does."""

    def __init__(
        self,
        app: FastAPI,
        metrics: ServerMetrics,
        *,
        body_limit: BodyLimit,
        image_body_limit: BodyLimit,
        api_key: str | None,
        predict_fast: Callable[[bytes, Receive], Awaitable[Response]] | None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit  # every endpoint's but the image upload's
        self.image_body_limit = image_body_limit
        self.api_key = api_key
        self.predict_fast = predict_fast
        self.state = app.state
        self._counts: dict[tuple[str, int], Any] = {}  # (endpoint, status) -> its counter
        self.in_flight = 0  # requests being answered (a plain count: they are all on the event loop)
        metrics.in_flight.set_function(lambda: self.in_flight)
        self._latencies: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = _endpoint(path)
        status = 499  # no answer started: the client went away (a crash would have sent a 500)
        started = time.perf_counter()
        self.in_flight += 1
        try:
            status = await self._admit(scope, receive, send, path)
        finally:
            self.in_flight -= 1
            counter = self._counts.get((endpoint, status))
            if counter is None:
                counter = self._counts[endpoint, status] = self.metrics.requests.labels(endpoint, str(status))
            counter.inc()
            latency = self._latencies.get(endpoint)
            if latency is None:
                latency = self._latencies[endpoint] = self.metrics.latency.labels(endpoint)
            latency.observe(time.perf_counter() - started)

    async def _admit(self, scope: Scope, receive: Receive, send: Send, path: str) -> int:
        """Answer the request; the status sent (499: none, the client went away)."""
        headers = {  # the few it reads (ASGI gives names in lower case)
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"] if name in _READ
        }
        openai = path in OPENAI_PATHS or (path.endswith("/completions") and path.startswith("/v1/models/"))
        if self.api_key is not None and not path.startswith("/health/") and not self._authorized(headers):
            refused = self.metrics.refuse("unauthorized", 401, "a valid API key is required", _CHALLENGE, openai=openai)
            return await _sent(refused, scope, receive, send)
        limit = self.image_body_limit if path.endswith("/predict/image") else self.body_limit
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit.max_bytes:
            return await _sent(self._too_large(limit, openai), scope, receive, send)
        chunks: list[bytes] = []
        size, more = 0, scope["method"] in ("POST", "PUT", "PATCH")
        while more:  # read here, up to the limit, then replayed to the application
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit.max_bytes:
                return await _sent(self._too_large(limit, openai), scope, receive, send)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if (
            self.predict_fast is not None
            and path == "/v1/predict"
            and scope["method"] == "POST"
            and headers.get("content-type", "").partition(";")[0].strip().lower() == "application/json"
        ):
            return await _sent(await self.predict_fast(body, receive), scope, receive, send)
        return await self._forward(scope, receive, send, body)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> int:
        """Let the application answer, `body` (read already) replayed to it; the status it sent (499: none)."""
        replayed = False
        status = 499

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only a disconnect comes

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, replay, counting_send)
        return status

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())  # type: ignore[union-attr]

    def _too_large(self, limit: BodyLimit, openai: bool) -> Response:
        detail = f"the body is larger than this endpoint's limit of {_size(limit.max_bytes)} ({limit.source})"
        return self.metrics.refuse("too_large", 413, detail, {"Connection": "close"}, openai=openai)
