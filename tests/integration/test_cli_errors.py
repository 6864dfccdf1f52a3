"""Every user error exits with code 2 and one clear line on stderr; internal failures exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaleforge.runs import write_manifest
from tests.conftest import run_subprocess

SEED = "configs/seed_mlp.yaml"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((SEED, "training.batchsize=3"), "training.batchsize: unknown key (did you mean 'batch_size'?)"),
        ((SEED, "model.hiden_layers=[3]"), "model.hiden_layers: MLP takes no parameter 'hiden_layers' (did you mean"),
        (("training.batch_size=abc",), "training.batch_size: expected an integer, got a string 'abc'"),
        (("model.hidden_layers=[a]",), "model.hidden_layers: expected a list of integers"),
        (("model.architecture=mlpp",), "unknown model 'mlpp' (did you mean 'mlp'?); one of: "),
        (("training.optimizer=adamx",), "unknown optimizer 'adamx' (did you mean 'adam'?); one of: adam, adamw"),
        (("training.learning_rate=-0.1",), "training.learning_rate: must be greater than 0, got -0.1"),
        (("training.batch_size=0",), "training.batch_size: must be greater than 0, got 0"),
        (("missing.yaml",), "config file not found: missing.yaml"),
        (("training.epochs",), "override 'training.epochs' is not KEY=VALUE"),
        (("model.num_classes=5",), "model.num_classes: 5 does not match the dataset, which has num_classes=10"),
        (("imports=[no_such_module_here]",), "imports: cannot import 'no_such_module_here'"),
        (("training.batch_size=64", "training.grad_accum_steps=5"), "not divisible by training.grad_accum_steps=5"),
        (("training.batch_size=5000",), "larger than the training split"),
        (("hardware.device=cuda:7",), "hardware.device: 'cuda:7' is not available"),
        (("model.dropout_rate=1.5",), "model: MLP rejected its parameters: dropout_rate must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    result = cli("train", *args, "--run-dir", str(tmp_path / "run"))
    assert result.code == 2
    assert expected in result.err
    assert result.err.count("\n") == 1 and result.err.startswith("config error: ")
    assert not (tmp_path / "run" / "final").exists()


def test_malformed_yaml_names_file_and_line(cli, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  architecture: mlp\n  hidden_layers: [1, 2\ntraining:\n  epochs: 3\n")
    result = cli("config", "show", str(path))
    assert result.code == 2
    assert result.err.startswith(f"config error: {path}:")
    assert "malformed YAML" in result.err and result.err.count("\n") == 1


def test_usage_errors_are_one_line(cli) -> None:
    result = cli("list", "widgets")
    assert result.code == 2
    assert result.err.startswith("usage error: argument kind: invalid choice: 'widgets'")
    assert result.err.count("\n") == 1


def test_eval_of_a_folder_that_is_not_a_run(cli, tmp_path: Path) -> None:
    result = cli("eval", str(tmp_path))
    assert result.code == 2
    assert "is not a finished run" in result.err


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    result = run_subprocess("train", "training.optimizer.lr=0.1", "--run-dir", str(tmp_path / "run"))
    assert result.code == 2
    assert result.err.strip() == (
        "config error: training.optimizer: a mapping needs 'name', the optimizer to use, got {'lr': 0.1} "
        "[override training.optimizer.lr=0.1]"
    )
    assert "Traceback" not in result.err


def test_internal_failure_exits_1_with_traceback(tmp_path: Path) -> None:
    (tmp_path / "broken_net.py").write_text(
        "from torch import nn\n"
        "class Broken(nn.Module):\n"
        "    def __init__(self, num_classes: int):\n"
        "        super().__init__()\n"
        "        self.blocks = nn.ModuleList([nn.Linear(64, num_classes)])\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError('boom in forward')\n"
    )
    result = run_subprocess(
        "train", "model.architecture=broken_net:Broken", "--run-dir", str(tmp_path / "run"), cwd=tmp_path
    )
    assert result.code == 1
    assert "Traceback" in result.err and "boom in forward" in result.err


def test_a_finished_run_is_never_overwritten(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = cli("train", "training.max_steps=3", "logging.progress=none", "--run-dir", str(run_dir))
    assert first.code == 0
    before = (run_dir / "final" / "model.safetensors").read_bytes()
    second = cli("train", "training.max_steps=5", "--run-dir", str(run_dir))
    assert second.code == 2
    assert second.err.startswith(f"usage error: {run_dir} already holds a finished run; choose another --run-dir")
    assert (run_dir / "final" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("seed=-1",), "seed: must be at least 0, got -1"),
        (("training.scheduler={name: step, step_size: 0}",), "step_size must be at least 1"),
        (("training.scheduler={name: cosine, min_lr_ratio: 2}",), "min_lr_ratio must be between 0 and 1"),
        (("data.val_fraction=0.0001",), "the validation split of 'digits' is empty"),
        (("data.val_fraction=2",), "val_fraction must be between 0 and 1"),
        (("training.metrics=[{name: accuracy, top_k: 20}]",), "top_k=20 is more than the dataset's 10 classes"),
        (("training.loss={name: cross_entropy, label_smoothing: 2}",), "label_smoothing must be in [0, 1)"),
        (("training.loss=mse",), "training.loss: mse is for regression data, but the dataset is classification"),
        (("training.callbacks=[{name: early_stopping, patience: 0}]",), "training.callbacks.0: EarlyStopping rejected"),
        (("training.init_from=/no/such/run",), "training.init_from: /no/such/run does not exist"),
        (("training.init_from=pyproject.toml",), "training.init_from: pyproject.toml does not hold this model's"),
    ],
)
def test_bad_component_values_fail_before_training(cli, tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    result = cli("train", *args, "--run-dir", str(tmp_path / "run"))
    assert result.code == 2
    assert expected in result.err and result.err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_config_file_problems(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    result = cli("config", "show", str(binary))
    assert result.code == 2 and "not a UTF-8 text file" in result.err

    twice = tmp_path / "twice.yaml"
    twice.write_text("training:\n  epochs: 3\n  epochs: 4\n")
    result = cli("config", "show", str(twice))
    assert result.code == 2 and f"{twice}:3: training.epochs is set twice (first at {twice}:2)" in result.err

    broken_module = tmp_path / "broken_module.py"
    broken_module.write_text("def oops(:\n")
    monkeypatch.chdir(tmp_path)
    result = cli("config", "show", f"imports=[{broken_module.stem}]")
    assert result.code == 2 and "importing 'broken_module' failed: SyntaxError" in result.err


def test_eval_of_a_damaged_run(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert cli("train", "training.max_steps=2", "logging.progress=none", "--run-dir", str(run_dir)).code == 0
    (run_dir / "final" / "model.safetensors").write_bytes(b"not a safetensors file")
    result = cli("eval", str(run_dir))
    assert result.code == 2 and "final is damaged: model.safetensors has 22 bytes, not " in result.err
    write_manifest(run_dir / "final")  # as if written so: the file itself is refused
    result = cli("eval", str(run_dir))
    assert result.code == 2 and "model.safetensors does not hold this model's weights" in result.err
    (run_dir / "final" / "data_info.json").unlink()
    result = cli("eval", str(run_dir))
    assert result.code == 2 and "data_info.json missing" in result.err


def test_bench_arguments_must_be_positive(cli) -> None:
    result = cli("bench", "overhead", "--repeats", "0")
    assert result.code == 2 and "expected a positive integer, got 0" in result.err
