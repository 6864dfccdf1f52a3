"""Classification heads shared by the image models."""

from __future__ import annotations

import torch
from torch import nn


class PooledLinearHead(nn.Module):
    """Global average pool over the feature map, dropout, then a linear classifier."""

    def __init__(self, channels: int, num_classes: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout_rate)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        return self.linear(self.dropout(pooled))  # (B, num_classes)
