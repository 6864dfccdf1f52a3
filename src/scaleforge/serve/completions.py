"""OpenAI's completions API over a language model: `POST /v1/completions`, decoded by continuous batching.

`EngineLoop` steps a `generation.engine.Engine` on the model's own thread, off the event loop, and hands each
sequence's outputs to its request through an asyncio queue (`Outbox`: one `loop.call_soon_threadsafe` a step).
`Completions` checks a request whole before any of its prompts joins the engine (a bad one gets its own 4xx in
OpenAI's error shape and never touches the running sequences), then answers with one JSON body or with server-sent
events, one event per piece of text (never a split UTF-8 character), then `data: [DONE]`. A client that goes away
cancels its sequences: they leave the batch at the engine's next step.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request

from scaleforge.errors import UsageError
from scaleforge.generation.engine import Engine, EngineRequest, Output
from scaleforge.generation.sampling import SamplingOptions
from scaleforge.serve.batching import Closed, ModelHung, QueueFull

OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_TOKENS_WITHOUT_CONTEXT = 4096  # max_tokens' bound for a model without a context limit (an lstm)
TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# fields of OpenAI's API that this server does not implement, and the value each takes when unused
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}


class OpenAIError(Exception):
    """A request refused in OpenAI's error shape: `status`, a message, the `param` at fault and a `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> Response:
        return openai_error(self.status, self.message, self.param, self.code, self.headers)


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    """An error answered as OpenAI's API answers it: `{"error": {"message", "type", "param", "code"}}`."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(errors: Sequence[Any]) -> Response:
    """FastAPI's or pydantic's schema errors of a completions body as OpenAI's 422: every problem, the first's field."""
    problems = []
    for error in errors:
        where = ".".join(str(part) for part in error["loc"] if part != "body")
        problems.append(f"{where or 'body'}: {error['msg']}")
    first = [str(part) for part in errors[0]["loc"] if part != "body"] if errors else []
    return openai_error(422, "; ".join(problems), first[0] if first else None, "invalid_type")


class CompletionRequest(BaseModel):
    """`POST /v1/completions`: OpenAI's fields (those in `UNSUPPORTED` only at their unused values)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    user: str | None = None  # accepted and ignored
    n: int | None = None
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class GenerationMetrics:
    """A language model's generation figures, in the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.time_to_first_token = Histogram(
            "scaleforge_time_to_first_token_seconds",
            "from a completion's arrival to its first token",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "scaleforge_time_per_output_token_seconds",
            "between a sequence's successive tokens",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("scaleforge_generated_tokens", "tokens generated (rate: tokens per second)", registry=r)
        self.running = Gauge("scaleforge_running_sequences", "sequences being decoded", registry=r)
        self.waiting = Gauge("scaleforge_waiting_sequences", "sequences waiting for a slot", registry=r)
        self.occupancy = Gauge("scaleforge_batch_occupancy_ratio", "running sequences / slots", registry=r)

    def watch(self, loop: EngineLoop) -> None:
        """Read the gauges from `loop` when scraped."""
        slots = loop.engine.model.slots
        self.running.set_function(lambda: len(loop.engine.running))
        self.waiting.set_function(lambda: loop.waiting)
        self.occupancy.set_function(lambda: len(loop.engine.running) / slots)


class Outbox:
    """What a step gave the requests, gathered on the engine's thread and handed to their event loops in one call
    per loop when the step ends: one wake-up of a loop a step, not one a token (at 16 sequences, 16 wake-ups a
    step, each a write to the loop's self-pipe and a callback, took the loop's time from the requests' writes)."""

    def __init__(self) -> None:
        self._items: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any], Any]] = []

    def put(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], item: Any) -> None:
        """Deliver `item` to `queue`, on `loop`, at the next `flush` (on the engine's thread)."""
        self._items.append((loop, queue, item))

    def flush(self) -> None:
        """Hand what was put since the last flush to the event loops."""
        items, self._items = self._items, []
        loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for loop, queue, item in items:
            loops.setdefault(loop, []).append((queue, item))
        for loop, deliveries in loops.items():
            loop.call_soon_threadsafe(_deliver, deliveries)


def _deliver(deliveries: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)


