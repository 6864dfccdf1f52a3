"""Options generated from a settings dataclass's fields (scaleforge.cli.fields), and every command's options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from scaleforge.cli import build_parser
from scaleforge.cli.arguments import Parser
from scaleforge.cli.fields import add_fields, given, settings_from
from scaleforge.errors import UsageError


@dataclass(frozen=True)
class Settings:
    name: str = field(metadata={"help": "required, as it has no default"})
    batch_size: int = field(default=8, metadata={"help": "rows", "range": "positive"})
    delay_ms: float = field(default=5.0, metadata={"help": "100% of the wait", "range": "non-negative"})
    folder: Path | None = field(default=None, metadata={"help": "where", "flag": "--dir"})
    mode: str = field(default="fast", metadata={"choices": ("fast", "slow")})
    verbose: bool = False
    in_process: bool | None = None
    secret: str | None = None


def parser() -> Parser:
    made = Parser(prog="test")
    add_fields(made, Settings, exclude=("secret",), fallback={"mode": {"help": "from the fallback", "metavar": "M"}})
    return made


def test_fields_become_options_with_their_types_ranges_and_defaults() -> None:
    args = parser().parse_args(["--name", "x", "--batch-size", "4", "--dir", "out", "--no-in-process"])
    assert settings_from(Settings, args, secret="s") == Settings(
        name="x", batch_size=4, folder=Path("out"), in_process=False, secret="s"
    )
    assert given(args, "batch_size") and not given(args, "delay_ms")  # left out: the field's own default
    assert settings_from(Settings, parser().parse_args(["--name", "x", "--verbose"])).verbose is True
    with pytest.raises(UsageError, match="--batch-size: expected a positive integer, got 0"):
        parser().parse_args(["--name", "x", "--batch-size", "0"])
    with pytest.raises(UsageError, match="the following arguments are required: --name"):
        parser().parse_args([])
    with pytest.raises(UsageError, match="unrecognized arguments: --secret"):
        parser().parse_args(["--name", "x", "--secret", "s"])


def test_help_comes_from_the_metadata_with_the_default() -> None:
    text = " ".join(parser().format_help().split())
    assert "--batch-size BATCH_SIZE rows (default: 8)" in text
    assert "--delay-ms DELAY_MS 100% of the wait (default: 5.0)" in text
    assert "--dir DIR where --mode M from the fallback (default: fast)" in text  # keys the field's metadata lacks
    assert "--no-verbose" not in text and "--in-process, --no-in-process" in text


def test_a_name_that_is_not_a_field_is_refused() -> None:
    with pytest.raises(ValueError, match="Settings has no field secrett"):
        add_fields(argparse.ArgumentParser(), Settings, exclude=("secrett",))


@dataclass(frozen=True)
class ListSettings:
    stop: tuple[str, ...] = field(default=(), metadata={"help": "strings"})
    policy: Literal["crop", "stop"] = field(default="crop", metadata={"help": "what to do"})
    top_p: float | None = field(default=None, metadata={"help": "mass", "range": "probability"})


def test_a_tuple_of_strings_takes_values_a_literal_its_choices_a_probability_0_to_1() -> None:
    made = Parser(prog="test")
    add_fields(made, ListSettings)
    args = made.parse_args(["--stop", "a", "b", "--stop", "c", "--policy", "stop", "--top-p", "1"])
    assert (args.stop, args.policy, args.top_p) == (["a", "b", "c"], "stop", 1.0)
    assert "(default: ())" not in made.format_help() and "{crop,stop}" in made.format_help()
    with pytest.raises(UsageError, match="invalid choice: 'roll'"):
        made.parse_args(["--policy", "roll"])
    with pytest.raises(UsageError, match="expected a number above 0 and at most 1, got 1.5"):
        made.parse_args(["--top-p", "1.5"])


@dataclass(frozen=True)
class NumbersSettings:
    streams: tuple[int, ...] = field(default=(1, 4, 16), metadata={"help": "counts", "range": "positive"})


def test_a_tuple_of_ints_takes_comma_separated_numbers_in_its_range() -> None:
    made = Parser(prog="test")
    add_fields(made, NumbersSettings)
    assert settings_from(NumbersSettings, made.parse_args(["--streams", "1,2"])) == NumbersSettings((1, 2))
    assert settings_from(NumbersSettings, made.parse_args([])) == NumbersSettings()
    assert "--streams N,N,... counts (default: 1,4,16)" in " ".join(made.format_help().split())
    with pytest.raises(UsageError, match="--streams"):
        made.parse_args(["--streams", "1,0"])


def _parsers(parser: argparse.ArgumentParser):  # noqa: ANN202 - an iterator of every command's parser
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield from _parsers(command)


def test_every_option_of_every_command_says_what_it_does() -> None:
    for command in _parsers(build_parser()):
        command.format_help()  # adds the options of commands that add theirs when used
        for action in command._actions:
            assert not action.option_strings or action.help, (command.prog, action.option_strings)
