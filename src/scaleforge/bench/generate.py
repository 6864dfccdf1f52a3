"""`scaleforge bench generate RUN_DIR`: how fast a run's gpt writes text.

The result is a list of rows, each one way of generating measured in one part of the benchmark (`PARTS`). The
`single` part is one greedy generation of `new_tokens` (default 256) after a prompt of `prompt_tokens` (16) random
tokens, five ways:

- `kv cache`: scaleforge's own generation (`Generation` over the gpt's key/value cache, as `scaleforge generate`);
- `recompute`: the same, reading the whole sequence again for each token (`Recompute`, no cache);
- `onnxruntime full sequence`: the same generation over the gpt's ONNX export (the graph `scaleforge export` writes:
  dynamic sequence, every position's logits) under ONNX Runtime, reading the whole sequence again for each token;
- `onnxruntime kv cache`: the same over the prefill/decode pair of `scaleforge export --kv-cache` (the cache as the
  graphs' inputs and outputs): the prompt once, then one token a step (both skipped, and said so, without the
  export extra; ONNX Runtime gets as many threads as torch);
- `transformers generate`: Hugging Face transformers' `GPT2LMHeadModel.generate` (`use_cache=True`, greedy, exactly
  `new_tokens` tokens, no end token) on a GPT-2 of the same layers, width, heads, vocabulary, context and GELU,
  random weights (skipped, and said so, when transformers is not installed).

The ways in torch run on `--device` (default cpu), the clocks read once the device has done its work; ONNX
Runtime's ways are measured on cpu only (skipped, and said so, on another device). Each is warmed up once, then
the repeats are interleaved and medians reported. tokens/s counts the new tokens over the whole generation (prompt
included); TTFT is the time to the first new token, TPOT the time between the following ones (p50 and p99 over
every token of every repeat; transformers hands its tokens back all at once, so it has neither). A run whose
context is shorter than prompt and new tokens is measured on a gpt of its shape with the context widened to fit,
random weights: speed does not depend on the weights' values, and a gpt cannot attend past its learned positions.

The `server` part measures `scaleforge serve`'s `POST /v1/completions` on the run itself (its weights, its
tokenizer and its context) at 1, 4 and 16 concurrent streams, three ways, each a server in a child process on
127.0.0.1 on the same device, with as many slots as the most streams:

- `continuous batching`: the server as it is;
- `one at a time`: the same with `--max-batch-size 1`;
- `static batching`: the same with `--batching static`, where waiting sequences join only when no sequence is
  running and a batch keeps its shape until its longest member ends (ended members decoded as padding, as a
  batched `generate` call does).

Every way is sent the same requests (`completion_requests`: prompts of 8 to 64 tokens, `max_tokens` 16 to 256,
drawn uniformly with a fixed seed, greedy), in a closed loop: each stream sends the next request of the list,
streamed (server-sent events), when its last one has ended; at N streams, the list's first N x
`requests_per_stream`. The servers are all started first and each is paused (SIGSTOP) but while it is measured,
the ways taking turns at each stream count, and the whole round is run `repeats` times (3). tokens/s counts the
completion tokens (the stream's usage) over the wall time, the median of the rounds; TTFT is from sending a
request to its first chunk, TPOT a request's time from its first chunk to its last over its tokens after the
first (p50 and p99 over the requests of every round). The part is skipped, and said so, when the
run has no tokenizer (the server completes text) or the serve and bench extras are not installed.

The options are the fields of `GenerateBenchOptions` and `ServerLoad`. A part is a function from the `Setup` to
rows; the table, JSON and plot take them as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleforge.bench.harness import machine, report, synchronizer
from scaleforge.console import counted
from scaleforge.data.tokenizers import Tokenizer
from scaleforge.errors import UsageError
from scaleforge.generation.decoders import CachedGPT, Decoder, Recompute
from scaleforge.generation.language_model import Generation
from scaleforge.generation.sampling import SamplingOptions
from scaleforge.hardware import onnx_session, select_device_option
from scaleforge.models.gpt import GPT
from scaleforge.runs import UNTRUSTED, Trust

CACHE_SPEEDUP_TARGET = 5.0  # kv cache against recomputation
TRANSFORMERS_TARGET = 1.0  # kv cache against transformers' generate
ONE_AT_A_TIME_TARGET = 3.0  # the server's continuous batching against one request at a time, at the most streams
STATIC_TARGET = 1.5  # the server's continuous batching against static batching, at the most streams
PROMPT_TOKENS = (8, 64)  # the server part's prompts, fewest and most tokens
MIN_MAX_TOKENS = 16  # the server part's fewest `max_tokens`
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from"]


@dataclass(frozen=True)
class Percentiles:
    """p50 and p99 of a set of times, in milliseconds."""

    p50: float
    p99: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles:
        """The percentiles of `seconds`, in milliseconds."""
        milliseconds = np.asarray(seconds) * 1000
        return cls(float(np.percentile(milliseconds, 50)), float(np.percentile(milliseconds, 99)))


@dataclass(frozen=True)
class GenerationRow:
    """One way of generating, as measured: `streams` sequences generated at once (1 in the `single` part)."""

    part: str  # which part of the benchmark measured it: `single` (one generation in this process) or `server`
    way: str
    streams: int
    tokens_per_s: float  # new tokens of every stream over the wall time (`single`: the median over the repeats)
    ttft_ms: Percentiles | None = None  # time to the first new token
    tpot_ms: Percentiles | None = None  # time per output token after the first


@dataclass(frozen=True)
class GenerateBenchOptions:
    """How `scaleforge bench generate` measures, but for the server part's load (`ServerLoad`); each field is one of
    its options."""

    new_tokens: int = field(default=256, metadata={"help": "tokens to generate", "range": "positive"})
    prompt_tokens: int = field(default=16, metadata={"help": "tokens of the (random) prompt", "range": "positive"})
    repeats: int = field(default=5, metadata={"help": "timed generations of each way", "range": "positive"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's choice)", "range": "non-negative"})
    device: str = field(
        default="cpu",
        metadata={
            "help": "where the torch ways run and the server part's servers serve: cpu, cuda, cuda:N, mps or auto "
            "(cuda, then mps, then cpu); ONNX Runtime's ways are measured on cpu only"
        },
    )
    server: bool = field(default=True, metadata={"help": "measure the server part (scaleforge serve)"})
    out: Path = field(
        default=Path("runs/bench-generate"), metadata={"help": "where generate.json, generate.png and logs go"}
    )


@dataclass(frozen=True)
class ServerLoad:
    """What the server part sends: the numbers of concurrent streams, the requests of each stream, and the most
    tokens a request asks for (`max_tokens` is drawn from 16, or fewer when this is lower, to this); each field is
    an option of `scaleforge bench generate`."""

    streams: tuple[int, ...] = field(
        default=(1, 4, 16),
        metadata={
            "help": "the server part: concurrent streams, increasing (the servers get as many slots as the most)",
            "range": "positive",
        },
    )
    requests_per_stream: int = field(
        default=8, metadata={"help": "the server part: requests each stream sends", "range": "positive"}
    )
    max_tokens: int = field(
        default=256,
        metadata={
            "help": "the server part: the most tokens a request asks for (max_tokens is drawn from 16 to this)",
            "range": "positive",
            "flag": "--server-max-tokens",
        },
    )
    repeats: int = field(
        default=3,
        metadata={
            "help": "the server part: closed loops of each way at each stream count, interleaved; tokens/s is their "
            "median",
            "range": "positive",
            "flag": "--server-repeats",
        },
    )


@dataclass(frozen=True)
class Setup:
    """What every part measures: the gpt (on `device`, in eval mode), its prompt and how many tokens to add; and
    for the server part, the run's own tokenizer and context and the load (None: not measured)."""

    run_dir: Path
    trust: Trust
    model: GPT
    prompt: list[int]
    new_tokens: int
    repeats: int
    token_bytes: Sequence[bytes]
    out: Path  # where a part may write files (the ONNX export, the servers' logs)
    tokenizer: Tokenizer | None = None
    context: int = 0  # the run's gpt's context (the server serves the run, never a widened model)
    threads: int = 0  # torch threads of each server (0: the server's choice)
    server: ServerLoad | None = None
    device: torch.device = torch.device("cpu")  # the model's, where the server part's servers serve too


