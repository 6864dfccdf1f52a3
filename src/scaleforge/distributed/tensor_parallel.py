"""Tensor parallelism with DTensor: the layers a model's plan names are split across the tensor-parallel
processes (`parallelize_module`), which then compute each block together.

A model declares its plan as data, beside its layers: a method `tp_plan(blocks)` that takes the indices of the
blocks to split (all of them, or a pipeline stage's) and returns submodule names mapped to style names, so that
model files import nothing of torch.distributed. The styles are the Megatron pair: `colwise` (each process
computes some output features) followed by `rowwise` (each process consumes its features and the partial results
are summed), one all-reduce per pair; `colwise_rep` ends a column-wise split without a partner by gathering its
output onto every process. What a plan does not name (embeddings, norms, heads) stays replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from scaleforge.distributed.pipeline_parallel import present_blocks
from scaleforge.errors import ConfigError, did_you_mean, one_of
from scaleforge.models.attention import MultiHeadSelfAttention

STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_rep": partial(ColwiseParallel, output_layouts=Replicate()),
}
SPLITS_OUTPUTS = ("colwise", "colwise_rep")


def declared_plan(model: nn.Module) -> dict[str, str] | None:
    """The model's plan for the blocks this process holds (submodule names to style names), or None when it
    declares none."""
    declare = getattr(model, "tp_plan", None)
    if not callable(declare):
        return None
    return declare([index for index, _ in present_blocks(model)])


def planned_architectures() -> list[str]:
    """The registered model names whose class declares a plan."""
    from scaleforge.registry import MODELS

    return [
        name
        for name in MODELS.names()
        if isinstance(factory := MODELS.get(name), type) and callable(getattr(factory, "tp_plan", None))
    ]


def check_tp(model: nn.Module, size: int, architecture: str) -> None:
    """A model without a tensor-parallel plan, with a style its plan misnames, or with widths or heads that do not
    divide by `size` processes, is a config error."""
    plan = declared_plan(model)
    if plan is None:
        raise ConfigError(
            f"parallel: model '{architecture}' declares no tensor-parallel plan (models with one: "
            f"{', '.join(sorted(planned_architectures()))}); use ddp, fsdp or pp, or give the model a "
            "tp_plan(blocks) method (see scaleforge.distributed.tensor_parallel)"
        )
    for name, style in plan.items():
        if style not in STYLES:
            raise ConfigError(
                f"parallel.tp: model '{architecture}' splits {name} by an unknown style '{style}'"
                f"{did_you_mean(style, STYLES)}; {one_of(STYLES)}"
            )
        layer = model.get_submodule(name)
        if style in SPLITS_OUTPUTS and isinstance(layer, nn.Linear) and layer.out_features % size:
            raise ConfigError(f"parallel.tp: {name} has {layer.out_features} outputs, not divisible by {size}")
        if style == "rowwise" and isinstance(layer, nn.Linear) and layer.in_features % size:
            raise ConfigError(f"parallel.tp: {name} has {layer.in_features} inputs, not divisible by {size}")
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadSelfAttention) and module.heads % size:
            raise ConfigError(
                f"parallel.tp: {name} has {module.heads} attention heads, which do not split across {size} processes"
            )


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split `model` in place by its plan (checked by `check_tp`) across the processes of `tp_mesh`: the blocks it
    holds."""
    plan = declared_plan(model) or {}
    parallelize_module(model, tp_mesh, {name: STYLES[style]() for name, style in plan.items()})
