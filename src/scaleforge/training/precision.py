"""Numeric precision: which one a run uses on its device, and the autocast context that applies it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]

# The dtype that mixed precision computes in (None: everything in fp32).
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


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
