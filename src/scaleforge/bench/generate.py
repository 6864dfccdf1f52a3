"""`scaleforge bench generate RUN_DIR`: how fast a run's gpt writes text.

The result is a list of rows, each one way of generating measured in one part of the benchmark (`PARTS`). The
`single` part is one greedy generation of `new_tokens` (default 256) after a prompt of `prompt_tokens` (16) random
tokens, three ways:

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

Each is warmed up once, then the repeats are interleaved and medians reported. tokens/s counts the new tokens over
the whole generation (prompt included); TTFT is the time to the first new token, TPOT the time between the
following ones (p50 and p99 over every token of every repeat; transformers hands its tokens back all at once, so
it has neither). A run whose context is shorter than prompt and new tokens is measured on a gpt of its shape with
the context widened to fit, random weights: speed does not depend on the weights' values, and a gpt cannot
attend past its learned positions.

A part is a function from the `Setup` to rows; a server part (tokens/s, TTFT and TPOT at 1, 4 and 16 concurrent
streams through `scaleforge serve`, continuous batching against one request at a time and static batching) is
another entry of `PARTS`, its rows with `part="server"` and `streams` set; the table, JSON and plot take them as
they are.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleforge.bench.harness import machine, report
from scaleforge.console import counted
from scaleforge.errors import UsageError
from scaleforge.generation.decoders import CachedGPT, Decoder, Recompute
from scaleforge.generation.language_model import Generation
from scaleforge.generation.sampling import SamplingOptions
from scaleforge.models.gpt import GPT
from scaleforge.runs import UNTRUSTED, Trust

CACHE_SPEEDUP_TARGET = 5.0  # kv cache against recomputation
TRANSFORMERS_TARGET = 1.0  # kv cache against transformers' generate


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

    part: str  # which part of the benchmark measured it: `single` (one generation in this process), later `server`
    way: str
    streams: int
    tokens_per_s: float  # new tokens of every stream over the wall time (median over the repeats)
    ttft_ms: Percentiles | None = None  # time to the first new token
    tpot_ms: Percentiles | None = None  # time per output token after the first


@dataclass(frozen=True)
class Setup:
    """What every part measures: the gpt (on CPU, in eval mode), its prompt and how many tokens to add."""

    run_dir: Path
    trust: Trust
    model: GPT
    prompt: list[int]
    new_tokens: int
    repeats: int
    token_bytes: Sequence[bytes]
    out: Path  # where a part may write files (the ONNX export)


def single_stream_rows(setup: Setup) -> list[GenerationRow]:
    """One greedy generation at a time: the gpt's cache, recomputation, its ONNX exports and transformers' GPT-2
    (each of the last two when installed)."""
    options = SamplingOptions(max_new_tokens=setup.new_tokens, temperature=0)
    context = setup.model.embed.seq_len
    decoders: dict[str, Decoder] = {"kv cache": CachedGPT(setup.model), "recompute": Recompute(setup.model, context)}
    decoders.update(_onnx_decoders(setup.model, setup.out))
    ways: dict[str, Callable[[], list[float]]] = {
        way: lambda decoder=decoder: _timed_generation(Generation(decoder, setup.prompt, options, setup.token_bytes))
        for way, decoder in decoders.items()
    }
    transformers_generate = _transformers_generate(setup.model, setup.prompt, setup.new_tokens)
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


# The parts of the benchmark, in order: each measures some ways of generating and returns their rows.
PARTS: dict[str, Callable[[Setup], list[GenerationRow]]] = {"single": single_stream_rows}


def run_generate_benchmark(
    run_dir: str | Path,
    *,
    out: Path,
    prompt_tokens: int = 16,
    new_tokens: int = 256,
    repeats: int = 5,
    threads: int | None = None,
    as_json: bool = False,
    trust: Trust = UNTRUSTED,
) -> dict[str, Any]:
    """Measure every part on the gpt of the run at `run_dir`, print the table (or JSON), write `out/generate.json`
    and `out/generate.png`, and return the result."""
    from scaleforge.runs import open_run, verify_final

    final = verify_final(run_dir, trust.signing_key_env)
    run = open_run(final, trust)
    if not isinstance(run.model, GPT):
        raise UsageError(
            f"bench generate measures a gpt's key/value cache; {final.parent} holds a {run.config.model.architecture}"
        )
    if threads:
        torch.set_num_threads(threads)
    model, weights = _model_to_measure(run.model, prompt_tokens + new_tokens)
    vocab_size = model.embed.token.num_embeddings
    prompt = torch.randint(0, vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    token_bytes = run.tokenizer.token_byte_strings() if run.tokenizer is not None else [b""] * vocab_size
    out.mkdir(parents=True, exist_ok=True)
    setup = Setup(final.parent, trust, model, prompt, new_tokens, repeats, token_bytes, out)
    rows = [row for part in PARTS.values() for row in part(setup)]
    result = {
        "benchmark": "generate",
        "run_dir": str(final.parent),
        **machine(),
        "threads": torch.get_num_threads(),
        "model": {**_shape(model), "parameters": sum(p.numel() for p in model.parameters()), "weights": weights},
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "rows": [dataclasses.asdict(row) for row in rows],
        "targets": _targets(rows, new_tokens),
    }
    _plot(rows, out / "generate.png")
    shape = result["model"]
    report(
        result,
        out / "generate.json",
        as_json=as_json,
        title=f"Generation by {final.parent}'s gpt ({counted(shape['layers'], 'layer')}, width {shape['width']}, "
        f"{counted(shape['heads'], 'head')}, vocabulary {shape['vocab_size']}, context {shape['context']}): "
        f"{new_tokens} tokens after {prompt_tokens}, greedy, CPU, {counted(torch.get_num_threads(), 'thread')}, "
        f"median of {repeats}",
        columns=["part", "way", "streams", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"],
        rows=[_table_row(row) for row in rows],
        notes=[
            *([f"model: {weights}"] if weights != "the run's" else []),
            *(f"{name}: {text}" for name, text in result["targets"].items()),
            f"results in {out}/ (generate.json, generate.png)",
        ],
    )
    return result


def _model_to_measure(model: GPT, length: int) -> tuple[GPT, str]:
    """The run's gpt when `length` tokens fit its context, else one of its shape whose context fits them."""
    model = model.cpu().eval()
    context = model.embed.seq_len
    if length <= context:
        return model, "the run's"
    shape = _shape(model)
    widened = GPT(shape["vocab_size"], length, shape["layers"], shape["heads"], shape["width"]).eval()
    return widened, f"random weights, the run's shape with its context of {context} widened to {length}"


