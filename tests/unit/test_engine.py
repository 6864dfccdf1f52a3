"""Continuous batching (scaleforge.generation.engine), driven step by step without threads or HTTP: sequences that
join a running batch get the tokens they get alone, prompts are read in chunks under the step's token budget, and
sequences leave when they end or are cancelled."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import torch

from scaleforge.generation.decoders import CachedGPT, RecurrentLSTM
from scaleforge.generation.engine import (
    CachedGPTSlots,
    DecoderSlots,
    Engine,
    EngineRequest,
    LSTMSlots,
    Output,
    SlotModel,
    slot_model_for,
)
from scaleforge.generation.sampling import SamplingOptions
from tests.unit.test_generation import BYTES, GREEDY, PROMPT, VOCAB, gpt, lstm, tokens_of


class Recorded:
    """A sequence's outputs, as its `emit` receives them."""

    def __init__(self) -> None:
        self.outputs: list[Output | Exception] = []

    def __call__(self, output: Output | Exception) -> None:
        self.outputs.append(output)

    @property
    def pieces(self) -> list[str]:
        return [output.text for output in self.outputs if isinstance(output, Output)]

    @property
    def finish_reason(self) -> str | None:
        last = self.outputs[-1] if self.outputs else None
        return last.finish_reason if isinstance(last, Output) else None


def submit(
    engine: Engine, prompt: Sequence[int], options: SamplingOptions = GREEDY, deadline: float | None = None
) -> tuple[EngineRequest, Recorded]:
    recorded = Recorded()
    request = EngineRequest(list(prompt), options, recorded, deadline=deadline)
    engine.add(request)
    return request, recorded


def run_out(engine: Engine, most: int = 500) -> int:
    """Step until every sequence has ended; the steps taken."""
    for steps in range(most):
        if engine.idle:
            return steps
        engine.step()
    raise AssertionError("the engine never went idle")


def test_a_sequence_joining_mid_decode_gets_the_greedy_tokens_it_gets_alone() -> None:
    model = gpt()
    engine = Engine(CachedGPTSlots(model, slots=4), BYTES, max_step_tokens=6)
    first, _ = submit(engine, PROMPT)
    for _ in range(8):  # the first is decoding by now
        engine.step()
    assert first.pending is not None and len(first.tokens) > 3
    long_prompt = [(7 * i) % VOCAB for i in range(25)]  # read in chunks of at most 5 (6 less the decoding one)
    second, _ = submit(engine, long_prompt)
    third, _ = submit(engine, PROMPT[:4], SamplingOptions(max_new_tokens=10, temperature=0))
    run_out(engine)
    assert first.tokens == tokens_of(CachedGPT(model)).tokens
    assert second.tokens == tokens_of(CachedGPT(model), prompt=long_prompt).tokens
    assert (
        third.tokens
        == tokens_of(CachedGPT(model), SamplingOptions(max_new_tokens=10, temperature=0), PROMPT[:4]).tokens
    )
    assert len(third.tokens) == 10


