"""Tensor parallelism with DTensor: the layers a model's plan names are split across the tensor-parallel
processes (`parallelize_module`), which then compute each block together."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from scaleforge.errors import ConfigError
from scaleforge.models.attention import MultiHeadSelfAttention
from scaleforge.models.tp_plans import tp_plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, architecture: str) -> None:
    """Split `model` in place by its family's plan; a model without a plan, or with widths or heads that do not
    divide by the number of processes, is a config error."""
    size = tp_mesh.size()
    plan = tp_plan(model)
    if plan is None:
        raise ConfigError(
            f"parallel: model '{architecture}' declares no tensor-parallel plan (models with one: gpt, vit, mlp); "
            "use ddp, fsdp or pp, or register a plan with scaleforge.models.tp_plans.register_tp_plan"
        )
    for name, style in plan.items():
        layer = model.get_submodule(name)
        if isinstance(style, ColwiseParallel) and isinstance(layer, nn.Linear) and layer.out_features % size:
            raise ConfigError(f"parallel.tp: {name} has {layer.out_features} outputs, not divisible by {size}")
        if isinstance(style, RowwiseParallel) and isinstance(layer, nn.Linear) and layer.in_features % size:
            raise ConfigError(f"parallel.tp: {name} has {layer.in_features} inputs, not divisible by {size}")
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadSelfAttention) and module.heads % size:
            raise ConfigError(
                f"parallel.tp: {name} has {module.heads} attention heads, which do not split across {size} processes"
            )
    parallelize_module(model, tp_mesh, plan)
