"""What the commands print besides their progress: tables of results, and counts with their nouns."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """`rows` under `columns` as a table (the first column left-aligned, the others right-aligned)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a pipe or a file has no width to fit: keep every row on one line
        console.width = 240
    console.print(table)


def counted(number: int, noun: str) -> str:
    """`1 thread`, `2 threads`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def format_energy(joules: float | None, source: str | None) -> str:
    """`12.3 kJ`, marked `~` when estimated rather than counted (see training/energy.py); '' when unknown."""
    if joules is None:
        return ""
    scaled = next(((joules / 10**power, unit) for power, unit in ((6, "MJ"), (3, "kJ")) if joules >= 10**power), None)
    value, unit = scaled or (joules, "J")
    return f"{'~' if source is None or 'estimate' in source else ''}{value:,.1f} {unit}"
