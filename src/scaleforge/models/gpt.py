"""A decoder-only transformer language model (GPT), readable top to bottom."""

from __future__ import annotations

import torch
from torch import nn

from scaleforge.models.attention import TransformerBlock
from scaleforge.registry import register_model


@register_model("gpt")
class GPT(nn.Module):
    """Token and position embeddings, `n_layers` blocks, a final LayerNorm and a head tied to the embedding."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_layers: int = 4,
        n_heads: int = 4,
        d_model: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        self.seq_len = seq_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, 4.0, dropout, causal=True) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied embeddings
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]  # (B, T)
        if seq > self.seq_len:
            raise ValueError(f"sequence of {seq} tokens is longer than the model's context of {self.seq_len}")
        positions = torch.arange(seq, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
