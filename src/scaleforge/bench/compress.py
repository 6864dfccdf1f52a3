"""`scaleforge bench compress RUN_DIR`: the trained model against each compression of it.

Each variant is made by the same converters users run (`compress_run`, the distillation loss through the
trainer), under `--out`: dynamic-int8, static-int8, qat (trained fake-quantized for `--finetune-epochs`), global
magnitude pruning to half the weights and structured
pruning to half the widths (both fine-tuned for `--finetune-epochs`), and a student with the narrowed widths
trained from scratch on the model's softened outputs for as many epochs as the model itself. For each: file size,
parameters, validation accuracy, CPU latency at batch 1 and 32 (p50 of 30 passes), throughput at batch 32, and
the throughput of its ONNX export under ONNX Runtime at batch 32. A variant that does not apply to the model (no
width plan, not exportable) is listed with the reason. Table, JSON and a PNG of accuracy against latency.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scaleforge.bench.harness import machine, report
from scaleforge.errors import UsageError
from scaleforge.hardware import onnx_session
from scaleforge.runs import UNTRUSTED, Trust

ONNX_ROWS = 32


def run_compress_benchmark(
    run_dir: str | Path, *, out: Path, finetune_epochs: int, as_json: bool, trust: Trust = UNTRUSTED
) -> dict[str, Any]:
    """Make, measure, print and return every variant of the run at `run_dir` (opened with `trust`, as are the
    variants made from it); everything goes under `out`."""
    from scaleforge.compress.convert import CompressOptions, compress_run, measure
    from scaleforge.runs import open_run, verify_final

    final = verify_final(run_dir, trust.signing_key_env)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    source = open_run(final, trust)
    makers: dict[str, Callable[[Path], Any]] = {
        "dynamic-int8": lambda path: compress_run(final, CompressOptions("dynamic-int8"), path, trust),
        "static-int8": lambda path: compress_run(final, CompressOptions("static-int8"), path, trust),
        "qat": lambda path: compress_run(final, CompressOptions("qat", finetune_epochs=finetune_epochs), path, trust),
        "pruned 50%": lambda path: compress_run(
            final, CompressOptions("prune", sparsity=0.5, finetune_epochs=finetune_epochs), path, trust
        ),
        "narrowed 50%": lambda path: compress_run(
            final, CompressOptions("prune", sparsity=0.5, structured=True, finetune_epochs=finetune_epochs), path, trust
        ),
        "distilled student": lambda path: _distil(final, path, trust),
    }
    rows: list[dict[str, Any]] = [
        {"variant": "float", "run_dir": str(final.parent), **measure(source.model, source.config, source.info,
                                                                      final / "model.safetensors")}
    ]  # fmt: skip
    rows[0]["onnx_per_s"] = _onnx_throughput(final.parent, out / "float.onnx", trust)
    for label, make in makers.items():
        path = out / label.split()[0].replace("%", "")
        print(f"{label}: making {path}")
        try:
            make(path)
        except UsageError as error:
            rows.append({"variant": label, "skipped": str(error)})
            continue
        run = open_run(path, trust)
        row = {"variant": label, "run_dir": str(path)}
        row.update(measure(run.model, run.config, run.info, path / "final" / "model.safetensors"))
        row["onnx_per_s"] = _onnx_throughput(path, out / f"{path.name}.onnx", trust)
        rows.append(row)
    result = {"benchmark": "compress", "run_dir": str(final.parent), **machine(), "variants": rows}
    result["targets"] = _targets(rows)
    _plot(rows, out / "compress.png")
    report(
        result,
        out / "compress.json",
        as_json=as_json,
        title=f"Compression of {final.parent} ({source.config.model.architecture}), CPU, {torch.get_num_threads()} "
        "threads",
        columns=[
            "variant",
            "KiB",
            "parameters",
            "val acc",
            "b1 ms",
            "b32 ms",
            "samples/s",
            "b32 speed-up",
            "ONNX Runtime/s",
        ],  # fmt: skip
        rows=[_table_row(row, rows[0]) for row in rows],
        notes=[*(f"{name}: {text}" for name, text in result["targets"].items()), f"results in {out}/ (compress.png)"],
    )
    return result


def _distil(final: Path, path: Path, trust: Trust) -> None:
    """A student with the narrowed widths, trained from scratch on the model's softened outputs and the labels."""
    from scaleforge.compress.prune import prune_structured
    from scaleforge.runs import open_run, run_config
    from scaleforge.training.trainer import train

    widths = prune_structured(open_run(final, trust).model, 0.5).params
    overrides = [f"model.{key}={json.dumps(value)}" for key, value in widths.items()]
    teacher = {"name": "distillation", "teacher": str(final.parent.resolve()), "trust_teacher_code": trust.code}
    overrides += [f"training.loss={json.dumps(teacher)}", "checkpoint.every_steps=0", "logging.progress=none"]
    train(run_config(final, trust, overrides), path, resume="never")