def single_stream_rows(setup: Setup) -> list[GenerationRow]:
    """One greedy generation at a time: the gpt's cache, recomputation, its ONNX exports (on cpu, when installed:
    `onnx_skipped`) and transformers' GPT-2 (when installed)."""
    options = SamplingOptions(max_new_tokens=setup.new_tokens, temperature=0)
    context = setup.model.embed.seq_len
    synchronize = synchronizer(setup.device)
    decoders: dict[str, Decoder] = {"kv cache": CachedGPT(setup.model), "recompute": Recompute(setup.model, context)}
    if onnx_skipped(setup) is None:
        decoders.update(_onnx_decoders(setup.model, setup.out))
    ways: dict[str, Callable[[], list[float]]] = {
        way: lambda decoder=decoder: _timed_generation(
            Generation(decoder, setup.prompt, options, setup.token_bytes), synchronize
        )
        for way, decoder in decoders.items()
    }
    transformers_generate = _transformers_generate(setup.model, setup.prompt, setup.new_tokens, setup.device)
    if transformers_generate is not None:
        ways["transformers generate"] = transformers_generate
    times: dict[str, list[list[float]]] = {way: [] for way in ways}
    for generate in ways.values():  # warm-up: allocations, thread pools, first-call dispatch
        generate()
    for _ in range(setup.repeats):  # interleaved, so that a slower moment of the machine falls on every way alike
        for way, generate in ways.items():
            times[way].append(generate())
    rows = []
    for way, repeats in times.items():
        total = statistics.median(stamps[-1] for stamps in repeats)
        per_token = way in decoders  # transformers returns one time: the whole generation
        gaps = [gap for stamps in repeats for gap in np.diff(stamps)] if per_token else []
        first = Percentiles.of([stamps[0] for stamps in repeats]) if per_token else None
        rows.append(
            GenerationRow("single", way, 1, setup.new_tokens / total, first, Percentiles.of(gaps) if gaps else None)
        )
    return rows


