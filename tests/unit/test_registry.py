"""Tests for scaleforge.registry: registration, misses, `module:Attr` paths and entry-point plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from scaleforge.config import load_config
from scaleforge.errors import ConfigError
from scaleforge.registry import Registry

USER_MODULE = "sf_test_user_components"
USER_SOURCE = '''
from torch import nn


class Widget:
    """A component class."""


class Outer:
    @staticmethod
    def make() -> str:
        return "made"


NOT_CALLABLE = 3


class TinyModel(nn.Module):
    def __init__(self, input_shape, num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.width = width
'''


def _thing_registry() -> Registry:
    things = Registry("thing")

    @things.register()
    def alpha() -> str:
        return "alpha"

    @things.register("beta")
    def second() -> str:
        return "beta"

    return things


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of an importable module written into tmp_path."""
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(USER_MODULE, None)
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


# ------------------------------------------------------------------------------------------- registration


def test_register_defaults_to_the_lower_cased_name_and_lists_sorted() -> None:
    things = _thing_registry()
    assert things.names() == ["alpha", "beta"]
    assert list(things) == ["alpha", "beta"]
    assert "beta" in things
    assert "second" not in things
    assert things.get("beta")() == "beta"

    @things.register()
    class CamelCase:
        pass

    assert things.get("camelcase") is CamelCase


def test_duplicate_registration_raises_value_error() -> None:
    things = _thing_registry()

    def other() -> str:
        return "other"

    with pytest.raises(ValueError, match="thing 'alpha' is already registered by .*alpha"):
        things.register("alpha")(other)
    assert things.get("alpha")() == "alpha"


def test_registering_the_same_object_again_is_allowed() -> None:
    things = _thing_registry()
    alpha = things.get("alpha")
    assert things.register("alpha")(alpha) is alpha
    assert things.names() == ["alpha", "beta"]


def test_miss_lists_valid_names_and_suggests_one() -> None:
    with pytest.raises(ConfigError) as info:
        _thing_registry().get("alpah", key="training.thing")
    message = str(info.value)
    assert message.startswith("training.thing: unknown thing 'alpah'")
    assert "(did you mean 'alpha'?)" in message
    assert "one of: alpha, beta" in message


def test_miss_with_nothing_close_has_no_suggestion() -> None:
    with pytest.raises(ConfigError, match="one of: alpha, beta") as info:
        _thing_registry().get("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert str(info.value).startswith("unknown thing 'zzzzzz'")


# ------------------------------------------------------------------------------------------ module:Attr


def test_module_attr_path_resolves(user_module: str) -> None:
    things = _thing_registry()
    widget = things.get(f"{user_module}:Widget")
    assert widget is sys.modules[user_module].Widget
    assert things.get(f"{user_module}:Outer.make")() == "made"


def test_module_attr_path_works_as_a_model_in_a_config(user_module: str) -> None:
    config = load_config(None, [f"model.architecture={user_module}:TinyModel", "model.width=8"])
    assert config.model.architecture == f"{user_module}:TinyModel"
    assert config.model.params == {"width": 8}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("sf_no_such_module_zz:Thing", "cannot import 'sf_no_such_module_zz'"),
        (f"{USER_MODULE}:Missing", f"module '{USER_MODULE}' has no attribute 'Missing'"),
        (f"{USER_MODULE}:Outer.missing", f"module '{USER_MODULE}' has no attribute 'Outer.missing'"),
        (f"{USER_MODULE}:NOT_CALLABLE", "is not a class or function"),
        (f"{USER_MODULE}:", "is not a 'module:Attr' path"),
        (":Widget", "is not a 'module:Attr' path"),
    ],
)
def test_bad_module_attr_path_raises_config_error(user_module: str, path: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _thing_registry().get(path, key="model.architecture")
    message = str(info.value)
    assert message.startswith("model.architecture: ")
    assert expected in message


# ---------------------------------------------------------------------------------------------- plugins


def _install_plugin(directory: Path, module_source: str) -> None:
    """A `my_plugin` module and the dist-info that declares it in the `scaleforge.plugins` group."""
    (directory / "my_plugin.py").write_text(textwrap.dedent(module_source))
    dist_info = directory / "my_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[scaleforge.plugins]\nmy_plugin = my_plugin\n")


def _run_child(directory: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(directory)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_entry_point_plugin_is_discovered(tmp_path: Path) -> None:
    _install_plugin(
        tmp_path,
        """
        from torch import nn

        from scaleforge import register_model


        @register_model("plugin_model")
        class PluginModel(nn.Module):
            pass
        """,
    )
    child = _run_child(
        tmp_path,
        """
        import scaleforge.registry
        print('plugin_model' in scaleforge.registry.MODELS.names())
        """,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "True"


def test_broken_plugin_names_itself(tmp_path: Path) -> None:
    _install_plugin(tmp_path, "raise RuntimeError('boom')\n")
    child = _run_child(
        tmp_path,
        """
        import scaleforge.registry
        from scaleforge.errors import ConfigError
        try:
            scaleforge.registry.MODELS.names()
        except ConfigError as error:
            print(error)
        """,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "plugin 'my_plugin' (my_plugin) failed to load: boom"


def test_decorator_works_with_and_without_arguments() -> None:
    things = Registry("thing")

    @things.register
    class Bare:
        pass

    @things.register()
    class Empty:
        pass

    @things.register("named")
    class Named:
        pass

    assert things._entries == {"bare": Bare, "empty": Empty, "named": Named}
    with pytest.raises(TypeError, match="a thing name must be a string"):
        things.register(3)  # type: ignore[arg-type]
