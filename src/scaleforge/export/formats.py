"""`scaleforge export`: a finished run's model as a file other runtimes load, checked before it is reported done.

- `onnx`: through torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`), one self-contained file, run
  back with ONNX Runtime;
- `torch-export`: a `.pt2` ExportedProgram (`torch.export.save`), loaded back with `torch.export.load`;
- `aoti`: an AOTInductor package (`.aoti.pt2`, compiled ahead of time by Inductor: a C++ compiler is needed),
  loaded back with `torch._inductor.aoti_load_package`; the supported successor of TorchScript, which is
  deprecated, for running without Python.

A `gpt` is exported with a dynamic sequence dimension as well, from 1 token to its context, whatever
`--dynamic-batch` says: a language model is fed sequences of every length while it generates. Its graph reads the
whole sequence and returns every position's logits (B, T, vocab); generating with it means reading the context
again for each token. `--kv-cache` writes, beside it, a prefill/decode pair with the key/value cache as the
graphs' inputs and outputs (docs/compression.md#export says what each costs). An `lstm` language model goes to
ONNX with a dynamic sequence dimension too, from 1 token to its training `seq_len` (`_sequence_length`).

All take float models and int8 runs: a `dynamic-int8` run goes to ONNX as ONNX Runtime's own dynamic int8 graph
(its quantizer applied to the float model that holds the run's int8 weights), a `static-int8` one with its
quantize and dequantize steps. The check runs the exported model on up to 256 validation rows, and with
`--dynamic-batch` on a batch one row smaller, a language model with a dynamic sequence at 1 token, half its
longest sequence and all of it, against the eager model: float outputs must agree to 1e-4, int8
ones in top-1 class on at least 99% of the rows (ONNX Runtime's int8 kernels round differently, and its int8
LSTM keeps 7 bits of each weight). The files (with `--kv-cache`, the pair too) are written under `.partial` names
and renamed into place once all are checked: a failed export or check leaves nothing (and earlier files of those
names as they were).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scaleforge.errors import UsageError, describe_export_error
from scaleforge.hardware import onnx_session
from scaleforge.runs import INT8_FORMATS, UNTRUSTED, Trust, compression_of, open_run, verify_final

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2", "aoti": ".aoti.pt2"}
FLOAT_TOLERANCE = 1e-4
INT8_AGREEMENT = 0.99
CHECK_ROWS = 256  # enough that 99% allows a near-tie or two to round the other way (of 32, one is 3%)
MAX_DYNAMIC_BATCH = 4096

_LSTM_AT_ANY_LENGTH: Callable[[], contextlib.AbstractContextManager[None]] | None
try:  # nn.LSTM decomposed with a while loop over the sequence, whatever its length
    from torch.export._patches import register_lstm_while_loop_decomposition as _LSTM_AT_ANY_LENGTH
except ImportError:  # an older torch: an lstm keeps the sequence length it is exported at
    _LSTM_AT_ANY_LENGTH = None


@dataclass(frozen=True)
class ExportCheck:
    """How the exported model's outputs compared with the eager model's on a batch of `rows`."""

    rows: int
    max_abs_diff: float
    top1_agreement: float
    tokens: int | None = None  # each row's sequence length, for a language model


def export_run(
    run_dir: str | Path,
    fmt: str,
    *,
    dynamic_batch: bool = False,
    kv_cache: bool = False,
    opset: int | None = None,
    out: str | Path | None = None,
    trust: Trust = UNTRUSTED,
) -> dict[str, Any]:
    """Export the model of the run at `run_dir` to `out` (default: `<run>/exported/model.<ext>`), check it, and
    return what was checked. With `kv_cache`, a gpt's prefill/decode pair is written beside it (`kv_cache_pair`)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UsageError("--opset applies to --format onnx only")
    if kv_cache and fmt != "onnx":
        raise UsageError("--kv-cache applies to --format onnx only")
    final = verify_final(run_dir, trust.signing_key_env)
    compression = compression_of(final) or {}
    int8 = compression.get("format") in INT8_FORMATS
    run = open_run(final, trust)
    if kv_cache and (run.config.model.architecture != "gpt" or int8):
        raise UsageError(f"--kv-cache takes a float gpt; {final.parent} holds a{' n int8' if int8 else ''} "
                         f"{run.config.model.architecture}")  # fmt: skip
    model = run.model.cpu()  # in eval mode, as `load_run` leaves it
    target = Path(out) if out is not None else final.parent / "exported" / f"model{FORMATS[fmt]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    inputs = validation_inputs(run, CHECK_ROWS)
    context = _sequence_length(run, fmt)
    pair_files = _kv_cache_files(target) if kv_cache else {}
    with _renamed_once_checked([target, *pair_files.values()]) as (partial, *pair_partial):
        with _quiet_exporters():
            dynamic_int8 = compression.get("format") == "dynamic-int8"
            runner = _export(fmt, model, inputs, partial, _dynamic_shapes(dynamic_batch, context), opset,
                             dynamic_int8=dynamic_int8)  # fmt: skip
        checks = [_compare(model, runner, batch) for batch in _check_batches(inputs, dynamic_batch, context)]
        for check in checks:
            _require(check, int8, fmt)
        if kv_cache:
            assert context is not None
            pair_checks = _write_kv_cache_pair(
                model, inputs, context, dict(zip(pair_files, pair_partial, strict=True)), dynamic_batch, opset
            )
    result = {
        "format": fmt,
        "file": str(target),
        "bytes": target.stat().st_size,
        "int8": int8,
        "dynamic_batch": dynamic_batch,
        "dynamic_sequence": None if context is None else [1, context],
        "checks": [check.__dict__ for check in checks],
    }
    if kv_cache:
        result["kv_cache"] = _pair_result(pair_files, pair_checks)
    return result


