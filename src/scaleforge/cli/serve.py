"""`scaleforge serve`: its options are `ServeSettings`' fields."""

from __future__ import annotations

import argparse
import os

from scaleforge.cli.arguments import Parser, trust_arguments
from scaleforge.errors import UsageError

DESCRIPTION = (
    "Serve a trained run's model over HTTP (FastAPI on uvicorn) with dynamic batching, a bounded queue, deadlines, "
    "health checks and Prometheus metrics. The model is loaded before the server listens."
)
# Not options of their own: the key comes from --api-key-env (never on the command line, where `ps` shows it); the
# trust fields are the trust options every command that opens a run has.
NOT_OPTIONS = ("api_key", "trust_code", "signing_key_env")
# What each field's option takes and says, for the fields whose metadata does not say it (ServeSettings' own
# metadata, where present, wins).
FIELDS = {
    "host": {"help": "address to bind (0.0.0.0: every interface)"},
    "port": {"help": "port (0: any free one, printed)", "range": "port"},
    "max_batch_size": {"help": "instances per batch, at most", "range": "positive"},
    "max_delay_ms": {"help": "longest wait for a batch to fill", "range": "non-negative"},
    "max_queue": {"help": "queued requests before 503", "range": "positive"},
    "timeout_ms": {"help": "queued longer: 504, never run", "range": "positive"},
    "cache_size": {"help": "LRU of results (0: none)", "range": "non-negative"},
    "max_body_mb": {
        "help": "larger bodies get 413 (unset: from the model's input, twice --max-batch-size instances at their "
        "largest JSON size plus 64 KiB; for image uploads, a 4096x4096 RGB image uncompressed plus 64 KiB)",
        "range": "positive",
    },
    "device": {"help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"},
    "threads": {
        "help": "torch threads for the model (0: every core if that runs a full batch 1.3x faster, else one fewer)",
        "range": "non-negative",
    },
    "model_process": {
        "help": "run the model in a process of its own, in parallel with HTTP (--no-model-process: a thread; "
        "by default, a process on a CPU when the model's compute dominates, a full batch taking >= 0.5 ms an instance)"
    },
    "drain_grace_s": {
        "help": "after SIGTERM, keep serving this long with /health/ready at 503 (for load balancers), then drain",
        "range": "non-negative",
    },
    "batch_timeout_s": {
        "help": "a batch the model has not answered in this long is taken for hung and its requests get 503: a "
        "model process is restarted; while a model on a thread is hung, /health/live and new requests get 503",
        "range": "positive",
    },
    "latency_target_ms": {
        "help": "keep batches small enough, and refuse at once what could not be answered, to answer within this "
        "(0: off)",
        "range": "non-negative",
    },
    "backend": {
        "help": "onnxruntime: serve the run's ONNX export (see --onnx) with ONNX Runtime, with the same API, "
        "batching and metrics",
        "choices": ("torch", "onnxruntime"),
    },
    "onnx": {
        "help": "the ONNX file for --backend onnxruntime (default: RUN_DIR/exported/model.onnx, written by "
        "`scaleforge export RUN_DIR --format onnx --dynamic-batch`)",
        "metavar": "FILE",
    },
    "tls_cert": {"help": "serve HTTPS with this PEM certificate (with --tls-key)", "metavar": "FILE"},
    "tls_key": {"help": "the certificate's PEM private key (with --tls-cert)", "metavar": "FILE"},
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`serve` on `commands`."""
    commands.add_parser(
        "serve", help="serve a trained run over HTTP", description=DESCRIPTION, populate=_serve_arguments
    ).set_defaults(handler=cmd_serve)


def _serve_arguments(parser: Parser) -> None:
    from scaleforge.extras import require

    require("serve", "scaleforge serve")  # ServeSettings' module is the server's, which imports FastAPI
    from scaleforge.cli.fields import add_fields
    from scaleforge.serve.app import ServeSettings

    parser.add_argument("run_dir", metavar="RUN_DIR_OR_MODEL", help="a run directory, or its final/ folder")
    trust_arguments(parser)
    add_fields(parser, ServeSettings, exclude=NOT_OPTIONS, fallback=FIELDS)
    parser.add_argument(
        "--api-key-env", metavar="VAR", help="require the key held by this environment variable (not /health/*)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until stopped; exit 1 if the server failed."""
    from scaleforge.cli.fields import settings_from
    from scaleforge.extras import require
    from scaleforge.serve.app import ServeSettings
    from scaleforge.serve.server import serve

    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
    settings = settings_from(ServeSettings, args, api_key=api_key)
    if settings.backend == "onnxruntime":
        require("export", "scaleforge serve --backend onnxruntime")
    return 0 if serve(args.run_dir, settings) else 1
