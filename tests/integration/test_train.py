"""End-to-end training from the CLI and through `train()`, read back from the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaleforge import load_config, load_run
from scaleforge.training.trainer import train
from tests.conftest import REPO, run_subprocess

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_run_reaches_95_percent_and_writes_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    result = run_subprocess("train", "--run-dir", str(run_dir))
    assert result.code == 0, result.err
    assert f"results: {run_dir}/" in result.out

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("num_parameters", "steps", "epochs", "val_loss", "val_accuracy", "wall_time_s", "samples_per_s"):
        assert key in summary
    assert summary["val_accuracy"] >= 0.95
    assert summary["wall_time_s"] < 60

    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert steps and evals
    assert {"step", "epoch", "time", "loss", "lr"} <= steps[0].keys()
    assert {"step", "val_loss", "val_accuracy"} <= evals[-1].keys()
    assert steps[-1]["step"] == summary["steps"]
    assert steps[-1]["loss"] < steps[0]["loss"]

    assert load_config(run_dir / "config.yaml") == load_config(None, [])
    assert (run_dir / "loss.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/loss", "val/accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in steps]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] != []

    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    loaded = load_run(run_dir)
    assert set(weights) == set(loaded.model.state_dict())

    evaluated = run_subprocess("eval", str(run_dir))
    assert evaluated.code == 0, evaluated.err
    assert f"val_accuracy: {summary['val_accuracy']:.4f}" in evaluated.out


def test_seed_config_runs_verbatim(cli, tmp_path: Path) -> None:
    result = cli("train", str(REPO / "configs" / "seed_mlp.yaml"), *QUICK, "--run-dir", str(tmp_path / "seed"))
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "seed" / "summary.json").read_text())
    assert summary["epochs"] == 50
    assert summary["val_accuracy"] >= 0.95
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "seed" / "metrics.jsonl") if "lr" in r]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < 1e-6  # the step scheduler decays 10x every 10 epochs


USER_MODEL = """
import torch
from torch import nn
from scaleforge import register_model


@register_model("tiny_user_net")
class TinyUserNet(nn.Module):
    def __init__(self, input_shape, num_classes: int, width: int = 8):
        super().__init__()
        features = 1
        for size in input_shape:
            features *= size
        self.blocks = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU())])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)
