"""Command-line options generated from a settings dataclass, so that a setting and its flag cannot drift apart.

Each field becomes `--field-name` (`dest` the field's name) with its type, range, choices and help taken from the
field: its annotation (`int`, `float`, `str`, `Path`, `bool`, each optionally `| None`; a `Literal` of strings,
its choices; `tuple[str, ...]`, one or more values, the option repeatable; `tuple[int, ...]`, comma-separated
numbers such as `1,4,16`, each in the field's range) and its `metadata`:

- `help`: the text; the field's default is added to it, unless the default is None, False or empty
- `range`: `positive`, `non-negative`, `port`, `fraction` or `probability`: the values an `int` or `float` takes
- `choices`, `metavar`: as argparse's
- `flag`: the option's name when it is not the field's (`--duration` for `duration_s`)

Other metadata keys are left alone: the mapping is shared with whatever else reads the fields.

A field without a default is a required option. A `bool` is `--x` when it defaults to False, else `--x/--no-x`.
An option left out of the command line is left out of the namespace (`argparse.SUPPRESS`), so that
`settings_from` gives the field its own default and a command can tell what was given.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from scaleforge.cli.arguments import (
    comma_separated,
    fraction,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
    probability,
)

Settings = TypeVar("Settings")

RANGES: dict[tuple[type, str], Callable[[str], Any]] = {
    (int, "positive"): positive_int,
    (int, "non-negative"): non_negative_int,
    (int, "port"): port,
    (float, "positive"): positive_float,
    (float, "non-negative"): non_negative_float,
    (float, "fraction"): fraction,
    (float, "probability"): probability,
}


def add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    settings: type,
    *,
    exclude: Collection[str] = (),
    fallback: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """An option for each field of the dataclass `settings` but those in `exclude`. `fallback` gives metadata for
    fields whose own metadata lacks a key (a settings class that does not describe its fields yet)."""
    fallback = fallback or {}
    fields = {field.name: field for field in dataclasses.fields(settings)}
    unknown = (set(exclude) | set(fallback)) - set(fields)
    if unknown:
        raise ValueError(f"{settings.__name__} has no field {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(settings)
    for name, field in fields.items():
        if name in exclude:
            continue
        metadata = {**fallback.get(name, {}), **field.metadata}
        flag = metadata.get("flag", "--" + name.replace("_", "-"))
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, **_argument(field, hints[name], metadata, flag))


def _argument(field: dataclasses.Field, hint: Any, metadata: Mapping[str, Any], flag: str) -> dict[str, Any]:
    """argparse's keywords for one field."""
    kind = _without_none(hint)
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    keywords: dict[str, Any] = {"help": _help(field, metadata.get("help"), required)}
    if kind is bool:
        keywords["action"] = "store_true" if field.default is False else argparse.BooleanOptionalAction
        return keywords
    if typing.get_origin(kind) is typing.Literal:
        metadata = {"choices": list(typing.get_args(kind)), **metadata}
        kind = str
    if kind == tuple[int, ...]:
        number = RANGES[int, metadata["range"]] if "range" in metadata else int
        keywords.update(type=_tuple_of(comma_separated(number)), metavar=metadata.get("metavar", "N,N,..."))
        keywords["required"] = required
        return keywords
    if kind == tuple[str, ...]:
        keywords.update(action="extend", nargs="+")
        kind = str
    if kind not in (int, float, str, Path):
        raise TypeError(f"{field.name}: no command-line option for a field of type {hint}")
    if "range" in metadata:
        keywords["type"] = RANGES[kind, metadata["range"]]
    elif kind is not str:
        keywords["type"] = kind
    if "choices" in metadata:
        keywords["choices"] = metadata["choices"]
    keywords["metavar"] = metadata.get("metavar", None if "choices" in metadata else flag[2:].upper().replace("-", "_"))
    keywords["required"] = required
    return keywords


def _tuple_of(parse: Callable[[str], list[Any]]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type: what `parse` gives, as a tuple (a field's value)."""
    return lambda text: tuple(parse(text))


def _without_none(hint: Any) -> Any:
    """`int` for `int | None`; the hint itself otherwise."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        return kinds[0] if len(kinds) == 1 else hint
    return hint


def _help(field: dataclasses.Field, text: str | None, required: bool) -> str | None:
    """The field's help with its default, escaped for argparse's %-formatting."""
    if text is None:
        return None
    text = text.replace("%", "%%")
    if required or field.default in (None, dataclasses.MISSING) or field.default is False or field.default == ():
        return text
    default = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
    return f"{text} (default: {default})"


def settings_from(settings: type[Settings], args: argparse.Namespace, **values: Any) -> Settings:
    """An instance of `settings` from the namespace's attributes named as its fields (options not given keep the
    field's default), with `values` taking precedence."""
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(settings)
        if field.name not in values and hasattr(args, field.name)
    }
    return settings(**given, **values)


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether the generated option of field `name` was on the command line."""
    return hasattr(args, name)