def _onnx_throughput(run_dir: Path, file: Path, trust: Trust) -> float | None:
    """Samples/s of the run's ONNX export under ONNX Runtime at batch `ONNX_ROWS` (None if it cannot export)."""
    from scaleforge.compress.convert import median_ms
    from scaleforge.export.formats import export_run
    from scaleforge.runs import example_inputs, load_description

    try:
        export_run(run_dir, "onnx", dynamic_batch=True, out=file, trust=trust)
    except UsageError as error:
        print(f"  no ONNX export: {error}")
        return None
    _, info = load_description(run_dir, trust)
    session = onnx_session(file)
    feed = {session.get_inputs()[0].name: example_inputs(info, ONNX_ROWS).numpy()}
    return ONNX_ROWS / median_ms(lambda: session.run(None, feed)) * 1000


def _targets(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The issue's targets against the measured figures (a variant that was skipped is said to be)."""
    base = rows[0]
    found = {row["variant"]: row for row in rows if "skipped" not in row}

    def speedup(row: dict[str, Any]) -> float:
        return base["latency_ms"]["32"] / row["latency_ms"]["32"]

    def points(row: dict[str, Any]) -> float:
        return 100 * (base["val_accuracy"] - row["val_accuracy"])

    targets: dict[str, str] = {}
    if "dynamic-int8" in found:
        row = found["dynamic-int8"]
        targets["dynamic-int8 >= 1.8x at batch 32, <= 1 point lost"] = (
            f"{speedup(row):.2f}x, {points(row):+.1f} points lost"
        )
    for label in ("dynamic-int8", "static-int8", "qat"):
        if label in found:
            ratio = found[label]["size_bytes"] / base["size_bytes"]
            targets[f"{label} file <= 0.3x float"] = f"{ratio:.2f}x"
    if "narrowed 50%" in found:
        row = found["narrowed 50%"]
        targets["narrowed >= 1.5x faster, <= 1 point lost"] = f"{speedup(row):.2f}x, {points(row):+.1f} points lost"
    if "distilled student" in found:
        row = found["distilled student"]
        targets["student at <= 1/4 of the parameters keeps >= 97% of the accuracy"] = (
            f"{row['parameters'] / base['parameters']:.2f} of the parameters, "
            f"{row['val_accuracy'] / base['val_accuracy']:.1%} of the accuracy"
        )
    return targets


def _table_row(row: dict[str, Any], base: dict[str, Any]) -> list[str]:
    if "skipped" in row:
        return [row["variant"], "skipped: " + row["skipped"][:80], *[""] * 7]
    onnx = f"{row['onnx_per_s']:,.0f}" if row.get("onnx_per_s") else "-"
    return [
        row["variant"],
        f"{row['size_bytes'] / 1024:,.1f}",
        f"{row['parameters']:,}",
        f"{row['val_accuracy']:.4f}",
        f"{row['latency_ms']['1']:.3f}",
        f"{row['latency_ms']['32']:.3f}",
        f"{row['throughput_per_s']:,.0f}",
        f"{base['latency_ms']['32'] / row['latency_ms']['32']:.2f}x",
        onnx,
    ]


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    measured = [row for row in rows if "skipped" not in row]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for row, marker in zip(measured, "osD^vP*X", strict=False):  # one marker each: the labels would overlap
        axis.scatter(row["latency_ms"]["32"], row["val_accuracy"], marker=marker, s=50, label=row["variant"])
    axis.set(xlabel="CPU latency at batch 32 (ms, p50)", ylabel="validation accuracy", title="accuracy against latency")
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
