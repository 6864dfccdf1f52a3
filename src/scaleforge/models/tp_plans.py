"""Tensor-parallel plans: for each model family, which layers are split across the tensor-parallel processes.

A plan maps module names to `ParallelStyle`s (data, not code). The Megatron pattern throughout: a column-wise
split (each process computes some output features) followed by a row-wise split (each process consumes its
features and the partial results are summed), so one all-reduce per pair. In attention the column-wise q, k, v
projections hand each process whole heads; `MultiHeadSelfAttention` derives its local head count from the
tensor shape, so no model code knows about ranks. Embeddings, norms and heads stay replicated.

A user's model gets a plan with `@register_tp_plan(MyModel)` on a function `model -> dict[str, ParallelStyle]`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from scaleforge.distributed.pipeline_parallel import present_blocks
from scaleforge.models.gpt import GPT
from scaleforge.models.mlp import MLP
from scaleforge.models.vit import ViT

TPPlan = dict[str, ParallelStyle]
TP_PLANS: dict[type[nn.Module], Callable[[nn.Module], TPPlan]] = {}


def register_tp_plan(model_class: type[nn.Module]) -> Callable[[Callable[[nn.Module], TPPlan]], Callable]:
    """Declare the tensor-parallel plan of `model_class` (and its subclasses)."""

    def decorate(plan: Callable[[nn.Module], TPPlan]) -> Callable[[nn.Module], TPPlan]:
        if TP_PLANS.get(model_class, plan) is not plan:
            raise ValueError(f"{model_class.__name__} already has a tensor-parallel plan: {TP_PLANS[model_class]}")
        TP_PLANS[model_class] = plan
        return plan

    return decorate


def tp_plan(model: nn.Module) -> TPPlan | None:
    """The plan for `model`, or None when its family declares none."""
    for cls in type(model).__mro__:
        if cls in TP_PLANS:
            return TP_PLANS[cls](model)
    return None


def planned_architectures() -> list[str]:
    """The registered model names whose class has a plan (or inherits one)."""
    from scaleforge.registry import MODELS

    return [
        name
        for name in MODELS.names()
        if isinstance(factory := MODELS.get(name), type) and any(cls in TP_PLANS for cls in factory.__mro__)
    ]


def transformer_block_plan(prefix: str) -> TPPlan:
    """`attention.TransformerBlock`: heads split across processes, then the feed-forward hidden units."""
    return {
        f"{prefix}.attn.q_proj": ColwiseParallel(),
        f"{prefix}.attn.k_proj": ColwiseParallel(),
        f"{prefix}.attn.v_proj": ColwiseParallel(),
        f"{prefix}.attn.out_proj": RowwiseParallel(),
        f"{prefix}.mlp.up": ColwiseParallel(),
        f"{prefix}.mlp.down": RowwiseParallel(),
    }


@register_tp_plan(GPT)
@register_tp_plan(ViT)
def transformer_plan(model: nn.Module) -> TPPlan:
    """Every block this process holds is a `TransformerBlock`."""
    plan: TPPlan = {}
    for index, _ in present_blocks(model):
        plan.update(transformer_block_plan(f"blocks.{index}"))
    return plan


@register_tp_plan(MLP)
def mlp_plan(model: nn.Module) -> TPPlan:
    """Hidden layers in column/row pairs; an unpaired last layer is split column-wise and gathered for the head."""
    plan: TPPlan = {}
    present = [index for index, _ in present_blocks(model)]
    for first, second in zip(present[::2], present[1::2], strict=False):
        plan[f"blocks.{first}.linear"] = ColwiseParallel()
        plan[f"blocks.{second}.linear"] = RowwiseParallel()
    if len(present) % 2:
        plan[f"blocks.{present[-1]}.linear"] = ColwiseParallel(output_layouts=Replicate())
    return plan
