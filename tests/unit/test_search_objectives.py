"""Tests for scaleforge.search.objectives: the costs a search can minimise, measured on a trained run."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaleforge.compress.convert import CompressOptions, compress_run
from scaleforge.config import load_config
from scaleforge.errors import ConfigError
from scaleforge.search.objectives import measure, parse_objective
from scaleforge.training.trainer import train

QUICK = ["training.max_steps=3", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("objectives") / "run"
    train(load_config(None, [*QUICK, "model.hidden_layers=[128, 64]"]), folder)
    return folder


def test_each_cost_is_measured_on_the_trained_run(run_dir: Path) -> None:
    objectives = [parse_objective(name) for name in ("val_accuracy", "params", "latency_ms", "int8_size_kib")]
    values = measure(run_dir, objectives, threads=1)
    assert set(values) == {"val_accuracy", "params", "latency_ms", "int8_size_kib"}
    assert values["params"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert 0 < values["latency_ms"] < 1000
    # the size is that of the weights file `compress --method dynamic-int8` writes
    compressed = compress_run(run_dir, CompressOptions(method="dynamic-int8"), run_dir.parent / "int8")
    int8_file = Path(compressed["run_dir"]) / "final" / "model.safetensors"
    assert values["int8_size_kib"] * 1024 == int8_file.stat().st_size
    assert values["int8_size_kib"] * 1024 < 0.5 * (run_dir / "final" / "model.safetensors").stat().st_size


def test_a_metric_the_runs_do_not_report_stops_the_search(run_dir: Path) -> None:
    with pytest.raises(ConfigError) as error:
        measure(run_dir, [parse_objective("val_f1:max")], threads=1)
    assert "--objective val_f1: the runs report no such metric; they report val_loss, val_accuracy" in str(error.value)
