"""The code stays readable: no function in src/ is longer than LIMIT lines unless a comment on the line of its
`def` says why (`# long: <reason>`)."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "scaleforge"
LIMIT = 80


def long_functions(root: Path, limit: int = LIMIT) -> list[str]:
    """`path:line name (N lines)` for each function over `limit` lines without a `# long:` reason."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit and "# long:" not in lines[node.lineno - 1]:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_the_limit_without_a_reason() -> None:
    assert long_functions(SOURCE) == []


def test_the_scan_finds_a_long_function_and_accepts_a_reason(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "module.py").write_text(f"def long():\n{body}\n\n\ndef reasoned():  # long: a table\n{body}\n")
    assert [line.split()[1] for line in long_functions(tmp_path)] == ["long"]
