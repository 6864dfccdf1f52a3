"""`scaleforge stream`: its options are `StreamOptions`' fields."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scaleforge.cli.arguments import Parser, run_dir_arguments, trust
from scaleforge.errors import UsageError

DESCRIPTION = (
    "Run a trained image classifier on a stream of frames: capture, preprocessing (as in training), batched "
    "inference and the sink run concurrently, joined by bounded queues. Live sources drop their oldest waiting frames "
    "when the model cannot keep up (latency stays bounded); files are processed whole, in order. Ctrl-C or SIGTERM "
    "finishes the frames in flight, flushes the sink and prints the summary."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`stream` on `commands`."""
    commands.add_parser(
        "stream",
        help="classify a stream of frames (video, camera, images) in real time",
        description=DESCRIPTION,
        populate=_stream_arguments,
    ).set_defaults(handler=cmd_stream)


def _stream_arguments(parser: Parser) -> None:
    from scaleforge.cli.fields import add_fields
    from scaleforge.stream.pipeline import StreamOptions

    run_dir_arguments(parser, help="a run directory of an image classifier")
    add_fields(parser, StreamOptions, exclude=("preprocess_workers",))
    parser.add_argument("--summary-json", metavar="FILE", help="also write the summary's figures here")


def cmd_stream(args: argparse.Namespace) -> int:
    """Run the stream to its end (or a stop signal) and print its summary."""
    from scaleforge.cli.fields import settings_from
    from scaleforge.console import print_table
    from scaleforge.extras import require
    from scaleforge.stream.pipeline import StreamOptions, print_summary, run_stream

    require("stream", "scaleforge stream")
    options = settings_from(StreamOptions, args)
    folder = Path(args.summary_json or ".").parent
    if not folder.is_dir():
        raise UsageError(f"--summary-json {args.summary_json}: the folder {folder} does not exist")
    summary = run_stream(args.run_dir, options, trust(args))
    print_summary(summary, print_table)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0
