"""`scaleforge bench stream RUN_DIR`: how fast the streaming pipeline runs a model, and how it holds up when
frames come faster than that.

1. For each batch size: the inference stage alone (the model on batches of preprocessed frames, back to back) and
   the whole pipeline with `block` on a synthetic source that never makes it wait: the fps it sustains. Their
   ratio says whether the stages overlap (1.0) or add up.
2. At the batch size that sustains the most: the source at 0.5x (light load), 1x, 2x and 4x that rate, with
   drop-oldest: p50 and p99 end-to-end latency, frames dropped, and the process's resident memory, sampled
   through each run.

Targets: the pipeline sustains >= 0.9x the inference stage alone; at 4x, p99 latency <= 3x the p99 at 1x (the
rate the pipeline sustains: not overloaded) and memory flat (the last sample within 5% or 16 MiB of the first).
Table, JSON and a PNG (sustained fps against batch size; latency against the source's rate).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scaleforge.bench.harness import machine, report
from scaleforge.runs import UNTRUSTED, Trust

if TYPE_CHECKING:
    from scaleforge.stream.pipeline import StreamOptions

LOADS = (0.5, 1.0, 2.0, 4.0)  # source rates, in multiples of the sustained one
FLAT_MEMORY = (0.05, 16 * 2**20)  # memory is flat when it grew by at most 5%, or 16 MiB


@dataclasses.dataclass(frozen=True)
class _Subject:
    """The model under test, one preprocessed frame for it, and the options every stream starts from."""

    model: Any
    instance: np.ndarray
    base: StreamOptions  # the synthetic source, each stream's duration, no progress


def run_stream_benchmark(
    run_dir: str,
    *,
    out: Path,
    batch_sizes: Sequence[int],
    seconds: float,
    frame_size: tuple[int, int],
    threads: int,
    as_json: bool,
    trust: Trust = UNTRUSTED,
) -> dict[str, Any]:
    """Measure, print and return the benchmark for the run at `run_dir` (opened with `trust`); JSON and PNG go
    under `out`."""
    import torch

    from scaleforge.stream.pipeline import StreamOptions, load_stream_model

    out.mkdir(parents=True, exist_ok=True)
    model = load_stream_model(run_dir, "auto", trust)
    model.prepare(threads, max(batch_sizes), time_batches=False)
    width, height = frame_size
    source = f"synthetic:{width}x{height}"
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    base = StreamOptions(source=source, duration_s=seconds, progress="none")
    subject = _Subject(model, model.decode_frame(frame), base)

    sustained = [_sustained(subject, batch_size) for batch_size in batch_sizes]
    best = max(sustained, key=lambda row: row["pipeline_fps"])
    loads = [_under_load(subject, load, best) for load in LOADS]
    result = {
        "benchmark": "stream",
        "run_dir": str(run_dir),
        **machine(),
        "threads": torch.get_num_threads(),
        "source": source,
        "seconds_per_point": seconds,
        "sustained": sustained,
        "best_batch_size": best["batch_size"],
        "sustained_fps": best["pipeline_fps"],
        "loads": loads,
    }
    result["targets"] = _targets(best, loads)
    _plot(sustained, loads, out / "stream.png")
    _report(result, out, as_json=as_json)
    return result


def _sustained(subject: _Subject, batch_size: int) -> dict[str, Any]:
    """The inference stage alone, and the whole pipeline with `block` on a source that never makes it wait."""
    from scaleforge.stream.pipeline import stream_through

    alone = _inference_fps(subject.model, subject.instance, batch_size, subject.base.duration_s / 2)
    options = dataclasses.replace(subject.base, fps=1e6, policy="block", max_batch_size=batch_size)
    summary = stream_through(subject.model, options)
    row = {"batch_size": batch_size, "inference_fps": alone, "pipeline_fps": summary["processed_fps"]}
    row["overlap"] = row["pipeline_fps"] / alone
    row["mean_batch_size"] = summary["mean_batch_size"]
    print(f"batch {batch_size}: inference alone {alone:,.0f} fps, pipeline {row['pipeline_fps']:,.0f} fps")
    return row


def _under_load(subject: _Subject, load: float, best: dict[str, Any]) -> dict[str, Any]:
    """The source at `load` times the rate that `best` sustained, with drop-oldest, at its batch size."""
    from scaleforge.stream.pipeline import stream_through

    rate = best["pipeline_fps"]
    options = dataclasses.replace(
        subject.base, fps=load * rate, policy="drop-oldest", max_batch_size=best["batch_size"], queue=4
    )
    with _sampled_rss() as memory:
        summary = stream_through(subject.model, options)
    print(f"{load:g}x ({load * rate:,.0f} fps): p99 {summary['latency_ms']['p99']:.1f} ms")
    return {
        "load": load,
        "source_fps": load * rate,
        "input_fps": summary["input_fps"],
        "processed_fps": summary["processed_fps"],
        "dropped": summary["frames_dropped"],
        "captured": summary["frames_captured"],
        "latency_ms": summary["latency_ms"],
        "rss_mib": {name: value / 2**20 for name, value in memory.items()},
    }


def _report(result: dict[str, Any], out: Path, *, as_json: bool) -> None:
    """Print the table (or JSON) and write `OUT/stream.json`."""
    rows = [
        [f"batch {row['batch_size']}", f"{row['inference_fps']:,.0f}", f"{row['pipeline_fps']:,.0f}",
         f"{row['overlap']:.2f}", f"{row['mean_batch_size']:.1f}", "", "", "", ""]
        for row in result["sustained"]
    ] + [
        [f"{row['load']:g}x rate", "", f"{row['processed_fps']:,.0f}", "", "", f"{row['source_fps']:,.0f}",
         f"{row['latency_ms']['p50']:.1f} / {row['latency_ms']['p99']:.1f}", f"{row['dropped']:,}",
         f"{row['rss_mib']['first']:.0f} -> {row['rss_mib']['last']:.0f}"]
        for row in result["loads"]
    ]  # fmt: skip
    report(
        result,
        out / "stream.json",
        as_json=as_json,
        title=f"Streaming {result['run_dir']} on {result['source']} frames, {result['threads']} threads, "
        f"{result['seconds_per_point']:g} s a point",
        columns=[
            "",
            "inference alone fps",
            "pipeline fps",
            "overlap",
            "batch",
            "source fps",
            "p50 / p99 ms",
            "dropped",
            "RSS MiB",
        ],  # fmt: skip
        rows=rows,
        notes=[*(f"{name}: {text}" for name, text in result["targets"].items()), f"results in {out}/ (stream.png)"],
    )


def _inference_fps(model: Any, instance: np.ndarray, batch_size: int, seconds: float) -> float:
    """Frames/s of the model alone on batches of `batch_size` preprocessed frames, back to back."""
    batch = [instance] * batch_size
    model.predict(batch)  # kernels are made for each shape
    frames, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or frames < 3 * batch_size:
        model.predict(batch)
        frames += batch_size
    return frames / (time.perf_counter() - started)


@contextmanager
def _sampled_rss(every_s: float = 0.1) -> Iterator[dict[str, float]]:
    """The process's resident memory, sampled every `every_s` while the block runs: first, peak and last (bytes)."""
    import psutil

    process = psutil.Process()
    samples = [float(process.memory_info().rss)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            samples.append(float(process.memory_info().rss))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    figures: dict[str, float] = {}
    try:
        yield figures
    finally:
        done.set()
        thread.join()
        samples.append(float(process.memory_info().rss))
        # the first sample after the stream started: the pipeline's threads and queues exist by then
        figures.update(first=samples[min(2, len(samples) - 1)], peak=max(samples), last=samples[-1])


def _targets(best: dict[str, Any], loads: list[dict[str, Any]]) -> dict[str, str]:
    by_load = {row["load"]: row for row in loads}
    overlap = best["overlap"]
    lines = {
        "pipeline >= 0.9x the inference stage alone": f"{overlap:.2f}x at batch {best['batch_size']} "
        f"({'met' if overlap >= 0.9 else 'not met'})",
    }
    if 4.0 in by_load and 1.0 in by_load:
        ratio = by_load[4.0]["latency_ms"]["p99"] / by_load[1.0]["latency_ms"]["p99"]
        light = by_load[4.0]["latency_ms"]["p99"] / by_load[0.5]["latency_ms"]["p99"] if 0.5 in by_load else None
        lines["p99 at 4x <= 3x the p99 at 1x"] = f"{ratio:.2f}x ({'met' if ratio <= 3 else 'not met'})" + (
            f"; {light:.2f}x the p99 at 0.5x" if light is not None else ""
        )
        memory = by_load[4.0]["rss_mib"]
        growth = memory["last"] - memory["first"]
        flat = growth <= max(FLAT_MEMORY[0] * memory["first"], FLAT_MEMORY[1] / 2**20)
        lines["memory flat at 4x"] = (
            f"{memory['first']:.0f} -> {memory['last']:.0f} MiB, peak {memory['peak']:.0f} "
            + ("(met)" if flat else "(not met)")
        )
    return lines


def _plot(sustained: list[dict[str, Any]], loads: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    sizes = [row["batch_size"] for row in sustained]
    left.plot(sizes, [row["inference_fps"] for row in sustained], "o--", label="inference stage alone")
    left.plot(sizes, [row["pipeline_fps"] for row in sustained], "s-", label="whole pipeline")
    left.set(xscale="log", xlabel="max batch size", ylabel="frames/s", title="Sustained throughput")
    left.set_xticks(sizes, [str(size) for size in sizes])
    left.legend()
    rates = [row["source_fps"] for row in loads]
    right.plot(rates, [row["latency_ms"]["p50"] for row in loads], "o-", label="p50")
    right.plot(rates, [row["latency_ms"]["p99"] for row in loads], "s-", label="p99")
    for row in loads:
        right.annotate(f"{row['load']:g}x", (row["source_fps"], row["latency_ms"]["p99"]), textcoords="offset points",
                       xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
    right.set(xlabel="source frames/s (drop-oldest)", ylabel="end-to-end latency (ms)", title="Latency under load")
    right.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
