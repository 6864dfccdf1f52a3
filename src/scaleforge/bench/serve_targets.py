"""The servers `scaleforge bench serve` compares with scaleforge's own, each started as
`python -m scaleforge.bench.serve_targets KIND PORT [RUN_DIR MAX_BATCH_SIZE MAX_DELAY_MS [TRUST FLAGS]]`:

- `bare`: a FastAPI endpoint on uvicorn that answers every `POST /v1/predict` with a constant, no model: the
  ceiling of the load generator and of the HTTP stack on this machine;
- `litserve`, `litserve-fast`: the same model behind LitServe (the optional `bench` extra), through the same
  `ServedModel` contract, with the same batch size and delay, with LitServe's defaults and with the speed option
  its documentation recommends (`fast_queue=True`);
- `reuseport`: `scaleforge serve --workers`'s alternative, `python -m scaleforge.bench.serve_targets reuseport
  PORT RUN_DIR MAX_BATCH_SIZE MAX_DELAY_MS COUNT [TRUST FLAGS]`: COUNT whole scaleforge servers, each with the
  model on its thread and the cores shared out, listening on one port (SO_REUSEPORT: the kernel spreads the
  connections). Nothing is shared between them, so this is the ceiling of that design: request ids, feedback
  and A/B counts, and reloads would also need a store the servers share, which costs more.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import sys
from typing import Any


def run_bare(port: int) -> None:
    import orjson
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()
    constant = {"outputs": [{"top_class": 0, "probability": 1.0}], "model": "constant", "version": "0"}

    @app.post("/v1/predict")
    async def predict() -> Response:
        # encoded for every request with orjson, as scaleforge encodes its answers
        return Response(orjson.dumps(constant), media_type="application/json")

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_litserve(
    port: int, run_dir: str, max_batch_size: int, max_delay_ms: float, flags: list[str], *, fast: bool = False
) -> None:
    """LitServe over the run, opened as `flags` (`scaleforge serve`'s --trust-code, --signing-key-env) say; with
    `fast`, with the speed option its documentation recommends (`fast_queue=True`: ZeroMQ between the HTTP server
    and the model's worker instead of multiprocessing queues), else with its defaults."""
    api = ScaleforgeLitAPI(run_dir, trust_of(flags), max_batch_size=max_batch_size, batch_timeout=max_delay_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30, fast_queue=fast)
    server.run(host="127.0.0.1", port=port, generate_client_file=False)


def trust_of(flags: list[str]) -> dict[str, Any]:
    """`Trust`'s fields from `scaleforge serve`'s --trust-code and --signing-key-env among `flags` (plain data: a
    LitAPI is pickled into LitServe's worker)."""
    signing = flags[flags.index("--signing-key-env") + 1] if "--signing-key-env" in flags else None
    return {"code": "--trust-code" in flags, "signing_key_env": signing}


def run_reuseport(
    port: int, run_dir: str, max_batch_size: int, max_delay_ms: float, count: int, trust_flags: list[str]
) -> None:
    """`count` servers of the run on `port`, each loading the model before any listens (so that none gets
    connections while another still loads); returns when they have all ended."""
    from scaleforge.processes import ParentDeathGuard

    context = multiprocessing.get_context("spawn")
    loaded = context.Barrier(count)
    servers = [
        context.Process(
            target=_one_of_many,
            args=(
                ParentDeathGuard(signal.SIGKILL),
                loaded,
                port,
                run_dir,
                max_batch_size,
                max_delay_ms,
                count,
                trust_flags,
            ),
        )
        for _ in range(count)
    ]
    for server in servers:
        server.start()
    signal.signal(signal.SIGTERM, lambda *_: [server.terminate() for server in servers])
    for server in servers:
        server.join()


def _one_of_many(
    guard: Any,
    loaded: Any,
    port: int,
    run_dir: str,
    max_batch_size: int,
    max_delay_ms: float,
    count: int,
    trust_flags: list[str],
) -> None:
    guard()
    import uvicorn

    from scaleforge.runs import Trust
    from scaleforge.serve.app import create_app
    from scaleforge.serve.model import ServedModel, cpu_cores
    from scaleforge.serve.server import _config
    from scaleforge.serve.settings import ServeSettings
    from scaleforge.serve.worker import freeze_garbage

    model = ServedModel(run_dir, trust=Trust(**trust_of(trust_flags)))
    settings = ServeSettings(port=port, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)
    model.prepare(max(1, cpu_cores() // count), max_batch_size, time_batches=False)
    gate = create_app(model, settings)
    loaded.wait(timeout=300)  # a server that failed to load breaks it: the others end too
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listening.bind(("127.0.0.1", port))
    freeze_garbage()
    uvicorn.Server(_config(gate, settings)).run(sockets=[listening])


try:
    import litserve as ls
except ImportError:  # the optional `bench` extra
    ls = None

if ls is not None:

    class ScaleforgeLitAPI(ls.LitAPI):
        """The LitAPI over `ServedModel`; at module level, as LitServe pickles it into its worker process."""

        def __init__(self, run_dir: str, trust: dict[str, Any], **options: Any) -> None:
            super().__init__(**options)
            self.run_dir, self.trust = run_dir, trust

        def setup(self, device: str) -> None:
            from scaleforge.runs import Trust
            from scaleforge.serve.model import ServedModel

            # torch's own thread count, as a LitServe user gets it
            self.model = ServedModel(self.run_dir, trust=Trust(**self.trust))

        def decode_request(self, request):  # noqa: ANN001, ANN201 - LitServe reads the annotation as the body type
            return self.model.decode(request["inputs"])[0]  # one instance per request, as the benchmark sends

        def batch(self, inputs: list[Any]) -> list[Any]:
            return inputs

        def predict(self, instances: Any) -> Any:
            return self.model.answer(instances if isinstance(instances, list) else [instances])

        def unbatch(self, outputs: list[Any]) -> list[Any]:
            return outputs

        def encode_response(self, output: Any) -> dict[str, Any]:
            return {"outputs": [output], "model": self.model.card.name}


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "bare":
        run_bare(port)
    elif kind == "reuseport":
        run_reuseport(port, sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), sys.argv[7:])
    else:  # litserve, litserve-fast
        run_litserve(port, sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6:], fast=kind.endswith("fast"))