def completion_requests(tokenizer: Tokenizer, context: int, count: int, max_tokens: int) -> list[tuple[str, int]]:
    """`count` requests of the server part, (prompt, max_tokens), drawn uniformly with a fixed seed: prompts of 8 to
    64 tokens (cut to half of `context`) of random words, `max_tokens` 16 to `max_tokens` (cut so that prompt and
    completion fit `context`). A prompt is the text of its tokens (with a bpe tokenizer, it may read back a token
    longer or shorter)."""
    generator = random.Random(0)
    words = [generator.choice(WORDS) for _ in range(PROMPT_TOKENS[1] * 2)]
    text_tokens = [int(token) for token in tokenizer.encode(" ".join(words))]
    requests = []
    for _ in range(count):
        length = min(generator.randint(*PROMPT_TOKENS), context // 2, len(text_tokens))
        start = generator.randrange(len(text_tokens) - length + 1)
        most = generator.randint(min(MIN_MAX_TOKENS, max_tokens), max_tokens)
        requests.append((tokenizer.decode(text_tokens[start : start + length]), min(most, context - length)))
    return requests


@dataclass
class StreamedLoad:
    """What one closed loop of streamed completions measured: its wall time, every request's completion tokens,
    time to its first chunk and time per output token after the first (None: a single token)."""

    seconds: float
    tokens: list[int]
    first_chunk: list[float]
    per_token: list[float | None]

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.seconds


def _server_row(way: str, streams: int, loads: Sequence[StreamedLoad]) -> GenerationRow:
    """The row of `loads`, the repeats of one way at one stream count: the median of their tokens/s, and TTFT and
    TPOT over the requests of all of them."""
    first_chunk = [seconds for load in loads for seconds in load.first_chunk]
    per_token = [seconds for load in loads for seconds in load.per_token if seconds is not None]
    return GenerationRow(
        "server",
        way,
        streams,
        statistics.median(load.tokens_per_s for load in loads),
        Percentiles.of(first_chunk),
        Percentiles.of(per_token) if per_token else None,
    )


async def _streamed_completion(session: Any, url: str, body: dict[str, Any], load: StreamedLoad) -> None:
    """One streamed completion, its figures added to `load`."""
    began = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                raise RuntimeError(f"the server's stream failed: {event['error']['message']}")
            if event["choices"]:
                arrivals.append(time.perf_counter() - began)
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    load.tokens.append(tokens)
    load.first_chunk.append(arrivals[0])
    load.per_token.append((arrivals[-1] - arrivals[0]) / (tokens - 1) if tokens > 1 else None)


async def _closed_loop(url: str, model: str, requests: Sequence[tuple[str, int]], streams: int) -> StreamedLoad:
    """`requests` sent by `streams` clients, each sending the next one when its last has ended."""
    import aiohttp

    load = StreamedLoad(0.0, [], [], [])
    pending = iter(requests)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams), timeout=timeout) as session:

        async def stream() -> None:
            for prompt, max_tokens in pending:  # one iterator shared by every stream: the next request of the list
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
                await _streamed_completion(session, url, {**body, "stream_options": {"include_usage": True}}, load)

        began = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(streams)))
        load.seconds = time.perf_counter() - began
    return load


