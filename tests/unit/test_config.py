"""Tests for scaleforge.config: loading, YAML overrides, validation errors, provenance and YAML output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from scaleforge.config import RunConfig, dump_yaml, explain_yaml, load_config
from scaleforge.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEED_CONFIG = CONFIGS / "seed_mlp.yaml"


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _file_entries(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of a parsed YAML file by dotted key."""
    entries: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            entries.update(_file_entries(value, f"{key}."))
        else:
            entries[key] = value
    return entries


def _resolved(data: dict[str, Any], key: str) -> Any:
    """A dotted key of `RunConfig.to_dict()`; a component written as a mapping yields its name."""
    for part in key.split("."):
        data = data[part]
    return data["name"] if isinstance(data, dict) and "name" in data else data


# ------------------------------------------------------------------------------------------------ loading


def test_defaults_load() -> None:
    config = load_config()
    assert isinstance(config, RunConfig)
    assert config.name == "default"
    assert config.seed == 0
    assert config.model.architecture == "mlp"
    assert config.data.dataset == "digits"
    assert config.training.batch_size == 64
    assert config.training.learning_rate == 1e-3
    assert config.training.optimizer.name == "adam"
    assert config.training.scheduler.name == "none"
    assert config.training.grad_accum_steps == 1
    assert config.origin("training.batch_size") == "default"


def test_seed_config_loads_verbatim() -> None:
    config = load_config(SEED_CONFIG)
    written = _file_entries(yaml.safe_load(SEED_CONFIG.read_text()))
    resolved = config.to_dict()
    assert written, "the seed config is empty"
    for key, value in written.items():
        assert _resolved(resolved, key) == value, key
    assert config.name == "seed_mlp"
    assert config.model.params["hidden_layers"] == [512, 256, 128]
    assert config.model.params["dropout_rate"] == 0.3
    assert config.training.epochs == 50
    assert config.training.scheduler.name == "step"
    assert config.origin("model.hidden_layers") == f"{SEED_CONFIG}:3"
    assert config.origin("training.scheduler.name") == f"{SEED_CONFIG}:12"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_loads(path: Path) -> None:
    assert load_config(path).name == path.stem


@pytest.mark.parametrize(
    ("override", "read", "expected", "expected_type"),
    [
        ("training.epochs=3", lambda c: c.training.epochs, 3, int),
        ("model.hidden_layers=[64,32]", lambda c: c.model.params["hidden_layers"], [64, 32], list),
        ("imports=[json]", lambda c: c.imports, ["json"], list),
        ("training.learning_rate=1e-3", lambda c: c.training.learning_rate, 0.001, float),
        ("training.compile=true", lambda c: c.training.compile, True, bool),
        ("training.max_steps=null", lambda c: c.training.max_steps, None, type(None)),
        ("name=my run", lambda c: c.name, "my run", str),
    ],
)
def test_override_value_is_parsed_as_yaml(override: str, read: Any, expected: Any, expected_type: type) -> None:
    config = load_config(None, [override])
    value = read(config)
    assert value == expected
    assert type(value) is expected_type


def test_override_records_its_origin_and_the_last_one_wins() -> None:
    config = load_config(None, ["training.epochs=3", "training.epochs=5"])
    assert config.training.epochs == 5
    assert config.origin("training.epochs") == "override training.epochs=5"


def test_override_beats_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "run.yaml", "training:\n  epochs: 2\n  batch_size: 32\n")
    config = load_config(path, ["training.epochs=7"])
    assert config.training.epochs == 7
    assert config.training.batch_size == 32
    assert config.origin("training.batch_size") == f"{path}:3"


def test_component_parameter_override_on_a_component_named_in_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "run.yaml", "training:\n  scheduler: step\n")
    config = load_config(path, ["training.scheduler.gamma=0.5"])
    assert config.training.scheduler.name == "step"
    assert config.training.scheduler.params == {"step_size": 10, "gamma": 0.5}


def test_exponent_without_dot_in_a_file_is_a_float(tmp_path: Path) -> None:
    path = _write(tmp_path, "run.yaml", "training:\n  learning_rate: 1e-3\n  weight_decay: 5E-4\n")
    config = load_config(path)
    assert isinstance(config.training.learning_rate, float)
    assert config.training.learning_rate == 1e-3
    assert config.training.weight_decay == 5e-4


