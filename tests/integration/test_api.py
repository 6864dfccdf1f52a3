"""The Python API: `scaleforge.fit` trains what `scaleforge train` trains, bit for bit; configs come as a path, a
mapping or a loaded config, with overrides as strings or a mapping; the run it returns reopens and evaluates."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import scaleforge
from scaleforge.api import Run, resolve_config
from scaleforge.distributed.launch import LaunchOptions
from scaleforge.errors import ConfigError, UsageError
from scaleforge.runs import TRUSTED, UNTRUSTED

OVERRIDES = ["training.epochs=1", "training.max_steps=12", "model.hidden_layers=[32]", "seed=3", "hardware.threads=2"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_fit_and_the_command_line_end_with_bitwise_equal_weights(tmp_path: Path) -> None:
    config = tmp_path / "small.yaml"
    config.write_text("name: small\ntraining:\n  learning_rate: 0.003\n")
    command = [sys.executable, "-m", "scaleforge", "train", str(config), *OVERRIDES, "--run-dir", str(tmp_path / "cli")]
    subprocess.run(command, check=True, capture_output=True, timeout=240)

    run = scaleforge.fit(config, OVERRIDES, run_dir=tmp_path / "api")

    from_cli, from_api = _weights(tmp_path / "cli"), _weights(run.run_dir)
    assert from_cli.keys() == from_api.keys()
    for name, tensor in from_cli.items():
        assert torch.equal(tensor, from_api[name]), name
    assert run.summary["steps"] == 12 and run.config.name == "small"
    saved = [(folder / "final" / "config.yaml").read_text() for folder in (tmp_path / "cli", run.run_dir)]
    assert saved[0] == saved[1]


def test_a_mapping_config_and_mapping_overrides_resolve_as_a_file_and_strings_do(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: c\ntraining:\n  learning_rate: 0.01\n  optimizer: sgd\n")
    from_file = resolve_config(path, ["training.optimizer.momentum=0.9", "training.batch_size=16"])
    from_mapping = resolve_config(
        {"name": "c", "training": {"learning_rate": 0.01, "optimizer": "sgd"}},
        {"training.optimizer.momentum": 0.9, "training.batch_size": 16},
    )
    assert from_file == from_mapping
    assert from_mapping.training.optimizer.params["momentum"] == 0.9
    assert resolve_config(from_file, {"seed": 7}).seed == 7
    assert resolve_config(from_file) is from_file
    assert "fit(overrides=" in resolve_config(None, {"seed": 7}).origin("seed")


def test_an_override_of_a_loaded_config_may_switch_its_components() -> None:
    """The parameters the old model or dataset received by default do not follow the switch to another."""
    loaded = scaleforge.load_config()
    switched = resolve_config(loaded, {"model.architecture": "cnn", "data.dataset": "synthetic"})
    assert switched == scaleforge.load_config(None, ["model.architecture=cnn", "data.dataset=synthetic"])
    assert "hidden_layers" not in switched.model.params
    # a config changed in Python keeps the change: it is rebuilt from its values, not from the data it was loaded from
    changed = dataclasses.replace(loaded, seed=5)
    assert resolve_config(changed, ["training.epochs=2"]).seed == 5


def test_the_public_names_are_the_functions() -> None:
    assert {"fit", "evaluate", "load_run", "Run"} <= set(dir(scaleforge))
    assert callable(scaleforge.fit) and callable(scaleforge.evaluate) and callable(scaleforge.load_run)


def test_bad_configs_and_overrides_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not the string"):
        scaleforge.fit(overrides="training.epochs=1")
    with pytest.raises(ConfigError, match="training.learning_rate"):
        scaleforge.fit({"training": {"learning_rate": "fast"}}, run_dir=tmp_path / "never")
    with pytest.raises(ConfigError, match="did you mean"):
        scaleforge.fit(overrides={"training.epohcs": 1}, run_dir=tmp_path / "never")
    with pytest.raises(UsageError, match="not both"):
        scaleforge.fit(nproc=4, launch=LaunchOptions(nproc=2), run_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_the_returned_run_reopens_and_evaluates(tmp_path: Path) -> None:
    run = scaleforge.fit({"name": "tiny"}, OVERRIDES, run_dir=tmp_path / "run")
    model = run.model()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == run.summary["num_parameters"]
    by_run = scaleforge.evaluate(run)
    assert by_run == scaleforge.evaluate(tmp_path / "run")
    assert by_run["val_accuracy"] == pytest.approx(run.summary["val_accuracy"])
    assert torch.equal(
        next(iter(scaleforge.load_run(tmp_path / "run").model.state_dict().values())),
        next(iter(model.state_dict().values())),
    )
    # the run is trusted as this process's own only while final/ holds the config it was trained from
    assert run.trust() == TRUSTED
    assert Run(run.run_dir, run.summary, scaleforge.load_config(None, ["seed=1"])).trust() == UNTRUSTED


@pytest.mark.slow
def test_fit_launches_workers_for_a_config_that_exists_only_in_this_process(tmp_path: Path) -> None:
    run = scaleforge.fit({"name": "two", "parallel": {"strategy": "ddp"}}, OVERRIDES, run_dir=tmp_path / "r", nproc=2)
    assert run.summary["processes"] == 2 and run.summary["steps"] == 12
    assert run.config.parallel.strategy == "ddp"
    assert "strategy: ddp" in (run.run_dir / "final" / "config.yaml").read_text()
