"""User-facing errors: the one place that decides how a mistake is reported and with which exit code."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class ScaleforgeError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with `exit_code`."""

    exit_code = 2
    kind = "error"

    def one_line(self) -> str:
        """The message as printed: a single line, prefixed with the error kind."""
        text = " ".join(str(self).split())
        return f"{self.kind}: {text}"


class ConfigError(ScaleforgeError):
    """A config file, override or component parameter that cannot be used."""

    kind = "config error"


class DataError(ScaleforgeError):
    """Input data that is missing or malformed."""

    kind = "data error"


class UsageError(ScaleforgeError):
    """A command line that cannot be understood (bad arguments, missing files)."""

    kind = "usage error"


class AgreedError(ScaleforgeError):
    """A user error met on one or more processes of a run, raised on all of them with one message."""

    def __init__(self, line: str, exit_code: int = 2) -> None:
        super().__init__(line)
        self.line = line
        self.exit_code = exit_code

    def one_line(self) -> str:
        return self.line


class ScaleforgeWarning(UserWarning):
    """Something the user should know that does not stop the work (a damaged checkpoint passed over); the CLI
    prints it as one line, `warning: ...`."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ` (did you mean 'x'?)` suffix for the closest choice, or '' when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def one_of(choices: Iterable[str]) -> str:
    """`one of: a, b, c` for error messages, sorted."""
    return "one of: " + ", ".join(sorted(choices))


def describe_export_error(error: BaseException) -> str:
    """` at <operator>: <first line>` for an exporter's error."""
    return f"{_operator_in(error)}: {first_line(error)}"


def _operator_in(error: BaseException) -> str:
    """` at <operator>` when the exporter's message names one."""
    text = str(error)
    found = re.search(r"(aten::?\.?[A-Za-z_0-9.]+|torch\.ops\.[A-Za-z_0-9.]+)", text)
    if found is None and error.__cause__ is not None:
        found = re.search(r"(aten::?\.?[A-Za-z_0-9.]+|torch\.ops\.[A-Za-z_0-9.]+)", str(error.__cause__))
    return f" at {found.group(1)}" if found else ""


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message, without terminal colours (its type's name if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
