"""A command whose extra is not installed says which to install, in one line, with exit code 2."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from scaleforge import extras
from scaleforge.errors import UsageError

ABSENT = ("scaleforge_no_such_module",)


def test_require_names_the_extra_and_the_missing_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(extras.EXTRAS, "serve", ("json", *ABSENT))
    with pytest.raises(UsageError) as caught:
        extras.require("serve", "scaleforge serve")
    assert caught.value.one_line() == (
        "usage error: scaleforge serve needs the [serve] extra: pip install 'scaleforge[serve]' "
        "(missing: scaleforge_no_such_module)"
    )
    extras.require("search", "scaleforge search")  # installed here: no error


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("serve", "RUN"), "serve"),
        (("export", "RUN", "--format", "onnx"), "export"),
        (("compress", "RUN", "--method", "static-int8"), "export"),
        (("compress", "RUN", "--method", "qat"), "export"),
        (("stream", "RUN", "--source", "synthetic:8x8"), "stream"),
        (("search", "--space", "space.yaml"), "search"),
        (("search", "show", "STUDY"), "search"),
        (("bench", "serve", "RUN"), "serve"),
        (("bench", "serve", "RUN"), "bench"),
        (("bench", "compress", "RUN"), "export"),
    ],
)
def test_a_command_without_its_extra_says_which_to_install(
    cli, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], extra: str
) -> None:
    monkeypatch.setitem(extras.EXTRAS, extra, ABSENT)
    result = cli(*args)
    assert result.code == 2
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert f"needs the [{extra}] extra: pip install 'scaleforge[{extra}]'" in result.err


def test_serve_describes_its_options_without_its_extra(
    cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ServeSettings` lives apart from the server's modules: the options are known without FastAPI."""
    monkeypatch.setitem(extras.EXTRAS, "serve", ABSENT)
    with pytest.raises(SystemExit) as exit_:
        cli("serve", "--help")
    assert exit_.value.code == 0
    assert "--max-batch-size" in capsys.readouterr().out


def test_the_extras_are_the_packages_and_all_holds_each() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    offered = project["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(offered)
    (everything,) = offered["all"]
    assert set(everything.removeprefix("scaleforge[").removesuffix("]").split(",")) == set(offered) - {
        "all",
        "dev",
        "gpu",
    }
