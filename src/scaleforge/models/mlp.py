"""A configurable multi-layer perceptron: Linear -> activation -> dropout blocks, then a linear head."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from scaleforge.registry import register_model

Activation = Literal["relu", "gelu", "silu", "tanh", "leaky_relu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


class MLPBlock(nn.Module):
    """One hidden layer: Linear, activation, dropout."""

    def __init__(self, in_features: int, out_features: int, activation: Activation, dropout_rate: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.activation = ACTIVATIONS[activation]()
        # no dropout is no module: nn.Dropout(0) still costs a call in every step (it holds no state either way)
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(self.linear(x)))  # (B, out_features)


@register_model("mlp")
class MLP(nn.Module):
    """Flattens its input, applies `hidden_layers` blocks and a linear classification head."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_layers: Sequence[int] = (256, 128),
        activation: Activation = "relu",
        dropout_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        if any(width <= 0 for width in hidden_layers):
            raise ValueError(f"hidden_layers must be positive widths, got {list(hidden_layers)}")
        widths = [math.prod(input_shape), *hidden_layers]
        self.embed = nn.Flatten()
        self.blocks = nn.ModuleList(
            MLPBlock(w_in, w_out, activation, dropout_rate) for w_in, w_out in zip(widths, widths[1:], strict=False)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # (B, F)
        for block in self.blocks:
            x = block(x)  # (B, H)
        return self.head(x)  # (B, num_classes)

    def tp_plan(self, blocks: Sequence[int]) -> dict[str, str]:
        """How tensor parallelism splits the blocks at indices `blocks`: their layers in column-wise, row-wise pairs
        (one all-reduce per pair); an unpaired last one column-wise, its output gathered for what follows."""
        plan: dict[str, str] = {}
        for first, second in zip(blocks[::2], blocks[1::2], strict=False):
            plan[f"blocks.{first}.linear"] = "colwise"
            plan[f"blocks.{second}.linear"] = "rowwise"
        if len(blocks) % 2:
            plan[f"blocks.{blocks[-1]}.linear"] = "colwise_rep"
        return plan
