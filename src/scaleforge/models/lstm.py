"""An LSTM: a language model on token data, a sequence classifier on labelled sequences."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scaleforge.registry import register_model

LSTMState = tuple[torch.Tensor, torch.Tensor]  # one layer's (h, c), each (1, B, H)


class LSTMBlock(nn.Module):
    """One LSTM layer followed by dropout; returns the output sequence only."""

    def __init__(self, input_size: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(x)  # (B, T, H)
        return self.dropout(output)

    def step(self, x: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        """`forward` continuing from `state` (h, c), each (1, B, H); returns the output and the state after x."""
        output, (hidden, cell) = self.lstm(x, state)  # (B, T, H)
        return self.dropout(output), (hidden, cell)


@register_model("lstm")
class LSTMModel(nn.Module):
    """With `vocab_size` and no `num_classes`: next-token logits at every position (B, T, V).

    With `num_classes`: the last position's state is classified (B, num_classes). Inputs are token ids when
    the data has a vocabulary, otherwise rows of features: an input of shape (..., F) is read as a sequence
    of F-wide steps (an 8x8 digit is 8 steps of 8 pixels).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        vocab_size: int | None = None,
        num_classes: int | None = None,
        embedding_dim: int = 128,
        hidden_size: int = 256,
        n_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if vocab_size is None and num_classes is None:
            raise ValueError("lstm needs token data (vocab_size) or labelled data (num_classes)")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        self.step_features = input_shape[-1]
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if vocab_size is not None else None
        input_size = embedding_dim if vocab_size is not None else self.step_features
        widths = [input_size] + [hidden_size] * n_layers
        self.blocks = nn.ModuleList(
            LSTMBlock(w_in, w_out, dropout) for w_in, w_out in zip(widths, widths[1:], strict=False)
        )
        self.classify = num_classes is not None
        self.head = nn.Linear(hidden_size, num_classes if num_classes is not None else vocab_size)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # token ids (B, T) -> (B, T, E); feature rows (B, ..., F) -> (B, T, F)
        x = self.embedding(x) if self.embedding is not None else x.reshape(x.shape[0], -1, self.step_features)
        for block in self.blocks:
            x = block(x)  # (B, T, H)
        if self.classify:
            return self.head(x[:, -1])  # (B, num_classes)
        return self.head(x)  # (B, T, V)

    def step(self, tokens: torch.Tensor, state: list[LSTMState] | None = None) -> tuple[torch.Tensor, list[LSTMState]]:
        """A language model's logits (B, T, V) of `tokens` (B, T) following the sequences whose state (each
        layer's (h, c)) is `state` (None: at their start), and the state after them: decoding one token a step
        gives what `forward` gives on the whole sequence."""
        if self.embedding is None or self.classify:
            raise ValueError("only an lstm language model (token data, no num_classes) steps through tokens")
        x = self.embedding(tokens)  # (B, T, E)
        carried = []
        for index, block in enumerate(self.blocks):
            x, layer_state = block.step(x, state[index] if state is not None else None)  # (B, T, H)
            carried.append(layer_state)
        return self.head(x), carried  # (B, T, V)
