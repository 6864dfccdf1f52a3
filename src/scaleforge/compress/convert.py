"""`scaleforge compress`: a finished run directory in, a new run directory out, whose `final/` holds the
compressed model, its config and `compression.json` (the method and its options, the source run and the SHA-256
of its weights, and size, accuracy and latency before and after). `eval`, `serve` and `export` take the new run
directory like any other.

The source is verified against its manifest first; the new run is written under `<out>.partial` and renamed into
place only once its model has loaded back and been measured, so a failure never leaves a half-converted run.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaleforge.config import ContinualSection, RunConfig, dump_yaml
from scaleforge.data.base import DataInfo
from scaleforge.errors import AgreedError, UsageError
from scaleforge.runs import (
    COMPRESSION,
    INT8_FORMATS,
    STATE_DICT,
    TOKENIZER,
    UNTRUSTED,
    Trust,
    compression_of,
    example_inputs,
    fsync_dir,
    open_run,
    save_final,
    sha256_of,
    signing_key,
    verify_final,
    write_durably,
    write_manifest,
)

METHODS = ("dynamic-int8", "static-int8", "qat", "prune")
LATENCY_BATCHES = (1, 32)


@dataclass(frozen=True)
class CompressOptions:
    """What `scaleforge compress` was asked for."""

    method: str = field(
        metadata={
            "choices": METHODS,
            "help": "dynamic-int8: Linear and LSTM layers in int8 (weights per channel, inputs per row), no "
            "calibration; static-int8: Linear and convolution layers in int8 by PT2E (torch.export, torchao's x86 "
            "quantizer), activation ranges from calibration batches; qat: trained fake-quantized for "
            "--finetune-epochs (at least 1) through the trainer, then converted to int8; prune: global magnitude "
            "pruning (zeros), or --structured (fewer units: a smaller dense model)",
        }
    )
    sparsity: float = field(
        default=0.5,
        metadata={"help": "prune: the fraction of weights (or, --structured, of units) removed", "range": "fraction"},
    )
    structured: bool = field(
        default=False,
        metadata={"help": "prune: remove whole hidden units or channels (mlp, cnn): a smaller dense model"},
    )
    finetune_epochs: int = field(
        default=0,
        metadata={
            "help": "prune: then train this many epochs; qat: train fake-quantized this many (at least 1)",
            "range": "non-negative",
        },
    )
    calibration_batches: int = field(
        default=8,
        metadata={"help": "static-int8: training batches whose activations fix the int8 ranges", "range": "positive"},
    )
    nproc: int = field(
        default=1,
        metadata={
            "help": "qat, prune's fine-tuning: processes to train on (the trainer's strategies, as train --nproc)",
            "range": "positive",
        },
    )

    def as_json(self) -> dict[str, Any]:
        if self.method == "prune":
            return {k: v for k, v in dataclasses.asdict(self).items() if k != "calibration_batches"}
        if self.method == "static-int8":
            return {"method": self.method, "calibration_batches": self.calibration_batches}
        if self.method == "qat":
            return {"method": self.method, "finetune_epochs": self.finetune_epochs, "nproc": self.nproc}
        return {"method": self.method}


def default_out(source: Path, options: CompressOptions) -> Path:
    """`<source>-dynamic-int8`, `<source>-pruned50`, `<source>-narrowed50` beside the source run."""
    run = source.parent if source.name == "final" else source
    if options.method == "prune":
        kind = "narrowed" if options.structured else "pruned"
        return run.with_name(f"{run.name}-{kind}{round(options.sparsity * 100)}")
    return run.with_name(f"{run.name}-{options.method}")


def compress_run(
    source: str | Path, options: CompressOptions, out: str | Path | None = None, trust: Trust = UNTRUSTED
) -> dict[str, Any]:
    """Compress the run at `source` (opened with `trust`) into `out` (default: `default_out`); returns
    `compression.json`'s content."""
    if options.method not in METHODS:
        raise UsageError(f"--method: '{options.method}' is not one of {', '.join(METHODS)}")
    final = verify_final(source, trust.signing_key_env)
    out = Path(out) if out is not None else default_out(Path(source), options)
    if out.exists():
        raise UsageError(f"{out} exists already; choose another --out or remove it")
    earlier = compression_of(final)
    if earlier is not None and earlier.get("format") in INT8_FORMATS:
        raise UsageError(f"{source} is int8 already (compressed by {earlier.get('method')}); compress its source run")
    run = open_run(final, trust)
    key = signing_key(trust.signing_key_env, "--signing-key-env")  # the new run is signed as the source was checked
    before = measure(run.model, run.config, run.info, final / "model.safetensors")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a failed earlier attempt left
    try:
        fmt, details = _convert(run.model, run.config, run.info, options, partial)
        report: dict[str, Any] = {
            "method": options.method,
            "format": fmt,
            "options": options.as_json(),
            "source": {"run": str(final.parent), "sha256": sha256_of(final / "model.safetensors")},
            **details,
        }
        record = partial / "final" / COMPRESSION
        if run.tokenizer is not None and not (partial / "final" / TOKENIZER).is_file():
            write_durably(partial / "final" / TOKENIZER, run.tokenizer.to_json().encode())  # the source run's text
        write_durably(record, (json.dumps(report, indent=2) + "\n").encode())  # how the weights load, for `load_run`
        write_manifest(partial / "final", key)
        loaded = open_run(partial, trust)  # proves the new run loads back through the ordinary path
        report["before"] = before
        report["after"] = measure(loaded.model, loaded.config, loaded.info, partial / "final" / "model.safetensors")
        write_durably(record, (json.dumps(report, indent=2) + "\n").encode())
        write_manifest(partial / "final", key)
        partial.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {**report, "run_dir": str(out)}


