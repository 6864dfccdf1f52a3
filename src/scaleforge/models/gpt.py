"""A decoder-only transformer language model (GPT), readable top to bottom."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from scaleforge.models.attention import KVCache, Positions, Read, Slots, TransformerBlock, transformer_tp_plan
from scaleforge.registry import register_model


class TokenEmbedding(nn.Module):
    """Token plus learned position embeddings, then dropout."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of `tokens` (B, T) at positions 0..T-1, or at `positions` (B, T) when given."""
        seq = tokens.shape[1]  # (B, T)
        if seq > self.seq_len:
            raise ValueError(f"sequence of {seq} tokens is longer than the model's context of {self.seq_len}")
        if positions is None:
            positions = torch.arange(seq, device=tokens.device)
        return self.dropout(self.token(tokens) + self.position(positions))  # (B, T, C)


class LMHead(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))  # (B, T, vocab_size)


@register_model("gpt")
class GPT(nn.Module):
    """Token and position embeddings, `n_layers` blocks, then a head (tied to the token embedding by default)."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_layers: int = 4,
        n_heads: int = 4,
        d_model: int = 128,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        self.embed = TokenEmbedding(vocab_size, seq_len, d_model, dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, 4.0, dropout, causal=True) for _ in range(n_layers)
        )
        self.head = LMHead(d_model, vocab_size)
        if tie_embeddings:
            self.head.proj.weight = self.embed.token.weight
        self.apply(self._init_weights)

    def tp_plan(self, blocks: Sequence[int]) -> dict[str, str]:
        """How tensor parallelism splits the blocks at indices `blocks` (every block's `TransformerBlock.TP_PLAN`)."""
        return transformer_tp_plan(blocks)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (B, T) -> (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head(x)  # (B, T, vocab_size)

    def new_cache(self, slots: int = 1) -> KVCache:
        """An empty key/value cache for `slots` sequences of up to the model's context, on its device."""
        weight = self.embed.token.weight
        attention = self.blocks[0].attn
        return KVCache(
            len(self.blocks),
            slots,
            attention.heads,
            self.embed.seq_len,
            attention.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def decode(self, tokens: torch.Tensor, cache: KVCache, slots: Slots | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) of `tokens` (B, T) appended to the sequences that cache `slots` (B,) hold
        (default: slots 0..B-1; a slice reads them as views of the cache): a prompt at once (prefill), then one
        token a step. Each row attends to its own slot's earlier tokens, whatever their number; the same as
        `forward` on the whole sequence."""
        batch, seq = tokens.shape
        rows: Slots = slice(0, batch) if slots is None else slots  # slots 0..B-1 read as views of the cache
        positions = cache.positions(rows, seq)  # (B, T)
        span, start = int(positions.max()) + 1, int(positions.min())
        aligned = start + seq == span  # every row's new tokens at the same positions: one slice of the cache
        where: Positions = slice(start, span) if aligned else positions
        # None: one new token a row at the same position sees every key; a first prompt in every row, causal
        mask: torch.Tensor | None = None
        if not aligned or (seq > 1 and start > 0):
            keys = torch.arange(span, device=tokens.device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, span): own earlier tokens
        reads = (
            _reads(rows, positions, span, mask)
            if seq == 1 and not aligned
            else [Read(slice(0, batch), rows, span, mask)]
        )
        x = self.embed(tokens, positions)  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block.decode(x, cache, layer, rows, where, reads)  # (B, T, C)
        cache.advance(rows, seq)
        return self.head(x)  # (B, T, vocab_size)

    def forward_with_past(
        self, tokens: torch.Tensor, past_keys: torch.Tensor | None = None, past_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab_size) of `tokens` (B, T) that follow the P tokens whose keys and values are
        `past_keys` and `past_values` (layers, B, heads, P, head_dim; none when None), and the keys and values of
        all P + T tokens: the cache as tensors in and out, for a runtime that carries it itself (the ONNX
        prefill/decode pair of `scaleforge export --kv-cache`)."""
        past = 0 if past_keys is None else past_keys.shape[3]
        x = self.embed(tokens, torch.arange(past, past + tokens.shape[1], device=tokens.device))  # (B, T, C)
        keys, values = [], []
        for layer, block in enumerate(self.blocks):
            layer_past = (
                (None, None) if past_keys is None or past_values is None else (past_keys[layer], past_values[layer])
            )
            x, layer_keys, layer_values = block.forward_with_past(x, *layer_past)  # (B, T, C)
            keys.append(layer_keys)
            values.append(layer_values)
        return self.head(x), torch.stack(keys), torch.stack(values)  # (B, T, V), (layers, B, H, P + T, head_dim)


# a step's attention is split in two reads when that reads at most this share of the keys one read would
SPLIT_BELOW = 0.75


def _reads(rows: Slots, positions: torch.Tensor, span: int, mask: torch.Tensor | None) -> list[Read]:
    """The reads of one new token a row at `positions` (B, 1): one read of every row's first `span` positions, or,
    for a run of slots whose lengths differ enough, two runs each read up to its own longest (the engine keeps
    its sequences in slots in the order they came, the longest first, so a step's short sequences sit together
    and need not read as far as its longest one)."""
    batch = positions.shape[0]
    whole = [Read(slice(0, batch), rows, span, mask)]
    if not isinstance(rows, slice) or batch < 2 or mask is None:
        return whole
    ends = [position + 1 for position in positions[:, 0].tolist()]
    before = list(itertools.accumulate(ends, max))
    after = list(itertools.accumulate(reversed(ends), max))[::-1]
    keys, split = min((k * before[k - 1] + (batch - k) * after[k], k) for k in range(1, batch))
    if keys > SPLIT_BELOW * batch * span:
        return whole
    first, second = before[split - 1], after[split]
    start = rows.start or 0
    return [
        Read(slice(0, split), slice(start, start + split), first, mask[:split, ..., :first]),
        Read(slice(split, batch), slice(start + split, start + batch), second, mask[split:, ..., :second]),
    ]
