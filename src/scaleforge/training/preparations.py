"""What a training field turns on around the model: weights to start from (`training.init_from`), fake quantization
(`training.quantization_aware`, registered by `scaleforge.compress.quantize`), zeros kept zero
(`training.keep_zeros`).

Each is a hook registered under the field's name (`registry.PREPARATIONS` before parallelization,
`registry.OPTIMIZER_PREPARATIONS` once the optimizer is built), so that the trainer applies whatever is registered
and never names the packages that provide them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from scaleforge import registry
from scaleforge.data.base import DataInfo
from scaleforge.errors import ConfigError, UsageError
from scaleforge.runs import load_weights, verify_final

if TYPE_CHECKING:  # a type only: the registry imports this module in serving processes too
    from scaleforge.distributed.parallel_dims import ParallelDims


@dataclass(frozen=True)
class PreparationContext:
    """What a model preparation may read besides the model: the dataset's description and how the run is split."""

    info: DataInfo
    dims: ParallelDims


def switched_on(section: Any, hooks: registry.Registry) -> list[tuple[Callable[..., Any], Any]]:
    """The hooks of `hooks` that a field of the dataclass `section` turns on (set, and not false), with the field's
    value, in the order of the fields."""
    found = []
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if field.name in hooks and value is not None and value is not False:
            found.append((hooks.get(field.name), value))
    return found


def prepare_model(model: nn.Module, section: Any, context: PreparationContext) -> nn.Module:
    """`model` with the model preparations that `section` (the training section) turns on, before parallelization."""
    for hook, value in switched_on(section, registry.PREPARATIONS):
        model = hook(model, value, context)
    return model


def prepare_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, section: Any) -> None:
    """Apply the optimizer preparations that `section` turns on to the parallelized `module` and its `optimizer`."""
    for hook, value in switched_on(section, registry.OPTIMIZER_PREPARATIONS):
        hook(module, optimizer, value)


@registry.register_preparation("init_from")
def load_initial_weights(model: nn.Module, source: str, context: PreparationContext) -> nn.Module:
    """`training.init_from`: the weights of a run directory (or its final/ folder) or of a .safetensors file."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"training.init_from: {source} does not exist")
    try:
        load_weights(model, path if path.is_file() else verify_final(path) / "model.safetensors")
    except UsageError as error:
        raise ConfigError(f"training.init_from: {error}") from error
    return model


@registry.register_optimizer_preparation("keep_zeros")
def keep_zeros(model: nn.Module, optimizer: torch.optim.Optimizer, enabled: bool) -> None:
    """`training.keep_zeros`: after every optimizer step, the weights that were zero at the start are zero again.
    Applied to the parallelized module (a sharded parameter gets a mask sharded as it is), after the step rather
    than to gradients, which FSDP assigns without autograd's hooks."""
    masks = [(p, p.detach() != 0) for p in model.parameters() if p.requires_grad and not bool((p != 0).all())]

    @torch.no_grad()
    def reapply(*_: Any) -> None:
        for parameter, mask in masks:
            parameter.mul_(mask)

    optimizer.register_step_post_hook(reapply)
