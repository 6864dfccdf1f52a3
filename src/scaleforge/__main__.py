"""`python -m scaleforge` is the `scaleforge` command."""

from scaleforge.cli import run

run()
