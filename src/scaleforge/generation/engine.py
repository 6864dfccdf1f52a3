"""Continuous batching: many sequences decoded together, scheduled one model step at a time (as Orca and vLLM do).

`Engine.step` is one iteration over a `waiting` queue and the `running` sequences, decided between model steps:
sequences whose client went away leave, and those whose deadline passed while waiting are refused; waiting
sequences join while a slot is free; one batched decode gives every running sequence that has read its prompt its
next token; prompts are read (prefilled) in chunks with what is left of the step's token budget (`max_step_tokens`
less one token per decoding sequence), so that a long prompt delays the running sequences by one step's budget at
most; sequences that end (a stop string, `max_new_tokens`, the model's context) leave and free their slot.

`batching="static"` is the baseline continuous batching is measured against (`scaleforge bench generate`): a batch
keeps its shape until its longest member ends, as a batched `generate` call does. Waiting sequences join only when
no sequence is running; a member that ends tells its client at once but keeps its slot and its row in every decode
(padding, its logits unread) until the whole batch has ended.

Each sequence samples with its own options and its own `torch.Generator`, a gpt's batched decode attends to each
slot's own keys and values only, and an lstm's batched step reads each slot's own (h, c) rows: a sequence gets the
tokens it would get decoded alone. The engine is pure and synchronous, tested without threads or HTTP;
`serve.completions` steps it on the model's own thread.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from scaleforge.generation.decoders import Decoder, decoder_for
from scaleforge.generation.sampling import SamplingOptions, sample_rows
from scaleforge.generation.streaming import TextOutput
from scaleforge.models.gpt import GPT
from scaleforge.models.lstm import LSTMModel

# length: max_new_tokens; stop: a stop string; context: the model's context is full; expired: its deadline passed
# while it waited for a slot (it never ran)
EngineFinish = Literal["length", "stop", "context", "expired"]
# continuous: a waiting sequence joins at any step with a free slot; static: only when the whole batch has ended
Batching = Literal["continuous", "static"]


@dataclass(frozen=True)
class Output:
    """What one step gave a sequence: `text` (possibly '', while a character is unfinished), `tokens` sampled (0 or
    1), and why it ended, on its last output."""

    text: str
    tokens: int
    finish_reason: EngineFinish | None = None


@dataclass(eq=False)
class EngineRequest:
    """One sequence to continue: its prompt's token ids, sampling options, and `emit`, called (on the engine's
    thread) with each `Output`. `deadline` (a `time.perf_counter` time): refused as `expired` if still waiting
    then. Setting `cancelled` takes it out at the next step, waiting or running."""

    prompt: Sequence[int]
    options: SamplingOptions
    emit: Callable[[Output | Exception], None]  # the engine emits Outputs; its driver, the error a step raised
    deadline: float | None = None
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)  # sampled so far
    slot: int = -1
    read: int = 0  # tokens the model has read: the prompt's, then the sampled ones
    pending: int | None = None  # the last sampled token, read at the next decode
    generator: torch.Generator | None = None
    text: TextOutput | None = None


class SlotModel(Protocol):
    """A language model holding `slots` sequences at once, each read in pieces and continued one token a step."""

    slots: int
    context: int | None  # the most tokens a slot holds (None: no limit)

    def prefill(self, slot: int, tokens: Sequence[int], first: bool) -> torch.Tensor:
        """Read `tokens` into `slot` (after what it holds, or from empty when `first`); the next token's logits (V,)."""
        ...

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Read one token for each of `slots`, all in one batch; the next tokens' logits (B, V)."""
        ...

    def move(self, source: int, target: int) -> None:
        """Move what slot `source` holds into slot `target` (free); `source` is free afterwards."""
        ...


class CachedGPTSlots:
    """A gpt's slots in one key/value cache: a chunk of a prompt into one slot, or one token into each of several
    slots in one batched `GPT.decode`, each row attending to its own slot only."""

    def __init__(self, model: GPT, slots: int) -> None:
        self.model = model
        self.slots = slots
        self.cache = model.new_cache(slots)
        self.context: int | None = model.embed.seq_len
        self._device = self.cache.lengths.device

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: Sequence[int], first: bool) -> torch.Tensor:
        slots = torch.tensor([slot], device=self._device)
        if first:
            self.cache.reset(slots)
        row = torch.tensor([list(tokens)], dtype=torch.long, device=self._device)  # (1, T)
        return self.model.decode(row, self.cache, slots)[0, -1]  # (V,)

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        run = _run_of(slots)
        if run is not None:
            # a run of slots (every slot, when all are busy) is read and written through the cache's views, not
            # gathered copies: at 16 slots, a third of a step's time
            rows, order = run
            column = torch.tensor([tokens[row] for row in order], dtype=torch.long, device=self._device)[:, None]
            return _in_slots_order(self.model.decode(column, self.cache, rows)[:, -1], order)  # (B, V)
        column = torch.tensor(list(tokens), dtype=torch.long, device=self._device)[:, None]  # (B, 1)
        return self.model.decode(column, self.cache, torch.tensor(list(slots), device=self._device))[:, -1]  # (B, V)

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        self.cache.move(source, target)


