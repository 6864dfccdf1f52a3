"""The Open Inference Protocol (KServe's v2, Triton's HTTP/REST API), as data: an inference request's tensors read
from JSON or from JSON followed by raw bytes (the binary tensor extension, which Triton's and KServe's clients use
by default), and an answer's outputs written back the same way. No HTTP here: `serve.hosting` serves the routes.

A request's one input tensor holds the instances, its first dimension the batch: FP32 of the model's input shape
(`[B, *input_shape]`), or INT64 token ids (`[B, T]`) for a language model. The outputs are the numeric fields of
scaleforge's answers, stacked over the batch: for a classifier `probabilities` (FP32 `[B, C]`), `top_class`
(INT64 `[B]`) and `probability` (FP32 `[B]`); for a regressor `values`; for a language model `next_token`,
`probability` and `probabilities`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
MAX_ELEMENTS = 64 * 2**20  # a tensor's elements, at most (its shape is checked against its data before any copy)


class ProtocolError(Exception):
    """A request the protocol cannot take; answered 400 with `{"error": message}`."""


@dataclass(frozen=True)
class Tensor:
    """A named tensor of the protocol."""

    name: str
    datatype: str
    array: np.ndarray


@dataclass(frozen=True)
class InferRequest:
    """An inference request as read: its id, input tensors, the outputs asked for (None: all) and which of them
    come back as raw bytes."""

    id: str | None
    inputs: list[Tensor]
    outputs: list[str] | None
    binary: frozenset[str]
    binary_all: bool


def read_request(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request's body (`header_length`: the `Inference-Header-Content-Length` header, when the JSON
    is followed by the tensors' raw bytes)."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be a number of bytes, got {header_length!r}") from None
        if not 0 <= split <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {split} is beyond the body's {len(body)} bytes")
        header, blob = body[:split], memoryview(body)[split:]
    else:
        header, blob = body, memoryview(b"")
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(f"the request is not JSON: {error}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise ProtocolError("the request needs inputs: a non-empty list of tensors")
    inputs, offset = [], 0
    for index, tensor in enumerate(request["inputs"]):
        read, offset = _input(tensor, index, blob, offset)
        inputs.append(read)
    if offset != len(blob):
        raise ProtocolError(f"the body has {len(blob) - offset} bytes after its tensors' data")
    parameters = request.get("parameters") or {}
    outputs, binary = None, set()
    if request.get("outputs") is not None:
        if not isinstance(request["outputs"], list):
            raise ProtocolError("outputs: a list of {name} objects")
        outputs = []
        for output in request["outputs"]:
            if not isinstance(output, dict) or not isinstance(output.get("name"), str):
                raise ProtocolError("outputs: each one an object with its name")
            outputs.append(output["name"])
            if (output.get("parameters") or {}).get("binary_data"):
                binary.add(output["name"])
    request_id = request.get("id")
    return InferRequest(
        None if request_id is None else str(request_id),
        inputs,
        outputs,
        frozenset(binary),
        bool(isinstance(parameters, dict) and parameters.get("binary_data_output")),
    )


def _input(tensor: Any, index: int, blob: memoryview, offset: int) -> tuple[Tensor, int]:
    where = f"inputs[{index}]"
    if not isinstance(tensor, dict):
        raise ProtocolError(f"{where}: a tensor is an object with name, shape, datatype and data")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or datatype not in DATATYPES:
        raise ProtocolError(f"{where}: name a tensor and give one of the datatypes {', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ProtocolError(f"{where}: shape must be a list of sizes")
    count = int(np.prod(shape)) if shape else 1
    if count > MAX_ELEMENTS:
        raise ProtocolError(f"{where}: {count:,} elements, more than {MAX_ELEMENTS:,}")
    dtype = DATATYPES[datatype]
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(blob):
            raise ProtocolError(f"{where}: binary_data_size must be the bytes of its shape, within the body")
        array = np.frombuffer(blob[offset : offset + size], dtype=dtype).reshape(shape)
        return Tensor(name, datatype, array), offset + size
    data = tensor.get("data")
    if data is None:
        raise ProtocolError(f"{where}: give its data, or its bytes after the JSON (binary_data_size)")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(f"{where}: its data are not {datatype} numbers") from None
    if array.size != count:
        raise ProtocolError(f"{where}: {array.size} values for a shape of {count}")
    return Tensor(name, datatype, array.reshape(shape)), offset


def output_tensors(answers: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """The numeric fields of a batch's answers (one mapping per instance), stacked into tensors by name."""
    tensors: dict[str, Tensor] = {}
    if not answers:
        return tensors
    for name, first in answers[0].items():
        values = [answer.get(name) for answer in answers]
        if _integers(first) and all(_integers(value) for value in values):
            tensors[name] = Tensor(name, "INT64", np.asarray(values, dtype=np.int64))
        elif _numbers(first) and all(_numbers(value) for value in values):
            try:
                tensors[name] = Tensor(name, "FP32", np.asarray(values, dtype=np.float32))
            except ValueError:  # ragged lists
                continue
    return tensors


