"""`scaleforge serve`: load the model, then serve it with uvicorn until SIGTERM or Ctrl-C, draining first."""

from __future__ import annotations

import signal
import socket
import ssl
import time
from pathlib import Path
from types import FrameType

import uvicorn

from scaleforge.errors import UsageError
from scaleforge.hardware import select_device_option
from scaleforge.runs import Trust
from scaleforge.serve.app import Gate, ServeSettings, create_app
from scaleforge.serve.model import ServedModel
from scaleforge.serve.worker import ModelPool, freeze_garbage


class DrainingServer(uvicorn.Server):
    """uvicorn, except that a stop signal first turns `/health/ready` to 503 and, for `drain_grace_s`, keeps
    serving (so that load balancers polling readiness stop sending); uvicorn then stops accepting connections
    and waits for the requests it admitted, and the batcher answers every queued one before the process ends.
    A second signal during the grace period stops at once."""

    def __init__(self, config: uvicorn.Config, gate: Gate, banner: str, drain_grace_s: float = 0.0) -> None:
        super().__init__(config)
        self.gate = gate
        self.banner = banner
        self.drain_grace_s = drain_grace_s
        self._stop_at: float | None = None
        self._stop_signal = signal.SIGTERM

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.gate.state.draining = True
        if self._stop_at is None and self.drain_grace_s > 0:
            self._stop_at, self._stop_signal = time.monotonic() + self.drain_grace_s, sig
            return
        self._stop(sig, frame)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down, so the process dies of it; a server that
        # drained as asked exits 0 instead
        self._captured_signals.clear()

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and not self.should_exit and time.monotonic() >= self._stop_at:
            self._stop(self._stop_signal, None)
        return await super().on_tick(counter)

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            scheme = "https" if self.config.is_ssl else "http"
            print(f"{self.banner} | {scheme}://{host}:{port} (docs: /docs)", flush=True)


def serve(path: str | Path, settings: ServeSettings) -> bool:
    """Load the run at `path` and serve it with `settings` until stopped; False if it never started (uvicorn
    said why)."""
    check_tls(settings.tls_cert, settings.tls_key)  # before the model loads, like the address
    check_address(settings.host, settings.port)  # before the model loads: a taken port fails at once
    device = select_device_option(settings.device)
    timing = settings.latency_target_ms > 0  # the batcher's cost model starts from timed batches
    trust = Trust(settings.trust_code, settings.signing_key_env)
    check_workers(settings)
    if settings.backend == "onnxruntime":
        if settings.model_process:
            raise UsageError("--model-process applies to --backend torch (ONNX Runtime runs beside HTTP on a thread)")
        if settings.signing_key_env is not None:
            raise UsageError("--signing-key-env checks final/, not the exported ONNX file --backend onnxruntime serves")
        model = ServedModel(path, onnx=settings.onnx or True, trust=trust)
        threads, timed = model.prepare(settings.threads, settings.max_batch_size, time_batches=timing)
        return _run(_server(model, settings, None, model.load_seconds, threads, timed))
    if settings.onnx is not None:
        raise UsageError("--onnx applies to --backend onnxruntime")
    if settings.model_process is not True and settings.workers == 1:
        model = ServedModel(path, device, trust=trust)  # loaded before the server listens, never per request
        threads, timed = model.prepare(settings.threads, settings.max_batch_size, time_batches=timing)
        # auto: a process of its own for a CPU model whose compute dominates, so that it runs in parallel with
        # HTTP; a small model's requests cost the server more than its compute, and handing its batches to a
        # process costs more than sharing the interpreter (digits' MLP at 32 in flight: 4,694/s on a thread,
        # 3,309/s in a process); a GPU model's work runs on the GPU
        in_process = settings.model_process is False or device.type != "cpu"
        in_process = in_process or model.generates_text  # completions decode beside the server (continuous batching)
        if in_process or not model.is_compute_bound(settings.max_batch_size):
            return _run(_server(model, settings, None, model.load_seconds, threads, timed))
        model.model = None  # the weights live in the model's process, with the threads and timings found here
        time_in_process = False
    else:  # the process chooses the threads and times the batches itself
        model = ServedModel(path, device, weights=False, trust=trust)  # checks the run before a process starts
        if model.generates_text:
            option = "--model-process" if settings.workers == 1 else f"--workers {settings.workers}"
            raise UsageError(
                f"{option}: a language model's completions are decoded in the server's process, a step for "
                f"every running sequence at once (continuous batching); leave {option.split()[0]} out"
            )
        threads, timed, time_in_process = settings.threads, [], timing
    # one model process, or --workers of them (a pool of one is that process, its threads chosen as above)
    pool = ModelPool(
        settings.workers,
        str(path),
        str(device),
        threads,
        settings.max_batch_size,
        time_batches=time_in_process,
        timed_batches=timed,
        hung_s=settings.batch_timeout_s,
        trust=trust,
    )
    try:
        return _run(_server(model, settings, pool, pool.load_seconds, pool.threads, pool.timed_batches))
    finally:
        pool.close()  # after the drain: every admitted request has its answer