def _sequence_length(run: Any, fmt: str) -> int | None:
    """The longest sequence of a model exported with a dynamic sequence dimension (from 1 token), None for one
    whose input is fixed: a gpt's context in every format; an lstm language model's training `seq_len` in ONNX,
    where `_export_onnx` captures its `nn.LSTM` layers at any length (torch.export's own LSTM decomposition unrolls
    the sequence, fixing its length in the other formats)."""
    architecture = run.config.model.architecture
    lstm_language_model = architecture == "lstm" and run.info.task == "language_modeling"
    if architecture == "gpt" or (lstm_language_model and fmt == "onnx" and _LSTM_AT_ANY_LENGTH is not None):
        return run.info.seq_len  # type: ignore[no-any-return]
    return None


@contextlib.contextmanager
def _renamed_once_checked(files: list[Path]) -> Iterator[list[Path]]:
    """`.partial` names of `files` to write and check them under: all renamed into place when the block ends
    without error, the first file last (it appears only once the others are in place), or all removed when it
    raises, leaving nothing new (and earlier files of those names as they were)."""
    partial = [path.with_name(f"{path.name.removesuffix(path.suffix)}.partial{path.suffix}") for path in files]
    try:
        yield partial
        for path, final in reversed(list(zip(partial, files, strict=True))):
            path.rename(final)
    except BaseException:
        for path in partial:
            path.unlink(missing_ok=True)
        raise