class EngineLoop:
    """`engine` stepped on a thread of its own while it has sequences, asleep otherwise. At most `max_waiting`
    sequences wait for a slot (`QueueFull` beyond); one still waiting `timeout_s` after it came is refused
    (`expired`). A step running longer than `hung_after_s` (0: never) is taken for hung: new sequences are refused
    (`ModelHung`) until it ends, since a model's thread cannot be stopped. `close` admits nothing more and returns
    once every admitted sequence has ended."""

    def __init__(self, engine: Engine, *, max_waiting: int, timeout_s: float, hung_after_s: float = 0.0) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.hung_after_s = hung_after_s
        self._step_since: float | None = None  # when the running step started
        self._inbox: collections.deque[EngineRequest] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.outbox = Outbox()  # what each step gave the requests, handed over when it ends

    @property
    def waiting(self) -> int:
        """Sequences not yet in a slot."""
        return len(self._inbox) + len(self.engine.waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scaleforge-engine", daemon=True)
        self._thread.start()

    @property
    def hung(self) -> bool:
        """Whether the running step has outlived `hung_after_s`."""
        since = self._step_since
        return bool(self.hung_after_s) and since is not None and time.perf_counter() - since > self.hung_after_s

    def hung_message(self) -> str:
        return (
            f"the model has not finished its decoding step within {self.hung_after_s:g} s (--batch-timeout-s); "
            "completions are refused until it does"
        )

    def admit(self, count: int) -> None:
        """Refuse `count` more sequences now if they would not be taken (`Closed`, `ModelHung`, `QueueFull`)."""
        if self._closing:
            raise Closed("the server is shutting down")
        if self.hung:
            raise ModelHung(self.hung_message())
        if self.waiting + count > self.max_waiting:
            raise QueueFull(f"{self.waiting} sequences are waiting already (--max-queue {self.max_waiting})")

    def submit(
        self, prompt: Sequence[int], options: SamplingOptions, emit: Callable[[Output | Exception], None]
    ) -> EngineRequest:
        """Queue one sequence for the engine; `emit` is called on the engine's thread with each `Output` (or with
        the error the model raised)."""
        request = EngineRequest(prompt, options, emit, deadline=time.perf_counter() + self.timeout_s)
        with self._wake:
            self._inbox.append(request)
            self._wake.notify()
        return request

    async def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and self.engine.idle and not self._closing:
                    self._wake.wait()
                if self._closing and not self._inbox and self.engine.idle:
                    return
                while self._inbox:
                    self.engine.add(self._inbox.popleft())
            self._step_since = time.perf_counter()
            try:
                self.engine.step()
            except Exception as error:  # noqa: BLE001 - the model failed: its sequences are told, the loop goes on
                for request in self.engine.abandon():
                    request.emit(error)
            finally:
                self._step_since = None
                self.outbox.flush()


class Choices:
    """The outputs of one request's sequences (choice `index`, `Output` or error), in the order they come, handed
    from the engine's thread to the request's event loop; token timings for the metrics on the way."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: GenerationMetrics, outbox: Outbox) -> None:
        self.queue: asyncio.Queue[tuple[int, Output | Exception]] = asyncio.Queue()
        self._loop, self._metrics, self._outbox = loop, metrics, outbox
        self._arrived = time.perf_counter()
        self.requests: list[EngineRequest] = []

    def emitter(self, index: int) -> Callable[[Output | Exception], None]:
        last: float | None = None

        def emit(item: Output | Exception) -> None:  # on the engine's thread
            nonlocal last
            if isinstance(item, Output) and item.tokens:
                now = time.perf_counter()
                metric = self._metrics.time_to_first_token if last is None else self._metrics.time_per_output_token
                metric.observe(now - (self._arrived if last is None else last))
                self._metrics.tokens.inc(item.tokens)
                last = now
            self._outbox.put(self._loop, self.queue, (index, item))

        return emit

    async def next_unless(self, gone: asyncio.Future[None]) -> tuple[int, Output | Exception] | None:
        """The next output, or None if `gone` (the client's disconnect) comes first."""
        got = asyncio.ensure_future(self.queue.get())
        await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
        if got.done():
            return got.result()
        got.cancel()
        return None

    def cancel(self) -> None:
        """Take the sequences still running or waiting out at the engine's next step."""
        for request in self.requests:
            request.cancelled = True


class Completions:
    """The completions endpoints of a served language model: `name` is the only model it answers for; prompts are
    tokenized by `encode`; `context` bounds prompts (None: no limit)."""

    def __init__(
        self,
        loop: EngineLoop,
        metrics: GenerationMetrics,
        *,
        name: str,
        encode: Callable[[str], Sequence[int]],
        context: int | None,
        max_prompts: int,
        refused: Callable[[str], None],
    ) -> None:
        self.loop, self.metrics = loop, metrics
        self.name, self.encode, self.context, self.max_prompts = name, encode, context, max_prompts
        self.refused = refused  # counts a refusal by reason
        metrics.watch(loop)

    async def complete(self, request: Request) -> Response:
        """`POST /v1/completions`: the continuation of each prompt, as JSON or as server-sent events."""
        try:
            body = CompletionRequest.model_validate(orjson.loads(await request.body()))
        except orjson.JSONDecodeError as error:
            self.refused("invalid")
            return openai_error(400, f"the body is not valid JSON ({error})", None, "invalid_json")
        except ValidationError as error:
            self.refused("invalid")
            return validation_error(error.errors())
        try:
            prompts, options = self.checked(body)
            self.loop.admit(len(prompts))
        except OpenAIError as error:
            self.refused("invalid")
            return error.response()
        except (QueueFull, Closed, ModelHung) as error:
            reason = {QueueFull: "queue_full", Closed: "shutting_down", ModelHung: "model_hung"}[type(error)]
            self.refused(reason)
            return openai_error(503, str(error), None, reason, {"Retry-After": "1"})
        choices = Choices(asyncio.get_running_loop(), self.metrics, self.loop.outbox)
        for index, prompt in enumerate(prompts):
            choices.requests.append(self.loop.submit(prompt, options, choices.emitter(index)))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = self.name
        usage = {"prompt_tokens": sum(map(len, prompts))}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return await self._streamed(choices, len(prompts), head, usage if include_usage else None, request)
        return await self._whole(choices, len(prompts), head, usage, request)

    def checked(self, body: CompletionRequest) -> tuple[list[list[int]], SamplingOptions]:
        """The prompts' token ids and the sampling options of a schema-valid body; `OpenAIError` says what is wrong."""
        if body.model != self.name:
            raise OpenAIError(
                404,
                f"The model '{body.model}' does not exist: this server serves '{self.name}'",
                "model",
                "model_not_found",
            )
        unknown = sorted(body.model_extra or {})
        if unknown:
            raise OpenAIError(
                400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter"
            )
        for name, unused in UNSUPPORTED.items():
            value = getattr(body, name)
            if value not in unused:
                hint = "leave it out" if unused == (None,) else f"leave it out or send {json.dumps(unused[-1])}"
                raise OpenAIError(
                    400, f"{name}={value!r} is not supported by this server: {hint}", name, "unsupported_parameter"
                )
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(texts) <= self.max_prompts:
            raise OpenAIError(
                400,
                f"prompt: give 1 to {self.max_prompts} prompts (--max-batch-size), not {len(texts)}",
                "prompt",
                "invalid_value",
            )
        prompts = [[int(token) for token in self.encode(text)] for text in texts]
        for index, tokens in enumerate(prompts):
            where = "prompt" if isinstance(body.prompt, str) else f"prompt[{index}]"
            if not tokens:
                raise OpenAIError(400, f"{where} is empty: it has no tokens to continue", "prompt", "invalid_value")
            if self.context is not None and len(tokens) > self.context:
                raise OpenAIError(
                    400,
                    f"This model's maximum context length is {self.context} tokens, however {where} has "
                    f"{len(tokens)} tokens. Please reduce the length of the prompt.",
                    "prompt",
                    "context_length_exceeded",
                )
        most = self.context if self.context is not None else MAX_TOKENS_WITHOUT_CONTEXT
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if not 1 <= max_tokens <= most:
            raise OpenAIError(
                400,
                f"max_tokens must be 1 to {most} (the model's context), got {max_tokens}",
                "max_tokens",
                "invalid_value",
            )
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:
            raise OpenAIError(400, f"temperature must be 0 to 2, got {temperature}", "temperature", "invalid_value")
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 < top_p <= 1:
            raise OpenAIError(400, f"top_p must be above 0 and at most 1, got {top_p}", "top_p", "invalid_value")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS or not all(stop):
            raise OpenAIError(
                400, f"stop: give up to {MAX_STOP_STRINGS} non-empty strings, got {stop!r}", "stop", "invalid_value"
            )
        if body.seed is not None and not 0 <= body.seed < 2**63:
            raise OpenAIError(400, f"seed must be 0 to 2**63 - 1, got {body.seed}", "seed", "invalid_value")
        try:
            options = SamplingOptions(
                max_new_tokens=max_tokens,
                temperature=temperature,
                top_p=None if top_p == 1 else top_p,
                seed=body.seed,
                stop=tuple(stop),
                context="stop",
            )
        except UsageError as error:  # the checks above leave none: kept for the options' own rules
            raise OpenAIError(400, str(error), None, "invalid_value") from None
        return prompts, options

    async def _whole(
        self, choices: Choices, count: int, head: dict[str, Any], usage: dict[str, int], request: Request
    ) -> Response:
        texts, finishes, tokens = [""] * count, [""] * count, 0
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            while not all(finishes):
                got = await choices.next_unless(gone)
                if got is None:
                    return Response(status_code=499)  # never sent: the client went away
                index, item = got
                failed = _failure(item)
                if failed is not None:
                    return failed
                assert isinstance(item, Output)
                texts[index] += item.text
                tokens += item.tokens
                if item.finish_reason is not None:
                    finishes[index] = _openai_finish(item.finish_reason)
        finally:
            gone.cancel()
            choices.cancel()
        body = {
            **head,
            "choices": [
                {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
                for index, (text, finish) in enumerate(zip(texts, finishes, strict=True))
            ],
            "usage": {**usage, "completion_tokens": tokens, "total_tokens": usage["prompt_tokens"] + tokens},
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def _streamed(
        self, choices: Choices, count: int, head: dict[str, Any], usage: dict[str, int] | None, request: Request
    ) -> Response:
        # the first output decides the status: a sequence refused before it ran is an error, not an empty stream
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            got = await choices.next_unless(gone)
        finally:
            gone.cancel()  # from here on, the streaming response watches the connection
        failed = Response(status_code=499) if got is None else _failure(got[1])
        if failed is not None:
            choices.cancel()
            return failed
        assert got is not None
        first = got

        def event(payload: Any) -> bytes:
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            item, done, tokens = first, 0, 0
            try:
                while True:
                    index, output = item
                    if isinstance(output, Output):
                        tokens += output.tokens
                        finish = None if output.finish_reason is None else _openai_finish(output.finish_reason)
                        if output.text or finish is not None:
                            choice = {"text": output.text, "index": index, "logprobs": None, "finish_reason": finish}
                            yield event({**head, "choices": [choice]})
                        done += finish is not None
                    else:  # refused or failed once the stream had started: said in the stream, which ends
                        yield event({"error": _error_body(output)})
                        break
                    if done == count:
                        break
                    item = await choices.queue.get()
                if usage is not None:
                    total = {**usage, "completion_tokens": tokens, "total_tokens": usage["prompt_tokens"] + tokens}
                    yield event({**head, "choices": [], "usage": total})
                yield b"data: [DONE]\n\n"
            finally:  # ended, or the client went away (the response is cancelled): its sequences leave
                choices.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def chat(self, request: Request) -> Response:
        """`POST /v1/chat/completions`: refused, the model was trained on plain text."""
        self.refused("invalid")
        return openai_error(
            400,
            "this model has no chat template: it continues plain text, through /v1/completions",
            None,
            "unsupported_endpoint",
        )


def _openai_finish(reason: str) -> str:
    """OpenAI's `finish_reason`: `stop` for a stop string, `length` for max_tokens or the model's context."""
    return "stop" if reason == "stop" else "length"


def _error_body(item: Output | Exception) -> dict[str, Any]:
    if isinstance(item, Output):  # expired
        return {
            "message": "waited for a slot longer than --timeout-ms",
            "type": "server_error",
            "param": None,
            "code": "deadline",
        }
    return {
        "message": f"the model failed: {type(item).__name__}: {item}",
        "type": "server_error",
        "param": None,
        "code": "model_error",
    }


def _failure(item: Output | Exception) -> Response | None:
    """The error response for a sequence that was refused (its deadline passed) or whose model failed, else None."""
    if isinstance(item, Output) and item.finish_reason != "expired":
        return None
    body = _error_body(item)
    return JSONResponse({"error": body}, status_code=504 if isinstance(item, Output) else 500)


async def _disconnected(receive: Callable[[], Any]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