class LSTMSlots:
    """An lstm's slots as rows of its states, each layer's h and c stacked (layers, slots, H): a chunk of a prompt
    into one slot, or one token into each of several slots in one batched `LSTMModel.step` over their rows."""

    def __init__(self, model: LSTMModel, slots: int) -> None:
        self.model = model
        self.slots = slots
        self.context: int | None = None
        parameter = next(model.parameters())
        shape = (len(model.blocks), slots, model.head.in_features)  # every layer is as wide as the head reads
        self.hidden = torch.zeros(shape, dtype=parameter.dtype, device=parameter.device)
        self.cell = torch.zeros_like(self.hidden)

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: Sequence[int], first: bool) -> torch.Tensor:
        row = torch.tensor([list(tokens)], dtype=torch.long, device=self.hidden.device)  # (1, T)
        return self._step(row, slice(slot, slot + 1), first)[0, -1]  # (V,)

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        run = _run_of(slots)
        rows: slice | torch.Tensor
        if run is None:
            rows, order = torch.tensor(list(slots), device=self.hidden.device), list(range(len(slots)))
        else:  # a run of slots reads its states through views and writes them back in place, gathering nothing
            rows, order = run
        column = torch.tensor([tokens[row] for row in order], dtype=torch.long, device=self.hidden.device)[:, None]
        return _in_slots_order(self._step(column, rows, first=False)[:, -1], order)  # (B, V)

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        self.hidden[:, target] = self.hidden[:, source]
        self.cell[:, target] = self.cell[:, source]

    def _step(self, tokens: torch.Tensor, rows: slice | torch.Tensor, first: bool) -> torch.Tensor:
        """Logits (B, T, V) of `tokens` (B, T) read by the slots whose rows are `rows` (B of them), after what they
        hold (from zero states when `first`); their rows then hold the states after `tokens`."""
        state = None
        if not first:
            hidden, cell = self.hidden[:, rows], self.cell[:, rows]  # (layers, B, H)
            state = [(hidden[layer : layer + 1], cell[layer : layer + 1]) for layer in range(len(hidden))]
        logits, carried = self.model.step(tokens, state)
        self.hidden[:, rows] = torch.cat([hidden for hidden, _ in carried])
        self.cell[:, rows] = torch.cat([cell for _, cell in carried])
        return logits


class DecoderSlots:
    """Any other language model (one re-read whole, `Recompute`): a `Decoder` per slot, stepped one after another."""

    def __init__(self, model: nn.Module, slots: int, seq_len: int | None) -> None:
        self.slots = slots
        self.decoders: list[Decoder] = [decoder_for(model, seq_len) for _ in range(slots)]
        self.context = self.decoders[0].context

    def prefill(self, slot: int, tokens: Sequence[int], first: bool) -> torch.Tensor:
        decoder = self.decoders[slot]
        if first:
            return decoder.start(tokens)
        logits = torch.empty(0)
        for token in tokens:
            logits = decoder.extend(token)
        return logits

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.decoders[slot].extend(token) for slot, token in zip(slots, tokens, strict=True)])

    def move(self, source: int, target: int) -> None:
        self.decoders[source], self.decoders[target] = self.decoders[target], self.decoders[source]


def slot_model_for(model: nn.Module, slots: int, seq_len: int | None) -> SlotModel:
    """`model`'s fastest way to hold `slots` sequences: a gpt's shared cache, an lstm's stacked states, else a
    decoder per slot."""
    if isinstance(model, GPT):
        return CachedGPTSlots(model, slots)
    if isinstance(model, LSTMModel):
        return LSTMSlots(model, slots)
    return DecoderSlots(model, slots, seq_len)


def _run_of(slots: Sequence[int]) -> tuple[slice, list[int]] | None:
    """`slots` as a run, `slice(first, first + B)`, and the order of `slots`' indices that reads it from its first
    slot; None when they are not a run."""
    order = sorted(range(len(slots)), key=slots.__getitem__)
    first = slots[order[0]]
    if any(slots[row] != first + index for index, row in enumerate(order)):
        return None
    return slice(first, first + len(order)), order


def _in_slots_order(logits: torch.Tensor, order: list[int]) -> torch.Tensor:
    """The rows of `logits` (B, V), read in `order`, put back in the order of the slots they were read for."""
    if order == sorted(order):
        return logits
    return logits[torch.tensor(order).argsort().to(logits.device)]


