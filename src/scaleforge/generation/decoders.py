"""Decoders: a language model fed one sequence's tokens and asked for the logits of the next one, carrying what it
has read from one call to the next: gpt's key/value cache, lstm's (h, c), or, for any other language model, the
tokens themselves, read again whole at each step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from scaleforge.models.gpt import GPT
from scaleforge.models.lstm import LSTMModel, LSTMState


class Decoder(Protocol):
    """One sequence's tokens in, the next token's logits (V,) out."""

    context: int | None  # the most tokens the model reads at once (None: no limit)

    @property
    def length(self) -> int:
        """The tokens read since `start`."""
        ...

    def start(self, tokens: Sequence[int]) -> torch.Tensor:
        """Forget what was read, read `tokens` (at most `context`), and return the next token's logits."""
        ...

    def extend(self, token: int) -> torch.Tensor:
        """Read one more token (the caller keeps `length` within `context`); the next token's logits."""
        ...


class CachedGPT:
    """A gpt reading a prompt in one pass (prefill), then one token a step against its key/value cache."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.cache = model.new_cache(slots=1)
        self.context: int | None = model.embed.seq_len
        self.length = 0

    @torch.inference_mode()
    def start(self, tokens: Sequence[int]) -> torch.Tensor:
        self.cache.reset()
        self.length = len(tokens)
        return self.model.decode(_as_row(tokens, self.cache.lengths.device), self.cache)[0, -1]

    @torch.inference_mode()
    def extend(self, token: int) -> torch.Tensor:
        self.length += 1
        return self.model.decode(_as_row([token], self.cache.lengths.device), self.cache)[0, -1]


class RecurrentLSTM:
    """An lstm language model carrying each layer's (h, c) from one token to the next."""

    def __init__(self, model: LSTMModel) -> None:
        self.model = model
        self.context: int | None = None
        self.length = 0
        self.state: list[LSTMState] | None = None

    @torch.inference_mode()
    def start(self, tokens: Sequence[int]) -> torch.Tensor:
        self.length = len(tokens)
        logits, self.state = self.model.step(_as_row(tokens, _device_of(self.model)))
        return logits[0, -1]

    @torch.inference_mode()
    def extend(self, token: int) -> torch.Tensor:
        self.length += 1
        logits, self.state = self.model.step(_as_row([token], _device_of(self.model)), self.state)
        return logits[0, -1]


class Recompute:
    """Any causal language model (B, T) -> (B, T, V), given the whole sequence again at each step (its most recent
    `context` tokens): what the cached decoders are checked against, and the way for models without a cache."""

    def __init__(self, model: nn.Module, context: int | None) -> None:
        self.model = model
        self.context = context
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    @torch.inference_mode()
    def start(self, tokens: Sequence[int]) -> torch.Tensor:
        self.tokens = list(tokens)
        return self._logits()

    @torch.inference_mode()
    def extend(self, token: int) -> torch.Tensor:
        self.tokens.append(token)
        return self._logits()

    def _logits(self) -> torch.Tensor:
        window = self.tokens[-self.context :] if self.context is not None else self.tokens
        logits: torch.Tensor = self.model(_as_row(window, _device_of(self.model)))
        return logits[0, -1]  # (V,)


def decoder_for(model: nn.Module, seq_len: int | None) -> Decoder:
    """The fastest decoder of `model`: gpt's cache, lstm's state, else recomputing windows of `seq_len` tokens
    (the length the model was trained on)."""
    if isinstance(model, GPT):
        return CachedGPT(model)
    if isinstance(model, LSTMModel):
        return RecurrentLSTM(model)
    return Recompute(model, seq_len)


def _as_row(tokens: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, T)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
