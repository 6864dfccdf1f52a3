"""`scaleforge generate`: a trained language model continues a prompt; the sampling options are `SamplingOptions`'
fields."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaleforge.cli.arguments import Parser, run_dir_arguments
from scaleforge.errors import UsageError

DESCRIPTION = (
    "Continue a prompt with a trained language model (a run trained on text) and print the continuation as it is "
    "produced. Temperature 0 is greedy; a seed makes a sample repeatable."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`generate` on `commands`."""
    commands.add_parser(
        "generate",
        help="continue a prompt with a trained language model",
        description=DESCRIPTION,
        populate=_generate_arguments,
    ).set_defaults(handler=cmd_generate)


def _generate_arguments(parser: Parser) -> None:
    from scaleforge.cli.fields import add_fields
    from scaleforge.generation.sampling import SamplingOptions

    run_dir_arguments(parser, help="a run trained on text, or its final/ folder")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE", help="the text to continue, read from a UTF-8 file")
    add_fields(parser, SamplingOptions)
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the continuation piece by piece, each flushed as soon as it is sampled."""
    from scaleforge.cli.arguments import trust
    from scaleforge.cli.fields import settings_from
    from scaleforge.generation.language_model import generate_stream
    from scaleforge.generation.sampling import SamplingOptions
    from scaleforge.hardware import select_device_option

    select_device_option(args.device)  # a device this machine lacks is a usage error before the run is read
    options = settings_from(SamplingOptions, args)
    prompt = args.prompt if args.prompt is not None else _read_prompt(Path(args.prompt_file))
    settings = trust(args)
    generation = generate_stream(
        args.run_dir,
        prompt,
        options,
        device=args.device,
        trust_code=settings.code,
        signing_key_env=settings.signing_key_env,
    )
    for piece in generation:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _read_prompt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--prompt-file {path} cannot be read as UTF-8 text: {error}") from error
