"""Optimizers and learning-rate schedules, registered by name.

An optimizer factory takes `(params, lr, weight_decay, **its own options)`; a scheduler factory takes
`(optimizer, total_steps, steps_per_epoch, **its own options)` and is stepped once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, StepLR

from scaleforge.registry import register_optimizer, register_scheduler

Params = Iterable[torch.nn.Parameter]


@register_optimizer("sgd")
def sgd(params: Params, lr: float, weight_decay: float, momentum: float = 0.9, nesterov: bool = False) -> Optimizer:
    """Stochastic gradient descent with (optionally Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


@register_optimizer("rmsprop")
def rmsprop(
    params: Params, lr: float, weight_decay: float, alpha: float = 0.99, momentum: float = 0.0, eps: float = 1e-8
) -> Optimizer:
    """RMSprop."""
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, momentum=momentum, eps=eps, weight_decay=weight_decay)


@register_optimizer("adam")
def adam(
    params: Params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> Optimizer:
    """Adam (L2 penalty through `training.weight_decay`)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@register_optimizer("adamw")
def adamw(
    params: Params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> Optimizer:
    """AdamW (decoupled weight decay through `training.weight_decay`)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@register_scheduler("none")
def constant(optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> None:
    """A constant learning rate (no scheduler is stepped at all)."""
    return None


@register_scheduler("step")
def step(
    optimizer: Optimizer, total_steps: int, steps_per_epoch: int, step_size: int = 10, gamma: float = 0.1
) -> LRScheduler:
    """Multiply the learning rate by `gamma` every `step_size` epochs."""
    if step_size < 1 or gamma <= 0:
        raise ValueError(f"step_size must be at least 1 and gamma positive, got step_size={step_size}, gamma={gamma}")
    return StepLR(optimizer, step_size=max(1, step_size * steps_per_epoch), gamma=gamma)


@register_scheduler("cosine")
def cosine(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, min_lr_ratio: float = 0.0) -> LRScheduler:
    """Cosine decay from the base rate to `min_lr_ratio` times it over the whole run."""
    _check_ratio("min_lr_ratio", min_lr_ratio)
    base_lr = optimizer.param_groups[0]["lr"]
    return CosineAnnealingLR(optimizer, T_max=max(1, total_steps), eta_min=base_lr * min_lr_ratio)


@register_scheduler("warmup_cosine")
def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int | None = None,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """Linear warm-up from zero over `warmup_steps` (default `warmup_fraction` of the run), then cosine decay."""
    _check_ratio("min_lr_ratio", min_lr_ratio)
    _check_ratio("warmup_fraction", warmup_fraction)
    if warmup_steps is not None and warmup_steps < 0:
        raise ValueError(f"warmup_steps must be at least 0, got {warmup_steps}")
    warmup = warmup_steps if warmup_steps is not None else round(warmup_fraction * total_steps)
    decay = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / decay)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def _check_ratio(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
