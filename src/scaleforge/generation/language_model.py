"""A trained language model that continues a prompt: `LanguageModel` wraps a run's model and tokenizer,
`Generation` is one continuation as text pieces, and `generate` / `generate_stream` do both from a run directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from scaleforge.errors import UsageError, did_you_mean
from scaleforge.generation.decoders import Decoder, decoder_for
from scaleforge.generation.sampling import SamplingOptions, next_tokens
from scaleforge.generation.streaming import TextOutput
from scaleforge.hardware import select_device
from scaleforge.runs import LoadedRun, Trust, open_run

FinishReason = Literal["length", "stop", "context"]
SAMPLING_FIELDS = tuple(field.name for field in dataclasses.fields(SamplingOptions))


class Generation:
    """One prompt's continuation, as text pieces in the order its tokens are sampled. Once iterated through,
    `tokens` holds the sampled ids and `finish_reason` why it ended: `length` (max_new_tokens), `stop` (a stop
    string, which the text leaves out) or `context` (the model's context was full, with `context="stop"`)."""

    def __init__(
        self, decoder: Decoder, prompt: Sequence[int], options: SamplingOptions, token_bytes: Sequence[bytes]
    ) -> None:
        if not prompt:
            raise UsageError("the prompt is empty: it has no tokens to continue")
        self.decoder = decoder
        self.prompt = list(prompt)
        self.options = options
        self.token_bytes = token_bytes
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None

    def __iter__(self) -> Iterator[str]:
        text = TextOutput(self.token_bytes, self.options.stop)
        for token in self.token_ids():
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                self.finish_reason = "stop"
                return
        piece = text.finish()
        if text.stopped:
            self.finish_reason = "stop"
        if piece:
            yield piece

    def token_ids(self) -> Iterator[int]:
        """The sampled tokens, each computed only when asked for, without their text (iterating yields the text).
        Past the context, `crop` reads the most recent `context` tokens again from scratch (a gpt's positions are
        learned: its cache cannot roll), as nanoGPT's generation does; `stop` ends once the next token would need
        a longer window."""
        decoder, options, context = self.decoder, self.options, self.decoder.context
        window = self.prompt[-context:] if context is not None else list(self.prompt)
        logits = decoder.start(window)
        generator = options.generator(logits.device)
        for count in range(options.max_new_tokens):
            token = int(next_tokens(logits[None], options, generator)[0])
            self.tokens.append(token)
            yield token
            if count + 1 == options.max_new_tokens:
                break
            window.append(token)
            if context is None or decoder.length < context:
                logits = decoder.extend(token)
            elif options.context == "stop":
                self.finish_reason = "context"
                return
            else:
                window = window[-context:]
                logits = decoder.start(window)
        self.finish_reason = "length"


class LanguageModel:
    """A run's language model and tokenizer on `device`, ready to continue prompts."""

    def __init__(self, run: LoadedRun, device: str | None = None, name: str = "the run") -> None:
        if run.info.task != "language_modeling":
            raise UsageError(
                f"{name} is a {run.info.task} model, not a language model: generate needs a run trained on text"
            )
        if run.tokenizer is None:
            raise UsageError(
                f"{name} was trained on token ids without a tokenizer: generate needs a run trained on text "
                "(data.dataset=text)"
            )
        self.device = select_device(device or "auto")
        self.model = run.model.to(self.device).eval()
        self.tokenizer = run.tokenizer
        self.seq_len = run.info.seq_len
        self.token_bytes = self.tokenizer.token_byte_strings()

    def generate(self, prompt: str, options: SamplingOptions) -> Generation:
        """The continuation of `prompt`, sampled as it is iterated."""
        ids = [int(token) for token in self.tokenizer.encode(prompt)]
        return Generation(decoder_for(self.model, self.seq_len), ids, options, self.token_bytes)


def generate_stream(
    run: str | Path | LoadedRun | LanguageModel,
    prompt: str,
    options: SamplingOptions | None = None,
    *,
    device: str | None = None,
    trust_code: bool = False,
    signing_key_env: str | None = None,
    **sampling: Any,
) -> Generation:
    """The continuation of `prompt` by a run's language model, as text pieces while they are produced (see
    `generate` for the arguments); the `Generation` says afterwards why it ended."""
    if options is not None and sampling:
        raise UsageError("generate: give the sampling options either as options or as keywords, not both")
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise UsageError(
            f"generate has no option {unknown[0]!r}{did_you_mean(unknown[0], SAMPLING_FIELDS)}; "
            f"its options: {', '.join(SAMPLING_FIELDS)}"
        )
    options = options or SamplingOptions(**sampling)
    if isinstance(run, LanguageModel):
        return run.generate(prompt, options)
    loaded = run if isinstance(run, LoadedRun) else open_run(run, Trust(trust_code, signing_key_env))
    name = "the run" if isinstance(run, LoadedRun) else str(run)
    return LanguageModel(loaded, device, name).generate(prompt, options)


def generate(
    run: str | Path | LoadedRun | LanguageModel,
    prompt: str,
    options: SamplingOptions | None = None,
    *,
    device: str | None = None,
    trust_code: bool = False,
    signing_key_env: str | None = None,
    **sampling: Any,
) -> str:
    """The continuation of `prompt` by the language model of `run` (a run directory, opened as data unless
    `trust_code`; a `load_run` result; or a `LanguageModel` to reuse across prompts). Sampling options come as
    `options` or as keywords of `SamplingOptions`: `max_new_tokens`, `temperature` (0: greedy), `top_k`, `top_p`,
    `seed`, `stop` (strings that end the text, left out of it), `context` (`crop` or `stop`)."""
    return "".join(
        generate_stream(
            run,
            prompt,
            options,
            device=device,
            trust_code=trust_code,
            signing_key_env=signing_key_env,
            **sampling,
        )
    )
