"""`scaleforge data ...`: datasets converted into shards, and what a prepared dataset holds."""

from __future__ import annotations

import argparse

from scaleforge.cli.arguments import Parser, json_argument

PREPARE = (
    "Convert an image folder (<class>/<image> folders, or train/ and val/ of them), a CSV table or a text corpus "
    "(a file or a folder of files), once and in parallel, into shards with an index: Hugging Face datasets' Arrow "
    "files and shards.json (rows, size and SHA-256 of each shard). DEST is a new folder or s3://bucket/prefix "
    "(credentials and AWS_ENDPOINT_URL from the standard AWS settings). Train from it with "
    "data.dataset=shards data.path=DEST."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`data` and its subcommands on `commands`."""
    data = commands.add_parser("data", help="prepare datasets as shards, on disk or in an object store")
    actions = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    actions.add_parser(
        "prepare", help="convert images, a CSV or text into shards", description=PREPARE, populate=_prepare_arguments
    ).set_defaults(handler=cmd_prepare)
    show = actions.add_parser("show", help="what a prepared dataset holds (from its index)")
    show.add_argument("path", metavar="PATH", help="a prepared folder or s3://bucket/prefix")
    json_argument(show)
    show.set_defaults(handler=cmd_show)


def _prepare_arguments(parser: Parser) -> None:
    from scaleforge.cli.fields import add_fields
    from scaleforge.data.prepare import PrepareOptions

    parser.add_argument("source", metavar="SOURCE", help="an image folder, a .csv file, or a text file or folder")
    parser.add_argument("--out", required=True, metavar="DEST", help="a new folder, or s3://bucket/prefix")
    add_fields(parser, PrepareOptions)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Prepare the shards and print what was written."""
    from scaleforge.cli.fields import settings_from
    from scaleforge.data.prepare import PrepareOptions, prepare

    manifest = prepare(args.source, args.out, settings_from(PrepareOptions, args))
    _print_manifest(args.out, manifest)
    print(f"prepared in {manifest['seconds']:.1f} s; train from it with: data.dataset=shards data.path={args.out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print a prepared dataset's splits and shards."""
    import json

    from scaleforge.data.shards import read_manifest
    from scaleforge.data.storage import ShardStore

    manifest = read_manifest(ShardStore(args.path))  # checked as training checks it
    if args.json:
        print(json.dumps(manifest, indent=2, default=lambda shard: shard.__dict__))
        return 0
    _print_manifest(args.path, manifest)
    return 0


def _print_manifest(where: str, manifest: dict) -> None:
    from scaleforge.console import counted, print_table
    from scaleforge.data.storage import format_size

    rows = []
    for name, split in manifest["splits"].items():
        shards = [s if isinstance(s, dict) else s.__dict__ for s in split["shards"]]
        size = sum(s["bytes"] for s in shards)
        rows.append([name, str(split["rows"]), counted(len(shards), "shard"), format_size(size)])
    print_table(f"{where}: {manifest['kind']}", ["split", "rows", "shards", "size"], rows)
    print(f"written with {manifest['engine']}")
