"""`scaleforge serve --repository DIR`: every model of a model repository (`serve.repository`) in one server.

Each version served is a `ServingApp` of its own, with its own batcher, queue bounds, result cache, completions
engine and metrics, and the model's `serving.yaml` batching over the server's options. A version is loaded on a
thread beside the event loop and warmed (`ServedModel.prepare`) before it takes traffic; one that fails to load
is `failed`, with its error in `GET /v1/models`, and the others serve on. A version's states:

- `pending`: its folder is not complete yet (still being copied, or its files do not match its manifest);
- `loading`, then `ready` (taking traffic) or `failed`;
- `draining`: no longer served (its folder was removed, or the policy dropped it): it takes no new request,
  answers those it has, then is unloaded.

Routes: `POST /v1/models/{name}/predict` (a version drawn by the model's traffic weights, or kept by its sticky
header), `POST /v1/models/{name}/versions/{version}/predict` (pinned), the same for `/predict/image` and
`/completions`; `POST /v1/completions` picks the model by the body's `model`; `POST /v1/predict` and
`/v1/predict/image` serve the default model (`--default-model`, else the first by name). Every answer names the
model, the repository version (`model_version`) and the weights' digest (`digest`), the version in the
`X-Model-Version` header too. `GET /v1/models` lists every model with its versions, their states and weights.

The repository is scanned again every `--poll-s` seconds and on `POST /v1/admin/reload` (behind the API key;
403 when the server has none): versions that appear are loaded, removed ones drained, and a changed
`serving.yaml` takes effect (a bad one keeps the model's last good settings, its problem shown in `/v1/models`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import torch
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaleforge.errors import UsageError
from scaleforge.runs import Trust
from scaleforge.serve import v2
from scaleforge.serve.app import (
    BodyLimit,
    Gate,
    ServerMetrics,
    ServingApp,
    _error,
    _Json,
    readiness,
)
from scaleforge.serve.completions import openai_error
from scaleforge.serve.feedback import Feedback, FeedbackError
from scaleforge.serve.model import MAX_IMAGE_BYTES, ServedModel
from scaleforge.serve.repository import (
    ManifestChecks,
    ModelFolder,
    ServingConfig,
    choose_version,
    file_state,
    scan,
    weights_of,
)
from scaleforge.serve.settings import ServeSettings
from scaleforge.serve.worker import ModelPool

VersionState = Literal["pending", "loading", "ready", "failed", "draining"]
DEFAULT_BODY_MB = 64.0  # every endpoint's body limit without --max-body-mb: the models differ in their inputs
DRAIN_POLL_S = 0.01


@dataclass(eq=False)
class Hosted:
    """One version of a model as this server holds it."""

    model: str
    version: int
    path: Path
    state: VersionState
    error: str | None = None  # failed: why; pending: what is missing
    app: ServingApp | None = None  # ready or draining
    digest: str | None = None
    in_flight: int = 0  # requests routed to it and not yet answered
    files: Any = None  # the state of its final/ files when it was loaded (or failed): loaded again if they change
    settings: ServeSettings | None = None  # what it was loaded with: loaded again if its batching changes
    replacement: Hosted | None = None  # a new copy loading to take its place (its files or batching changed)
    _lifespan: contextlib.AsyncExitStack | None = field(default=None, repr=False)


class Hosting:
    """A model repository at `root`, served with `settings` on `device` (see the module)."""

    def __init__(
        self,
        root: Path,
        settings: ServeSettings,
        device: torch.device,
        trust: Trust,
        *,
        default_model: str | None = None,
        poll_s: float = 2.0,
    ) -> None:
        self.root, self.settings, self.device, self.trust = root, settings, device, trust
        self.default_model, self.poll_s = default_model, poll_s
        self.metrics = ServerMetrics(settings.max_batch_size, device)
        self.metrics.registry.register(_VersionMetrics(self))
        self.metrics.queue_depth.set_function(self._queued)  # every version's queue: one figure to scale on
        self.models: dict[str, ModelFolder] = {}  # as last scanned
        self.serving: dict[str, ServingConfig] = {}  # each model's last good serving.yaml
        self.hosted: dict[tuple[str, int], Hosted] = {}
        self._wanted: set[tuple[str, int]] = set()  # the versions the last scan's policies serve
        self._checks = ManifestChecks()
        self._refreshing = asyncio.Lock()
        self._load_lock = threading.Lock()
        self._loads: set[asyncio.Task[None]] = set()
        self._shadows: set[asyncio.Task[Any]] = set()  # copies of requests a shadow version is answering
        self.feedback = Feedback()
        if settings.feedback_log is not None:
            try:
                self.feedback.log = Path(settings.feedback_log).open("a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            except OSError as error:
                raise UsageError(
                    f"--feedback-log {settings.feedback_log}: cannot append to it ({error.strerror})"
                ) from None
        self.api = self._build_api()

    def gate(self) -> Gate:
        """The application behind its `Gate`: the API key, body limits and request metrics."""
        megabytes = self.settings.max_body_mb or DEFAULT_BODY_MB
        source = f"--max-body-mb {megabytes:g}" if self.settings.max_body_mb else f"{megabytes:g} MiB by default"
        limit = BodyLimit(int(megabytes * 2**20), f"{source} for a repository's models")
        image = BodyLimit(max(limit.max_bytes, MAX_IMAGE_BYTES), limit.source)
        return Gate(
            self.api,
            self.metrics,
            body_limit=limit,
            image_body_limit=image,
            api_key=self.settings.api_key,
            predict_fast=None,
        )

    # ---- the repository ------------------------------------------------------------------------------------

    async def refresh(self) -> dict[str, Any]:
        """Scan the repository and act on what changed: load the versions to serve (new ones, ready ones whose
        files or batching changed, failed ones whose files changed), retire those no longer served; what it
        started, as `POST /v1/admin/reload` answers.

        The policy chooses among complete versions (and those loaded already, whose folders may be rewritten in
        place), so a newer folder still being copied changes nothing; the pending folders it would choose are
        listed as pending. A version the policy drops keeps serving until a version of its model that the policy
        keeps is ready (`_retire`), so that a model is never without a ready version because its next one is still
        loading, or failed."""
        async with self._refreshing:
            models = await asyncio.to_thread(scan, self.root, self._checks)
            started: list[str] = []
            for name, folder in models.items():
                if folder.serving is not None:
                    self.serving[name] = folder.serving
            self.models = models
            self._wanted = set()
            for name, folder in models.items():
                serving = self.serving.get(name)
                # a version loaded already stays a candidate while its folder is rewritten in place
                complete = [
                    version
                    for version, found in folder.versions.items()
                    if found.final is not None or self._state(name, version) in ("ready", "loading")
                ]
                if serving is None and folder.problem is not None:  # never read well: serve nothing yet
                    continue
                serving = serving or ServingConfig()
                for version in serving.served(list(folder.versions)):  # chosen but not complete: shown pending
                    found = folder.versions[version]
                    hosted = self.hosted.get((name, version))
                    if found.final is None and (hosted is None or hosted.state in ("pending", "failed")):
                        self.hosted[name, version] = Hosted(name, version, found.path, "pending", found.pending)
                        self._wanted.add((name, version))
                for version in serving.served(complete):
                    self._wanted.add((name, version))
                    final = folder.versions[version].final
                    if final is not None and self._needs_load(name, version, final):
                        started.append(f"{name}/{version}")
            draining = self._retire()
            return {"loading": started, "draining": draining}

    def _needs_load(self, name: str, version: int, final: Path) -> bool:
        """Start loading `name`/`version` from `final` if it needs it: whether it was started."""
        hosted = self.hosted.get((name, version))
        files, settings = file_state(final), self._settings_of(name)
        if hosted is not None and hosted.state in ("loading", "ready") and hosted.replacement is not None:
            return False  # a new copy is loading already
        if (
            hosted is None
            or hosted.state in ("pending", "draining")
            or (hosted.state == "failed" and hosted.files != files)
        ):
            fresh = self.hosted[name, version] = Hosted(name, version, final, "loading", files=files, settings=settings)
            self._start(self._load(fresh, settings))
            return True
        if hosted.state == "ready" and (hosted.files != files or hosted.settings != settings):
            # new weights, or new batching, in place: a new copy loads beside, then takes over
            hosted.replacement = Hosted(name, version, final, "loading", files=files, settings=settings)
            self._start(self._load(hosted.replacement, settings, replacing=hosted))
            return True
        return False

    def _retire(self) -> list[str]:
        """Drain the versions no longer wanted, but a model's ready ones only once a wanted version of it is ready;
        what it started draining."""
        ready_wanted = {model for (model, version) in self._wanted if self._state(model, version) == "ready"}
        draining = []
        for key, hosted in list(self.hosted.items()):
            if key in self._wanted or hosted.state == "draining":
                continue
            if hosted.state == "ready" and hosted.model not in ready_wanted and hosted.model in self.models:
                continue  # the last ready version of its model: it serves until its successor is ready
            draining.append(f"{hosted.model}/{hosted.version}")
            self._start(self._unload(hosted))
        return draining

    def _state(self, model: str, version: int) -> str | None:
        hosted = self.hosted.get((model, version))
        return None if hosted is None else hosted.state

    def _loaded(
        self, final: Path, settings: ServeSettings
    ) -> tuple[ServedModel, list[tuple[int, float]], ModelPool | None]:
        """A version's model, loaded and warmed, on a thread, its timed batches, and with `workers` > 1 the pool of
        processes that holds its weights (a language model's stay here: its completions decode in this process).
        Loaded here one at a time (imports that two threads start at once see each other's modules half made; and
        warming times the model, which another load would disturb). torch's threads are the process's: each load
        sets them for its model, the last for all."""
        timing = settings.latency_target_ms > 0
        with self._load_lock:
            if settings.workers > 1:
                checked = ServedModel(final, self.device, weights=False, trust=self.trust)
                if not checked.generates_text:
                    # started from one of the event loop's worker threads, which live as long as the loop: a model
                    # process dies with the thread that started it (`ParentDeathGuard`)
                    pool = ModelPool(
                        settings.workers,
                        str(final),
                        str(self.device),
                        settings.threads,
                        settings.max_batch_size,
                        time_batches=timing,
                        hung_s=settings.batch_timeout_s,
                        trust=self.trust,
                    )
                    return checked, pool.timed_batches, pool
            model = ServedModel(final, self.device, trust=self.trust)
            _, timed = model.prepare(settings.threads, settings.max_batch_size, time_batches=timing)
            return model, timed, None

    def _settings_of(self, name: str) -> ServeSettings:
        serving = self.serving.get(name)
        return dataclasses.replace(self.settings, **serving.batching.given()) if serving else self.settings

    def _start(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def settled(self) -> None:
        """Return once every load and drain started so far has ended."""
        while self._loads:
            await asyncio.gather(*list(self._loads), return_exceptions=True)

    async def _load(self, hosted: Hosted, settings: ServeSettings, replacing: Hosted | None = None) -> None:
        """Load `hosted` on a thread, warm it, start its batcher; `failed` with the error if any step fails. A
        `replacing` version's new copy takes its place once ready (and it drains); if the copy fails, the version
        serves on, its error shown, until its files change again."""
        stack = contextlib.AsyncExitStack()
        try:
            model, timed, pool = await asyncio.to_thread(self._loaded, hosted.path, settings)
            if pool is not None:  # closed once the version's batcher has answered what it admitted
                stack.push_async_callback(asyncio.to_thread, pool.close)
            identity = {"model": hosted.model, "model_version": hosted.version, "digest": model.card.version}
            load_seconds = model.load_seconds if pool is None else pool.load_seconds
            app = ServingApp(model, settings, pool, load_seconds, timed, identity=identity, name=hosted.model)
            await stack.enter_async_context(app.lifespan(app.api))
        except Exception as error:  # noqa: BLE001 - one model's failure leaves the others serving
            await _closed(stack, hosted)
            failure = f"{type(error).__name__}: {error}".splitlines()[0]
            hosted.state, hosted.error = "failed", failure
            if replacing is not None:
                replacing.replacement, replacing.files, replacing.settings = None, hosted.files, hosted.settings
                replacing.error = f"its new files failed to load (serving the ones before): {failure}"
            return
        hosted.app, hosted.digest, hosted._lifespan, hosted.state = app, model.card.version, stack, "ready"
        key = (hosted.model, hosted.version)
        if replacing is not None:
            if self.hosted.get(key) is replacing and replacing.state == "ready":
                self.hosted[key] = hosted
                self._start(self._unload(replacing))
            else:  # the version went away meanwhile
                await _closed(stack, hosted)
            return
        if self.hosted.get(key) is not hosted:  # dropped while it loaded
            await _closed(stack, hosted)
            return
        self._retire()  # versions it succeeds can go now

    async def _unload(self, hosted: Hosted) -> None:
        """Stop routing to `hosted`, let the requests it has end, then close it (an error closing it is printed,
        and it is gone all the same)."""
        hosted.state = "draining"
        deadline = time.monotonic() + max(30.0, 2 * (hosted.settings or self.settings).timeout_ms / 1000)
        try:
            while hosted.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
            if hosted._lifespan is not None:
                await _closed(hosted._lifespan, hosted)
        finally:
            hosted.app = None
            if self.hosted.get((hosted.model, hosted.version)) is hosted:
                del self.hosted[hosted.model, hosted.version]

    async def close(self) -> None:
        """Answer what every version admitted (and the copies a shadow has), then close them all."""
        await self.settled()
        await asyncio.gather(*list(self._shadows), return_exceptions=True)
        await asyncio.gather(*(self._unload(h) for h in list(self.hosted.values())), return_exceptions=True)
        if self.feedback.log is not None:
            self.feedback.log.close()
            self.feedback.log = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as error:  # noqa: BLE001 - a scan that fails (a folder vanishing mid-read) is tried again
                print(
                    f"scaleforge serve: scanning {self.root} failed, tried again: {error}", file=sys.stderr, flush=True
                )

    @contextlib.asynccontextmanager
    async def lifespan(self, api: FastAPI) -> AsyncIterator[None]:
        """The first scan and its loads before the server is ready; the watch while it serves; a drain at the end."""
        await self.refresh()
        await self.settled()
        watch = asyncio.get_running_loop().create_task(self._watch()) if self.poll_s > 0 else None
        api.state.ready = True
        yield
        api.state.ready = False
        if watch is not None:
            watch.cancel()
        await self.close()

    # ---- routing -------------------------------------------------------------------------------------------

    def _queued(self) -> int:
        """Requests waiting in every loaded version's batcher (and sequences waiting for a completions slot)."""
        total = 0
        for hosted in list(self.hosted.values()):
            app = hosted.app
            if app is not None:
                total += app.batcher.queued + (app.completions.loop.waiting if app.completions is not None else 0)
        return total

    def ready_versions(self, name: str) -> list[int]:
        return sorted(h.version for h in self.hosted.values() if h.model == name and h.state == "ready")

    def route(self, name: str, version: int | None, request: Request, *, openai: bool = False) -> Hosted | Response:
        """The ready version of model `name` a request goes to (`version` when pinned), or the refusal."""
        folder = self.models.get(name)
        if folder is None:
            return self._refused(404, f"no model {name!r} in the repository (GET /v1/models lists them)", openai)
        if version is not None:
            hosted = self.hosted.get((name, version))
            if hosted is None or hosted.state == "draining":
                return self._refused(404, f"{name} has no version {version} served", openai)
            if hosted.state != "ready":
                why = f": {hosted.error}" if hosted.error else ""
                return self._refused(503, f"{name} version {version} is {hosted.state}{why}", openai, retry=True)
            return hosted
        serving = self.serving.get(name, ServingConfig())
        weights = weights_of(serving, self.ready_versions(name))
        if not weights:
            states = {f"{h.version}": h.state for h in self.hosted.values() if h.model == name}
            return self._refused(503, f"no version of {name} is ready ({states or 'none served'})", openai, retry=True)
        sticky = request.headers.get(serving.sticky_header) if serving.sticky_header else None
        return self.hosted[name, choose_version(weights, sticky, salt=name)]

    def _refused(self, status: int, detail: str, openai: bool, *, retry: bool = False) -> Response:
        headers = {"Retry-After": "1"} if retry else None
        reason = "invalid" if status < 500 else "not_ready"
        return self.metrics.refuse(reason, status, detail, headers, openai=openai)

    @contextlib.contextmanager
    def _serving(self, hosted: Hosted) -> Iterator[ServingApp]:
        hosted.in_flight += 1
        try:
            assert hosted.app is not None
            yield hosted.app
        finally:
            hosted.in_flight -= 1

    def _default(self) -> str | None:
        """`--default-model`, else the first model by name with a ready version (else the first by name)."""
        if self.default_model is not None:
            return self.default_model
        ready = (name for name in self.models if self.ready_versions(name))
        return next(ready, next(iter(self.models), None))

    # ---- the routes ----------------------------------------------------------------------------------------

    def _build_api(self) -> FastAPI:
        api = FastAPI(title="scaleforge", summary=f"the models of {self.root}", lifespan=self.lifespan)
        api.state.ready = False
        api.state.draining = False
        api.add_exception_handler(StarletteHTTPException, self._http_error)  # type: ignore[arg-type]
        api.add_exception_handler(RequestValidationError, self._invalid_request)  # type: ignore[arg-type]
        route = api.add_api_route
        route("/v1/models", self.list_models, methods=["GET"])
        route("/v1/models/{name}/predict", self.predict, methods=["POST"])
        route("/v1/models/{name}/versions/{version}/predict", self.predict, methods=["POST"])
        route("/v1/models/{name}/predict/image", self.predict_image, methods=["POST"])
        route("/v1/models/{name}/versions/{version}/predict/image", self.predict_image, methods=["POST"])
        route("/v1/models/{name}/completions", self.complete, methods=["POST"])
        route("/v1/models/{name}/versions/{version}/completions", self.complete, methods=["POST"])
        route("/v1/predict", self.predict_default, methods=["POST"])
        route("/v1/predict/image", self.predict_image_default, methods=["POST"])
        route("/v1/completions", self.complete_by_body, methods=["POST"])
        route("/v1/admin/reload", self.reload, methods=["POST"])
        route("/v1/feedback", self.take_feedback, methods=["POST"])
        route("/v1/models/{name}/ab", self.ab, methods=["GET"])
        route("/v2", self.v2_server, methods=["GET"])
        route("/v2/health/live", self.v2_live, methods=["GET"])
        route("/v2/health/ready", self.v2_ready, methods=["GET"])
        route("/v2/models/{name}", self.v2_model, methods=["GET"])
        route("/v2/models/{name}/versions/{version}", self.v2_model, methods=["GET"])
        route("/v2/models/{name}/ready", self.v2_model_ready, methods=["GET"])
        route("/v2/models/{name}/versions/{version}/ready", self.v2_model_ready, methods=["GET"])
        route("/v2/models/{name}/infer", self.v2_infer, methods=["POST"])
        route("/v2/models/{name}/versions/{version}/infer", self.v2_infer, methods=["POST"])
        route("/health/live", self.live, methods=["GET"])
        route("/health/ready", self.ready, methods=["GET"])
        route("/metrics", self.prometheus, methods=["GET"])
        return api

    async def _http_error(self, request: Request, error: StarletteHTTPException) -> Response:
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    async def _invalid_request(self, request: Request, error: RequestValidationError) -> Response:
        problems = [f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()]
        return self.metrics.refuse("invalid", 422, "; ".join(problems))

    async def predict(self, request: Request, name: str, version: int | None = None) -> Response:
        """Outputs for a list of instances from model `name` (a version drawn by its traffic, or `version`), with
        the request id its outcome can be given for; a copy goes to the model's shadow version, if it has one."""
        hosted = self.route(name, version, request)
        if isinstance(hosted, Response):
            return hosted
        body = await request.body()
        answered = self._on_answer(hosted)
        with self._serving(hosted) as app:
            response = await app.answer_predict(body, request.receive, answered)
        shadow = self._shadow_of(name, hosted)
        if shadow is not None and answered.request_id is not None:
            self._start_shadow(shadow, answered.request_id, lambda app, hook: app.answer_predict(body, _never, hook))
        return response

    def _on_answer(self, hosted: Hosted) -> _Answered:
        assert hosted.app is not None
        return _Answered(self.feedback, hosted.model, hosted.version, hosted.app.model.info.class_names)

    def _shadow_of(self, name: str, hosted: Hosted) -> Hosted | None:
        """The model's shadow version when it is ready and is not the one that answered."""
        serving = self.serving.get(name)
        if serving is None or serving.shadow is None or serving.shadow == hosted.version:
            return None
        shadow = self.hosted.get((name, serving.shadow))
        return shadow if shadow is not None and shadow.state == "ready" else None

    def _start_shadow(self, shadow: Hosted, request_id: str, ask: Any) -> None:
        """Have `shadow` answer the copy of a request (`ask(app, on_answer)`), its answer recorded, never returned."""

        def record(outputs: list[Any]) -> tuple[dict[str, Any], dict[str, str]]:
            self.feedback.shadowed(request_id, shadow.version, outputs)
            return {}, {}

        async def answer() -> None:
            with self._serving(shadow) as app:
                await ask(app, record)

        task = asyncio.get_running_loop().create_task(answer())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def predict_default(self, request: Request) -> Response:
        """`/v1/predict`: the default model's."""
        name = self._default()
        if name is None:
            return _error(404, f"the repository {self.root} holds no model yet")
        return await self.predict(request, name)

    async def predict_image(
        self,
        request: Request,
        name: str,
        file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, ...)")],
        version: int | None = None,
    ) -> Response:
        """The output for one uploaded image from model `name`."""
        hosted = self.route(name, version, request)
        if isinstance(hosted, Response):
            return hosted
        with self._serving(hosted) as app:
            if app.model.info.image is None:
                return self.metrics.refuse("invalid", 422, f"{name} does not take images: it answers /predict")
            return await app.answer_image(request, file, self._on_answer(hosted))

    async def predict_image_default(
        self, request: Request, file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, ...)")]
    ) -> Response:
        name = self._default()
        if name is None:
            return _error(404, f"the repository {self.root} holds no model yet")
        return await self.predict_image(request, name, file)

    async def complete(self, request: Request, name: str, version: int | None = None) -> Response:
        """OpenAI's completions from model `name` (the body's `model` must name it)."""
        hosted = self.route(name, version, request, openai=True)
        if isinstance(hosted, Response):
            return hosted
        with self._serving(hosted) as app:
            if app.completions is None:
                return await app._no_completions(request)
            response = await app.completions.complete(request)
            if isinstance(response, StreamingResponse):  # the version is in use until the stream has ended
                response.body_iterator = _counted(response.body_iterator, hosted)
            return response

    async def complete_by_body(self, request: Request) -> Response:
        """`/v1/completions`: the model the body's `model` names."""
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as error:
            return openai_error(400, f"the body is not valid JSON ({error})", None, "invalid_json")
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str):
            return openai_error(400, "model: give the name of a model of GET /v1/models", "model", "invalid_value")
        return await self.complete(request, name)

    async def list_models(self) -> dict[str, Any]:
        """Every model in OpenAI's list shape, each with its versions (state, weight, digest, error), its traffic
        and sticky header, and, where its serving.yaml cannot be read, the problem."""
        data = []
        for name, folder in self.models.items():
            serving = self.serving.get(name, ServingConfig())
            weights = weights_of(serving, self.ready_versions(name))
            total = sum(weights.values()) or 1.0
            versions = []
            for version, found in folder.versions.items():
                hosted = self.hosted.get((name, version))
                entry: dict[str, Any] = {"version": version, "state": hosted.state if hosted else "not served"}
                if hosted is not None and hosted.error:
                    entry["error"] = hosted.error
                elif found.pending and hosted is not None:
                    entry["error"] = found.pending
                if hosted is not None and hosted.app is not None:
                    card = hosted.app.model.card
                    schema = dict(card.input_schema)
                    if isinstance(schema.get("image"), dict):  # this model's own route, not the one-run server's
                        schema["image"] = {**schema["image"], "endpoint": f"/v1/models/{name}/predict/image"}
                    entry |= {"digest": card.version, "task": card.task, "input_schema": schema}
                entry["traffic"] = weights.get(version, 0.0) / total
                entry["shadow"] = serving.shadow == version
                versions.append(entry)
            model = {
                "id": name,
                "object": "model",
                "created": _created(folder.path),
                "owned_by": "scaleforge",
            }
            model |= {"default": name == self._default(), "versions": versions, "sticky_header": serving.sticky_header}
            if folder.problem is not None:
                model["problem"] = folder.problem
            data.append(model)
        return {"object": "list", "data": data}

    async def take_feedback(self, request: Request) -> Response:
        """`POST /v1/feedback`: a request's outcome, `{"request_id": ..., "label": ...}` (a class index or name,
        or one per instance) or `{"request_id": ..., "reward": ...}`, counted for the version that answered it."""
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as error:
            return self.metrics.refuse("invalid", 422, f"the body is not valid JSON ({error})")
        if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
            return self.metrics.refuse("invalid", 422, "request_id: give the request_id of an answer")
        unknown = sorted(set(body) - {"request_id", "label", "reward"})
        if unknown:
            return self.metrics.refuse("invalid", 422, f"{unknown[0]}: not a field of feedback (label or reward)")
        reward = body.get("reward")
        if reward is not None and (isinstance(reward, bool) or not isinstance(reward, int | float)):
            return self.metrics.refuse("invalid", 422, f"reward: expected a number, got {reward!r}")
        try:
            answer = self.feedback.outcome(body["request_id"], body.get("label"), reward)
        except FeedbackError as error:
            return self.metrics.refuse("invalid", error.status, str(error))
        return _Json({"request_id": body["request_id"], "model": answer.model, "model_version": answer.version})

    async def ab(
        self, name: str, mde: float | None = None, control: int | None = None, metric: str | None = None
    ) -> Response:
        """`GET /v1/models/{name}/ab`: the A/B report of the model's versions (docs/ab-testing.md)."""
        if name not in self.models:
            return _error(404, f"no model {name!r} in the repository (GET /v1/models lists them)")
        if metric not in (None, "accuracy", "reward"):
            return self.metrics.refuse("invalid", 422, f"metric: accuracy or reward, not {metric!r}")
        try:
            report = self.feedback.report(name, self.ready_versions(name), metric=metric, control=control, mde=mde)  # type: ignore[arg-type]
        except UsageError as error:
            return self.metrics.refuse("invalid", 422, str(error))
        return _Json({"model": name, **report.to_dict(), "table": report.table()})

    async def reload(self) -> Response:
        """Scan the repository now (the API key is required: without one configured, admin routes are refused)."""
        if self.settings.api_key is None:
            return _error(403, "admin routes need the server to have an API key (--api-key-env)")
        started = await self.refresh()
        return _Json(started)

    async def live(self) -> Response:
        """200 while every loaded version answers its batches (and a language model its decoding steps) within
        --batch-timeout-s; else 503 naming the version."""
        for hosted in list(self.hosted.values()):
            hung = hosted.app.hung() if hosted.app is not None else None
            if hung is not None:
                return _error(503, f"{hosted.model} version {hosted.version}: {hung}")
        return _Json({"status": "live"})

    async def ready(self) -> Response:
        return readiness(self.api.state)

    # ---- the Open Inference Protocol (KServe v2, Triton's HTTP/REST API) -------------------------------------

    async def v2_server(self) -> Response:
        """Server metadata."""
        from scaleforge import __version__

        return _Json({"name": "scaleforge", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def v2_live(self) -> Response:
        return await self.live()

    async def v2_ready(self) -> Response:
        return await self.ready()

    async def v2_model(self, name: str, version: int | None = None) -> Response:
        """A model's (or one version's) metadata: its versions, its input and its outputs."""
        hosted = self._v2_hosted(name, version)
        if isinstance(hosted, Response):
            return hosted
        assert hosted.app is not None
        versions = [str(v) for v in self.ready_versions(name)] if version is None else [str(version)]
        return _Json(v2.metadata(name, versions, hosted.app.model))

    async def v2_model_ready(self, name: str, version: int | None = None) -> Response:
        """200 when the model (any version, or `version`) is ready to infer, else 400, as Triton answers."""
        ready = self.ready_versions(name)
        if ready and (version is None or version in ready):
            return _Json({"name": name, "ready": True})
        return JSONResponse({"name": name, "ready": False}, status_code=400)

    async def v2_infer(self, request: Request, name: str, version: int | None = None) -> Response:
        """An inference request of the protocol: its one input tensor holds the instances (see `serve.v2`)."""
        hosted = self.route(name, version, request)
        if isinstance(hosted, Response):
            return _v2_error(hosted)
        body = await request.body()
        with self._serving(hosted) as app:
            try:
                infer = v2.read_request(body, request.headers.get(v2.HEADER_LENGTH))
                instances = v2.instances(infer, app.model, app.settings.max_batch_size)
            except v2.ProtocolError as error:
                self.metrics.rejections.labels("invalid").inc()
                return JSONResponse({"error": str(error)}, status_code=400)
            answers = await app.outputs_for(instances, request.receive)
        if isinstance(answers, Response):
            return _v2_error(answers)
        try:
            content, headers = v2.write_response(name, hosted.version, infer, v2.output_tensors(answers))
        except v2.ProtocolError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return Response(content, headers={**headers, "X-Model-Version": str(hosted.version)})

    def _v2_hosted(self, name: str, version: int | None) -> Hosted | Response:
        ready = self.ready_versions(name)
        chosen = version if version is not None else (ready[-1] if ready else None)
        hosted = self.hosted.get((name, chosen)) if chosen is not None else None
        if hosted is None or hosted.state != "ready":
            which = f"{name} version {version}" if version is not None else name
            return JSONResponse({"error": f"{which} is not ready (or not in the repository)"}, status_code=404)
        return hosted

    async def prometheus(self) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _counted(stream: AsyncIterable[Any], hosted: Hosted) -> AsyncIterator[Any]:
    """`stream`, with `hosted` counted in flight until it ends (or its client goes away)."""
    hosted.in_flight += 1
    try:
        async for chunk in stream:
            yield chunk
    finally:
        hosted.in_flight -= 1


def _v2_error(response: Response) -> Response:
    """A refusal in the protocol's error shape, `{"error": message}`, with its status and headers."""
    try:
        detail = orjson.loads(bytes(response.body)).get("detail", "refused")
    except (orjson.JSONDecodeError, AttributeError):
        detail = "refused"
    headers = {name: value for name, value in response.headers.items() if name.lower() == "retry-after"}
    return JSONResponse({"error": str(detail)}, status_code=response.status_code, headers=headers or None)


async def _closed(stack: contextlib.AsyncExitStack, hosted: Hosted) -> None:
    """Close a version's lifespan; an error doing so is printed, not raised (the version goes all the same)."""
    try:
        await stack.aclose()
    except Exception as error:  # noqa: BLE001 - closing one version must not stop the others closing
        print(f"scaleforge serve: closing {hosted.model}/{hosted.version} failed: {error}", file=sys.stderr, flush=True)


@dataclass
class _Answered:
    """A request's `OnAnswer` hook: records its outputs for their outcome, and adds the request id to its answer."""

    feedback: Feedback
    model: str
    version: int
    class_names: Any
    request_id: str | None = None

    def __call__(self, outputs: list[Any]) -> tuple[dict[str, Any], dict[str, str]]:
        self.request_id = self.feedback.answered(self.model, self.version, outputs, self.class_names)
        return {"request_id": self.request_id}, {"X-Request-Id": self.request_id}


async def _never() -> dict[str, Any]:
    """The `receive` of a request copied to a shadow version: its client never goes away."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


# a version's metrics that only a Gate of its own would feed: the repository has one Gate, whose metrics these are
_SERVER_ONLY = frozenset({"scaleforge_requests", "scaleforge_request_seconds", "scaleforge_in_flight"})


def _created(folder: Path) -> int:
    """A model folder's modification time, as OpenAI's `created` (0 once removed, until the next scan)."""
    try:
        return int(folder.stat().st_mtime)
    except OSError:
        return 0


class _VersionMetrics(Collector):
    """Every served version's metrics, each sample labelled with its model and version, merged by family and named
    `scaleforge_version_...` (`scaleforge_version_inference_seconds{model="digits",model_version="2"}`), apart
    from the server's own `scaleforge_...` metrics of every request."""

    def __init__(self, hosting: Hosting) -> None:
        self.hosting = hosting

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for hosted in list(self.hosting.hosted.values()):
            if hosted.app is None:
                continue
            labels = {"model": hosted.model, "model_version": str(hosted.version)}
            for family in hosted.app.metrics.registry.collect():
                if family.name.startswith("process_") or family.name in _SERVER_ONLY:
                    continue  # one process and one front: the server's own registry has them
                merged = families.get(family.name)
                if merged is None:
                    name = family.name.replace("scaleforge_", "scaleforge_version_", 1)
                    merged = families[family.name] = Metric(name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    renamed = merged.name + sample.name[len(family.name) :]
                    merged.add_sample(renamed, {**sample.labels, **labels}, sample.value)
        yield from families.values()
        yield from self._outcomes()

    def _outcomes(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "scaleforge_version_answered",
            "requests answered, by model and version (a shadow's included)",
            labels=["model", "model_version"],
        )
        outcomes = CounterMetricFamily(
            "scaleforge_version_outcomes", "outcomes received by kind", labels=["model", "model_version", "kind"]
        )
        accuracy = GaugeMetricFamily(
            "scaleforge_version_accuracy", "online accuracy from the labels received", labels=["model", "model_version"]
        )
        reward = GaugeMetricFamily(
            "scaleforge_version_mean_reward", "mean of the rewards received", labels=["model", "model_version"]
        )
        for model in list(self.hosting.models):
            for version, sums in self.hosting.feedback.outcomes(model).items():
                labels = [model, str(version)]
                requests.add_metric(labels, sums.requests)
                outcomes.add_metric([*labels, "label"], sums.labelled)
                outcomes.add_metric([*labels, "reward"], sums.rewarded)
                if sums.labelled:
                    accuracy.add_metric(labels, sums.correct / sums.labelled)
                if sums.rewarded:
                    reward.add_metric(labels, sums.reward_mean)
        yield from (requests, outcomes, accuracy, reward)
