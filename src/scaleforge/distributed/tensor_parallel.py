"""Tensor parallelism with DTensor: the layers a model's plan names are split across the tensor-parallel
processes (`parallelize_module`), which then compute each block together."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from scaleforge.errors import ConfigError
from scaleforge.models.attention import MultiHeadSelfAttention
from scaleforge.models.tp_plans import TPPlan, planned_architectures, tp_plan


def check_tp(model: nn.Module, size: int, architecture: str) -> None:
    """A model without a tensor-parallel plan, or with widths or heads that do not divide by `size` processes, is
    a config error."""
    plan = tp_plan(model)
    if plan is None:
        raise ConfigError(
            f"parallel: model '{architecture}' declares no tensor-parallel plan (models with one: "
            f"{', '.join(sorted(planned_architectures()))}); use ddp, fsdp or pp, or register a plan with "
            "scaleforge.models.tp_plans.register_tp_plan"
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


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: TPPlan) -> None:
    """Split `model` in place by its (checked) plan across the processes of `tp_mesh`."""
    parallelize_module(model, tp_mesh, plan)
