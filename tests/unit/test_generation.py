"""Generation (scaleforge.generation): cached decoders against recomputation, sampling, the context policies, stop
strings and text decoded as tokens arrive."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from scaleforge.config import load_config
from scaleforge.data.base import DataInfo
from scaleforge.data.tokenizers import bytes_tokenizer
from scaleforge.errors import UsageError
from scaleforge.generation.decoders import CachedGPT, Decoder, Recompute, RecurrentLSTM
from scaleforge.generation.language_model import Generation, LanguageModel, generate, generate_stream
from scaleforge.generation.sampling import SamplingOptions, next_tokens, sample_rows
from scaleforge.generation.streaming import StopStrings, StreamingDetokenizer
from scaleforge.models.gpt import GPT
from scaleforge.models.lstm import LSTMModel
from scaleforge.runs import LoadedRun

VOCAB = 64
BYTES = [bytes([value]) for value in range(VOCAB)]
GREEDY = SamplingOptions(max_new_tokens=40, temperature=0)
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7]


def gpt(seq_len: int = 64) -> GPT:
    """A small random gpt whose logits are far apart (weights ten times those of initialisation), so that greedy
    decoding neither hangs on rounding nor repeats one token."""
    torch.manual_seed(0)
    model = GPT(vocab_size=VOCAB, seq_len=seq_len, n_layers=2, n_heads=4, d_model=32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    return model


def lstm() -> LSTMModel:
    """A small random lstm whose logits are far apart (weights drawn wider than at initialisation), so that greedy
    decoding continues different prompts with different tokens rather than one repeated cycle."""
    torch.manual_seed(0)
    model = LSTMModel(input_shape=(16,), vocab_size=VOCAB, embedding_dim=16, hidden_size=32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.5)
    return model


def tokens_of(decoder: Decoder, options: SamplingOptions = GREEDY, prompt: Sequence[int] = PROMPT) -> Generation:
    generation = Generation(decoder, prompt, options, BYTES)
    list(generation)
    return generation


def test_greedy_decoding_with_the_gpt_cache_equals_recomputing_the_whole_sequence() -> None:
    model = gpt()
    cached, recomputed = tokens_of(CachedGPT(model)), tokens_of(Recompute(model, 64))
    assert cached.tokens == recomputed.tokens and len(cached.tokens) == 40
    assert len(set(cached.tokens)) > 5 and cached.finish_reason == "length"


def test_greedy_decoding_with_the_lstm_state_equals_recomputing_the_whole_sequence() -> None:
    model = lstm()
    assert tokens_of(RecurrentLSTM(model)).tokens == tokens_of(Recompute(model, None)).tokens


def test_past_the_context_crop_gives_the_tokens_of_recomputing_the_most_recent_window() -> None:
    model = gpt(seq_len=16)
    cached = tokens_of(CachedGPT(model))  # 10 prompt tokens + 40 new ones: 34 past the context of 16
    assert cached.tokens == tokens_of(Recompute(model, 16)).tokens
    assert len(cached.tokens) == 40 and cached.finish_reason == "length"
    long_prompt = list(range(30))  # a prompt longer than the context is cropped to its end too
    assert (
        tokens_of(CachedGPT(model), prompt=long_prompt).tokens
        == tokens_of(Recompute(model, 16), prompt=long_prompt).tokens
    )


def test_context_stop_ends_with_the_last_token_the_whole_sequence_predicts() -> None:
    options = SamplingOptions(max_new_tokens=40, temperature=0, context="stop")
    stopped = tokens_of(CachedGPT(gpt(seq_len=16)), options)
    assert len(stopped.tokens) == 16 - len(PROMPT) + 1 and stopped.finish_reason == "context"
    assert stopped.tokens == tokens_of(CachedGPT(gpt(seq_len=16))).tokens[:7]


def test_a_seed_reproduces_a_sample_and_another_seed_gives_another() -> None:
    model = gpt()
    options = [SamplingOptions(max_new_tokens=30, temperature=1.0, seed=seed) for seed in (7, 7, 8)]
    sample = [tokens_of(CachedGPT(model), chosen).tokens for chosen in options]
    assert sample[0] == sample[1] and sample[0] != sample[2]
    assert sample[0] == tokens_of(Recompute(model, 64), options[0]).tokens  # the same logits, the same draws


def test_top_k_and_top_p_sample_only_from_the_likeliest_tokens() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(next_tokens(logits, SamplingOptions(temperature=1.0, top_k=2), generator).tolist()) == {0, 1}
    # probabilities 0.64, 0.24, 0.09, ...: 0.8 takes the first two, 0.5 the first alone
    assert set(next_tokens(logits, SamplingOptions(temperature=1.0, top_p=0.8), generator).tolist()) == {0, 1}
    assert set(next_tokens(logits, SamplingOptions(temperature=5.0, top_p=0.5), generator).tolist()) <= {0, 1}
    assert set(next_tokens(logits, SamplingOptions(temperature=1.0, top_p=0.5), generator).tolist()) == {0}
    assert set(next_tokens(logits, SamplingOptions(temperature=1.0), generator).tolist()) == {0, 1, 2, 3, 4}
    assert next_tokens(logits[:1], SamplingOptions(temperature=0, top_k=3), generator).tolist() == [0]


def test_a_batch_of_rows_samples_what_each_row_samples_alone() -> None:
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    options = [
        SamplingOptions(temperature=0),
        SamplingOptions(temperature=1.0, top_k=5),
        SamplingOptions(temperature=0.7, top_p=0.8),
        SamplingOptions(temperature=1.3),
        SamplingOptions(temperature=1.0, top_k=10, top_p=0.5),
    ]
    batched = [torch.Generator().manual_seed(row) for row in range(5)]
    alone = [torch.Generator().manual_seed(row) for row in range(5)]
    for _ in range(20):
        tokens = sample_rows(logits, options, batched).tolist()
        assert tokens == [int(next_tokens(logits[row : row + 1], options[row], alone[row])[0]) for row in range(5)]


class ScriptedDecoder:
    """A decoder whose greedy choice is each token of `script` in turn, whatever it is fed."""

    def __init__(self, script: Sequence[int]) -> None:
        self.script, self.context, self.length, self.steps = list(script), None, 0, 0

    def start(self, tokens: Sequence[int]) -> torch.Tensor:
        self.length, self.steps = len(tokens), 0
        return self._logits()

    def extend(self, token: int) -> torch.Tensor:
        self.length, self.steps = self.length + 1, self.steps + 1
        return self._logits()

    def _logits(self) -> torch.Tensor:
        return nn.functional.one_hot(torch.tensor(self.script[self.steps]), len(self.script)).float()


def scripted(pieces: Sequence[bytes], stop: Sequence[str] = ()) -> tuple[list[str], Generation]:
    """The text pieces of a generation whose tokens stand for `pieces`, in that order."""
    options = SamplingOptions(max_new_tokens=len(pieces), temperature=0, stop=tuple(stop))
    generation = Generation(ScriptedDecoder(range(len(pieces))), [0], options, pieces)
    return list(generation), generation


def test_a_stop_string_that_spans_two_tokens_ends_the_text_before_it() -> None:
    pieces, generation = scripted([b"hel", b"lo wo", b"rld", b"!"], stop=["wor", "xyz"])
    assert pieces == ["hel", "lo "] and generation.finish_reason == "stop"
    assert generation.tokens == [0, 1, 2]  # nothing is sampled after the stop string
    pieces, generation = scripted([b"hel", b"lo wo", b"rld"], stop=["world!"])  # a start of it, never completed
    assert "".join(pieces) == "hello world" and generation.finish_reason == "length"
    assert scripted([b"ab", b"cd"], stop=["a"])[0] == []  # at the very start: no text at all


def test_a_multi_byte_character_is_never_split_between_pieces() -> None:
    # a\xc3 | \xa9\xe6 | \xbc | \xa2b: "aé漢b" with é and 漢 each split between tokens
    pieces, generation = scripted([b"a\xc3", b"\xa9\xe6", b"\xbc", b"\xa2b"])
    assert pieces == ["a", "é", "漢b"] and generation.tokens == [0, 1, 2, 3]
    text = "über 漢字 🙂 naïve"
    detokenizer = StreamingDetokenizer(bytes_tokenizer().token_byte_strings())
    streamed = [detokenizer.push(value) for value in text.encode()]
    assert "".join(streamed) == text and "\ufffd" not in "".join(streamed)
    assert all(piece in ("", character) for piece, character in zip([p for p in streamed if p], text, strict=True))
    unfinished = StreamingDetokenizer(BYTES + [bytes([value]) for value in range(VOCAB, 256)])
    assert unfinished.push(0xE6) == "" and unfinished.flush() == "\ufffd"  # as Tokenizer.decode makes it


def test_stop_strings_hold_back_only_what_could_begin_one() -> None:
    stops = StopStrings(["\n\n", "END"])
    assert stops.push("one\n") == "one" and stops.push("two E") == "\ntwo " and stops.push("N") == ""
    assert stops.push("D and more") == "" and stops.stopped


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -0.5}, "temperature must be 0"),
        ({"top_p": 0.0}, "top_p must be above 0 and at most 1"),
        ({"top_p": 1.5}, "top_p must be above 0 and at most 1"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"stop": ("",)}, "each stop string must be a non-empty string"),
        ({"context": "roll"}, "context must be crop or stop"),
    ],
)
def test_bad_sampling_options_are_usage_errors(options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        SamplingOptions(**options)


def test_one_stop_string_is_one_string_not_its_characters() -> None:
    assert SamplingOptions(stop="\n\n").stop == ("\n\n",)  # type: ignore[arg-type]


def loaded(model: nn.Module, info: DataInfo, tokenizer: object = None) -> LoadedRun:
    return LoadedRun(config=load_config(None), model=model, info=info, tokenizer=tokenizer)  # type: ignore[arg-type]


def test_generate_continues_a_prompt_and_refuses_what_it_cannot_continue() -> None:
    info = DataInfo(task="language_modeling", input_shape=(64,), vocab_size=256, seq_len=64)
    torch.manual_seed(0)
    run = loaded(GPT(vocab_size=256, seq_len=64, n_layers=1, n_heads=2, d_model=16).eval(), info, bytes_tokenizer())
    text = generate(run, "the fox", max_new_tokens=20, temperature=0, device="cpu")
    stream = generate_stream(LanguageModel(run, "cpu"), "the fox", SamplingOptions(max_new_tokens=20, temperature=0))
    assert "".join(stream) == text and len(stream.tokens) == 20 and stream.finish_reason == "length"
    with pytest.raises(UsageError, match="the prompt is empty"):
        generate(run, "")
    with pytest.raises(UsageError, match="no option 'temprature' \\(did you mean 'temperature'\\?\\)"):
        generate(run, "x", temprature=0)
    with pytest.raises(UsageError, match="a classification model, not a language model"):
        LanguageModel(loaded(nn.Linear(2, 2), DataInfo(task="classification", input_shape=(2,), num_classes=2)))
    with pytest.raises(UsageError, match="trained on token ids without a tokenizer"):
        LanguageModel(loaded(run.model, info))