def _convert(
    model: nn.Module, config: RunConfig, info: DataInfo, options: CompressOptions, partial: Path
) -> tuple[str, dict[str, Any]]:
    """Write the compressed run under `partial`; its `compression.json` format and the method's own figures."""
    model = copy.deepcopy(model)
    if options.method == "dynamic-int8":
        from scaleforge.compress.quantize import dynamic_int8, quantized_layers

        quantized = dynamic_int8(model)
        layers = quantized_layers(quantized)
        if not layers:
            raise UsageError(f"dynamic-int8: {type(model).__name__} has no nn.Linear or nn.LSTM layer to quantize")
        int8_config = _with_device(config, "cpu")  # int8 kernels run on the CPU
        _write_run(partial, quantized.state_dict(), int8_config, info)
        return "dynamic-int8", {"quantized_layers": layers}

    if options.method == "static-int8":
        from scaleforge.compress.quantize import static_int8

        calibration = calibration_batches(config, options.calibration_batches)
        _, state = static_int8(model, example_inputs(info, 2), calibration)
        _write_run(partial, state, _with_device(config, "cpu"), info)
        return "static-int8", {"calibration_rows": sum(len(batch) for batch in calibration)}

    if options.method == "qat":
        return "qat-int8", _quantization_aware(model, config, info, options, partial)

    from scaleforge.compress.prune import prune_structured, prune_unstructured

    details: dict[str, Any]
    if options.structured:
        from scaleforge.components import build_model

        narrowed = prune_structured(model, options.sparsity)
        model_section = dataclasses.replace(config.model, params={**config.model.params, **narrowed.params})
        config = dataclasses.replace(config, model=model_section)
        model = build_model(config.model, info)
        model.load_state_dict(narrowed.state)
        details = {"new_widths": narrowed.params}
    else:
        details = {"zero_fraction": prune_unstructured(model, options.sparsity)}
    if options.finetune_epochs:
        _finetune(model, config, options, partial)
    else:
        _write_run(partial, model.state_dict(), config, info)
    return STATE_DICT, details