def _shape(model: GPT) -> dict[str, int]:
    return {
        "layers": len(model.blocks),
        "width": model.embed.token.embedding_dim,
        "heads": model.blocks[0].attn.heads,
        "vocab_size": model.embed.token.num_embeddings,
        "context": model.embed.seq_len,
    }


def _timed_generation(generation: Generation) -> list[float]:
    """Seconds from the start to each new token of `generation`."""
    started = time.perf_counter()
    return [time.perf_counter() - started for _ in generation.token_ids()]


def _onnx_session(path: Path) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch's ways get
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
    """`model` exported as `scaleforge export --kv-cache` exports a gpt (`out/generate.onnx` and its pair, checked),
    and a decoder over each; none when the export extra is not installed."""
    from scaleforge.extras import missing

    if missing("export"):
        return {}
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


def _transformers_generate(model: GPT, prompt: list[int], new_tokens: int) -> Callable[[], list[float]] | None:
    """A generation of `new_tokens` by transformers' GPT-2 of `model`'s shape (random weights), returning its
    total seconds; None when transformers is not installed."""
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
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    inputs = torch.tensor([prompt])
    kwargs = {"min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "eos_token_id": None, "do_sample": False}

    def generate() -> list[float]:
        started = time.perf_counter()
        with torch.inference_mode():
            ids = gpt2.generate(inputs, attention_mask=torch.ones_like(inputs), use_cache=True, **kwargs)
        if ids.shape[1] != len(prompt) + new_tokens:
            raise RuntimeError(f"transformers generated {ids.shape[1] - len(prompt)} tokens, not {new_tokens}")
        return [time.perf_counter() - started]

    return generate


def _targets(rows: Sequence[GenerationRow], new_tokens: int) -> dict[str, str]:
    """The targets against the measured figures: met or not met."""
    single = {row.way: row for row in rows if row.part == "single"}
    cache = single["kv cache"].tokens_per_s
    targets = {}
    speedup = cache / single["recompute"].tokens_per_s
    targets[f"kv cache >= {CACHE_SPEEDUP_TARGET:g}x recomputation at {new_tokens} tokens"] = _verdict(
        speedup, CACHE_SPEEDUP_TARGET
    )
    if "onnxruntime kv cache" not in single:
        targets["onnxruntime"] = "not measured: the export extra is not installed (pip install 'scaleforge[export]')"
    name = f"kv cache >= {TRANSFORMERS_TARGET:.1f}x transformers' generate"
    if "transformers generate" in single:
        targets[name] = _verdict(cache / single["transformers generate"].tokens_per_s, TRANSFORMERS_TARGET)
    else:
        targets[name] = "not measured: transformers is not installed (pip install 'scaleforge[bench]')"
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

    labels = [f"{row.part}: {row.way}" + (f" ({row.streams} streams)" if row.streams > 1 else "") for row in rows]
    figure, axis = plt.subplots(figsize=(6.5, 0.6 * len(rows) + 1.5))
    axis.barh(labels, [row.tokens_per_s for row in rows])
    axis.invert_yaxis()  # the first row on top, as in the table
    axis.set(xlabel="tokens/s (median)", title="generation speed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
