"""How the next token is chosen from a language model's logits: greedy, or sampled with a temperature, top-k and
top-p, from a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from scaleforge.errors import UsageError

ContextPolicy = Literal["crop", "stop"]


@dataclass(frozen=True)
class SamplingOptions:
    """What `generate` samples and when it stops; each field is an option of `scaleforge generate`."""

    max_new_tokens: int = field(
        default=200, metadata={"help": "the most tokens to generate", "range": "positive", "metavar": "N"}
    )
    temperature: float = field(
        default=0.8,
        metadata={
            "help": "divides the logits; 0 picks the likeliest token (greedy)",
            "range": "non-negative",
            "metavar": "T",
        },
    )
    top_k: int | None = field(
        default=None, metadata={"help": "sample from the K likeliest tokens only", "range": "positive", "metavar": "K"}
    )
    top_p: float | None = field(
        default=None,
        metadata={
            "help": "sample from the likeliest tokens whose probabilities add up to P (nucleus sampling), 0 < P <= 1",
            "range": "probability",
            "metavar": "P",
        },
    )
    seed: int | None = field(
        default=None,
        metadata={
            "help": "the sampler's seed: the same seed gives the same text",
            "range": "non-negative",
            "metavar": "S",
        },
    )
    stop: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "end the text where one of these strings appears (the string is left out)",
            "metavar": "STRING",
        },
    )
    context: ContextPolicy = field(
        default="crop",
        metadata={"help": "past the model's context: crop to its most recent tokens (and read them again), or stop"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise UsageError(f"temperature must be 0 (greedy) or more, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise UsageError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be above 0 and at most 1, got {self.top_p!r}")
        if self.context not in ("crop", "stop"):
            raise UsageError(f"context must be crop or stop, got {self.context!r}")
        if isinstance(self.stop, str):  # one string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(text, str) or not text for text in self.stop):
            raise UsageError(f"each stop string must be a non-empty string, got {list(self.stop)!r}")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A random generator seeded with `seed` (from the system's entropy when None)."""
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def next_tokens(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> torch.Tensor:
    """The next token (B,) of each row of `logits` (B, V): the likeliest at temperature 0, else one sampled from
    the softmax of logits / temperature, restricted to the `top_k` likeliest and to the nucleus of `top_p`."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / options.temperature
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p is not None and options.top_p < 1:
        logits = _nucleus(logits, options.top_p)
    probabilities = torch.softmax(logits, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator)[:, 0]


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` with every token outside the smallest set of likeliest tokens whose probability reaches `top_p`
    set to -inf (the likeliest token always stays)."""
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probabilities = torch.softmax(ordered, dim=-1)
    outside = probabilities.cumsum(dim=-1) - probabilities >= top_p  # the likelier tokens already reach top_p
    ordered = ordered.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