def _write_run(partial: Path, state: dict[str, torch.Tensor], config: RunConfig, info: DataInfo) -> None:
    partial.mkdir(parents=True)
    (partial / "config.yaml").write_text(dump_yaml(config))
    save_final(partial / "final", state, config, info)


def _finetune(model: nn.Module, config: RunConfig, options: CompressOptions, partial: Path) -> None:
    """Train the pruned `model` for `finetune_epochs` through the normal trainer into `partial`; unstructured
    zeros stay zero (`training.keep_zeros`)."""
    trained = _train_from(
        model, config, partial, options.nproc, epochs=options.finetune_epochs, keep_zeros=not options.structured
    )
    _write_configs(partial, trained)


def _quantization_aware(
    model: nn.Module, config: RunConfig, info: DataInfo, options: CompressOptions, partial: Path
) -> dict[str, Any]:
    """Train `model` fake-quantized (`training.quantization_aware`) for `finetune_epochs` (at least 1) through the
    normal trainer into `partial`, then put what it learned, converted to int8, in place of its `final/` weights."""
    from safetensors.torch import save

    from scaleforge.components import build_model
    from scaleforge.compress.quantize import int8_state, prepared_for_int8
    from scaleforge.runs import read_weights

    epochs = max(1, options.finetune_epochs)
    trained = _train_from(model, config, partial, options.nproc, epochs=epochs, quantization_aware=True)
    prepared = prepared_for_int8(build_model(config.model, info), example_inputs(info, 2), qat=True)
    prepared.load_state_dict(read_weights(partial / "final" / "model.safetensors"))
    _, state = int8_state(prepared)
    write_durably(partial / "final" / "model.safetensors", save(state))
    _write_configs(partial, _with_device(trained, "cpu"))
    return {"trained_epochs": epochs}


def _train_from(model: nn.Module, config: RunConfig, partial: Path, nproc: int, **changes: Any) -> RunConfig:
    """Train from `model`'s weights, with `config.training` changed by `changes`, through the normal trainer into
    `partial`, on `nproc` processes (started as `scaleforge train --nproc` starts them); the config it trained
    with, but for the scratch file it started from (compression.json says where the weights came from)."""
    from safetensors.torch import save_file

    from scaleforge.training.trainer import train

    with tempfile.TemporaryDirectory() as scratch:
        start = Path(scratch) / "start.safetensors"
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(start))
        # compression's fine-tuning is not a task of a continual sequence: it keeps no buffer, penalty or teacher
        changes.setdefault("continual", ContinualSection())
        training = dataclasses.replace(config.training, max_steps=None, init_from=str(start), **changes)
        config = dataclasses.replace(config, training=training)
        if nproc == 1:
            train(config, partial, resume="never")
        else:
            _launch_training(config, partial, nproc, Path(scratch) / "config.yaml")
    return dataclasses.replace(config, training=dataclasses.replace(training, init_from=None))


def _launch_training(config: RunConfig, partial: Path, nproc: int, config_file: Path) -> None:
    """`scaleforge train CONFIG --nproc N` into `partial`; the launcher has said why when it fails."""
    from scaleforge.distributed.launch import LaunchOptions, launch
    from scaleforge.distributed.parallel_dims import ParallelDims

    ParallelDims.resolve(config.parallel, nproc)  # bad arithmetic fails here, before any process starts
    config_file.write_text(dump_yaml(config))
    code = launch(["train", str(config_file), "--run-dir", str(partial), "--resume", "never"], LaunchOptions(nproc))
    if code != 0:
        raise AgreedError(f"compress: the fine-tuning on {nproc} processes failed, so nothing was written", code)


def _write_configs(partial: Path, config: RunConfig) -> None:
    for path in (partial / "config.yaml", partial / "final" / "config.yaml"):
        path.write_text(dump_yaml(config))