def serve_repository(settings: ServeSettings) -> bool:
    """Serve every model of the repository `settings.repository` until stopped (`serve.hosting`); False if the
    server never started."""
    from scaleforge.serve.hosting import Hosting

    assert settings.repository is not None
    check_tls(settings.tls_cert, settings.tls_key)
    check_address(settings.host, settings.port)
    root = Path(settings.repository)
    if not root.is_dir():
        raise UsageError(f"--repository {root}: not a folder")
    if settings.default_model is not None and not (root / settings.default_model).is_dir():
        raise UsageError(f"--default-model {settings.default_model}: {root} has no such model folder")
    for option, value in (("--backend onnxruntime", settings.backend == "onnxruntime"), ("--onnx", settings.onnx)):
        if value:
            raise UsageError(f"{option} applies to one run; a repository's models are served with --backend torch")
    if settings.model_process:
        raise UsageError("--model-process applies to one run; a repository's models run beside the server")
    check_workers(settings)
    device = select_device_option(settings.device)
    trust = Trust(settings.trust_code, settings.signing_key_env)
    hosting = Hosting(root, settings, device, trust, default_model=settings.default_model, poll_s=settings.poll_s)
    gate = hosting.gate()
    config = _config(gate, settings)
    banner = f"serving the model repository {root} on {device}"
    if settings.workers > 1:
        banner += f", each version in {settings.workers} model processes (a language model's in this one)"
    banner += f" (scanned every {settings.poll_s:g} s)" if settings.poll_s else " (scanned on POST /v1/admin/reload)"
    return _run(DrainingServer(config, gate, banner, settings.drain_grace_s))


def _run(server: DrainingServer) -> bool:
    """Serve until stopped, what loading made frozen out of the garbage collector (`freeze_garbage`); whether
    the server started."""
    freeze_garbage()
    server.run()
    return server.started


def _server(
    model: ServedModel,
    settings: ServeSettings,
    worker: ModelPool | None,
    load_seconds: float,
    threads: int,
    timed_batches: list[tuple[int, float]],
) -> DrainingServer:
    gate = create_app(model, settings, run_batch=worker, load_seconds=load_seconds, timed_batches=timed_batches)
    config = _config(gate, settings)
    card = model.card
    banner = (
        f"serving {card.name} ({card.task}, version {card.version}) on {model.device}, {threads} {settings.backend} "
        "thread"
        f"{'s' * (threads != 1)}{_in_processes(worker)}, loaded in {load_seconds:.2f}s"
        f" | batches of <= {settings.max_batch_size}, delay <= {settings.max_delay_ms:g} ms,"
        f" queue {settings.max_queue}, timeout {settings.timeout_ms:g} ms,"
        f" bodies <= {gate.body_limit.max_bytes:,} bytes"
    )
    if model.generates_text and worker is None:
        banner += f" | completions: {settings.max_batch_size} slots, <= {settings.max_step_tokens} tokens a step"
        banner += ", static batching" if settings.batching == "static" else ""
    return DrainingServer(config, gate, banner, settings.drain_grace_s)


def _in_processes(worker: ModelPool | None) -> str:
    """Where the model runs, for the banner: '' on the server's thread."""
    if worker is None:
        return ""
    count = len(worker.processes)
    return f" in each of {count} model processes" if count > 1 else " in a model process"


def _config(gate: Gate, settings: ServeSettings) -> uvicorn.Config:
    return uvicorn.Config(
        gate,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(30.0, 2 * settings.timeout_ms / 1000),
        # requests being read or answered, beyond the queue and a batch: more get 503 from uvicorn, so memory
        # stays bounded (each holds at most its endpoint's body limit) whatever the load
        limit_concurrency=settings.max_queue + 2 * settings.max_batch_size + 64,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
    )


def check_workers(settings: ServeSettings) -> None:
    """A usage error if `--workers N` (N > 1) is given with an option that keeps the model on a thread."""
    if settings.workers == 1:
        return
    for option, given in (
        ("--no-model-process", settings.model_process is False),
        ("--backend onnxruntime", settings.backend == "onnxruntime"),
    ):
        if given:
            raise UsageError(
                f"--workers {settings.workers} serves the model from that many processes; {option} runs it beside "
                "HTTP on a thread: give one or the other"
            )


def check_address(host: str, port: int) -> None:
    """A usage error unless this process may listen on `host:port`."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None


def check_tls(cert: str | None, key: str | None) -> None:
    """A usage error unless `cert` and `key` are both unset, or a readable certificate (PEM) and its private key."""
    if (cert is None) != (key is None):
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise UsageError(f"{given} needs {missing}: HTTPS takes a certificate and its private key, both or neither")
    if cert is None or key is None:
        return
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            Path(path).read_bytes()
        except OSError as error:
            raise UsageError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    try:  # as uvicorn will load them, so that a wrong file is one line here rather than a traceback there
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as error:
        raise UsageError(f"--tls-cert {cert} --tls-key {key}: not a PEM certificate and its key ({error})") from None
