"""Transformer building blocks shared by the model families: self-attention (over all positions for image
models, causal for language models), the feed-forward network and the pre-norm block that joins them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over a (B, T, C) sequence, with separate q, k, v projections (splittable by heads)."""

    def __init__(self, width: int, heads: int, dropout_rate: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be at least 1, got {heads}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.causal = causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.dropout_rate = dropout_rate
        self.resid_dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape  # (B, T, C)
        # -1 heads rather than self.heads: under tensor parallelism each process holds a slice of whole heads
        q, k, v = (
            proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(  # (B, H, T, C/H)
            q, k, v, is_causal=self.causal, dropout_p=self.dropout_rate if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(batch, seq, -1)  # (B, T, C)
        return self.resid_dropout(self.out_proj(y))


class SpatialSelfAttention(nn.Module):
    """Pre-norm self-attention between the H*W positions of a feature map, added back as a residual."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = MultiHeadSelfAttention(channels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape  # (B, C, H, W)
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        tokens = tokens + self.attn(self.norm(tokens))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)


class FeedForward(nn.Module):
    """The position-wise MLP: C -> hidden -> C with GELU."""

    def __init__(self, width: int, hidden: int, dropout_rate: float) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.activation = nn.GELU()
        self.down = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activation(self.up(x))))  # (B, T, C)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    # How tensor parallelism splits the block: q, k, v column-wise, so that each process holds whole heads
    # (`MultiHeadSelfAttention` takes its head count from the tensor's shape), then the output projection
    # row-wise; the feed-forward's hidden units likewise. One all-reduce for each pair; the norms stay whole.
    TP_PLAN: ClassVar[dict[str, str]] = {
        "attn.q_proj": "colwise",
        "attn.k_proj": "colwise",
        "attn.v_proj": "colwise",
        "attn.out_proj": "rowwise",
        "mlp.up": "colwise",
        "mlp.down": "rowwise",
    }

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout_rate: float, causal: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiHeadSelfAttention(width, heads, dropout_rate, causal=causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, int(width * mlp_ratio), dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


def transformer_tp_plan(blocks: Iterable[int]) -> dict[str, str]:
    """The tensor-parallel plan of a model's `TransformerBlock`s at `blocks.N`, for each N in `blocks`."""
    return {f"blocks.{index}.{name}": style for index in blocks for name, style in TransformerBlock.TP_PLAN.items()}