def _integers(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    if isinstance(value, list):
        return all(_numbers(each) for each in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def write_response(
    model: str, version: int, request: InferRequest, outputs: Mapping[str, Tensor]
) -> tuple[bytes, dict[str, str]]:
    """The inference response's body and headers: the outputs asked for (all by default), those asked as binary
    (or all, with `binary_data_output`) as raw bytes after the JSON."""
    names = request.outputs if request.outputs is not None else list(outputs)
    missing = [name for name in names if name not in outputs]
    if missing:
        raise ProtocolError(f"outputs: the model has no output {missing[0]!r} (it has {', '.join(outputs)})")
    tensors, blobs = [], []
    for name in names:
        tensor = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": tensor.datatype, "shape": list(tensor.array.shape)}
        if request.binary_all or name in request.binary:
            raw = np.ascontiguousarray(tensor.array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor.array.reshape(-1).tolist()
        tensors.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def instances(request: InferRequest, model: Any, max_rows: int) -> list[np.ndarray]:
    """The instances of `request`'s one input tensor for `model` (a `ServedModel`): FP32 (or any number type,
    converted) of the model's input shape after the batch, or INT64 token ids for a language model."""
    if len(request.inputs) != 1:
        raise ProtocolError(f"the model takes one input tensor, got {len(request.inputs)}")
    tensor = request.inputs[0]
    array, info = tensor.array, model.info
    if array.ndim < 1 or not 1 <= array.shape[0] <= max_rows:
        raise ProtocolError(f"{tensor.name}: its first dimension is the batch, 1 to {max_rows} instances")
    if info.task == "language_modeling":
        if tensor.datatype not in ("INT64", "INT32") or array.ndim != 2:
            raise ProtocolError(f"{tensor.name}: a language model takes INT64 token ids shaped [batch, tokens]")
        decoded: list[np.ndarray] = model.decode(array.tolist())  # checked as JSON's token ids are
        return decoded
    shape = tuple(info.input_shape)
    if tuple(array.shape[1:]) != shape or tensor.datatype == "BOOL":
        raise ProtocolError(f"{tensor.name}: expected numbers shaped [batch, {', '.join(map(str, shape))}]")
    converted = array.astype(np.float32)
    if not np.isfinite(converted).all():
        raise ProtocolError(f"{tensor.name}: holds a value that is not a finite FP32 number")
    return list(converted)


def metadata(name: str, versions: list[str], model: Any) -> dict[str, Any]:
    """The protocol's model metadata of `model` (a `ServedModel`): its input, and the outputs of its task."""
    info = model.info
    if info.task == "language_modeling":
        input_tensor = {"name": "input", "datatype": "INT64", "shape": [-1, -1]}
        outputs = [("next_token", "INT64", [-1]), ("probability", "FP32", [-1])]
        outputs.append(("probabilities", "FP32", [-1, int(info.vocab_size or -1)]))
    else:
        input_tensor = {"name": "input", "datatype": "FP32", "shape": [-1, *info.input_shape]}
        if info.task == "classification":
            outputs = [("top_class", "INT64", [-1]), ("probability", "FP32", [-1])]
            outputs.append(("probabilities", "FP32", [-1, int(info.num_classes or -1)]))
        else:
            outputs = [("values", "FP32", [-1, -1])]
    return {
        "name": name,
        "versions": versions,
        "platform": "pytorch",
        "inputs": [input_tensor],
        "outputs": [{"name": n, "datatype": d, "shape": shape} for n, d, shape in outputs],
    }