"""


@pytest.mark.parametrize(
    "selection",
    [["imports=[user_nets]", "model.architecture=tiny_user_net"], ["model.architecture=user_nets:TinyUserNet"]],
    ids=["imports", "module-path"],
)
def test_user_model_from_outside_the_package(cli, tmp_path: Path, monkeypatch, selection: list[str]) -> None:
    (tmp_path / "user_nets.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "user_nets", raising=False)
    result = cli("train", *selection, "model.width=12", "training.epochs=2", *QUICK, "--run-dir", "run")
    assert result.code == 0, result.err
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert weights["blocks.0.1.weight"].shape == (12, 64)
    bad = cli("train", *selection, "model.widht=12", *QUICK, "--run-dir", "run2")
    assert bad.code == 2 and "(did you mean 'width'?)" in bad.err


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_same_seed_gives_bitwise_equal_weights(tmp_path: Path) -> None:
    overrides = ["training.epochs=2", "model.dropout_rate=0.3", "checkpoint.every_steps=0", *QUICK]
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train(load_config(None, [*overrides, f"seed={seed}"]), tmp_path / name)
        runs[name] = _final_weights(tmp_path / name)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_gradient_accumulation_does_not_change_the_math(tmp_path: Path) -> None:
    overrides = ["training.max_steps=30", "model.dropout_rate=0.0", "checkpoint.every_steps=0", *QUICK]
    train(load_config(None, overrides), tmp_path / "one")
    train(load_config(None, [*overrides, "training.grad_accum_steps=4"]), tmp_path / "four")
    one, four = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "four")
    for name in one:
        torch.testing.assert_close(one[name], four[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_trains(tmp_path: Path, precision: str) -> None:
    config = load_config(
        None,
        [
            f"training.precision={precision}",
            "training.epochs=3",
            "training.clip_grad_norm=1.0",
            "checkpoint.every_steps=0",
            *QUICK,
        ],
    )
    summary = train(config, tmp_path / "run")
    assert summary["precision"] == precision
    assert summary["val_accuracy"] > 0.8


def test_max_steps_eval_every_and_early_stopping(tmp_path: Path) -> None:
    config = load_config(None, ["training.max_steps=25", "training.eval_every_steps=10", *QUICK])
    summary = train(config, tmp_path / "steps")
    evals = [r["step"] for r in read_jsonl(tmp_path / "steps" / "metrics.jsonl") if "val_loss" in r]
    assert summary["steps"] == 25 and evals == [10, 20, 25]  # every 10 steps, and at the end

    config = load_config(
        None,
        [
            "training.learning_rate=1e-7",
            "training.eval_every_steps=2",
            "training.epochs=5",
            "training.callbacks=[{name: early_stopping, patience: 2, min_delta: 1.0}]",
            *QUICK,
        ],
    )
    summary = train(config, tmp_path / "early")
    assert summary["stopped_early"] and summary["steps"] == 6
    logged = [r["step"] for r in read_jsonl(tmp_path / "early" / "metrics.jsonl") if "loss" in r]
    assert logged == [6]  # the steps since the last log line are logged when a run stops early


def test_checkpoints_are_written_and_pruned(tmp_path: Path) -> None:
    config = load_config(None, ["training.max_steps=50", "checkpoint.every_steps=10", "checkpoint.keep=2", *QUICK])
    train(config, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000040", "step-00000050"]
    progress = json.loads((tmp_path / "run" / "checkpoints" / "step-00000050" / "progress.json").read_text())
    assert progress["step"] == 50 and progress["global_sample_position"] == 50 * 64


def test_config_show_list_and_explain(cli, tmp_path: Path) -> None:
    shown = cli("config", "show", str(REPO / "configs" / "seed_mlp.yaml"), "training.epochs=3")
    assert shown.code == 0
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(shown.out)
    assert load_config(dumped).training.epochs == 3

    explained = cli("config", "show", str(REPO / "configs" / "seed_mlp.yaml"), "training.epochs=3", "--explain")
    lines = {line.split(":")[0].strip(): line for line in explained.out.splitlines()}
    assert lines["epochs"].endswith("# override training.epochs=3")
    assert lines["hidden_layers"].endswith("seed_mlp.yaml:3")
    assert lines["every_steps"].endswith("# default")

    listed = cli("list")
    assert listed.code == 0 and "optimizers: adam, adamw, rmsprop, sgd" in listed.out
    models = cli("list", "models")
    assert models.out.startswith("models: ") and {"mlp", "gpt", "lstm"} <= set(models.out[8:].strip().split(", "))


def test_bench_overhead_prints_json(cli) -> None:
    result = cli("bench", "overhead", "--steps", "20", "--repeats", "1", "--no-lightning", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["steps"] == 50  # rounded up to whole log intervals
    assert [(row["workload"], row["loop"]) for row in report["results"]] == [
        ("mlp-128", "plain PyTorch loop"),
        ("mlp-128", "scaleforge trainer"),
        ("digits", "plain PyTorch loop"),
        ("digits", "scaleforge trainer"),
    ]
    batches = {"mlp-128": 128, "digits": 64}
    for plain, trainer in zip(report["results"][::2], report["results"][1::2], strict=True):
        assert 0 < plain["median_step_ms"] < 1000 and 0 < trainer["median_step_ms"] < 1000
        ratio = plain["median_step_ms"] / trainer["median_step_ms"]  # one repeat: the pair ratio is this ratio
        assert trainer["throughput_vs_plain"] == pytest.approx(ratio) and trainer["pair_ratios"] == [
            trainer["throughput_vs_plain"]
        ]
        batch = batches[trainer["workload"]]
        assert trainer["samples_per_s"] == pytest.approx(batch / (trainer["median_step_ms"] / 1e3))
    assert {workload["name"]: workload["evaluation"] for workload in report["workloads"]} == {
        "mlp-128": "none in the timed steps",
        "digits": "after every epoch",
    }


def test_step_clock_times_the_steps_after_warm_up() -> None:
    from scaleforge.bench.overhead import StepClock

    clock = StepClock()
    clock.marks = {25: 0.5, 50: 1.0, 100: 2.0, 102: 2.04}
    assert clock.seconds_per_step(after=50) == pytest.approx(1.04 / 52)


def test_compiled_model_trains_like_the_eager_one(tmp_path: Path) -> None:
    overrides = ["training.max_steps=5", "model.dropout_rate=0.0", "checkpoint.every_steps=0", *QUICK]
    from torch._dynamo.utils import counters

    train(load_config(None, overrides), tmp_path / "eager")
    counters.clear()
    train(load_config(None, [*overrides, "training.compile=true"]), tmp_path / "compiled")
    assert counters["frames"]["ok"] > 0  # it compiled (counting the model's FLOPs must not stop dynamo)
    eager, compiled = _final_weights(tmp_path / "eager"), _final_weights(tmp_path / "compiled")
    assert set(eager) == set(compiled)  # no `_orig_mod.` prefixes in the saved names
    for name in eager:
        torch.testing.assert_close(eager[name], compiled[name], rtol=0, atol=1e-4)
