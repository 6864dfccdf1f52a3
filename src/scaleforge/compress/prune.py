"""Pruning. Unstructured: the smallest-magnitude weights of every Linear and convolution, ranked together across
the model (global magnitude pruning, by `torch.nn.utils.prune`), set to zero; the model keeps its shape, so it is
smaller only once compressed and faster only on sparse kernels. Structured: whole hidden units or channels
removed, giving a smaller dense model whose new widths go into its config, so the speed-up is real.

A model gets structured pruning through a plan: `@register_width_plan(MyModel)` on a function
`(model, keep) -> Narrowed` that chooses the units to keep (a fraction `keep` of each prunable layer) and
returns the smaller model's weights and the model parameters that build it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from scaleforge.errors import UsageError
from scaleforge.models.cnn import CNN, ConvBlock
from scaleforge.models.mlp import MLP

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prune_unstructured(model: nn.Module, sparsity: float) -> float:
    """Zero the `sparsity` fraction of smallest-magnitude weights of `model`'s Linear and convolution layers, in
    place and permanently; the fraction of those weights that are now zero."""
    layers = [(module, "weight") for module in model.modules() if isinstance(module, PRUNABLE)]
    if not layers:
        raise UsageError(f"{type(model).__name__} has no Linear or convolution layer to prune")
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in layers:
        prune.remove(module, name)  # the mask folded into the weight: plain tensors under their usual names
    zeros = sum(int((module.weight == 0).sum()) for module, _ in layers)
    return zeros / sum(module.weight.numel() for module, _ in layers)


@dataclass(frozen=True)
class Narrowed:
    """A structurally pruned model: its weights, and the model parameters (config keys) that build it."""

    state: dict[str, torch.Tensor]
    params: dict[str, Any]


WidthPlan = Callable[[nn.Module, float], Narrowed]
WIDTH_PLANS: dict[type[nn.Module], WidthPlan] = {}


def register_width_plan(model_class: type[nn.Module]) -> Callable[[WidthPlan], WidthPlan]:
    """Declare how structured pruning narrows `model_class` (and its subclasses)."""

    def decorator(plan: WidthPlan) -> WidthPlan:
        WIDTH_PLANS[model_class] = plan
        return plan

    return decorator


def prune_structured(model: nn.Module, sparsity: float) -> Narrowed:
    """`model` with the `sparsity` fraction of the units of each prunable layer removed (by its width plan)."""
    for cls in type(model).__mro__:
        if cls in WIDTH_PLANS:
            return WIDTH_PLANS[cls](model, 1 - sparsity)
    known = ", ".join(sorted(cls.__name__ for cls in WIDTH_PLANS))
    raise UsageError(
        f"--structured: {type(model).__name__} has no width plan (plans exist for {known}); prune it without "
        "--structured (zeros in place), or declare one with @scaleforge.compress.prune.register_width_plan"
    )


def _kept(importance: torch.Tensor, keep: float) -> torch.Tensor:
    """The indices (in order) of the `keep` fraction of units with the largest `importance`, at least one."""
    count = max(1, round(keep * importance.numel()))
    return importance.topk(count).indices.sort().values


@register_width_plan(MLP)
def narrow_mlp(model: nn.Module, keep: float) -> Narrowed:
    """Each hidden layer keeps the units whose incoming weights have the largest L2 norm; the next layer loses the
    matching inputs."""
    assert isinstance(model, MLP)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    layers = [f"blocks.{i}.linear" for i in range(len(model.blocks))] + ["head"]
    widths = []
    for layer, following in zip(layers, layers[1:], strict=False):
        kept = _kept(state[f"{layer}.weight"].norm(dim=1), keep)
        state[f"{layer}.weight"] = state[f"{layer}.weight"][kept]
        state[f"{layer}.bias"] = state[f"{layer}.bias"][kept]
        state[f"{following}.weight"] = state[f"{following}.weight"][:, kept]
        widths.append(len(kept))
    return Narrowed({name: tensor.contiguous() for name, tensor in state.items()}, {"hidden_layers": widths})


@register_width_plan(CNN)
def narrow_cnn(model: nn.Module, keep: float) -> Narrowed:
    """Each convolution keeps the channels whose filter, scaled by its BatchNorm's gain, has the largest L2 norm;
    the next convolution (or the head) loses the matching inputs."""
    assert isinstance(model, CNN)
    for index, block in enumerate(model.blocks):
        if not isinstance(block, ConvBlock):
            raise UsageError(
                f"--structured: cnn's blocks.{index} is a {type(block).__name__}, which the cnn width plan cannot "
                "narrow (set attention_heads: 0, or prune without --structured)"
            )
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    layers = [f"blocks.{i}" for i in range(len(model.blocks))]
    widths = []
    for index, layer in enumerate(layers):
        norm = f"{layer}.norm"
        gain = state[f"{norm}.weight"].abs() / (state[f"{norm}.running_var"] + model.blocks[index].norm.eps).sqrt()
        kept = _kept(state[f"{layer}.conv.weight"].flatten(1).norm(dim=1) * gain, keep)
        state[f"{layer}.conv.weight"] = state[f"{layer}.conv.weight"][kept]
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"{norm}.{name}"] = state[f"{norm}.{name}"][kept]
        following = f"{layers[index + 1]}.conv.weight" if index + 1 < len(layers) else "head.linear.weight"
        state[following] = state[following][:, kept]
        widths.append(len(kept))
    return Narrowed({name: tensor.contiguous() for name, tensor in state.items()}, {"channels": widths})