class Engine:
    """Sequences `add`ed to `waiting`, continued together by `step` in the slots of `model` (see the module)."""

    def __init__(
        self,
        model: SlotModel,
        token_bytes: Sequence[bytes],
        max_step_tokens: int,
        batching: Batching = "continuous",
    ) -> None:
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be at least 1, got {max_step_tokens}")
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', got {batching!r}")
        self.model = model
        self.token_bytes = token_bytes
        self.max_step_tokens = max_step_tokens
        self.batching = batching
        self.waiting: collections.deque[EngineRequest] = collections.deque()
        self.running: list[EngineRequest] = []
        self.padding: list[EngineRequest] = []  # static batching: ended members still decoded until the batch ends
        self._free = list(range(model.slots))[::-1]  # popped from the end: the lowest free slot first

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self.padding

    def add(self, request: EngineRequest) -> None:
        """Queue `request`; it joins the running sequences at a step when a slot is free."""
        if not request.prompt:
            raise ValueError("the prompt is empty: it has no tokens to continue")
        self.waiting.append(request)

    def step(self) -> None:
        """One iteration: leave, join, decode one token for each decoding sequence, read prompts' chunks."""
        self._leave_and_join()
        decoding = [request for request in self.running if request.pending is not None]
        context = self.model.context
        padding = [r for r in self.padding if r.tokens and (context is None or r.read < context)]
        if decoding or padding:
            rows = decoding + padding
            tokens = [r.pending if r.pending is not None else r.tokens[-1] for r in rows]
            logits = self.model.decode([r.slot for r in rows], tokens)
            for request in rows:
                request.read += 1
            if decoding:
                self._sample(decoding, logits[: len(decoding)])
        budget = self.max_step_tokens - len(decoding)
        for request in self.running:
            if budget <= 0:
                break
            if request.pending is None and not request.tokens:  # still reading its prompt
                chunk = request.prompt[request.read : request.read + budget]
                logits = self.model.prefill(request.slot, chunk, first=request.read == 0)
                request.read += len(chunk)
                budget -= len(chunk)
                if request.read == len(request.prompt):
                    self._sample([request], logits[None])
        self._release([request for request in self.running if request.pending is None and request.tokens])

    def abandon(self) -> list[EngineRequest]:
        """Take every sequence out, waiting or running (after the model failed on a step); they are returned."""
        running, waiting = list(self.running), list(self.waiting)
        self._release(running, padding=False)
        self.waiting.clear()
        return [*running, *waiting]

    def _leave_and_join(self) -> None:
        self._release([request for request in self.running if request.cancelled])
        now = time.perf_counter()
        if any(r.cancelled or (r.deadline is not None and r.deadline <= now) for r in self.waiting):
            kept: collections.deque[EngineRequest] = collections.deque()
            for request in self.waiting:
                if request.cancelled:
                    continue
                if request.deadline is not None and request.deadline <= now:
                    request.emit(Output("", 0, "expired"))
                    continue
                kept.append(request)
            self.waiting = kept
        if self.batching == "static" and self.running:
            return
        while self.waiting and self._free:
            request = self.waiting.popleft()
            request.slot = self._free.pop()
            request.text = TextOutput(self.token_bytes, request.options.stop)
            self.running.append(request)
            context = self.model.context
            if context is not None and len(request.prompt) > context:  # its most recent tokens, as generate crops
                request.prompt = request.prompt[-context:]

    def _release(self, leaving: list[EngineRequest], padding: bool = True) -> None:
        """Take `leaving` out of the running sequences, then keep the others in slots 0..len(running)-1 in the order
        they came: each sequence above a slot left free moves down (one copy of its cache), so that a step decodes
        a run of slots through the cache's views rather than gathering scattered slots, and a gpt's shorter
        sequences sit together after the longer ones (`gpt._reads`).

        With static batching, `leaving` keep their slots as `padding` until no member of their batch is running
        (unless `padding` is False: every slot is freed now)."""
        for request in leaving:
            self.running.remove(request)
        if self.batching == "static":
            self.padding.extend(leaving)
            if self.running and padding:
                return
            leaving, self.padding = self.padding, []
        for request in leaving:
            request.slot = -1
        held = sorted((request for request in self.running if request.slot >= 0), key=lambda request: request.slot)
        for index, request in enumerate(held):  # slot `index` is free: every lower slot's sequence is placed
            if request.slot != index:
                self.model.move(request.slot, index)
                request.slot = index
        self._free = list(range(len(held), self.model.slots))[::-1]

    def _sample(self, requests: list[EngineRequest], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of `logits` (B, V), all rows at once but each with its own
        options and generator, and tell it its text."""
        generators = [self._generator(request, logits.device) for request in requests]
        tokens = sample_rows(logits, [request.options for request in requests], generators).tolist()
        for request, token in zip(requests, tokens, strict=True):
            self._push(request, token)

    @staticmethod
    def _generator(request: EngineRequest, device: torch.device) -> torch.Generator:
        if request.generator is None:  # made as `Generation` makes it, so that a seed samples the same text
            request.generator = request.options.generator(device)
        return request.generator

    def _push(self, request: EngineRequest, token: int) -> None:
        """Append `token` to `request`, emit the text it completes, and end the sequence where it ends."""
        options, text = request.options, request.text
        assert text is not None
        request.tokens.append(token)
        piece = text.push(token)
        finish: EngineFinish | None = None
        if text.stopped:
            finish = "stop"
        elif len(request.tokens) == options.max_new_tokens:
            finish = "length"
        elif self.model.context is not None and request.read >= self.model.context:  # no room to read `token`
            finish = "context"
        if finish is not None and finish != "stop":
            piece += text.finish()
            finish = "stop" if text.stopped else finish
        request.pending = token if finish is None else None  # None: it leaves at the end of this step
        request.emit(Output(piece, 1, finish))
