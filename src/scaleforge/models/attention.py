"""Transformer building blocks shared by the model families: self-attention (over all positions for image
models, causal for language models), the feed-forward network and the pre-norm block that joins them; and the
key/value cache a language model decodes with, one token at a time."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

Slots = torch.Tensor | slice  # cache slots: a tensor of indices (B,), or a run of them
Positions = torch.Tensor | slice  # new tokens' positions: (B, T), or one run of them that every row shares


@dataclass(frozen=True)
class Read:
    """What some rows of a batch attend to in the cache: rows `rows` of the batch, held in cache `slots`, attend to
    the slots' first `span` positions where `mask` (rows, 1, T, span) is True (when None: causally, or every key for
    one token a row at the same position)."""

    rows: slice
    slots: Slots
    span: int
    mask: torch.Tensor | None


class KVCache:
    """The keys and values of every layer for `slots` sequences, preallocated up to `context` positions.

    `keys` and `values` are (layers, slots, heads, context, head_dim); `lengths[s]` is how many positions slot `s`
    holds. Slots fill independently, so one cache serves a batch of sequences at different positions: each new
    token attends to its own slot's first `lengths[s]` positions and itself, through a mask. Slots are named by a
    tensor of indices, or by a slice for a run of them (`slice(0, B)`): a slice reads the cache's own views
    instead of gathering copies, which a step of one short sequence spends most of its time on.
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        heads: int,
        context: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (layers, slots, heads, context, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.context = context

    def reset(self, slots: torch.Tensor | None = None) -> None:
        """Empty `slots` (every slot when None); their old keys and values are masked out, then overwritten."""
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[slots] = 0

    def move(self, source: int, target: int) -> None:
        """Copy slot `source`'s keys, values and length into slot `target` (its positions held only)."""
        length = int(self.lengths[source])
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length

    def positions(self, slots: Slots, count: int) -> torch.Tensor:
        """The positions (B, count) that `count` new tokens of each slot in `slots` (B,) take."""
        positions = self.lengths[slots, None] + torch.arange(count, device=self.lengths.device)
        if int(positions.max()) >= self.context:
            raise ValueError(f"the cache holds {self.context} positions; these tokens would need more")
        return positions

    def write(self, layer: int, slots: Slots, positions: Positions, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store one layer's new `keys` and `values` (B, T, H, D) of `slots` (B of them) at `positions`: (B, T),
        or a slice when every row's new tokens take the same positions (a copy into a view, not a scatter)."""
        if isinstance(positions, slice):
            self.keys[layer, slots, :, positions] = keys.transpose(1, 2)
            self.values[layer, slots, :, positions] = values.transpose(1, 2)
            return
        if isinstance(slots, slice):  # into the views of those slots, row b of the batch into the view's row b
            layer_keys, layer_values = self.keys[layer, slots], self.values[layer, slots]
            rows = torch.arange(len(positions), device=positions.device)[:, None]
        else:
            layer_keys, layer_values, rows = self.keys[layer], self.values[layer], slots[:, None]
        layer_keys[rows, :, positions] = keys  # rows (B, 1) broadcast against positions (B, T)
        layer_values[rows, :, positions] = values

    def read(self, layer: int, slots: Slots, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values (B, H, span, D) of `slots`' first `span` positions (views for a slice)."""
        return self.keys[layer, slots, :, :span], self.values[layer, slots, :, :span]

    def advance(self, slots: Slots, count: int) -> None:
        """Count `count` more positions as held by each of `slots`, once every layer has written them."""
        self.lengths[slots] += count


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

    def forward_with_past(
        self, x: torch.Tensor, past_keys: torch.Tensor | None, past_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` (causal) for tokens x (B, T, C) that follow the P tokens whose keys and values are `past_keys`
        and `past_values` (B, H, P, C/H; none when None); returns the output and the keys and values of all P + T
        tokens: a cache carried as tensors, by a runtime that cannot hold `KVCache` (an exported graph)."""
        batch, seq, _ = x.shape
        q, k, v = (
            proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, H, T, C/H)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if past_keys is None or past_values is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = torch.cat([past_keys, k], dim=2), torch.cat([past_values, v], dim=2)  # (B, H, P + T, C/H)
            mask = None  # one new token sees every key
            if seq > 1:
                past = past_keys.shape[2]
                keys = torch.arange(past + seq, device=x.device)
                mask = keys[None, :] <= (past + torch.arange(seq, device=x.device))[:, None]  # (T, P + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, -1)), k, v  # (B, T, C), (B, H, P + T, C/H)

    def decode(
        self,
        x: torch.Tensor,
        cache: KVCache,
        layer: int,
        slots: Slots,
        positions: Positions,
        reads: Sequence[Read],
    ) -> torch.Tensor:
        """`forward` for new tokens x (B, T, C) of the sequences in cache `slots` (B of them), at `positions`
        (B, T): their keys and values go into the cache, then each of `reads` (which together cover the B rows, in
        order) attends to its part of the cache; when its mask is None, causally (T new tokens from position 0,
        or one at the end)."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, H, T, C/H)
        new_keys, new_values = (proj(x).view(batch, seq, -1, self.head_dim) for proj in (self.k_proj, self.v_proj))
        cache.write(layer, slots, positions, new_keys, new_values)  # (B, T, H, C/H) each
        parts = []
        for read in reads:
            keys, values = cache.read(layer, read.slots, read.span)  # (rows, H, span, C/H)
            causal = read.mask is None and seq > 1  # T == span here: SDPA's causal mask is aligned to the first key
            parts.append(
                F.scaled_dot_product_attention(q[read.rows], keys, values, attn_mask=read.mask, is_causal=causal)
            )
        y = parts[0] if len(parts) == 1 else torch.cat(parts)  # (B, H, T, C/H)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, -1))  # (B, T, C)


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

    def decode(
        self,
        x: torch.Tensor,
        cache: KVCache,
        layer: int,
        slots: Slots,
        positions: Positions,
        reads: Sequence[Read],
    ) -> torch.Tensor:
        """`forward` for new tokens attending through the cache (`MultiHeadSelfAttention.decode`)."""
        x = x + self.attn.decode(self.ln_1(x), cache, layer, slots, positions, reads)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)

    def forward_with_past(
        self, x: torch.Tensor, past_keys: torch.Tensor | None, past_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` for tokens after a past given as tensors (`MultiHeadSelfAttention.forward_with_past`)."""
        attended, keys, values = self.attn.forward_with_past(self.ln_1(x), past_keys, past_values)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), keys, values  # (B, T, C)


def transformer_tp_plan(blocks: Iterable[int]) -> dict[str, str]:
    """The tensor-parallel plan of a model's `TransformerBlock`s at `blocks.N`, for each N in `blocks`."""
    return {f"blocks.{index}.{name}": style for index in blocks for name, style in TransformerBlock.TP_PLAN.items()}
