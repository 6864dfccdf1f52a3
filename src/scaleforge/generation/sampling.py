"""How the next token is chosen from a language model's logits: greedy, or sampled with a temperature, top-k and
top-p, from a seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
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
    return sample_rows(logits, [options] * len(logits), [generator] * len(logits))


def sample_rows(
    logits: torch.Tensor, options: Sequence[SamplingOptions], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """The next token (B,) of each row b of `logits` (B, V), chosen as `next_tokens` chooses it with `options[b]`
    and `generators[b]`: the rows are scaled, masked and normalised together, as tensors of per-row options, and
    only the draw (one uniform number per sampled row, from its own generator) is made row by row. A row gets the
    same token in any batch, so a sequence batched with others samples what it samples alone."""
    tokens = logits.argmax(dim=-1)
    sampled = [row for row, option in enumerate(options) if option.temperature > 0]
    if not sampled:
        return tokens
    chosen = [options[row] for row in sampled]
    rows = logits[sampled].float()  # (S, V)
    vocab, device = rows.shape[-1], rows.device
    rows = rows / torch.tensor([option.temperature for option in chosen], device=device)[:, None]
    top_k = [min(option.top_k or vocab, vocab) for option in chosen]
    if any(k < vocab for k in top_k):
        ordered = torch.sort(rows, dim=-1, descending=True).values
        kth = ordered.gather(-1, torch.tensor(top_k, device=device)[:, None] - 1)  # (S, 1)
        rows = rows.masked_fill(rows < kth, float("-inf"))
    top_p = [option.top_p if option.top_p is not None and option.top_p < 1 else float("inf") for option in chosen]
    if any(p < 1 for p in top_p):
        rows = _nucleus(rows, torch.tensor(top_p, device=device)[:, None])
    # inverse transform sampling: the first token whose cumulative probability passes the row's uniform draw
    cumulative = torch.softmax(rows, dim=-1).double().cumsum(dim=-1)  # (S, V)
    draws = torch.cat(
        [
            torch.rand(1, generator=generators[row], dtype=torch.float64, device=generators[row].device).cpu()
            for row in sampled
        ]
    )
    picked = torch.searchsorted(cumulative, draws.to(device)[:, None] * cumulative[:, -1:], right=True)[:, 0]
    tokens[sampled] = picked.clamp(max=vocab - 1)
    return tokens


def _nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`logits` (B, V) with every token outside the smallest set of likeliest tokens whose probability reaches
    its row's `top_p` (B, 1) set to -inf (the likeliest token always stays; a `top_p` of inf keeps every token)."""
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probabilities = torch.softmax(ordered, dim=-1)
    outside = probabilities.cumsum(dim=-1) - probabilities >= top_p  # the likelier tokens already reach top_p
    ordered = ordered.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