def calibration_batches(config: RunConfig, count: int) -> list[torch.Tensor]:
    """The inputs of the first `count` batches (of `training.batch_size`) of the run's training split."""
    from scaleforge.data.loading import eval_batches
    from scaleforge.training.trainer import build_data

    data = build_data(config.data)
    batches = eval_batches(data.train, config.training.batch_size, torch.device("cpu"))
    return [inputs for inputs, _ in itertools.islice(batches, count)]


def _with_device(config: RunConfig, device: str) -> RunConfig:
    return dataclasses.replace(config, hardware=dataclasses.replace(config.hardware, device=device))


# ------------------------------------------------------------------------------------------------ measuring


def median_ms(call: Callable[[], Any], repeats: int = 30) -> float:
    """The median time of `call()` over `repeats` runs after 3 to warm up, in milliseconds."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


@torch.inference_mode()
def latency_ms(model: nn.Module, inputs: torch.Tensor) -> float:
    """The median time of a forward pass over `inputs` on the CPU, in milliseconds."""
    model.eval()  # a static-int8 model's `eval` returns None
    model = model.cpu()
    return median_ms(lambda: model(inputs))


def weights_of(model: nn.Module) -> list[torch.Tensor]:
    """The model's learned weights: its parameters, int8 weights (held as buffers) and the biases of int8 layers."""
    from scaleforge.compress.quantize import Int8DynamicLinear

    tensors = [p.detach() for p in model.parameters()] + [b for b in model.buffers() if b.dtype == torch.int8]
    for module in model.modules():
        if isinstance(module, Int8DynamicLinear):
            tensors += [module.bias] if module.bias is not None else []
    return tensors


def measure(model: nn.Module, config: RunConfig, info: DataInfo, weights: Path) -> dict[str, Any]:
    """Size, parameters, validation metrics and CPU latency of `model` (whose weights are the file `weights`)."""
    from scaleforge.evaluation import evaluate_model

    tensors = weights_of(model)
    latency = {str(rows): latency_ms(model, example_inputs(info, rows)) for rows in LATENCY_BATCHES}
    return {
        "size_bytes": weights.stat().st_size,
        "parameters": sum(t.numel() for t in tensors),
        "nonzero_parameters": sum(int(t.count_nonzero()) for t in tensors),
        **evaluate_model(model, config, device="cpu"),
        "latency_ms": latency,
        "throughput_per_s": LATENCY_BATCHES[-1] / latency[str(LATENCY_BATCHES[-1])] * 1000,
    }


def print_report(report: dict[str, Any]) -> None:
    """The before/after comparison of a `compress_run` report, as a table."""
    from scaleforge.console import print_table

    before, after = report["before"], report["after"]
    metrics = sorted(key for key in before if key.startswith("val_"))
    rows = [
        _row("file size (KiB)", before["size_bytes"] / 1024, after["size_bytes"] / 1024, "{:,.1f}"),
        _row("parameters", before["parameters"], after["parameters"], "{:,.0f}"),
        _row("nonzero parameters", before["nonzero_parameters"], after["nonzero_parameters"], "{:,.0f}"),
        *(_row(name, before[name], after[name], "{:.4f}", ratio=False) for name in metrics),
        *(
            _row(f"latency batch {rows} (ms, p50)", before["latency_ms"][rows], after["latency_ms"][rows], "{:.3f}")
            for rows in before["latency_ms"]
        ),
        _row("throughput (samples/s)", before["throughput_per_s"], after["throughput_per_s"], "{:,.0f}"),
    ]
    print_table(
        f"{report['method']}: {report['source']['run']} -> {report['run_dir']}", ["", "before", "after", "change"], rows
    )


def _row(name: str, before: float, after: float, fmt: str, ratio: bool = True) -> list[str]:
    if not ratio:
        return [name, fmt.format(before), fmt.format(after), f"{after - before:+.4f}"]
    change = f"{after / before:.2f}x" if before else "-"
    return [name, fmt.format(before), fmt.format(after), change]
