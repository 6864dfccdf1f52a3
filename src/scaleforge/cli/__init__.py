"""The `scaleforge` command line: one module per command group, each with its parser and handlers.

`main` runs a command line and returns its exit code; `run` is the console script (`scaleforge = scaleforge.cli:run`).
"""

from scaleforge.cli.main import build_parser, main, parse_args, run

__all__ = ["build_parser", "main", "parse_args", "run"]
