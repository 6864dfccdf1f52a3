"""Tests for scaleforge.search.space: reading a space file, conditions, sampling, trial configs, and every way a
space is refused before a trial starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaleforge.config import config_from_dict, read_yaml
from scaleforge.errors import ConfigError
from scaleforge.search.space import Dimension, check_space, read_space, trial_config

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "configs" / "seed_mlp.yaml"


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _seed() -> dict:
    return read_yaml(SEED)[0]


def _first(dimension: Dimension):  # noqa: ANN202 - a value of any type
    return dimension.extremes()[0]


def test_a_space_reads_each_distribution_and_samples_only_the_keys_whose_condition_holds(tmp_path: Path) -> None:
    space = read_space(
        _space(
            tmp_path,
            """
model.architecture: {choice: [cnn, mlp]}
model.hidden_layers: {choice: [[64], [128, 64]], when: {model.architecture: mlp}}
model.channels: {choice: [[8, 16]], when: {model.architecture: [cnn]}}
model.dropout_rate: {uniform: [0.0, 0.5], step: 0.1}
training.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}
training.epochs: {int: [2, 8]}
training.batch_size: {log_int: [16, 256]}
""",
        )
    )
    kinds = {d.key: d.kind for d in space.dimensions}
    assert kinds == {
        "model.architecture": "choice",
        "model.hidden_layers": "choice",
        "model.channels": "choice",
        "model.dropout_rate": "uniform",
        "training.learning_rate": "log_uniform",
        "training.epochs": "int",
        "training.batch_size": "log_int",
    }
    cnn = space.sample(_first)
    assert cnn["model.architecture"] == "cnn" and "model.hidden_layers" not in cnn
    assert cnn["model.channels"] == [8, 16]
    mlp = space.sample(lambda d: d.extremes()[-1])
    assert mlp["model.hidden_layers"] == [128, 64] and "model.channels" not in mlp
    assert (mlp["training.learning_rate"], mlp["training.epochs"]) == (1e-2, 8)


def test_list_choices_go_to_optuna_as_text_and_come_back_as_lists(tmp_path: Path) -> None:
    import optuna

    space = read_space(_space(tmp_path, "model.hidden_layers: {choice: [[64], [128, 64]]}\n"))
    dimension = space.dimensions[0]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    value = dimension.suggest(trial)
    assert value in ([64], [128, 64])
    assert trial.params["model.hidden_layers"] == str(value).replace(" ", "").replace(",", ", ")


def test_a_trial_that_changes_the_architecture_leaves_the_base_configs_other_model_parameters_behind() -> None:
    data = trial_config(_seed(), {"model.architecture": "cnn", "model.channels": [8, 16]})
    assert data["model"] == {"architecture": "cnn", "num_classes": 10, "channels": [8, 16], "dropout_rate": 0.3}
    config = config_from_dict(data)
    assert config.model.params["channels"] == [8, 16]
    kept = trial_config(_seed(), {"model.hidden_layers": [64]})  # the same architecture keeps everything
    assert kept["model"]["activation"] == "relu" and kept["model"]["hidden_layers"] == [64]
    assert _seed()["model"]["hidden_layers"] == [512, 256, 128]  # the base is not changed
    # another optimizer keeps the base's parameters it takes, and drops those it does not
    base = {**_seed(), "training": {"optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True}}}
    assert trial_config(base, {"training.optimizer": "rmsprop"})["training"]["optimizer"] == {
        "name": "rmsprop",
        "momentum": 0.9,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the space is empty"),
        ("training.learning_rate: 0.01\n", "training.learning_rate: expected a distribution"),
        ("training.learning_rate: {unifrom: [0, 1]}\n", "unknown 'unifrom' (did you mean 'uniform'?)"),
        ("training.learning_rate: {uniform: [0.5, 0.1]}\n", "the range [0.5, 0.1] is empty"),
        ("training.learning_rate: {log_uniform: [0, 0.1]}\n", "log_uniform needs a positive low end"),
        ("training.epochs: {int: [2.5, 8]}\n", "int needs whole numbers"),
        ("model.hidden_layers: {choice: []}\n", "choice needs a non-empty list"),
        ("model.dropout_rate: {uniform: [0, 0.5], choice: [0.1]}\n", "give exactly one distribution"),
        ("training.epochs: {int: [2, 8], step: 1.5}\n", "int takes a whole 'step', got 1.5"),
        ("seed: {choice: [2026-12-01]}\n", "choice holds a value that is not plain data"),
        ("learning_rate: {uniform: [0, 1]}\n", "expected a dotted config key"),
        (
            "model.hidden_layers: {choice: [[64]], when: {model.architecture: mlp}}\n",
            "'when' names model.architecture, which is not a choice key above it",
        ),
        (
            "model.architecture: {choice: [mlp]}\n"
            "model.hidden_layers: {choice: [[64]], when: {model.architecture: cnn}}\n",
            'asks for model.architecture="cnn", which is not one of "mlp"',
        ),
        (
            "training.learning_rate: {uniform: [0.001, 0.1]}\nenqueue: [{training.learning_rate: 0.5}]\n",
            "enqueue.0: training.learning_rate=0.5 is not uniform from 0.001 to 0.1",
        ),
    ],
)
def test_a_malformed_space_is_refused_naming_its_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        read_space(_space(tmp_path, text))
    assert message in str(error.value)
    if text:
        assert f"{tmp_path / 'space.yaml'}:" in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a key no chosen component takes: cnn has no hidden_layers
        (
            "model.architecture: {choice: [mlp, cnn]}\nmodel.hidden_layers: {choice: [[64]]}\n",
            "model.hidden_layers: CNN takes no parameter 'hidden_layers'",
        ),
        ("training.learnin_rate: {uniform: [0.001, 0.1]}\n", "(did you mean 'learning_rate'?)"),
        ("model.widths: {choice: [[64]]}\n", "MLP takes no parameter 'widths'"),
        ("training.batch_size: {int: [0, 64]}\n", "training.batch_size: must be greater than 0, got 0"),
        ("training.optimizer: {choice: [adam, sgdd]}\n", "unknown optimizer 'sgdd' (did you mean 'sgd'?)"),
        (
            "model.architecture: {choice: [mlp, cnn]}\n"
            "model.channels: {choice: [[8]], when: {model.architecture: cnn}}\n"
            "enqueue: [{model.architecture: mlp, model.channels: [8]}]\n",
            "enqueue.0: model.channels does not apply to that trial",
        ),
    ],
)
def test_a_space_whose_configs_the_loader_refuses_is_refused_before_any_trial(
    tmp_path: Path, text: str, message: str
) -> None:
    space = read_space(_space(tmp_path, text))
    with pytest.raises(ConfigError) as error:
        check_space(space, _seed())
    assert message in str(error.value)
    assert str(error.value).startswith(f"{tmp_path / 'space.yaml'}:")  # the file, and the line of the key


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "search").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_space_is_checked_against_the_seed_config(path: Path) -> None:
    space = read_space(path)
    check_space(space, _seed())
    for values in space.enqueued:
        config_from_dict(trial_config(_seed(), values))