@pytest.mark.parametrize("override", ["model.architecture=mlp", "training.optimizer=adam"])
def test_naming_the_default_component_changes_nothing(override: str) -> None:
    assert load_config(None, [override]) == load_config()


def test_empty_file_gives_defaults_named_after_the_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "empty.yaml", ""))
    assert config == load_config(None, ["name=empty"])


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            ["training.batchsize=32"],
            ["training.batchsize", "unknown key", "did you mean 'batch_size'", "[override training.batchsize=32]"],
            id="unknown-key",
        ),
        pytest.param(["trainng.epochs=3"], ["trainng", "unknown key", "did you mean 'training'"], id="unknown-section"),
        pytest.param(
            ["model.hiden_layers=[64]"],
            ["model.hiden_layers", "MLP takes no parameter 'hiden_layers'", "did you mean 'hidden_layers'"],
            id="unknown-model-parameter",
        ),
        pytest.param(
            ["training.scheduler={name: step, gama: 0.5}"],
            ["training.scheduler.gama", "step takes no parameter 'gama'", "did you mean 'gamma'"],
            id="unknown-scheduler-parameter",
        ),
        pytest.param(
            ["training.optimizer={name: sgd, lr: 0.1}"],
            ["training.optimizer.lr", "set by scaleforge"],
            id="injected-parameter",
        ),
        pytest.param(
            ["training.epochs=three"], ["training.epochs", "expected an integer", "'three'"], id="string-for-int"
        ),
        pytest.param(["training.epochs=2.5"], ["training.epochs", "expected an integer", "2.5"], id="float-for-int"),
        pytest.param(
            ["training.batch_size=true"], ["training.batch_size", "expected an integer", "True"], id="bool-for-int"
        ),
        pytest.param(["training.learning_rate=fast"], ["training.learning_rate", "expected a number"], id="not-number"),
        pytest.param(["training.compile=maybe"], ["training.compile", "expected true or false"], id="not-bool"),
        pytest.param(
            ["model.hidden_layers=64"], ["model.hidden_layers", "expected a list of integers"], id="int-for-list"
        ),
        pytest.param(
            ["model.activation=relux"], ["model.activation", "one of: gelu, leaky_relu, relu, silu, tanh"], id="literal"
        ),
        pytest.param(["training=3"], ["training", "expected a mapping"], id="scalar-section"),
        pytest.param(
            ["training.optimizer=adamm"],
            ["training.optimizer", "unknown optimizer 'adamm'", "did you mean 'adam'", "one of: adam, adamw, rmsprop"],
            id="unknown-optimizer",
        ),
        pytest.param(
            ["training.scheduler=cosin"],
            ["training.scheduler", "unknown scheduler 'cosin'", "cosine", "warmup_cosine"],
            id="unknown-scheduler",
        ),
        pytest.param(
            ["model.architecture=mlpp"], ["model.architecture", "unknown model 'mlpp'", "mlp"], id="unknown-model"
        ),
        pytest.param(
            ["data.dataset=digitz"], ["data.dataset", "unknown dataset 'digitz'", "digits", "synthetic"], id="dataset"
        ),
        pytest.param(
            ["training.metrics=[acuracy]"], ["training.metrics.0", "did you mean 'accuracy'"], id="unknown-metric"
        ),
        pytest.param(
            ["training.learning_rate=-0.1"],
            ["training.learning_rate", "must be greater than 0", "-0.1"],
            id="negative-learning-rate",
        ),
        pytest.param(["training.batch_size=0"], ["training.batch_size", "must be greater than 0"], id="zero-batch"),
        pytest.param(["data.num_workers=-1"], ["data.num_workers", "must be at least 0", "-1"], id="negative-workers"),
        pytest.param(["checkpoint.keep=0"], ["checkpoint.keep", "must be greater than 0"], id="zero-keep"),
        pytest.param(["training.epochs"], ["'training.epochs'", "is not KEY=VALUE"], id="override-without-equals"),
        pytest.param(["=3"], ["'=3'", "is not KEY=VALUE"], id="override-without-key"),
        pytest.param(
            ["training.epochs=3", "training.epochs.foo=1"],
            ["training.epochs is an integer, not a section"],
            id="override-into-scalar",
        ),
        pytest.param(
            ["training.batch_size=10", "training.grad_accum_steps=3"],
            ["training.batch_size", "10 is not divisible by training.grad_accum_steps=3"],
            id="indivisible-accumulation",
        ),
        pytest.param(["imports=[sf_no_such_module_zz]"], ["imports", "cannot import 'sf_no_such_module_zz'"], id="imp"),
    ],
)
def test_bad_override_raises_config_error_naming_the_key(overrides: list[str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_error_in_a_file_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "run.yaml", "seed: 1\ntraining:\n  epochs: 3\n  batchsize: 32\n")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'") as info:
        load_config(path)
    assert str(info.value).startswith("training.batchsize: ")
    assert f"[{path}:4]" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.yaml", "training:\n  epochs: 3\n   batch_size: 4\n")
    with pytest.raises(ConfigError, match="malformed YAML") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_top_level_list_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "list.yaml", "- training\n- model\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level, got a list"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [("data.num_worker=2", "num_workers"), ("model.architectur=mlp", "architecture")],
)
def test_misspelt_field_of_open_section_suggests_the_field(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"did you mean '{suggestion}'" in str(info.value)


# ------------------------------------------------------------------------------------------------- output


def _explained(text: str) -> dict[str, str]:
    """`name: value` -> origin comment, for each commented line of `explain_yaml` output."""
    origins = {}
    for line in text.splitlines():
        if "# " in line:
            value, _, origin = line.rpartition("# ")
            origins[value.strip()] = origin
    return origins


def test_explain_yaml_names_file_line_override_and_default(tmp_path: Path) -> None:
    path = _write(tmp_path, "run.yaml", "training:\n  learning_rate: 1e-3\n  epochs: 2\n")
    config = load_config(path, ["training.epochs=3"])
    text = explain_yaml(config)
    origins = _explained(text)
    assert origins["learning_rate: 0.001"] == f"{path}:2"
    assert origins["epochs: 3"] == "override training.epochs=3"
    assert origins["batch_size: 64"] == "default"
    assert yaml.safe_load(text) == config.to_dict()


def test_explain_yaml_gives_a_component_name_the_line_of_the_component() -> None:
    config = load_config(SEED_CONFIG)
    origins = _explained(explain_yaml(config))
    assert origins["name: step"] == f"{SEED_CONFIG}:12"
    assert origins["gamma: 0.1"] == "default"


@pytest.mark.parametrize(
    ("path", "overrides"),
    [
        pytest.param(None, [], id="defaults"),
        pytest.param(SEED_CONFIG, [], id="seed"),
        pytest.param(
            SEED_CONFIG,
            [
                "training.optimizer={name: sgd, momentum: 0.5}",
                "training.scheduler=warmup_cosine",
                "training.scheduler.warmup_steps=5",
                "training.callbacks=[{name: early_stopping, patience: 2}]",
                "training.metrics=[accuracy, {name: accuracy, top_k: 2}]",
                "training.clip_grad_norm=1",
                "training.precision=32",
                "data.dataset=synthetic",
                "data.num_samples=100",
                "hardware.threads=2",
            ],
            id="components",
        ),
    ],
)
def test_dump_yaml_round_trips(tmp_path: Path, path: Path | None, overrides: list[str]) -> None:
    config = load_config(path, overrides)
    dumped = _write(tmp_path, "dumped.yaml", dump_yaml(config))
    reloaded = load_config(dumped)
    assert reloaded == config
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.origin("seed") == f"{dumped}:1"  # origins differ; equality ignores them


def test_config_equality_compares_values() -> None:
    assert load_config(None, ["training.epochs=3"]) != load_config()
    assert load_config(None, ["training.optimizer={name: sgd, momentum: 0.5}"]) != load_config(
        None, ["training.optimizer={name: sgd, momentum: 0.6}"]
    )


def test_one_line_is_a_single_line() -> None:
    assert ConfigError("first\n  second\tthird").one_line() == "config error: first second third"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["training.batchsize=32"])
    line = info.value.one_line()
    assert "\n" not in line
    assert line.startswith("config error: training.batchsize: unknown key")
