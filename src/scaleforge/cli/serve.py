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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`serve` on `commands`."""
    commands.add_parser(
        "serve", help="serve a trained run over HTTP", description=DESCRIPTION, populate=_serve_arguments
    ).set_defaults(handler=cmd_serve)


def _serve_arguments(parser: Parser) -> None:
    from scaleforge.cli.fields import add_fields
    from scaleforge.serve.settings import ServeSettings

    parser.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="a run directory, or its final/ folder (or --repository DIR)"
    )
    trust_arguments(parser)
    add_fields(parser, ServeSettings, exclude=NOT_OPTIONS)
    parser.add_argument(
        "--api-key-env", metavar="VAR", help="require the key held by this environment variable (not /health/*)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until stopped; exit 1 if the server failed."""
    from scaleforge.cli.fields import settings_from
    from scaleforge.extras import require

    require("serve", "scaleforge serve")  # before the server's modules, which import FastAPI
    from scaleforge.serve.server import serve
    from scaleforge.serve.settings import ServeSettings

    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
    settings = settings_from(ServeSettings, args, api_key=api_key)
    if settings.backend == "onnxruntime":
        require("export", "scaleforge serve --backend onnxruntime")
    if (args.run_dir is None) == (settings.repository is None):
        raise UsageError("give a RUN_DIR to serve one run, or --repository DIR to serve a model repository, not both")
    if settings.repository is not None:
        from scaleforge.serve.server import serve_repository

        return 0 if serve_repository(settings) else 1
    for option, value in (("--default-model", settings.default_model), ("--feedback-log", settings.feedback_log)):
        if value is not None:
            raise UsageError(f"{option} applies to --repository")
    return 0 if serve(args.run_dir, settings) else 1
