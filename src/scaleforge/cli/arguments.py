"""What the commands share: the parser class, argument types, and the config, trust and output options."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from scaleforge.errors import UsageError

CONFIG_HELP = "[CONFIG.yaml] [KEY=VALUE ...]: a config file (default: the embedded default) and dotted overrides"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`usage error: ...`) and exit code 2; and a command's options can
    be added when the command is used (`populate`), so that `scaleforge --help` imports no command's module."""

    def __init__(self, *args: Any, populate: Callable[[Parser], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _populated(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        self._populated()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._populated()
        return super().format_usage()

    def format_help(self) -> str:
        self._populated()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------------------ types


def int_at_least(minimum: int, kind: str) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, described as `kind` in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value

    return parse


def float_above(minimum: float, inclusive: bool, kind: str) -> Callable[[str], float]:
    """An argparse type: a finite number above `minimum` (or equal to it when `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} number, got '{text}'") from None
        if not (value >= minimum if inclusive else value > minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a {kind} number, got {text}")
        return value

    return parse


positive_int = int_at_least(1, "positive")
non_negative_int = int_at_least(0, "non-negative")
positive_float = float_above(0.0, False, "positive")
non_negative_float = float_above(0.0, True, "non-negative")


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number above 0 and at most 1."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0 and at most 1, got {text}")
    return value


Item = TypeVar("Item")


def comma_separated(item: Callable[[str], Item]) -> Callable[[str], list[Item]]:
    """An argparse type: `a,b,c`, each part parsed by `item` (whose errors name the bad part)."""

    def parse(text: str) -> list[Item]:
        return [item(part.strip()) for part in text.split(",")]

    return parse


# ------------------------------------------------------------------------------------------------ shared options


def config_argument(parser: argparse.ArgumentParser) -> None:
    """`[CONFIG] [KEY=VALUE ...]`; `parse_args` adds the overrides found elsewhere on the line."""
    parser.add_argument("config", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=CONFIG_HELP)


def split_config_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [KEY=VALUE ...]`: the first item is the config file if it names a file or ends in .yaml/.yml."""
    first = items[0] if items else ""
    if first and "=" not in first and (first.endswith((".yaml", ".yml")) or Path(first).exists()):
        return first, list(items[1:])
    return None, list(items)


def load_config_args(items: Sequence[str]):  # noqa: ANN201 - RunConfig, imported lazily to keep --help fast
    """The RunConfig of `[CONFIG] [KEY=VALUE ...]`."""
    from scaleforge.config import load_config

    path, overrides = split_config_args(items)
    return load_config(path, overrides)


def run_dir_arguments(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """The RUN_DIR of a command that opens a trained run, and its trust options."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help=help)
    trust_arguments(parser)


def trust_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that opens a run directory: whether its code may run, and the key its manifest
    must be signed with."""
    trust = parser.add_argument_group("trust (a run directory is data: its code never runs unless you say so)")
    trust.add_argument(
        "--trust-code",
        action="store_true",
        help="import the modules the run's config names (imports:) and build its module:Attr components",
    )
    trust.add_argument(
        "--signing-key-env",
        metavar="VAR",
        help="refuse the run unless its manifest is signed (HMAC-SHA256) with the key in this environment variable",
    )


def trust(args: argparse.Namespace):  # noqa: ANN201 - runs.Trust, imported lazily to keep --help fast
    """The `runs.Trust` the trust options ask for."""
    from scaleforge.runs import Trust

    return Trust(args.trust_code, args.signing_key_env)


def json_argument(parser: argparse.ArgumentParser) -> None:
    """`--json`: the command's figures as JSON rather than a table."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
