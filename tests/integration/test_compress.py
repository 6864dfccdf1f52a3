"""`scaleforge compress` and `scaleforge export` end to end from the CLI on small digits models: the new run
directories load back through `eval` and serving, exports are checked, and bad input exits 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaleforge import load_config
from scaleforge.distributed.parallel_dims import ParallelDims
from scaleforge.serve.model import ServedModel
from scaleforge.training.trainer import train
from tests.support_matrix import record_cell

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]
SHARDED_OR_SPLIT = {  # the support matrix's other strategies, on its process counts
    "fsdp": ParallelDims("fsdp", 2, 1, 1),
    "tp": ParallelDims("tp", 1, 2, 1),
    "pp": ParallelDims("pp", 1, 1, 2),
    "hybrid": ParallelDims("hybrid", 1, 2, 2),
}


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("mlp") / "run"
    train(load_config(None, [*QUICK, "training.epochs=3"]), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def int8_run(mlp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scaleforge.cli import main

    out = tmp_path_factory.mktemp("int8") / "run"
    assert main(["compress", str(mlp_run), "--method", "dynamic-int8", "--out", str(out)]) == 0
    return out


def _val_accuracy(cli, run_dir: Path) -> float:  # noqa: ANN001 - the cli fixture
    result = cli("eval", str(run_dir))
    assert result.code == 0, result.err
    return float(next(line for line in result.out.splitlines() if line.startswith("val_accuracy")).split()[-1])


def test_dynamic_int8_is_a_quarter_of_the_size_keeps_accuracy_and_loads_back(cli, mlp_run: Path, int8_run: Path):
    report = json.loads((int8_run / "final" / "compression.json").read_text())
    assert report["format"] == "dynamic-int8" and report["source"]["run"] == str(mlp_run)
    assert report["after"]["size_bytes"] <= 0.3 * report["before"]["size_bytes"]
    assert report["after"]["val_accuracy"] >= report["before"]["val_accuracy"] - 0.02
    state = load_file(str(int8_run / "final" / "model.safetensors"))
    assert state["blocks.0.linear.weight_int8"].dtype == torch.int8  # data, no pickle
    assert _val_accuracy(cli, int8_run) == pytest.approx(report["after"]["val_accuracy"], abs=1e-4)
    served = ServedModel(int8_run)
    answers = served.answer(served.decode([[[[0.5] * 8] * 8]]))  # one (1, 8, 8) image
    assert len(answers) == 1 and 0 <= answers[0]["top_class"] < 10


def test_pruning_with_fine_tuning_keeps_its_zeros(cli, mlp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = cli("compress", str(mlp_run), "--method", "prune", "--sparsity", "0.7", "--finetune-epochs", "1",
                 "--out", str(out))  # fmt: skip
    assert result.code == 0, result.err
    assert "nonzero parameters" in result.out
    weights = [t for name, t in load_file(str(out / "final" / "model.safetensors")).items() if name.endswith("weight")]
    zeros = sum(int((t == 0).sum()) for t in weights) / sum(t.numel() for t in weights)
    assert zeros >= 0.7 - 1e-3  # fine-tuning moved the other weights, never these
    assert (out / "metrics.jsonl").is_file()  # trained through the normal trainer
    assert _val_accuracy(cli, out) > 0.8


def test_structured_pruning_writes_a_smaller_dense_model_with_its_widths(cli, mlp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "narrowed"
    result = cli("compress", str(mlp_run), "--method", "prune", "--structured", "--out", str(out))
    assert result.code == 0, result.err
    config = load_config(out / "final" / "config.yaml")
    assert list(config.model.params["hidden_layers"]) == [128, 64]  # half of the seed's [256, 128]
    report = json.loads((out / "final" / "compression.json").read_text())
    assert report["after"]["parameters"] < 0.4 * report["before"]["parameters"]
    _val_accuracy(cli, out)  # loads through the ordinary path


def test_exports_are_checked_against_the_model(cli, mlp_run: Path, int8_run: Path, tmp_path: Path) -> None:
    result = cli("export", str(mlp_run), "--format", "onnx", "--dynamic-batch", "--out", str(tmp_path / "m.onnx"))
    assert result.code == 0, result.err
    differences = [
        float(line.split("difference| ")[1].split(",")[0]) for line in result.out.splitlines() if "|" in line
    ]
    assert len(differences) == 2 and max(differences) <= 1e-4  # two batch sizes
    result = cli("export", str(int8_run), "--format", "onnx", "--out", str(tmp_path / "int8.onnx"))
    assert result.code == 0, result.err
    agreements = [float(line.rsplit(" ", 1)[1].rstrip("%")) for line in result.out.splitlines() if "agreement" in line]
    assert agreements and min(agreements) >= 99
    import onnx

    operators = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators  # ONNX Runtime's int8 kernels, not float ones
    result = cli("export", str(int8_run), "--format", "torch-export", "--out", str(tmp_path / "m.pt2"))
    assert result.code == 0, result.err
    assert "exported (int8, torch-export)" in result.out and "top-1 agreement 100.0%" in result.out
    program = torch.export.load(str(tmp_path / "m.pt2"))
    assert "_int_mm" in str(program.graph)  # the int8 matmul, not a float one


@pytest.mark.slow
def test_an_aoti_package_of_the_int8_model_answers_as_the_model(cli, int8_run: Path, tmp_path: Path) -> None:
    package = tmp_path / "int8.aoti.pt2"
    result = cli("export", str(int8_run), "--format", "aoti", "--dynamic-batch", "--out", str(package))
    assert result.code == 0, result.err
    assert result.out.count("max |difference| 0.00e+00") == 2  # compiled, at two batch sizes, the same numbers
    runner = torch._inductor.aoti_load_package(str(package))
    assert runner(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_bad_compress_and_export_requests_exit_2_and_write_nothing(cli, mlp_run: Path, int8_run: Path, tmp_path):  # noqa: ANN001
    out = tmp_path / "out"
    damaged = tmp_path / "damaged"
    shutil.copytree(mlp_run, damaged)
    weights = damaged / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    missing = tmp_path / "missing"
    shutil.copytree(mlp_run, missing)
    (missing / "final" / "data_info.json").unlink()
    cases = {
        ("compress", str(damaged), "--method", "dynamic-int8"): "model.safetensors does not match its SHA-256",
        ("compress", str(missing), "--method", "prune"): "data_info.json missing",
        ("compress", str(mlp_run), "--method", "prune", "--sparsity", "1.5"): "between 0 and 1",
        ("compress", str(mlp_run), "--method", "dynamic-int8", "--structured"): "apply to --method prune only",
        ("compress", str(int8_run), "--method", "dynamic-int8"): "int8 already",
        ("compress", str(mlp_run), "--method", "prune", "--out", str(int8_run)): "exists already",
        ("export", str(mlp_run), "--format", "torch-export", "--opset", "18"): "--opset applies to --format onnx",
        ("export", str(damaged), "--format", "onnx"): "does not match its SHA-256",
    }
    for args, message in cases.items():
        result = cli(*args, *([] if "--out" in args or args[0] == "export" else ["--out", str(out)]))
        assert result.code == 2, (args, result.err)
        assert message in result.err and "Traceback" not in result.err, (args, result.err)
        assert not out.exists() and not out.with_name("out.partial").exists()
    assert not (damaged / "exported").exists() or not any((damaged / "exported").iterdir())


def test_a_compressed_format_no_component_loads_is_refused_and_never_imported(mlp_run: Path, tmp_path: Path) -> None:
    from scaleforge.errors import UsageError
    from scaleforge.runs import load_run, write_manifest

    for fmt in ("int4", "os:system"):  # a run's file names a registered format, never code to import
        run = tmp_path / fmt.replace(":", "-")
        shutil.copytree(mlp_run, run)
        (run / "final" / "compression.json").write_text(json.dumps({"format": fmt}))
        write_manifest(run / "final")
        with pytest.raises(UsageError, match=f"names the format '{fmt}', which no installed component loads"):
            load_run(run, trust_code=True)
    for fmt in (["dynamic-int8"], None, {"name": "state_dict"}):  # not a name: damage, said as such
        run = tmp_path / f"not-a-name-{type(fmt).__name__}"
        shutil.copytree(mlp_run, run)
        (run / "final" / "compression.json").write_text(json.dumps({"format": fmt}))
        write_manifest(run / "final")
        with pytest.raises(UsageError, match="is damaged: its format is"):
            load_run(run)


def test_the_distillation_loss_mixes_the_teachers_softened_outputs_with_the_labels(mlp_run: Path, tmp_path):  # noqa: ANN001
    from scaleforge.compress.distill import DistillationLoss
    from scaleforge.errors import ConfigError
    from scaleforge.runs import load_run
    from scaleforge.training.objectives import Objective
    from scaleforge.training.trainer import check_loss_sees_inputs

    loss = DistillationLoss(str(mlp_run), num_classes=10, temperature=2.0, soft_weight=0.25).train()
    assert not loss.teacher.training and not any(p.requires_grad for p in loss.teacher.parameters())
    inputs, labels = torch.rand(16, 1, 8, 8) * 16, torch.randint(0, 10, (16,))
    teacher_logits = load_run(mlp_run).model(inputs).detach()
    hard = torch.nn.functional.cross_entropy(teacher_logits, labels)
    torch.testing.assert_close(loss(teacher_logits, labels), hard)  # validation: no inputs, the hard loss
    torch.testing.assert_close(loss(teacher_logits, labels, inputs), 0.75 * hard)  # agreeing with the teacher: KL 0
    student = torch.zeros(16, 10, requires_grad=True)
    DistillationLoss(str(mlp_run), num_classes=10, soft_weight=1.0)(student, labels, inputs).backward()
    toward_teacher = -(student.grad * (teacher_logits - teacher_logits.mean(dim=1, keepdim=True))).sum()
    assert toward_teacher > 0  # the soft term alone pulls the student's logits toward the teacher's
    with record_cell("single", "distill", "32"):
        student_config = [*QUICK, "model.hidden_layers=[16]", "training.max_steps=3"]
        student_config.append(f"training.loss={{name: distillation, teacher: '{mlp_run}'}}")
        assert train(load_config(None, student_config), tmp_path / "student")["steps"] == 3
    for strategy in ("pp", "hybrid"):  # the last pipeline stage computes the loss without the inputs
        with record_cell(strategy, "distill", "32") as cell:
            with pytest.raises(ConfigError, match="reads the batch's inputs, which pipeline stages") as refusal:
                check_loss_sees_inputs(Objective(loss, []), "distillation", SHARDED_OR_SPLIT[strategy])
            cell.outcome = f"refused: {refusal.value}"


def test_distill_trains_a_student_under_ddp_with_a_teacher_on_each_process(cli, mlp_run: Path, tmp_path: Path):  # noqa: ANN001
    run_dir = tmp_path / "student"
    with record_cell("ddp", "distill", "32"):
        result = cli("distill", str(mlp_run), *QUICK, "model.hidden_layers=[32]", "training.epochs=2",
                     "training.loss.temperature=2", "--nproc", "2", "--run-dir", str(run_dir))  # fmt: skip
        assert result.code == 0, result.err
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["strategy"] == "ddp" and summary["processes"] == 2
    loss = load_config(run_dir / "final" / "config.yaml").training.loss
    assert loss.name == "distillation" and loss.params["teacher"] == str(mlp_run.resolve())
    assert loss.params["temperature"] == 2.0
    other = cli("distill", str(tmp_path / "no-teacher"), *QUICK, "--run-dir", str(tmp_path / "x"))
    assert other.code == 2 and "is not a finished run" in other.err


UNEXPORTABLE = """
import torch
from torch import nn
from scaleforge import register_model

