"""The package's imports point down its layers (tests/layers.py draws them: `python -m tests.layers`)."""

from __future__ import annotations

import ast

from tests import layers


def test_no_module_is_part_of_an_import_cycle() -> None:
    found = layers.cycles(layers.import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(component) for component in found)


def test_no_module_is_part_of_a_cycle_of_imports_run_at_import_time() -> None:
    found = layers.cycles(layers.import_time_graph())
    assert found == [], "cycles at import time:\n" + "\n".join(" <-> ".join(component) for component in found)


def test_an_import_runs_the_packages_above_the_module_it_names(tmp_path, monkeypatch) -> None:
    package = tmp_path / "scaleforge"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "components.py").write_text("from scaleforge.data.base import DataInfo\n")
    (package / "data" / "__init__.py").write_text("from scaleforge.data import image_folder\n")
    (package / "data" / "base.py").write_text("DataInfo = object\n")
    (package / "data" / "image_folder.py").write_text("from scaleforge.components import factory_of\n")
    monkeypatch.setattr(layers, "PACKAGE", package)
    assert layers.cycles(layers.import_time_graph()) == [
        ["scaleforge.components", "scaleforge.data", "scaleforge.data.image_folder"]
    ]
    (package / "components.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from scaleforge.data.base import DataInfo\n"
    )
    assert layers.cycles(layers.import_time_graph()) == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    wrong = layers.upward(layers.import_graph())
    assert wrong == [], "upward or forbidden imports (see LAYERS and FORBIDDEN in tests/layers.py):\n" + "\n".join(
        f"{module} -> {other}" for module, other in wrong
    )


def test_the_checks_catch_an_upward_import_a_forbidden_one_and_a_cycle() -> None:
    graph = {
        "scaleforge.errors": {"scaleforge.training.trainer"},
        "scaleforge.training.trainer": {"scaleforge.errors", "scaleforge.runs"},
        "scaleforge.serve.server": {"scaleforge.distributed.env", "scaleforge.runs"},
        "scaleforge.distributed.env": set(),
        "scaleforge.runs": set(),
    }
    assert layers.cycles(graph) == [["scaleforge.errors", "scaleforge.training.trainer"]]
    assert layers.upward(graph) == [
        ("scaleforge.errors", "scaleforge.training.trainer"),
        ("scaleforge.serve.server", "scaleforge.distributed.env"),
    ]


def test_a_forbidden_import_through_another_module_is_caught() -> None:
    graph = {
        "scaleforge.serve.app": {"scaleforge.compress.convert"},
        "scaleforge.compress.convert": {"scaleforge.training.trainer"},
        "scaleforge.training.trainer": set(),
    }
    assert layers.upward(graph) == [
        ("scaleforge.serve.app", "scaleforge.compress.convert -> scaleforge.training.trainer"),
    ]


def test_every_key_of_the_layers_names_a_part_of_the_package() -> None:
    assert layers.unknown_keys() == []


def test_an_import_inside_a_function_counts_and_one_for_type_checking_does_not() -> None:
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from scaleforge.bench.harness import machine
def load():
    from scaleforge.compress.quantize import dynamic_int8
"""
    known = {"scaleforge.runs", "scaleforge.bench.harness", "scaleforge.compress.quantize"}
    found = layers._imports(ast.parse(source), "scaleforge.runs", False, known)
    assert found == {"scaleforge.compress.quantize"}
