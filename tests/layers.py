"""The package's layers and the imports between them.

`python -m tests.layers` prints the layer picture: for each layer, the layers it imports, then every import cycle
between modules and every import that points up a layer. `tests/unit/test_layers.py` fails on either. Every
`import`/`from ... import` of a scaleforge module counts, at module level or inside a function alike: an import
deferred to call time is still a dependency. Only imports under `if TYPE_CHECKING:` are left out, since they never
run.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scaleforge"

# Bottom to top. A module may import its own layer and the layers below it, never one above. A key names a module
# or a subpackage (every module under it); the longest matching key wins.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["errors", "registry", "config", "processes", "network", "console", "extras", "files"]),
    ("hardware", ["hardware"]),
    ("models, data", ["models", "data", "components"]),
    ("runs", ["runs"]),
    ("generation", ["generation"]),
    ("distributed", ["distributed"]),
    ("training", ["training", "evaluation"]),
    ("compress, export", ["compress", "export"]),
    ("serve, stream", ["serve", "stream"]),
    ("search, federated, bench", ["search", "federated", "bench"]),
    ("cli, api", ["cli", "api", "__init__", "__main__"]),
]
# Imports that the layer order admits but the design does not: product code never imports the benchmarks, and
# serving and streaming read run directories without the trainer or torch.distributed.
FORBIDDEN = [
    ("search", "bench"),
    ("federated", "bench"),
    ("serve", "distributed"),
    ("stream", "distributed"),
    ("serve", "training"),
    ("stream", "training"),
]


def module_name(path: Path) -> str:
    """`scaleforge.training.trainer` for src/scaleforge/training/trainer.py; packages by their __init__."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The index in LAYERS of a scaleforge module."""
    inner = module.split(".")[1:] or ["__init__"]
    best, best_length = None, -1
    for index, (_, keys) in enumerate(LAYERS):
        for key in keys:
            key_parts = key.split(".")
            if inner[: len(key_parts)] == key_parts and len(key_parts) > best_length:
                best, best_length = index, len(key_parts)
    if best is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in tests/layers.py")
    return best


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _modules() -> dict[str, Path]:
    """Every module of the package by name, with its file."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Each scaleforge module and the scaleforge modules it imports (a package's __init__ counts as the package)."""
    names = _modules()
    known = set(names)
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text(), str(path))
        found = _imports(tree, name, path.name == "__init__.py", known)
        # `from scaleforge.x import y` also runs scaleforge/__init__ and scaleforge/x/__init__; those are the
        # packages' own business, not an edge of this module.
        graph[name] = {other for other in found if not name.startswith(other + ".") and other != "scaleforge"}
    return graph


def import_time_graph() -> dict[str, set[str]]:
    """Each module and the modules its module-level imports run when it is first imported: the module imported and
    every package above it (`from scaleforge.data.base import x` runs `scaleforge/data/__init__.py` first), but not
    the root package nor the importer's own packages. A cycle here fails whichever of its modules a process imports
    first (a name taken from a module still half made), whatever `import_graph`, which sees a package's modules
    and not its `__init__`'s own imports as one, says."""
    names = _modules()
    known = set(names)
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text(), str(path))
        statements: list[ast.stmt] = []
        for node in tree.body:  # at module level, in a plain `if` or `try` too; never under TYPE_CHECKING
            if isinstance(node, ast.If):
                statements += [] if _type_checking_only(node) else node.body + node.orelse
            elif isinstance(node, ast.Try):
                statements += node.body
            else:
                statements.append(node)
        found = _imports(ast.Module(body=statements, type_ignores=[]), name, path.name == "__init__.py", known)
        ran = set()
        for other in found:
            while other and other != "scaleforge":
                if other != name and not name.startswith(other + "."):
                    ran.add(other)
                other = other.rpartition(".")[0]
        graph[name] = ran
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a module to one in a higher layer, and the paths of imports, direct or through other modules,
    from a module to one that FORBIDDEN keeps it from (as `(module, "a -> b -> c")`)."""
    wrong = []
    for module, imported in sorted(graph.items()):
        wrong.extend((module, other) for other in sorted(imported) if layer_of(other) > layer_of(module))
        for low, high in FORBIDDEN:
            if _within(module, low):
                path = _path_to(graph, module, high)
                if path:
                    wrong.append((module, path[-1] if len(path) == 2 else " -> ".join(path[1:])))
    return wrong


def _path_to(graph: dict[str, set[str]], start: str, key: str) -> list[str]:
    """The shortest chain of imports from `start` to a module within `key` (empty if there is none)."""
    came_from: dict[str, str] = {start: ""}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for other in sorted(graph.get(module, ())):
                if other in came_from:
                    continue
                came_from[other] = module
                if _within(other, key):
                    path = [other]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                following.append(other)
        frontier = following
    return []


def unknown_keys() -> list[str]:
    """Keys of LAYERS and FORBIDDEN that name no module or subpackage of the package."""
    names = {module_name(path) for path in PACKAGE.rglob("*.py")} | {"scaleforge.__init__"}  # the package itself
    keys = [key for _, layer in LAYERS for key in layer] + [key for pair in FORBIDDEN for key in pair]
    return [key for key in keys if not any(_within(name, key) for name in names) and f"scaleforge.{key}" not in names]


def _within(module: str, key: str) -> bool:
    inner = module.split(".", 1)[1] if "." in module else ""
    return inner == key or inner.startswith(key + ".")


def picture(graph: dict[str, set[str]]) -> str:
    """The layers from top to bottom, each with the parts (modules and subpackages) of other layers it imports."""
    uses: dict[int, set[str]] = defaultdict(set)
    for module, imported in graph.items():
        for other in imported:
            if layer_of(other) != layer_of(module):
                uses[layer_of(module)].add(other.split(".")[1])
    lines = []
    for number in reversed(range(len(LAYERS))):
        name = LAYERS[number][0]
        parts = sorted(uses[number], key=lambda part: (-layer_of(f"scaleforge.{part}"), part))
        marker = " <- imports a higher layer" if any(layer_of(f"scaleforge.{p}") > number for p in parts) else ""
        lines.append(f"{number}  {name:<18} imports: {', '.join(parts) or '-'}{marker}")
    return "\n".join(lines)


def main() -> int:
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(len(v) for v in graph.values())} imports between them\n")
    print(picture(graph))
    found_cycles = cycles(graph)
    at_import = cycles(import_time_graph())
    wrong = upward(graph)
    print(f"\nimport cycles: {len(found_cycles)}")
    for component in found_cycles:
        print("  " + " <-> ".join(name.removeprefix("scaleforge.") for name in component))
    print(f"cycles at import time (packages' __init__ included): {len(at_import)}")
    for component in at_import:
        print("  " + " <-> ".join(name.removeprefix("scaleforge.") for name in component))
    print(f"upward imports: {len(wrong)}")
    for module, other in wrong:
        print(f"  {module.removeprefix('scaleforge.')} -> {other.removeprefix('scaleforge.')}")
    return 1 if found_cycles or at_import or wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