@register_model("branchy")
class Branchy(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.a, self.b = nn.Linear(64, num_classes), nn.Linear(64, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) if x.sum() > 0 else self.b(x)  # a branch on the data: torch.export cannot capture it
"""


NO_ONNX = """
import torch
from torch import nn
from scaleforge import register_model

@register_model("bessel")
class Bessel(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        y = self.linear(x.flatten(1))
        return y + torch.special.i1e(y)  # no ONNX operator for it
"""


def test_an_export_failure_names_the_operator_and_leaves_no_file(cli, tmp_path: Path) -> None:
    (tmp_path / "bessel.py").write_text(NO_ONNX)
    out = tmp_path / "bessel.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        train(load_config(None, [*QUICK, "imports=[bessel]", "model.architecture=bessel", "training.max_steps=2"]),
              tmp_path / "run")  # fmt: skip
        result = cli("export", str(tmp_path / "run"), "--format", "onnx", "--out", str(out), "--trust-code")
    assert result.code == 2 and "ONNX export failed at torch.ops.prims.bessel_i1e" in result.err, result.err
    assert result.err.count("\n") == 1 and not out.exists() and not list(tmp_path.glob("*.partial*"))


@pytest.mark.slow
def test_static_int8_quantizes_a_cnn_after_calibration_and_loads_back(cli, tmp_path: Path) -> None:
    source = tmp_path / "cnn"
    train(load_config(None, [*QUICK, "model.architecture=cnn", "model.channels=[4,8]", "training.epochs=2"]), source)
    out = tmp_path / "cnn-int8"
    result = cli("compress", str(source), "--method", "static-int8", "--calibration-batches", "4", "--out", str(out))
    assert result.code == 0, result.err
    report = json.loads((out / "final" / "compression.json").read_text())
    assert report["format"] == "static-int8" and 3 * 64 < report["calibration_rows"] <= 4 * 64  # 4 batches
    assert report["after"]["val_accuracy"] >= report["before"]["val_accuracy"] - 0.02
    int8 = {name for name, t in load_file(str(out / "final" / "model.safetensors")).items() if t.dtype == torch.int8}
    assert len(int8) == 3  # both convolutions and the head
    assert _val_accuracy(cli, out) == pytest.approx(report["after"]["val_accuracy"], abs=1e-4)
    exported = cli("export", str(out), "--format", "torch-export", "--out", str(tmp_path / "cnn.pt2"))
    assert exported.code == 0 and "exported (int8, torch-export)" in exported.out, exported.err
    served = ServedModel(out)  # serving loads it as it loads any run
    assert len(served.answer(served.decode(torch.rand(3, 1, 8, 8).tolist()))) == 3


@pytest.mark.slow
def test_qat_trains_fake_quantized_under_ddp_through_the_trainer_then_converts_to_int8(cli, mlp_run: Path, tmp_path):  # noqa: ANN001
    trained = tmp_path / "qat"
    with record_cell("ddp", "qat", "32"):
        result = cli("compress", str(mlp_run), "--method", "qat", "--finetune-epochs", "1", "--nproc", "2",
                     "--out", str(trained))  # fmt: skip
        assert result.code == 0, result.err
        report = json.loads((trained / "final" / "compression.json").read_text())
        assert report["format"] == "qat-int8" and report["options"]["nproc"] == 2
        summary = json.loads((trained / "summary.json").read_text())  # trained by the trainer, on two processes
        assert summary["strategy"] == "ddp" and summary["processes"] == 2
    assert report["after"]["val_accuracy"] >= report["before"]["val_accuracy"] - 0.02
    state = load_file(str(trained / "final" / "model.safetensors"))
    assert sum(t.dtype == torch.int8 for t in state.values()) == 3  # the two hidden layers and the head
    assert _val_accuracy(cli, trained) == pytest.approx(report["after"]["val_accuracy"], abs=1e-4)


def test_quantization_aware_training_runs_on_one_process_and_is_refused_where_it_cannot(tmp_path: Path) -> None:
    from scaleforge.compress.quantize import quantization_aware
    from scaleforge.data.base import DataInfo
    from scaleforge.errors import ConfigError
    from scaleforge.models.mlp import MLP
    from scaleforge.training.preparations import PreparationContext

    qat = [*QUICK, "model.hidden_layers=[16]", "training.max_steps=3", "training.quantization_aware=true"]
    with record_cell("single", "qat", "32"):
        summary = train(load_config(None, qat), tmp_path / "single")
        assert summary["steps"] == 3 and summary["strategy"] == "single"
        state = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
        assert any("activation_post_process" in name for name in state)  # trained with its fake quantizers
    info = DataInfo(task="classification", input_shape=(1, 8, 8), num_classes=10)
    for strategy, dims in SHARDED_OR_SPLIT.items():
        with record_cell(strategy, "qat", "32") as cell:
            with pytest.raises(ConfigError, match=f"runs on one process or under ddp, not {strategy}") as refusal:
                quantization_aware(MLP((1, 8, 8), 10), True, PreparationContext(info, dims))
            cell.outcome = f"refused: {refusal.value}"


def test_static_int8_of_a_model_torch_export_cannot_capture_is_refused(cli, tmp_path: Path) -> None:
    (tmp_path / "branchy.py").write_text(UNEXPORTABLE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        train(load_config(None, [*QUICK, "imports=[branchy]", "model.architecture=branchy", "training.max_steps=2"]),
              tmp_path / "run")  # fmt: skip
        result = cli(
            "compress", str(tmp_path / "run"), "--method", "static-int8", "--out", str(tmp_path / "out"), "--trust-code"
        )
    assert result.code == 2
    assert "static-int8 needs a model torch.export can capture" in result.err and "use dynamic-int8" in result.err
    assert "Traceback" not in result.err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_compress_measures_every_variant_and_draws_them(cli, mlp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = cli("bench", "compress", str(mlp_run), "--finetune-epochs", "1", "--out", str(out))
    assert result.code == 0, result.err
    data = json.loads((out / "compress.json").read_text())
    variants = {row["variant"]: row for row in data["variants"]}
    expected = ["float", "dynamic-int8", "static-int8", "qat", "pruned 50%", "narrowed 50%", "distilled student"]
    assert list(variants) == expected
    for row in variants.values():
        assert row["onnx_per_s"], [line for line in result.out.splitlines() if "ONNX" in line]
        assert row["latency_ms"]["32"] > 0 and 0 < row["val_accuracy"] <= 1
    assert variants["narrowed 50%"]["parameters"] < 0.4 * variants["float"]["parameters"]
    assert variants["distilled student"]["parameters"] == variants["narrowed 50%"]["parameters"]
    assert any("file <= 0.3x float" in name for name in data["targets"])
    assert (out / "compress.png").stat().st_size > 0 and "distilled student" in result.out


def test_dynamic_int8_quantizes_an_lstm_and_exports_it_as_onnx_runtimes_int8_lstm(cli, tmp_path: Path) -> None:
    run, out = tmp_path / "lstm", tmp_path / "lstm-int8"
    lstm = ["model.architecture=lstm", "model.hidden_size=64", "training.epochs=3", "training.learning_rate=0.01"]
    train(load_config(None, [*QUICK, *lstm]), run)  # 84% accurate: few near-ties for int8 rounding to flip
    result = cli("compress", str(run), "--method", "dynamic-int8", "--out", str(out))
    assert result.code == 0, result.err
    report = json.loads((out / "final" / "compression.json").read_text())
    assert report["quantized_layers"] == ["blocks.0.lstm", "blocks.1.lstm", "head"]
    assert report["after"]["size_bytes"] <= 0.3 * report["before"]["size_bytes"]
    assert report["after"]["val_accuracy"] >= report["before"]["val_accuracy"] - 0.02
    assert _val_accuracy(cli, out) == pytest.approx(report["after"]["val_accuracy"], abs=1e-4)
    result = cli("export", str(out), "--format", "onnx", "--dynamic-batch", "--out", str(tmp_path / "lstm.onnx"))
    assert result.code == 0, result.err
    import onnx

    operators = {node.op_type for node in onnx.load(str(tmp_path / "lstm.onnx")).graph.node}
    assert "DynamicQuantizeLSTM" in operators and "LSTM" not in operators


TOKENS = ["data.dataset=synthetic", "data.kind=tokens", "data.seq_len=24", "data.vocab_size=64", "data.num_samples=256"]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("gpt") / "run"
    gpt = ["model.architecture=gpt", "model.n_layers=2", "model.d_model=32", "model.n_heads=2"]
    train(load_config(None, [*QUICK, *gpt, *TOKENS, "training.max_steps=2"]), run)
    return run


def _export_answering_at_every_length(cli, run: Path, out: Path, *options: str):  # noqa: ANN001, ANN202 - cli
    """Export the language model of `run` (24 tokens of 64) to ONNX with a dynamic batch; check that it was checked
    at 1 token, half its context and all of it, and that ONNX Runtime runs it as the model at other batch sizes and
    lengths. The export's CLI result."""
    import numpy as np
    import onnxruntime

    from scaleforge.runs import UNTRUSTED, open_run

    result = cli("export", str(run), "--format", "onnx", "--dynamic-batch", *options, "--out", str(out))
    assert result.code == 0, result.err
    checked = [line for line in result.out.splitlines() if line.startswith("checked on")]
    lengths = [int(line.split(" rows of ")[1].split()[0]) for line in checked]
    assert lengths == [1, 1, 12, 12, 24, 24]  # 1 token, half the context, all of it; each at two batch sizes
    assert all(float(line.split("difference| ")[1].split(",")[0]) <= 1e-4 for line in checked)

    model = open_run(run / "final", UNTRUSTED).model
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", "sequence"]
    assert session.get_outputs()[0].shape == ["batch", "sequence", 64]
    generator = torch.Generator().manual_seed(0)
    for rows, length in [(1, 1), (3, 7), (1, 24), (5, 24), (2, 13)]:
        batch = torch.randint(0, 64, (rows, length), generator=generator)
        with torch.inference_mode():
            expected = model(batch).numpy()
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        assert got.shape == (rows, length, 64) and np.abs(got - expected).max() <= 1e-4
    return result


@pytest.mark.slow
def test_a_gpt_exports_with_a_dynamic_sequence_and_answers_as_the_model_at_every_length(cli, gpt_run: Path, tmp_path):  # noqa: ANN001
    import numpy as np
    import onnxruntime

    from scaleforge.runs import UNTRUSTED, open_run

    run = gpt_run
    result = _export_answering_at_every_length(cli, run, tmp_path / "gpt.onnx", "--kv-cache")
    model = open_run(run / "final", UNTRUSTED).model
    generator = torch.Generator().manual_seed(1)

    pair = [line for line in result.out.splitlines() if line.startswith("prefill/decode checked on")]
    assert len(pair) == 2 and all(float(line.rsplit(" ", 1)[1]) <= 1e-4 for line in pair)  # two batch sizes
    prefill, decode = (
        onnxruntime.InferenceSession(str(tmp_path / f"gpt.{name}.onnx"), providers=["CPUExecutionProvider"])
        for name in ("prefill", "decode")
    )
    batch = torch.randint(0, 64, (3, 24), generator=generator)
    logits, keys, values = prefill.run(None, {"tokens": batch[:, :5].numpy()})
    assert keys.shape == (2, 3, 2, 5, 16)  # layers, batch, heads, positions, head_dim
    steps = [logits]
    for position in range(5, 24):  # one token at a time to the whole context
        feed = {"tokens": batch[:, position : position + 1].numpy(), "past_keys": keys, "past_values": values}
        logits, keys, values = decode.run(None, feed)
        steps.append(logits)
    with torch.inference_mode():
        assert np.abs(np.concatenate(steps, axis=1) - model(batch).numpy()).max() <= 1e-4

    refused = cli("export", str(run), "--format", "torch-export", "--kv-cache", "--out", str(tmp_path / "x.pt2"))
    assert refused.code == 2 and "--kv-cache applies to --format onnx only" in refused.err

    fixed = cli("export", str(run), "--format", "torch-export", "--out", str(tmp_path / "gpt.pt2"))
    assert fixed.code == 0, fixed.err  # the batch fixed, the sequence still free
    rows = int(fixed.out.split("checked on ")[1].split()[0])  # the validation rows: the batch it was exported at
    program = torch.export.load(str(tmp_path / "gpt.pt2")).module()
    assert program(torch.zeros(rows, 5, dtype=torch.long)).shape == (rows, 5, 64)


def test_an_lstm_exports_to_onnx_with_a_dynamic_sequence_and_answers_as_the_model_at_every_length(cli, tmp_path):  # noqa: ANN001
    run = tmp_path / "lstm"
    lstm = ["model.architecture=lstm", "model.hidden_size=32", "model.embedding_dim=16"]
    train(load_config(None, [*QUICK, *lstm, *TOKENS, "training.max_steps=2"]), run)
    _export_answering_at_every_length(cli, run, tmp_path / "lstm.onnx")


def test_a_kv_cache_pair_failing_its_check_leaves_no_export_and_earlier_files_as_they_were(
    cli,
    gpt_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    from scaleforge.errors import UsageError
    from scaleforge.export import formats

    def disagreeing(*args: object) -> None:
        raise UsageError("the prefill/decode pair disagrees with the model")

    monkeypatch.setattr(formats, "_generate_with_pair", disagreeing)
    out = tmp_path / "gpt.onnx"
    out.write_bytes(b"an earlier export")
    result = cli("export", str(gpt_run), "--format", "onnx", "--kv-cache", "--out", str(out))
    assert result.code == 2 and "the prefill/decode pair disagrees with the model" in result.err
    assert [path.name for path in tmp_path.iterdir()] == ["gpt.onnx"] and out.read_bytes() == b"an earlier export"