def test_a_seeded_sequence_samples_in_a_batch_what_it_samples_alone() -> None:
    model = gpt()
    options = SamplingOptions(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    engine = Engine(CachedGPTSlots(model, slots=3), BYTES, max_step_tokens=64)
    others = [submit(engine, PROMPT[i:], SamplingOptions(max_new_tokens=30, temperature=1.0))[0] for i in range(2)]
    engine.step()
    engine.step()
    seeded, _ = submit(engine, PROMPT, options)
    run_out(engine)
    assert seeded.tokens == tokens_of(CachedGPT(model), options).tokens
    assert all(len(other.tokens) == 30 for other in others)


class Counting:
    """A slot model that counts the tokens each step reads."""

    def __init__(self, inner: SlotModel) -> None:
        self.inner, self.slots, self.context = inner, inner.slots, inner.context
        self.read: list[int] = [0]

    def prefill(self, slot: int, tokens: Sequence[int], first: bool) -> torch.Tensor:
        self.read[-1] += len(tokens)
        return self.inner.prefill(slot, tokens, first)

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        self.read[-1] += len(tokens)
        return self.inner.decode(slots, tokens)

    def move(self, source: int, target: int) -> None:
        self.inner.move(source, target)


def test_a_long_prompt_is_read_in_chunks_and_never_stalls_the_running_sequences() -> None:
    counting = Counting(CachedGPTSlots(gpt(), slots=4))
    engine = Engine(counting, BYTES, max_step_tokens=8)
    running, recorded = submit(engine, PROMPT, SamplingOptions(max_new_tokens=40, temperature=0))
    engine.step()
    engine.step()  # the prompt read (10 tokens: 8, then 2), its first token sampled
    long_prompt = [(3 * i) % VOCAB for i in range(40)]
    joining, _ = submit(engine, long_prompt)
    before = len(running.tokens)
    steps = 0
    while not joining.tokens:
        counting.read.append(0)
        engine.step()
        steps += 1
        assert counting.read[-1] <= 8  # one token for the running sequence, up to 7 of the prompt
    assert steps == -(-40 // 7) and len(running.tokens) == before + steps  # one token a step, all along
    run_out(engine)
    assert recorded.finish_reason == "length" and "".join(recorded.pieces)


def test_a_cancelled_sequence_leaves_at_the_next_step_and_frees_its_slot() -> None:
    counting = Counting(CachedGPTSlots(gpt(), slots=2))
    engine = Engine(counting, BYTES, max_step_tokens=64)
    kept, _ = submit(engine, PROMPT)
    gone, recorded = submit(engine, PROMPT[:5])
    waiting, _ = submit(engine, PROMPT[:3])  # no slot free: it waits
    counting.read.append(0)
    engine.step()
    counting.read.append(0)
    engine.step()
    assert counting.read[-1] == 2 and len(engine.running) == 2 and list(engine.waiting) == [waiting]
    gone.cancelled = True
    outputs = len(recorded.outputs)
    counting.read.append(0)
    engine.step()
    assert gone not in engine.running and waiting in engine.running  # its slot went to the waiting one
    assert len(recorded.outputs) == outputs  # nothing more was computed for it
    assert counting.read[-1] == 1 + 3  # the kept one's token and the joining prompt
    run_out(engine)
    assert len(kept.tokens) == 40 and len(waiting.tokens) == 40


class Scripted:
    """A slot model whose every slot samples `script`'s tokens in turn (greedy), whatever it reads."""

    def __init__(self, script: Sequence[int], vocab: int) -> None:
        self.script, self.vocab = list(script), vocab
        self.slots, self.context = 1, None
        self.position = 0

    def _next(self) -> torch.Tensor:
        logits = torch.zeros(self.vocab)
        logits[self.script[min(self.position, len(self.script) - 1)]] = 1.0
        self.position += 1
        return logits

    def prefill(self, slot: int, tokens: Sequence[int], first: bool) -> torch.Tensor:
        return self._next()

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        return self._next()[None]

    def move(self, source: int, target: int) -> None:
        raise AssertionError("one slot never moves")


def test_streamed_pieces_keep_characters_whole_and_stop_strings_spanning_tokens_are_cut() -> None:
    pieces = [b"a\xc3", b"\xa9\xe6", b"\xbc", b"\xa2b", b" wo", b"rld", b"!"]
    engine = Engine(Scripted(range(len(pieces)), len(pieces)), pieces, max_step_tokens=8)
    _, recorded = submit(engine, [0], SamplingOptions(max_new_tokens=10, temperature=0, stop=("wor",)))
    run_out(engine)
    assert recorded.pieces == ["a", "é", "", "漢b", " ", ""] and recorded.finish_reason == "stop"
    assert all(isinstance(output, Output) and output.tokens == 1 for output in recorded.outputs)


def test_a_sequence_ends_at_the_context_and_one_waiting_past_its_deadline_is_refused() -> None:
    model = gpt(seq_len=16)
    engine = Engine(CachedGPTSlots(model, slots=1), BYTES, max_step_tokens=64)
    full, recorded = submit(engine, PROMPT, SamplingOptions(max_new_tokens=40, temperature=0))
    _, late = submit(engine, PROMPT, deadline=time.perf_counter() - 1)
    run_out(engine)
    assert recorded.finish_reason == "context" and len(full.tokens) == 16 - len(PROMPT) + 1
    options = SamplingOptions(max_new_tokens=40, temperature=0, context="stop")
    assert full.tokens == tokens_of(CachedGPT(model), options).tokens
    assert late.outputs == [Output("", 0, "expired")]


def test_static_batching_keeps_the_batch_whole_until_its_longest_member_ends() -> None:
    model = gpt()
    slots = CachedGPTSlots(model, slots=4)
    engine = Engine(slots, BYTES, max_step_tokens=64, batching="static")
    short, short_recorded = submit(engine, PROMPT, SamplingOptions(max_new_tokens=2, temperature=0))
    long, _ = submit(engine, PROMPT, SamplingOptions(max_new_tokens=6, temperature=0))
    engine.step()
    late, late_recorded = submit(engine, PROMPT, SamplingOptions(max_new_tokens=3, temperature=0))
    while len(short.tokens) < 2:
        engine.step()
    assert short_recorded.finish_reason == "length"  # its client hears the end at once
    held = short.slot
    while long in engine.running:
        assert short.slot == held and late.slot < 0 and not late.tokens  # the short one's row is padding now
        read = int(slots.cache.lengths[held])
        engine.step()
        assert int(slots.cache.lengths[held]) == read + 1  # decoded with the batch, its logits unread
    assert len(short.tokens) == 2 and len(long.tokens) == 6 and short.slot < 0 and not engine.padding
    engine.step()
    assert late in engine.running
    run_out(engine)
    assert late_recorded.finish_reason == "length" and late.tokens == tokens_of(CachedGPT(model), late.options).tokens


def test_continuous_batching_is_the_default_and_the_batching_is_checked() -> None:
    assert Engine(CachedGPTSlots(gpt(), slots=1), BYTES, max_step_tokens=8).batching == "continuous"
    with pytest.raises(ValueError, match="batching must be 'continuous' or 'static', got 'dynamic'"):
        Engine(CachedGPTSlots(gpt(), slots=1), BYTES, max_step_tokens=8, batching="dynamic")  # type: ignore[arg-type]


def test_a_run_of_slots_in_any_order_decodes_as_the_same_slots_gathered() -> None:
    model = gpt()
    views, gathered = CachedGPTSlots(model, slots=4), CachedGPTSlots(model, slots=4)
    for slot, prompt in enumerate([PROMPT, PROMPT[:4], PROMPT[2:9], PROMPT[:2]]):
        views.prefill(slot, prompt, first=True)
        gathered.prefill(slot, prompt, first=True)
    slots, tokens = [3, 1, 2], [5, 6, 7]  # a run of slots, out of order: read through the cache's views
    with torch.inference_mode():
        expected = model.decode(torch.tensor(tokens)[:, None], gathered.cache, torch.tensor(slots))[:, -1]
    torch.testing.assert_close(views.decode(slots, tokens), expected)
    assert views.cache.lengths.tolist() == gathered.cache.lengths.tolist() == [len(PROMPT), 5, 8, 3]


class Moving(Counting):
    """A counting slot model that also records the slots each step decodes and the moves between slots."""

    def __init__(self, inner: SlotModel) -> None:
        super().__init__(inner)
        self.decoded: list[list[int]] = []
        self.moves: list[tuple[int, int]] = []

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        self.decoded.append(sorted(slots))
        return super().decode(slots, tokens)

    def move(self, source: int, target: int) -> None:
        self.moves.append((source, target))
        super().move(source, target)


def test_sequences_leaving_and_joining_keep_the_running_ones_in_the_lowest_slots_in_the_order_they_came() -> None:
    model = gpt()
    moving = Moving(CachedGPTSlots(model, slots=4))
    engine = Engine(moving, BYTES, max_step_tokens=64)
    lengths = [3, 30, 6, 25, 12]  # the 1st and 3rd end early: those after them move down, the 5th and seeded join
    requests = [
        submit(engine, PROMPT[index:], SamplingOptions(max_new_tokens=new, temperature=0))[0]
        for index, new in enumerate(lengths)
    ]
    sampled = SamplingOptions(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.95, seed=3)
    seeded, _ = submit(engine, PROMPT[1:], sampled)
    steps = 0
    while not engine.idle:
        engine.step()
        steps += 1
        assert [request.slot for request in engine.running] == list(range(len(engine.running)))  # in joining order
    assert steps == 30 and all(slots == list(range(len(slots))) for slots in moving.decoded)  # a run from 0
    assert (3, 2) in moving.moves  # sequences move down one slot at a time, behind those that came before them
    for index, (request, new) in enumerate(zip(requests, lengths, strict=True)):
        options = SamplingOptions(max_new_tokens=new, temperature=0)
        assert request.tokens == tokens_of(CachedGPT(model), options, PROMPT[index:]).tokens
    assert seeded.tokens == tokens_of(CachedGPT(model), sampled, PROMPT[1:]).tokens


LSTM_LENGTHS = [4, 30, 20]  # the first ends early: the third moves down into its slot
LSTM_JOINING = [(5 * i + 2) % VOCAB for i in range(17)]  # joins mid-decode, read in chunks


def run_lstm_batch(slots: SlotModel) -> tuple[list[EngineRequest], Moving]:
    """Sequences with different prompts in 3 slots of an lstm: one ends early, one joins mid-decode, one samples
    with a seed; the requests, and the slot model's record of decodes and moves."""
    moving = Moving(slots)
    engine = Engine(moving, BYTES, max_step_tokens=6)
    requests = [
        submit(engine, PROMPT[index:], SamplingOptions(max_new_tokens=new, temperature=0))[0]
        for index, new in enumerate(LSTM_LENGTHS)
    ]
    for _ in range(8):
        engine.step()
    requests.append(submit(engine, LSTM_JOINING)[0])
    requests.append(submit(engine, PROMPT[3:], SamplingOptions(max_new_tokens=15, temperature=0.9, seed=5))[0])
    run_out(engine)
    return requests, moving


def test_lstm_sequences_joining_and_leaving_a_batch_get_the_greedy_tokens_they_get_alone() -> None:
    model = lstm()
    slots = slot_model_for(model, 3, None)
    assert isinstance(slots, LSTMSlots)
    requests, moving = run_lstm_batch(slots)
    assert moving.moves and max(len(decoded) for decoded in moving.decoded) == 3  # a full batch, and moves
    prompts = [PROMPT[index:] for index in range(len(LSTM_LENGTHS))] + [LSTM_JOINING]
    lengths = [*LSTM_LENGTHS, GREEDY.max_new_tokens]
    alone = [
        tokens_of(RecurrentLSTM(model), SamplingOptions(max_new_tokens=new, temperature=0), prompt).tokens
        for prompt, new in zip(prompts, lengths, strict=True)
    ]
    assert [request.tokens for request in requests[:4]] == alone
    assert len({tuple(tokens[:4]) for tokens in alone}) == 4  # mixed-up rows would change some sequence's tokens
    assert requests[4].tokens == tokens_of(RecurrentLSTM(model), requests[4].options, PROMPT[3:]).tokens


def test_an_lstm_batched_over_its_slots_gives_what_its_slots_decoded_one_by_one_give() -> None:
    model = lstm()
    batched, _ = run_lstm_batch(LSTMSlots(model, slots=3))
    one_by_one, _ = run_lstm_batch(DecoderSlots(model, 3, None))
    assert [request.tokens for request in batched] == [request.tokens for request in one_by_one]


def test_lstm_slots_in_a_run_in_any_order_or_scattered_decode_as_each_slot_alone() -> None:
    model = lstm()
    batched, one_by_one = LSTMSlots(model, slots=5), DecoderSlots(model, 5, None)
    for slot, prompt in enumerate([PROMPT, PROMPT[:4], PROMPT[2:9], PROMPT[:2], PROMPT[5:]]):
        for slot_model in (batched, one_by_one):
            slot_model.prefill(slot, prompt[:3], first=True)
            slot_model.prefill(slot, prompt[3:] or [1], first=False)
    for slots in ([3, 1, 2], [0, 4, 2], [4, 3, 2, 1, 0]):  # a run out of order, scattered slots, every slot
        tokens = [(7 * slot + 1) % VOCAB for slot in slots]
        torch.testing.assert_close(batched.decode(slots, tokens), one_by_one.decode(slots, tokens))
    for slot_model in (batched, one_by_one):
        slot_model.move(4, 1)
    torch.testing.assert_close(batched.decode([0, 1], [2, 3]), one_by_one.decode([0, 1], [2, 3]))