class _Prefill(nn.Module):
    """A gpt reading a prompt (B, T): its logits and every layer's keys and values (layers, B, H, T, head_dim)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.forward_with_past(tokens)  # type: ignore[no-any-return]


class _Decode(_Prefill):
    """A gpt reading one more token (B, 1) after the keys and values of the P before it: its logits, and the keys
    and values of all P + 1."""

    def forward(  # type: ignore[override]
        self, tokens: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.forward_with_past(tokens, past_keys, past_values)  # type: ignore[no-any-return]


def kv_cache_pair(
    model: nn.Module, inputs: torch.Tensor, context: int, beside: Path, *, dynamic_batch: bool, opset: int | None
) -> dict[str, Any]:
    """A gpt's prefill and decode graphs, the key/value cache as their inputs and outputs, written beside the file
    `beside` (`model.prefill.onnx`, `model.decode.onnx`) once checked (`_write_kv_cache_pair`)."""
    files = _kv_cache_files(beside)
    with _renamed_once_checked(list(files.values())) as partial:
        checks = _write_kv_cache_pair(
            model, inputs, context, dict(zip(files, partial, strict=True)), dynamic_batch, opset
        )
    return _pair_result(files, checks)


def _kv_cache_files(beside: Path) -> dict[str, Path]:
    """Where the prefill/decode pair of the file `beside` goes: `model.prefill.onnx`, `model.decode.onnx`."""
    stem = beside.name.removesuffix(beside.suffix)
    return {name: beside.with_name(f"{stem}.{name}.onnx") for name in ("prefill", "decode")}


def _pair_result(files: dict[str, Path], checks: list[ExportCheck]) -> dict[str, Any]:
    """The pair's files and checks, as `export_run` reports them."""
    return {**{name: str(path) for name, path in files.items()}, "checks": [check.__dict__ for check in checks]}


def _write_kv_cache_pair(
    model: nn.Module,
    inputs: torch.Tensor,
    context: int,
    files: dict[str, Path],
    dynamic_batch: bool,
    opset: int | None,
) -> list[ExportCheck]:
    """Write a gpt's prefill and decode graphs to `files` and check them: `inputs` (B, context) prefilled to half
    the context, then decoded one token at a time to the end, against the model's logits of the whole rows."""
    batch = {0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)} if dynamic_batch else {}
    sequence = torch.export.Dim("sequence", min=1, max=context)
    past = {**({1: batch[0]} if batch else {}), 3: torch.export.Dim("past", min=1, max=context - 1)}
    prompt = context // 2
    with _quiet_exporters(), torch.inference_mode():
        _, keys, values = model.forward_with_past(inputs[:, :prompt])
    with _quiet_exporters():
        outputs = ["logits", "keys", "values"]
        prefill_shapes = ({**batch, 1: sequence},)
        _export_onnx(_Prefill(model).eval(), (inputs,), files["prefill"], prefill_shapes, opset, (["tokens"], outputs))
        decode_inputs, decode_names = (inputs[:, :1], keys, values), ["tokens", "past_keys", "past_values"]
        decode_shapes = (batch, past, past)
        _export_onnx(
            _Decode(model).eval(), decode_inputs, files["decode"], decode_shapes, opset, (decode_names, outputs)
        )
    checks = []
    for rows in _check_batches(inputs, dynamic_batch, None):
        got = _generate_with_pair(files, rows.numpy(), prompt)
        with torch.inference_mode():
            expected = model(rows).float().numpy()
        agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
        check = ExportCheck(len(rows), float(np.abs(got - expected).max()), agreement, context)
        _require(check, False, "onnx prefill/decode")
        checks.append(check)
    return checks


def _generate_with_pair(files: dict[str, Path], rows: np.ndarray, prompt: int) -> np.ndarray:
    """The logits (B, T, V) of `rows` (B, T) from the prefill graph on the first `prompt` tokens, then the decode
    graph one token at a time."""
    prefill, decode = (onnx_session(files[name]) for name in ("prefill", "decode"))
    logits, keys, values = prefill.run(None, {"tokens": rows[:, :prompt]})
    steps = [logits]
    for position in range(prompt, rows.shape[1]):
        feed = {"tokens": rows[:, position : position + 1], "past_keys": keys, "past_values": values}
        logits, keys, values = decode.run(None, feed)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def export_onnx_language_model(model: nn.Module, context: int, out: Path) -> None:
    """Write a language model of `context` tokens to `out` as `export` writes a gpt: batch 1, any sequence length
    from 1 token to `context`; unchecked."""
    example = torch.zeros(1, context, dtype=torch.long)
    with _quiet_exporters():
        _export_onnx(model, example, out, _dynamic_shapes(False, context), None)


