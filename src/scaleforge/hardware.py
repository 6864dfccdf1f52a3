"""The device a process computes on and the numeric precision it computes in: chosen alike for training,
evaluation, serving and streaming."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from scaleforge.errors import ConfigError, UsageError

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]

# The dtype that mixed precision computes in (None: everything in fp32).
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
# `parallel.reduce_dtype`: what fsdp reduce-scatters gradients in
REDUCE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks cuda (this process's GPU: `cuda:LOCAL_RANK`), then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"hardware.device: '{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from error
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ConfigError(f"hardware.device: '{name}' is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def select_device_option(name: str) -> torch.device:
    """`select_device` for a command's `--device`: a name that is not a device, or not on this machine, is a usage
    error that names the option."""
    try:
        return select_device(name)
    except ConfigError as error:
        raise UsageError(str(error).replace("hardware.device", "--device")) from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16-mixed on a GPU that supports it, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32"


def make_autocast(precision: str, device: torch.device) -> Autocast:
    """A factory of autocast contexts for the precision (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def onnx_session(path: str | Path, threads: int = 0) -> Any:
    """An ONNX Runtime session on the CPU for the model file at `path`, on `threads` threads (0: ONNX Runtime's
    default). Its int8 matrix products run exact: on an x86-64 CPU without VNNI, ONNX Runtime's fast kernel
    (u8 x s8) adds pairs of products in 16 bits, which saturate, and a dynamic-int8 MLP's classes disagreed with
    the model on 1.7% of the rows (an lstm's on 3.9%); `session.x64quantprecision` has it multiply u8 x u8 there
    instead, and changes nothing on other CPUs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.x64quantprecision", "1")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
