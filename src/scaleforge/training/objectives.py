"""Losses and metrics, registered by name and chosen from the dataset's task when the config says `auto`.

Metrics accumulate on the device and synchronise with the host only in `compute()`, once per evaluation. Their
state is sums, so over several processes `sync()` adds up each process's share before `compute()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from scaleforge.data.base import DataInfo
from scaleforge.registry import register_loss, register_metric


@register_loss("cross_entropy")
class CrossEntropy(nn.Module):
    """Cross-entropy over the last dimension; (B, T, V) language-model logits are flattened."""

    tasks = ("classification", "language_modeling")

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() > 2:  # (B, T, V) -> (B*T, V)
            logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)


@register_loss("mse")
class MeanSquaredError(nn.Module):
    """Mean squared error for regression."""

    tasks = ("regression",)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs.reshape(targets.shape), targets)


ReduceSum = Callable[[torch.Tensor], torch.Tensor]


class Metric(Protocol):
    """Accumulates over batches; `compute()` returns named values (plain floats).

    `sync(reduce_sum)` replaces the state with its sum over every process (`reduce_sum` returns a tensor added
    up across them); a metric without it cannot be used in a multi-process run.
    """

    def reset(self) -> None: ...
    def update(self, outputs: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> None: ...
    def sync(self, reduce_sum: ReduceSum) -> None: ...
    def compute(self) -> dict[str, float]: ...


def _summed(reduce_sum: ReduceSum, *values: torch.Tensor | float) -> list[float]:
    """`values` summed over every process, in one collective."""
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    return reduce_sum(stacked).tolist()


@register_metric("accuracy")
class Accuracy:
    """Top-k accuracy of class predictions."""

    tasks = ("classification", "language_modeling")

    def __init__(self, top_k: int = 1) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = top_k
        self.reset()

    def reset(self) -> None:
        self.correct: torch.Tensor | int = 0
        self.count = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> None:
        logits = outputs.reshape(-1, outputs.shape[-1])
        labels = targets.reshape(-1)
        if self.top_k == 1:  # three kernels rather than five
            right = (logits.argmax(dim=-1) == labels).sum()
        else:
            right = (logits.topk(self.top_k, dim=-1).indices == labels[:, None]).any(dim=-1).sum()
        self.correct = right if self.count == 0 else self.correct + right  # no kernel to add to 0
        self.count += labels.shape[0]

    def sync(self, reduce_sum: ReduceSum) -> None:
        correct, count = _summed(reduce_sum, self.correct, self.count)
        self.correct, self.count = correct, int(count)

    def compute(self) -> dict[str, float]:
        name = "accuracy" if self.top_k == 1 else f"top{self.top_k}_accuracy"
        return {name: float(self.correct) / max(1, self.count)}


@register_metric("perplexity")
class Perplexity:
    """exp(mean token cross-entropy), from the loss the evaluator already computed."""

    tasks = ("classification", "language_modeling")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.count = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.loss_sum = loss_sum if self.count == 0 else self.loss_sum + loss_sum
        self.count += targets.numel()

    def sync(self, reduce_sum: ReduceSum) -> None:
        loss_sum, count = _summed(reduce_sum, self.loss_sum, self.count)
        self.loss_sum, self.count = loss_sum, int(count)

    def compute(self) -> dict[str, float]:
        return {"perplexity": math.exp(min(50.0, float(self.loss_sum) / max(1, self.count)))}


@register_metric("bits_per_byte")
class BitsPerByte(Perplexity):
    """Bits per byte of text: the summed cross-entropy in bits over the bytes of text the tokens stand for (their
    count times the dataset's `bytes_per_token`), so that models with different tokenizers compare."""

    tasks = ("language_modeling",)

    def __init__(self, bytes_per_token: float | None = None) -> None:
        if bytes_per_token is None:
            raise ValueError("bits_per_byte needs text data (a dataset that gives bytes_per_token)")
        if not bytes_per_token > 0:
            raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
        self.bytes_per_token = bytes_per_token
        super().__init__()

    def compute(self) -> dict[str, float]:
        text_bytes = max(1, self.count) * self.bytes_per_token
        return {"bits_per_byte": float(self.loss_sum) / math.log(2) / text_bytes}


@dataclass(frozen=True)
class Objective:
    """The loss to train on and the metrics to evaluate, for one task."""

    loss: nn.Module
    metrics: list[Metric]


_DEFAULTS = {
    "classification": (CrossEntropy, [Accuracy]),
    "language_modeling": (CrossEntropy, [Perplexity]),
    "regression": (MeanSquaredError, []),
}


def default_objective(info: DataInfo) -> Objective:
    """The usual loss and metrics for the dataset's task; bits per byte too for text."""
    loss_cls, metric_classes = _DEFAULTS[info.task]
    metrics: list[Metric] = [cls() for cls in metric_classes]
    if info.task == "language_modeling" and info.bytes_per_token is not None:
        metrics.append(BitsPerByte(info.bytes_per_token))
    return Objective(loss=loss_cls(), metrics=metrics)