def _dynamic_shapes(dynamic_batch: bool, context: int | None) -> Any:
    """The dynamic dimensions of the model's one input: the batch with `dynamic_batch`, and the sequence (1 to
    `context` tokens) of a language model with a context."""
    dims = {0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)} if dynamic_batch else {}
    if context is not None:
        dims[1] = torch.export.Dim("sequence", min=1, max=context)
    return (dims,) if dims else None


def _check_batches(inputs: torch.Tensor, dynamic_batch: bool, context: int | None) -> list[torch.Tensor]:
    """What the export is checked on: the validation rows, and with `dynamic_batch` one row fewer (as many rows
    again, so that 99% means the same in both checks); a language model's at 1 token, half its context and all
    of it, each at both batch sizes."""
    batches = [inputs] + ([inputs[: max(1, len(inputs) - 1)]] if dynamic_batch else [])
    if context is None:
        return batches
    lengths = sorted({1, max(1, context // 2), context})
    return [batch[:, :length] for length in lengths for batch in batches]


def validation_inputs(run: Any, rows: int = 32) -> torch.Tensor:
    """The first `rows` inputs of the run's validation split, as the model takes them."""
    from scaleforge.data.loading import eval_batches
    from scaleforge.training.trainer import build_data

    data = build_data(run.config.data)
    inputs, _ = next(eval_batches(data.val, rows, torch.device("cpu")))
    return inputs[:rows]


def _export(
    fmt: str, model: nn.Module, inputs: torch.Tensor, out: Path, dynamic: Any, opset: int | None, *, dynamic_int8: bool
) -> Any:
    """Write `model` to `out` in `fmt`; returns what runs the written file (a batch in, numpy outputs out). A
    `dynamic_int8` model goes to ONNX as ONNX Runtime's own int8 graph."""
    if fmt == "onnx":
        (_export_onnx_dynamic_int8 if dynamic_int8 else _export_onnx)(model, inputs, out, dynamic, opset)
        return _onnx_runner(out)
    if fmt == "torch-export":
        torch.export.save(_export_program(model, inputs, dynamic), str(out))
        return _torch_runner(torch.export.load(str(out)).module())  # the file we wrote, which we trust
    _compile_aoti(_export_program(model, inputs, dynamic), out)
    return _torch_runner(torch._inductor.aoti_load_package(str(out)))


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Without what torch's exporters say of their own insides, which users cannot act on: operators of a
    torchvision that is not installed, deprecations inside torch, `nn.LSTM` attributes set while tracing."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")  # a Dim used twice
            yield
    finally:
        registration.setLevel(level)


def _export_program(model: nn.Module, inputs: torch.Tensor, dynamic: Any) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(model, (inputs,), dynamic_shapes=dynamic)
    except Exception as error:  # noqa: BLE001 - torch.export raises many kinds; each is the model's to fix
        raise UsageError(f"torch.export failed{describe_export_error(error)}") from error


def _compile_aoti(program: torch.export.ExportedProgram, out: Path) -> None:
    """An AOTInductor package: the program compiled ahead of time to a shared library (C++ and Python load it with
    `torch._inductor.aoti_load_package`), the supported successor of TorchScript for deployment without Python."""
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    except Exception as error:  # noqa: BLE001 - Inductor raises many kinds; the message names what failed
        raise UsageError(f"AOTInductor compilation failed{describe_export_error(error)}") from error


def _export_onnx(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    out: Path,
    dynamic: Any,
    opset: int | None,
    names: tuple[list[str], list[str]] | None = None,
) -> None:
    """`model` on `inputs` (one tensor, or a tuple of them) to an ONNX file; `names` of its inputs and outputs."""
    try:
        # torch's ONNX exporter captures `nn.LSTM` with a while-loop decomposition, then decomposes the graph again
        # with the unrolled one, which fixes the sequence length it passes on; the while loop throughout keeps it
        # dynamic (tests/integration/test_compress.py exports an lstm and runs it at several lengths)
        lstm_decomposition = _LSTM_AT_ANY_LENGTH if dynamic is not None else None
        with lstm_decomposition() if lstm_decomposition is not None else contextlib.nullcontext():
            program = torch.onnx.export(
                model,
                inputs if isinstance(inputs, tuple) else (inputs,),
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic,
                opset_version=opset,
                verbose=False,
                input_names=names[0] if names else None,
                output_names=names[1] if names else None,
            )
        assert program is not None
        program.save(str(out), external_data=False)
    except Exception as error:  # noqa: BLE001 - the exporter raises many kinds; the message names the operator
        raise UsageError(f"ONNX export failed{describe_export_error(error)}") from error


def _export_onnx_dynamic_int8(
    model: nn.Module, inputs: torch.Tensor, out: Path, dynamic: Any, opset: int | None
) -> None:
    """A dynamic-int8 model as ONNX Runtime's own dynamic int8 graph: the float model that holds the int8 weights
    (`float_twin`), exported, then quantized by `onnxruntime.quantization.quantize_dynamic`, weights per channel
    (to the same int8 values). Its kernels fuse; a graph of the model's own int8 steps ran at a fifth of the float
    ONNX model's speed (1024-wide MLP, batch 32: 6,439 samples/s, float 31,595, this one 116,671)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from scaleforge.compress.quantize import float_twin

    with tempfile.TemporaryDirectory() as scratch:
        float_file, folded = Path(scratch) / "float.onnx", Path(scratch) / "folded.onnx"
        _export_onnx(float_twin(model), inputs, float_file, dynamic, opset)
        # constants folded first: the exporter reorders an LSTM's gates with ops the quantizer cannot read through
        quant_pre_process(float_file, folded, skip_symbolic_shape=True)
        quantize_dynamic(folded, out, weight_type=QuantType.QInt8, per_channel=True)


def _onnx_runner(path: Path) -> Any:
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch.numpy()})[0]


def _torch_runner(module: nn.Module) -> Any:
    def run(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(batch).numpy()

    return run


def _compare(model: nn.Module, runner: Any, batch: torch.Tensor) -> ExportCheck:
    with torch.inference_mode():
        expected = model(batch).float().numpy()
    got = np.asarray(runner(batch), dtype=np.float32)
    if got.shape != expected.shape:
        raise UsageError(f"the exported model answered shape {list(got.shape)}, the model {list(expected.shape)}")
    agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
    tokens = batch.shape[1] if got.ndim == 3 else None  # a language model's logits: (B, T, vocab)
    return ExportCheck(len(batch), float(np.abs(got - expected).max()), agreement, tokens)


def _require(check: ExportCheck, int8: bool, fmt: str) -> None:
    if int8 and check.top1_agreement < INT8_AGREEMENT:
        raise UsageError(
            f"the {fmt} export agrees with the model in top-1 class on {check.top1_agreement:.1%} of {check.rows} "
            f"validation rows{_of_tokens(check)}, less than {INT8_AGREEMENT:.0%}"
        )
    if not int8 and check.max_abs_diff > FLOAT_TOLERANCE:
        raise UsageError(
            f"the {fmt} export differs from the model by up to {check.max_abs_diff:.2e} on {check.rows} validation "
            f"rows{_of_tokens(check)}, more than {FLOAT_TOLERANCE:g}"
        )


def _of_tokens(check: ExportCheck) -> str:
    return "" if check.tokens is None else f" of {check.tokens} tokens"
