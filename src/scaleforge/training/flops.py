"""A training step's floating-point operations, the device's peak, and their ratio: model FLOP utilisation (MFU).

FLOPs per step, per process, by one of two methods, named with the figure:

- a transformer language model (`gpt`): `6 N + 12 L H Q T` per token, as in the PaLM paper's appendix B (and
  torchtitan): `N` the parameters that multiply activations (every linear layer's, the output head's included
  when it shares the token embedding; not the embeddings' lookups), `L` layers, `H` heads of size `Q`, `T` the
  context. Times the tokens of a step, shared out over the processes;
- any other model: counted by torch's `FlopCounterMode` over a forward and backward pass of a few training samples
  at setup, on the whole model before it is split or compiled (in eval mode, the random streams put back, the
  gradients dropped: training goes on as if it had not run), per sample, times the global batch, shared out over
  the processes. Not over a training step: under a dispatch mode dynamo gives up compiling the module's call for
  good in torch 2.13, so a compiled run would train uncompiled.

The peak is the dense (no sparsity) figure of the datasheet for the device and the precision the run computes in
(`PEAKS`); a device not listed has no MFU, only its achieved FLOP/s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense peak TFLOP/s by device (a substring of torch.cuda.get_device_name, most specific first) and the dtype of
# the matrix products: NVIDIA's datasheets, without structured sparsity.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s for one dtype, and where the figure comes from."""

    flops: float
    source: str


def matmul_dtype(precision: str) -> str:
    """The dtype of a run's matrix products: bf16 or fp16 under mixed precision; in full precision tf32 when torch
    lets float32 products use it (`torch.set_float32_matmul_precision`), else fp32."""
    if precision.startswith(("bf16", "fp16")):
        return precision[:4]
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: torch.device, precision: str) -> Peak | None:
    """The peak of `device` (a CUDA GPU that `PEAKS` lists) for the run's `precision`; None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    dtype = matmul_dtype(precision)
    for key, figures in PEAKS:
        if key in name and dtype in figures:
            return Peak(figures[dtype] * 1e12, f"{name}, dense {dtype.upper()} (NVIDIA datasheet)")
    return None


def transformer_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """`6 N + 12 L H Q T` for a model with `blocks` of attention (`attn.heads`, `attn.head_dim`), else None."""
    blocks = getattr(model, "blocks", None)
    attention = getattr(blocks[0], "attn", None) if blocks else None
    heads, head_dim = getattr(attention, "heads", None), getattr(attention, "head_dim", None)
    if not heads or not head_dim:
        return None
    multiplying = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    return 6 * multiplying + 12 * len(blocks) * heads * head_dim * seq_len


def flops_per_sample(model: nn.Module, inputs: torch.Tensor) -> float | None:
    """The FLOPs of a forward and backward pass of `model` on `inputs` (a few samples), per sample; None if that
    cannot be counted. Leaves the model as it was: its mode, its gradients (none) and the random streams."""
    was_training = model.training
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()  # no running statistics updated, no dropout drawn: the products are the same
            counted = counted_flops(lambda: model(inputs).float().sum().backward())
    except Exception:  # noqa: BLE001 - a model FlopCounterMode cannot follow has no FLOP figure; it trains all the same
        return None
    finally:
        model.train(was_training)
        for parameter in model.parameters():
            parameter.grad = None
    return counted / len(inputs) if counted else None


def counted_flops(work: Callable[[], object]) -> float:
    """The FLOPs torch's `FlopCounterMode` counts while `work()` runs (on this process)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return float(counter.get_total_flops())


@dataclass
class StepFlops:
    """A run's FLOPs per step on this process and how they were found; `utilisation` is MFU given a step rate."""

    per_step: float | None = None
    method: str | None = None
    peak: Peak | None = None

    def utilisation(self, steps_per_s: float) -> float | None:
        if self.per_step is None or self.peak is None:
            return None
        return self.per_step * steps_per_s / self.peak.flops

    def summary(self, steps_per_s: float) -> dict[str, Any]:
        """The figures summary.json holds: FLOPs per step, the method, the achieved TFLOP/s and, with a known
        peak, the peak, its source and the MFU."""
        if self.per_step is None:
            return {}
        figures: dict[str, Any] = {
            "flops_per_step": self.per_step,
            "flops_method": self.method,
            "tflops_per_s": self.per_step * steps_per_s / 1e12,
        }
        if self.peak is not None:
            figures.update(
                peak_tflops=self.peak.flops / 1e12, peak_source=self.peak.source, mfu=self.utilisation(steps_per_s)
            )
        return figures
