"""The servers `scaleforge bench serve` compares with scaleforge's own, each started as
`python -m scaleforge.bench.serve_targets KIND PORT [RUN_DIR MAX_BATCH_SIZE MAX_DELAY_MS [TRUST FLAGS]]`:

- `bare`: a FastAPI endpoint on uvicorn that answers every `POST /v1/predict` with a constant, no model: the
  ceiling of the load generator and of the HTTP stack on this machine;
- `litserve`: the same model behind LitServe (the optional `bench` extra), through the same `ServedModel`
  contract, with the same batch size and delay.
"""

from __future__ import annotations

import sys
from typing import Any


def run_bare(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    constant = {"outputs": [{"top_class": 0, "probability": 1.0}], "model": "constant", "version": "0"}

    @app.post("/v1/predict")
    async def predict() -> JSONResponse:
        return JSONResponse(constant)

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_litserve(port: int, run_dir: str, max_batch_size: int, max_delay_ms: float, trust_flags: list[str]) -> None:
    """LitServe over the run, opened as `trust_flags` (`scaleforge serve`'s --trust-code, --signing-key-env) say."""
    trust = {"code": "--trust-code" in trust_flags}
    if "--signing-key-env" in trust_flags:
        trust["signing_key_env"] = trust_flags[trust_flags.index("--signing-key-env") + 1]
    api = ScaleforgeLitAPI(run_dir, trust, max_batch_size=max_batch_size, batch_timeout=max_delay_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=port, generate_client_file=False)


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
    else:
        run_litserve(port, sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6:])