async def _model_name(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as response:
        name: str = (await response.json())["data"][0]["id"]
        return name


def server_ways(setup: Setup, slots: int) -> dict[str, list[str]]:
    """The server part's ways: `scaleforge serve`'s command line for each (the port left as `{port}`)."""
    from scaleforge.bench.serve import trust_flags

    serve = [sys.executable, "-m", "scaleforge", "serve", str(setup.run_dir), "--port", "{port}"]
    # no sequence is refused for waiting: one at a time, the others wait for every request ahead of them
    serve += [*trust_flags(setup.trust), "--timeout-ms", "3600000", "--max-queue", str(max(256, 2 * slots))]
    serve += ["--device", str(setup.device), *(["--threads", str(setup.threads)] if setup.threads else [])]
    return {
        "continuous batching": [*serve, "--max-batch-size", str(slots)],
        "one at a time": [*serve, "--max-batch-size", "1"],
        "static batching": [*serve, "--max-batch-size", str(slots), "--batching", "static"],
    }


def server_rows(setup: Setup) -> list[GenerationRow]:
    """Streamed completions from `scaleforge serve` at each number of concurrent streams: continuous batching, one
    request at a time and static batching (none when the part is not measured: `server_skipped`)."""
    if setup.server is None or server_skipped(setup) is not None:
        return []
    from scaleforge.bench.serve import Target, started

    load = setup.server
    slots = max(load.streams)
    requests = _server_requests(setup, load)
    warm_up = [(prompt, min(max_tokens, 8)) for prompt, max_tokens in requests[:4]]
    measured: dict[str, dict[int, list[StreamedLoad]]] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for index, (way, command) in enumerate(server_ways(setup, slots).items()):
            target = Target(way, command, "/v1/completions", "/health/ready")
            server = servers[way] = stack.enter_context(started(target, setup.out / f"server-{index}.log"))
            model = asyncio.run(_model_name(server.url))
            asyncio.run(_closed_loop(server.endpoint, model, warm_up, 2))  # first requests' allocations
            server.pause()
        for _ in range(load.repeats):
            for streams in load.streams:
                for way, server in servers.items():  # in turn: a slow spell of the machine falls on every way alike
                    with server.running():
                        sent = requests[: streams * load.requests_per_stream]
                        measured.setdefault(way, {}).setdefault(streams, []).append(
                            asyncio.run(_closed_loop(server.endpoint, model, sent, streams))
                        )
    return [_server_row(way, streams, runs) for way, loads in measured.items() for streams, runs in loads.items()]


def _server_requests(setup: Setup, load: ServerLoad) -> list[tuple[str, int]]:
    """Every request the server part sends: the most streams times each stream's requests."""
    assert setup.tokenizer is not None
    return completion_requests(
        setup.tokenizer, setup.context, max(load.streams) * load.requests_per_stream, load.max_tokens
    )


def server_skipped(setup: Setup) -> str | None:
    """Why the server part is not measured, or None when it is."""
    from scaleforge.extras import missing

    if setup.server is None:
        return "not measured (--no-server)"
    if setup.tokenizer is None:
        return "not measured: the run has no tokenizer, and the server completes text (train on data.dataset=text)"
    if missing("serve") or missing("bench"):
        return "not measured: the serve and bench extras are not installed (pip install 'scaleforge[serve,bench]')"
    return None


def onnx_skipped(setup: Setup) -> str | None:
    """Why ONNX Runtime's ways are not measured, or None when they are."""
    from scaleforge.extras import missing

    if setup.device.type != "cpu":
        return f"not measured on {setup.device}: ONNX Runtime's ways run on cpu only (measure them with --device cpu)"
    if missing("export"):
        return "not measured: the export extra is not installed (pip install 'scaleforge[export]')"
    return None


# The parts of the benchmark, in order: each measures some ways of generating and returns their rows.
PARTS: dict[str, Callable[[Setup], list[GenerationRow]]] = {"single": single_stream_rows, "server": server_rows}


def run_generate_benchmark(
    run_dir: str | Path,
    options: GenerateBenchOptions = GenerateBenchOptions(),
    load: ServerLoad = ServerLoad(),
    *,
    as_json: bool = False,
    trust: Trust = UNTRUSTED,
) -> dict[str, Any]:
    """Measure every part on the gpt of the run at `run_dir` (the server part under `load`, unless
    `options.server` is False), print the table (or JSON), write `generate.json` and `generate.png` into
    `options.out`, and return the result. A device that is not one, or not on this machine, is a `UsageError`."""
    from scaleforge.runs import open_run, verify_final

    device = select_device_option(options.device)  # before any work
    final = verify_final(run_dir, trust.signing_key_env)
    run = open_run(final, trust)
    if not isinstance(run.model, GPT):
        raise UsageError(
            f"bench generate measures a gpt's key/value cache; {final.parent} holds a {run.config.model.architecture}"
        )
    if options.threads:
        torch.set_num_threads(options.threads)
    context = run.model.embed.seq_len
    model, weights = _model_to_measure(run.model, options.prompt_tokens + options.new_tokens, device)
    vocab_size = model.embed.token.num_embeddings
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (options.prompt_tokens,), generator=generator).tolist()
    token_bytes = run.tokenizer.token_byte_strings() if run.tokenizer is not None else [b""] * vocab_size
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    server = load if options.server else None
    setup = Setup(final.parent, trust, model, prompt, options.new_tokens, options.repeats, token_bytes, out)
    setup = dataclasses.replace(
        setup, tokenizer=run.tokenizer, context=context, threads=options.threads, server=server, device=device
    )
    rows = [row for part in PARTS.values() for row in part(setup)]
    skipped = server_skipped(setup)
    result = {
        "benchmark": "generate",
        "run_dir": str(final.parent),
        **machine(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": {**_shape(model), "parameters": sum(p.numel() for p in model.parameters()), "weights": weights},
        "prompt_tokens": options.prompt_tokens,
        "new_tokens": options.new_tokens,
        "repeats": options.repeats,
        "server": {"skipped": skipped} if server is None or skipped else _server_summary(setup, server),
        "rows": [dataclasses.asdict(row) for row in rows],
        "targets": _targets(rows, options.new_tokens, onnx_skipped(setup), skipped),
    }
    _plot(rows, out / "generate.png")
    shape = result["model"]
    report(
        result,
        out / "generate.json",
        as_json=as_json,
        title=f"Generation by {final.parent}'s gpt ({counted(shape['layers'], 'layer')}, width {shape['width']}, "
        f"{counted(shape['heads'], 'head')}, vocabulary {shape['vocab_size']}, context {shape['context']}): "
        f"{options.new_tokens} tokens after {options.prompt_tokens}, greedy, {_device_name(device)}, "
        f"{counted(torch.get_num_threads(), 'thread')}, median of {options.repeats}",
        columns=["part", "way", "streams", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"],
        rows=[_table_row(row) for row in rows],
        notes=[
            *([f"model: {weights}"] if weights != "the run's" else []),
            *([_server_note(result["server"])] if not skipped else []),
            *(f"{name}: {text}" for name, text in result["targets"].items()),
            f"results in {out}/ (generate.json, generate.png)",
        ],
    )
    return result


def _server_summary(setup: Setup, load: ServerLoad) -> dict[str, Any]:
    """The server part's load, as the JSON gives it: the streams, the requests and their mean lengths."""
    assert setup.tokenizer is not None
    requests = _server_requests(setup, load)
    return {
        "streams": list(load.streams),
        "requests_per_stream": load.requests_per_stream,
        "repeats": load.repeats,
        "slots": max(load.streams),
        "device": str(setup.device),
        "max_tokens": load.max_tokens,
        "context": setup.context,
        "mean_prompt_tokens": statistics.mean(len(setup.tokenizer.encode(prompt)) for prompt, _ in requests),
        "mean_max_tokens": statistics.mean(max_tokens for _, max_tokens in requests),
    }


def _server_note(summary: dict[str, Any]) -> str:
    return (
        f"server: `scaleforge serve` with {counted(summary['slots'], 'slot')} on {summary['device']}; each stream "
        f"sends {counted(summary['requests_per_stream'], 'streamed request')}, the next when its last ends; prompts "
        f"of {summary['mean_prompt_tokens']:.0f} tokens and max_tokens {summary['mean_max_tokens']:.0f} on average, "
        f"greedy, context {summary['context']}; tokens/s: median of {summary['repeats']} interleaved runs; TTFT and "
        "TPOT: p50 and p99 over their requests"
    )


def _device_name(device: torch.device) -> str:
    """`device` as the table's title names it: CPU, or the device and its GPU's name."""
    if device.type == "cpu":
        return "CPU"
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def _model_to_measure(model: GPT, length: int, device: torch.device) -> tuple[GPT, str]:
    """The run's gpt on `device` when `length` tokens fit its context, else one of its shape whose context fits
    them."""
    model = model.to(device).eval()
    context = model.embed.seq_len
    if length <= context:
        return model, "the run's"
    shape = _shape(model)
    widened = GPT(shape["vocab_size"], length, shape["layers"], shape["heads"], shape["width"]).to(device).eval()
    return widened, f"random weights, the run's shape with its context of {context} widened to {length}"


def _shape(model: GPT) -> dict[str, int]:
    return {
        "layers": len(model.blocks),
        "width": model.embed.token.embedding_dim,
        "heads": model.blocks[0].attn.heads,
        "vocab_size": model.embed.token.num_embeddings,
        "context": model.embed.seq_len,
    }


def _timed_generation(generation: Generation, synchronize: Callable[[], None]) -> list[float]:
    """Seconds from the start to each new token of `generation`, each read once `synchronize` has waited for the
    device."""
    synchronize()
    started = time.perf_counter()
    stamps = []
    for _ in generation.token_ids():
        synchronize()
        stamps.append(time.perf_counter() - started)
    return stamps


def _onnx_session(path: Path) -> Any:
    return onnx_session(path, torch.get_num_threads())  # as many threads as torch's ways get


class OnnxFullSequence:
    """A `Decoder` over a gpt's full-sequence ONNX graph under ONNX Runtime: the whole sequence read again for each
    token, as a runtime without the model's cache does."""

    def __init__(self, path: Path, context: int) -> None:
        self.session = _onnx_session(path)
        self.context: int | None = context
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def start(self, tokens: Sequence[int]) -> torch.Tensor:
        self.tokens = list(tokens)
        return self._logits()

    def extend(self, token: int) -> torch.Tensor:
        self.tokens.append(token)
        return self._logits()

    def _logits(self) -> torch.Tensor:
        logits = self.session.run(None, {"tokens": np.asarray([self.tokens], dtype=np.int64)})[0]
        return torch.from_numpy(logits[0, -1])  # (V,)


class OnnxKVCache:
    """A `Decoder` over a gpt's ONNX prefill/decode pair: the prompt read once, then one token a step, the keys and
    values handed from one call to the next."""

    def __init__(self, prefill: Path, decode: Path, context: int) -> None:
        self.prefill, self.decode = _onnx_session(prefill), _onnx_session(decode)
        self.context: int | None = context
        self.length = 0
        self.keys = self.values = np.empty(0, dtype=np.float32)

    def start(self, tokens: Sequence[int]) -> torch.Tensor:
        self.length = len(tokens)
        logits, self.keys, self.values = self.prefill.run(None, {"tokens": np.asarray([tokens], dtype=np.int64)})
        return torch.from_numpy(logits[0, -1])

    def extend(self, token: int) -> torch.Tensor:
        self.length += 1
        feed = {"tokens": np.asarray([[token]], dtype=np.int64), "past_keys": self.keys, "past_values": self.values}
        logits, self.keys, self.values = self.decode.run(None, feed)
        return torch.from_numpy(logits[0, -1])


def _onnx_decoders(model: GPT, out: Path) -> dict[str, Decoder]:
    """`model` (on cpu) exported as `scaleforge export --kv-cache` exports a gpt (`out/generate.onnx` and its pair,
    checked), and a decoder over each; the export extra must be installed."""
    from scaleforge.export.formats import export_onnx_language_model, kv_cache_pair

    context, path = model.embed.seq_len, out / "generate.onnx"
    export_onnx_language_model(model, context, path)
    example = torch.randint(
        0, model.embed.token.num_embeddings, (1, context), generator=torch.Generator().manual_seed(0)
    )
    pair = kv_cache_pair(model, example, context, path, dynamic_batch=False, opset=None)
    return {
        "onnxruntime full sequence": OnnxFullSequence(path, context),
        "onnxruntime kv cache": OnnxKVCache(Path(pair["prefill"]), Path(pair["decode"]), context),
    }


def _transformers_generate(
    model: GPT, prompt: list[int], new_tokens: int, device: torch.device
) -> Callable[[], list[float]] | None:
    """A generation of `new_tokens` by transformers' GPT-2 of `model`'s shape (random weights) on `device`,
    returning its total seconds; None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    shape = _shape(model)
    config = transformers.GPT2Config(
        vocab_size=shape["vocab_size"],
        n_positions=shape["context"],
        n_embd=shape["width"],
        n_layer=shape["layers"],
        n_head=shape["heads"],
        activation_function="gelu",  # the exact GELU of scaleforge's gpt (GPT-2's default is tanh's approximation)
        bos_token_id=None,
        eos_token_id=None,
    )
    gpt2 = transformers.GPT2LMHeadModel(config).to(device).eval()
    inputs = torch.tensor([prompt], device=device)
    synchronize = synchronizer(device)
    kwargs = {"min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "eos_token_id": None, "do_sample": False}

    def generate() -> list[float]:
        synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            ids = gpt2.generate(inputs, attention_mask=torch.ones_like(inputs), use_cache=True, **kwargs)
        synchronize()
        seconds = time.perf_counter() - started
        if ids.shape[1] != len(prompt) + new_tokens:
            raise RuntimeError(f"transformers generated {ids.shape[1] - len(prompt)} tokens, not {new_tokens}")
        return [seconds]

    return generate


def _targets(
    rows: Sequence[GenerationRow], new_tokens: int, onnx_skipped: str | None, server_skipped: str | None
) -> dict[str, str]:
    """The targets against the measured figures: met or not met (`onnx_skipped`, `server_skipped`: why ONNX
    Runtime's ways and the server part's are not measured)."""
    single = {row.way: row for row in rows if row.part == "single"}
    cache = single["kv cache"].tokens_per_s
    targets = {}
    speedup = cache / single["recompute"].tokens_per_s
    targets[f"kv cache >= {CACHE_SPEEDUP_TARGET:g}x recomputation at {new_tokens} tokens"] = _verdict(
        speedup, CACHE_SPEEDUP_TARGET
    )
    if onnx_skipped is not None:
        targets["onnxruntime"] = onnx_skipped
    name = f"kv cache >= {TRANSFORMERS_TARGET:.1f}x transformers' generate"
    if "transformers generate" in single:
        targets[name] = _verdict(cache / single["transformers generate"].tokens_per_s, TRANSFORMERS_TARGET)
    else:
        targets[name] = "not measured: transformers is not installed (pip install 'scaleforge[bench]')"
    server = [row for row in rows if row.part == "server"]
    most = max((row.streams for row in server), default=16)
    at_most = {row.way: row.tokens_per_s for row in server if row.streams == most}
    for way, target in (("one at a time", ONE_AT_A_TIME_TARGET), ("static batching", STATIC_TARGET)):
        name = f"server: continuous batching >= {target:g}x {way} at {most} streams"
        targets[name] = server_skipped or _verdict(at_most["continuous batching"] / at_most[way], target)
    return targets


def _verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x, {'met' if ratio >= target else 'not met'}"


def _table_row(row: GenerationRow) -> list[str]:
    def milliseconds(value: Percentiles | None, field: str) -> str:
        return "-" if value is None else f"{getattr(value, field):.2f}"

    return [
        row.part,
        row.way,
        str(row.streams),
        f"{row.tokens_per_s:,.0f}",
        milliseconds(row.ttft_ms, "p50"),
        milliseconds(row.ttft_ms, "p99"),
        milliseconds(row.tpot_ms, "p50"),
        milliseconds(row.tpot_ms, "p99"),
    ]


def _plot(rows: Sequence[GenerationRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [row for row in rows if row.part == "single"]
    server = [row for row in rows if row.part == "server"]
    figure, axes = plt.subplots(1, 2 if server else 1, figsize=(12 if server else 6.5, 0.6 * len(single) + 2.5))
    bars = axes[0] if server else axes
    bars.barh([row.way for row in single], [row.tokens_per_s for row in single])
    bars.invert_yaxis()  # the first row on top, as in the table
    bars.set(xlabel="tokens/s (median)", title="one generation")
    if server:
        lines = axes[1]
        for way in dict.fromkeys(row.way for row in server):
            measured = [row for row in server if row.way == way]
            lines.plot([row.streams for row in measured], [row.tokens_per_s for row in measured], marker="o", label=way)
        lines.set(xlabel="concurrent streams", ylabel="tokens/s", xscale="log", title="scaleforge serve, streamed")
        streams = sorted({row.streams for row in server})
        lines.set_xticks(streams, [str(count) for count in streams], minor=False)
        lines.minorticks_off()
        lines.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
