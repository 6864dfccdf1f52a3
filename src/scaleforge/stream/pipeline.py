"""`scaleforge stream`: real-time inference on a stream of frames that never falls behind.

Stages run concurrently, joined by bounded queues, each frame carrying its sequence number and capture time:

    capture (its own thread) -> [captured] -> preprocess (a thread pool, in order) -> [preprocessed]
      -> batched inference (the server's `Batcher`, on the model's own thread) -> postprocess -> sink (a thread)

The two queues are where a slow model is felt. With `drop-oldest` (the default for live sources: a camera,
`synthetic:`) a full queue drops its oldest frame for the new one, and counts it, so a frame that gets through
is a recent one and latency stays bounded however fast frames come; `put_nowait` and a drop, not `await
put()`, which would only make the source wait. With `block` (the default for files and folders) every frame is
processed, in order, and the source waits. Frames in flight to the model are bounded too (two batches: one
running, one gathering); with drop-oldest a new frame takes the place of the oldest one still gathering, so a
batch that starts holds the newest frames. A frame that cannot be decoded or preprocessed is counted and skipped.

A result cache (`cache_size`) answers a frame whose preprocessed pixels were seen before without the model
(keyed by a hash of them). A stop (the source's end, `duration_s`, Ctrl-C or SIGTERM) stops the capture only:
the frames in flight finish, the sink is flushed and the summary is printed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaleforge.errors import UsageError
from scaleforge.runs import UNTRUSTED, Trust
from scaleforge.stream.sinks import Sink, open_sink
from scaleforge.stream.sources import Frame, Source, open_source

POLICIES = ("drop-oldest", "block")
PROGRESS = ("auto", "bar", "plain", "none")  # the live line: a bar on a terminal (auto), or plain lines
STAGES = ("preprocess", "batch_wait", "inference", "sink")
END = None  # what the queues pass on after the last frame
LATENCY_WINDOW = 100_000  # the end-to-end latencies the summary's percentiles are taken from (the latest)


@dataclass(frozen=True)
class StreamOptions:
    """What `scaleforge stream` was asked for."""

    source: str = field(
        metadata={
            "help": "a video file, a camera index (0), a folder of images, or synthetic:WxH (generated moving frames)"
        }
    )
    fps: float | None = field(
        default=None,
        metadata={"help": "the source's rate (synthetic: 30; a file: as fast as it is taken)", "range": "positive"},
    )
    max_batch_size: int = field(default=8, metadata={"help": "frames per batch, at most", "range": "positive"})
    max_delay_ms: float = field(default=10.0, metadata={"help": "longest wait for a batch", "range": "non-negative"})
    queue: int = field(default=4, metadata={"help": "frames each queue between stages holds", "range": "positive"})
    policy: str | None = field(
        default=None,
        metadata={
            "help": "a full queue drops its oldest frame, or makes the source wait (default: drop-oldest for live "
            "sources, block for files and folders)",
            "choices": POLICIES,
        },
    )
    sink: str = field(default="none", metadata={"help": "jsonl:FILE (a line per frame), video:FILE.avi|.mp4, none"})
    cache_size: int = field(default=0, metadata={"help": "results kept for repeated frames", "range": "non-negative"})
    duration_s: float | None = field(
        default=None,
        metadata={"help": "seconds to run (default: until the source ends)", "range": "positive", "flag": "--duration"},
    )
    metrics_port: int | None = field(
        default=None, metadata={"help": "serve Prometheus metrics on this port (0: any free)", "range": "port"}
    )
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address of the metrics endpoint"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"})
    threads: int = field(
        default=0, metadata={"help": "torch threads (0: chosen for the model)", "range": "non-negative"}
    )
    preprocess_workers: int = 2  # threads preprocessing frames; not an option of `scaleforge stream`
    progress: str = field(default="auto", metadata={"help": "the live line", "choices": PROGRESS})

    def check(self) -> None:
        """Refuse options that cannot describe a stream, naming the flag."""
        if self.policy is not None and self.policy not in POLICIES:
            raise UsageError(f"--policy: '{self.policy}' is not one of {', '.join(POLICIES)}")
        for flag, value in (("--max-batch-size", self.max_batch_size), ("--queue", self.queue)):
            if value < 1:
                raise UsageError(f"{flag}: expected at least 1, got {value}")
        if self.max_delay_ms < 0 or self.cache_size < 0:
            raise UsageError("--max-delay-ms and --cache-size cannot be negative")
        if self.duration_s is not None and self.duration_s <= 0:
            raise UsageError(f"--duration: expected a positive number of seconds, got {self.duration_s:g}")


# ------------------------------------------------------------------------------------------------ figures


class StreamStats:
    """Counts and timings of a stream, read by the progress line, the summary and the Prometheus metrics."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.captured = self.processed = self.corrupt = self.cache_hits = self.cache_misses = 0
        self.dropped: dict[str, int] = {"captured": 0, "preprocessed": 0, "batcher": 0}
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)  # seconds
        self.stage_seconds: dict[str, collections.deque[float]] = {
            stage: collections.deque(maxlen=LATENCY_WINDOW) for stage in STAGES
        }
        self.batches = self.batched_frames = 0
        self.stopped_by: str | None = None
        self.metrics: StreamMetrics | None = None

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def drop(self, queue: str) -> None:
        self.dropped[queue] += 1
        if self.metrics is not None:
            self.metrics.frames.labels("dropped").inc()

    def skip_corrupt(self) -> None:
        self.corrupt += 1
        if self.metrics is not None:
            self.metrics.frames.labels("corrupt").inc()

    def stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage].append(seconds)
        if self.metrics is not None:
            self.metrics.stages.labels(stage).observe(seconds)

    def done(self, latency_s: float) -> None:
        self.processed += 1
        self.latencies.append(latency_s)
        if self.metrics is not None:
            self.metrics.frames.labels("processed").inc()
            self.metrics.latency.observe(latency_s)

    def summary(self) -> dict[str, Any]:
        """The whole stream's figures, as `run_stream` returns them."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        latencies = np.array(self.latencies) * 1000
        stages = {
            stage: float(np.median(seconds) * 1000) if seconds else None
            for stage, seconds in self.stage_seconds.items()
        }
        return {
            "frames_captured": self.captured,
            "frames_processed": self.processed,
            "frames_dropped": self.dropped_total,
            "dropped_by_queue": dict(self.dropped),
            "frames_corrupt": self.corrupt,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "wall_time_s": elapsed,
            "input_fps": self.captured / elapsed,
            "processed_fps": self.processed / elapsed,
            "latency_ms": {  # None when no frame was processed
                "p50": float(np.percentile(latencies, 50)) if len(latencies) else None,
                "p90": float(np.percentile(latencies, 90)) if len(latencies) else None,
                "p99": float(np.percentile(latencies, 99)) if len(latencies) else None,
                "max": float(latencies.max()) if len(latencies) else None,
            },
            "stage_p50_ms": stages,
            "mean_batch_size": self.batched_frames / self.batches if self.batches else 0.0,
            "stopped_by": self.stopped_by,
        }


class StreamMetrics:
    """The stream's figures as Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.frames = Counter(
            "scaleforge_stream_frames", "Frames, by what became of them", ["outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "scaleforge_stream_latency_seconds", "Capture to result, per processed frame", buckets=buckets,
            registry=self.registry,
        )  # fmt: skip
        self.stages = Histogram(
            "scaleforge_stream_stage_seconds", "Time in each stage, per frame", ["stage"], buckets=buckets,
            registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "scaleforge_stream_queue_depth", "Frames waiting in each queue", ["queue"], registry=self.registry
        )
        self.cache = Counter(
            "scaleforge_stream_cache", "Result cache lookups, by result", ["result"], registry=self.registry
        )
        self.batch_size = Histogram(
            "scaleforge_stream_batch_size", "Frames per model batch", buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )  # fmt: skip
        self.fps = Gauge(
            "scaleforge_stream_fps", "Frames per second, by direction", ["direction"], registry=self.registry
        )


# ------------------------------------------------------------------------------------------------ queues


class FrameQueue:
    """A bounded queue between two stages: `drop_oldest` makes room for a new item by dropping the oldest one
    waiting (counted in `stats`), else `put` waits for room. The end marker is never dropped."""

    def __init__(self, name: str, size: int, drop_oldest: bool, stats: StreamStats) -> None:
        self.name, self.drop_oldest, self.stats = name, drop_oldest, stats
        self.items: asyncio.Queue[Any] = asyncio.Queue(maxsize=size)

    async def put(self, item: Any) -> None:
        if item is END or not self.drop_oldest:
            await self.items.put(item)
            return
        while self.items.full():
            self.items.get_nowait()
            self.stats.drop(self.name)
        self.items.put_nowait(item)

    async def get(self) -> Any:
        return await self.items.get()

    def depth(self) -> int:
        return self.items.qsize()


class ResultCache:
    """The latest `size` results, keyed by a hash of the preprocessed frame."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: collections.OrderedDict[bytes, Any] = collections.OrderedDict()

    @staticmethod
    def key(instance: np.ndarray) -> bytes:
        return hashlib.blake2b(instance.tobytes(), digest_size=16).digest()

    def get(self, key: bytes) -> Any | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key: bytes, value: Any) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


# ------------------------------------------------------------------------------------------------ the pipeline


@dataclass
class _Preprocessed:
    frame: Frame
    instance: np.ndarray
    ready: float  # perf_counter when preprocessing ended


@dataclass
class _InFlight:
    """A frame given to the model (`ticket`, awaited by `future`) or answered from the cache (`ticket` None)."""

    item: _Preprocessed
    key: bytes | None
    future: asyncio.Future[Any]
    ticket: Any = None
    dropped: bool = False


class Pipeline:
    """The stages of one stream, from `source` through `model` to `sink`. `model.decode_frame` preprocesses a
    frame; `model.predict` runs a batch of preprocessed frames and gives one row of class probabilities each."""

    def __init__(self, source: Source, model: Any, sink: Sink, options: StreamOptions, stats: StreamStats) -> None:
        from scaleforge.serve.batching import Batcher

        self.source, self.model, self.sink, self.options, self.stats = source, model, sink, options, stats
        policy = options.policy or ("drop-oldest" if source.live else "block")
        self.policy = policy
        drop = policy == "drop-oldest"
        self.captured = FrameQueue("captured", options.queue, drop, stats)
        self.preprocessed = FrameQueue("preprocessed", options.queue, drop, stats)
        self.in_flight = 2 * options.max_batch_size  # frames given to the model: one batch running, one gathering
        self.batcher = Batcher(
            self._run_batch,
            max_batch_size=options.max_batch_size,
            max_delay_s=options.max_delay_ms / 1000,
            max_queue=self.in_flight,
            timeout_s=3600.0,  # a stream's frames are never refused for waiting: the queues bound the wait
            on_batch=self._on_batch,
        )
        self.cache = ResultCache(options.cache_size) if options.cache_size else None
        self.stop = asyncio.Event()
        names = self.model.info.class_names
        self.class_names: tuple[str, ...] | None = tuple(names) if names is not None else None

    def _run_batch(self, instances: list[np.ndarray]) -> list[np.ndarray]:
        probabilities = self.model.predict(instances).numpy()  # (B, classes)
        return list(probabilities)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.batched_frames += size
        if self.stats.metrics is not None:
            self.stats.metrics.batch_size.observe(size)

    async def run(self) -> None:
        """Run every stage until the source ends or `stop` is set, then let the frames in flight finish."""
        self.batcher.start()
        capture_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture")
        preprocess_pool = ThreadPoolExecutor(max_workers=self.options.preprocess_workers, thread_name_prefix="pre")
        sink_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink")
        # the frames between inference and the sink, in frame order: bounded, so that answers from the cache
        # cannot pile up ahead of a slow sink (the queues before it drop, or wait, instead)
        results: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.in_flight)
        slots = asyncio.Semaphore(self.in_flight)
        try:
            async with asyncio.TaskGroup() as stages:  # a stage that fails stops the others
                stages.create_task(self._capture(capture_thread))
                stages.create_task(self._preprocess(preprocess_pool))
                stages.create_task(self._infer(results, slots))
                stages.create_task(self._deliver(results, slots, sink_thread))
        except ExceptionGroup as failed:
            raise _cause(failed) from None
        finally:
            await self.batcher.close()
            for pool in (capture_thread, preprocess_pool, sink_thread):  # off the loop: a read may still run
                await asyncio.to_thread(pool.shutdown, wait=True)

    async def _capture(self, thread: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if self.options.duration_s is None else time.perf_counter() + self.options.duration_s
        while not self.stop.is_set():
            frame = await loop.run_in_executor(thread, self.source.read)
            if frame is None:
                self.stats.stopped_by = self.stats.stopped_by or "end of source"
                break
            self.stats.captured += 1
            await self.captured.put(frame)
            if deadline is not None and time.perf_counter() >= deadline:
                self.stats.stopped_by = self.stats.stopped_by or f"--duration {self.options.duration_s:g}"
                break
        await self.captured.put(END)

    async def _preprocess(self, pool: ThreadPoolExecutor) -> None:
        """Frames preprocessed on `pool`, `preprocess_workers` at once, passed on in capture order."""
        loop = asyncio.get_running_loop()
        started: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.options.preprocess_workers)
        passing_on = asyncio.create_task(self._pass_on(started))
        try:
            while True:
                frame = await self.captured.get()
                if frame is END:
                    await started.put(END)
                    break
                if frame.image is None:
                    self.stats.skip_corrupt()
                    continue
                await started.put((frame, loop.run_in_executor(pool, self.model.decode_frame, frame.image)))
        finally:
            await passing_on

    async def _pass_on(self, started: asyncio.Queue[Any]) -> None:
        while True:
            entry = await started.get()
            if entry is END:
                await self.preprocessed.put(END)
                return
            frame, future = entry
            try:
                instance = await future
            except Exception:  # noqa: BLE001 - a frame preprocessing fails on is counted and skipped, never a crash
                self.stats.skip_corrupt()
                continue
            ready = time.perf_counter()
            self.stats.stage("preprocess", ready - frame.captured)
            await self.preprocessed.put(_Preprocessed(frame, instance, ready))

    async def _infer(self, results: asyncio.Queue[Any], slots: asyncio.Semaphore) -> None:
        """Each preprocessed frame to the batcher (or answered from the cache), its result awaited in order by
        `_deliver`. With drop-oldest, a frame that finds every slot taken takes the one of the oldest frame still
        waiting in the batcher, which is dropped: the batch that gathers holds the newest frames."""
        loop = asyncio.get_running_loop()
        waiting: collections.deque[_InFlight] = collections.deque()  # given to the batcher, oldest first
        while True:
            item = await self.preprocessed.get()
            if item is END:
                await results.put(END)
                return
            key = None
            if self.cache is not None:
                key = ResultCache.key(item.instance)
                cached = self.cache.get(key)
                self._count_cache(cached is not None)
                if cached is not None:
                    answered: asyncio.Future[Any] = loop.create_future()
                    answered.set_result(cached)
                    await results.put(_InFlight(item, key, answered))
                    continue
            if self.policy == "drop-oldest" and slots.locked():
                self._drop_oldest_waiting(waiting, slots)
            await slots.acquire()
            ticket = self.batcher.enqueue([item.instance])
            entry = _InFlight(item, key, asyncio.ensure_future(self.batcher.wait(ticket)), ticket)
            if self.policy == "drop-oldest":
                while waiting and waiting[0].ticket.state != "queued":  # in a batch, or done: past dropping
                    waiting.popleft()
                waiting.append(entry)
            await results.put(entry)

    def _drop_oldest_waiting(self, waiting: collections.deque[_InFlight], slots: asyncio.Semaphore) -> None:
        """Cancel the oldest frame still queued in the batcher (not yet in a running batch), freeing its slot."""
        while waiting:
            entry = waiting.popleft()
            if self.batcher.cancel(entry.ticket):  # out of the queue now: the batch that gathers never sees it
                entry.dropped = True
                slots.release()
                self.stats.drop("batcher")
                return

    def _count_cache(self, hit: bool) -> None:
        if hit:
            self.stats.cache_hits += 1
        else:
            self.stats.cache_misses += 1
        if self.stats.metrics is not None:
            self.stats.metrics.cache.labels("hit" if hit else "miss").inc()

    async def _deliver(self, results: asyncio.Queue[Any], slots: asyncio.Semaphore, thread: ThreadPoolExecutor) -> None:
        """Postprocess each result in frame order and write it to the sink."""
        loop = asyncio.get_running_loop()
        while True:
            entry = await results.get()
            if entry is END:
                return
            if entry.dropped:  # its slot was released when it was dropped
                continue
            try:
                outcome = await entry.future
            finally:
                if entry.ticket is not None:
                    slots.release()
            if entry.ticket is not None:
                self.stats.stage("batch_wait", outcome.queue_wait_s)
                self.stats.stage("inference", outcome.inference_s)
                probabilities = outcome.outputs[0]
                if self.cache is not None:
                    self.cache.put(entry.key, probabilities)
            else:
                probabilities = outcome
            item = entry.item
            result = self._postprocess(item.frame, probabilities)
            written = time.perf_counter()
            await loop.run_in_executor(thread, self.sink.write, item.frame, result)
            self.stats.stage("sink", time.perf_counter() - written)
            self.stats.done(result["latency_ms"] / 1000)

    def _postprocess(self, frame: Frame, probabilities: np.ndarray) -> dict[str, Any]:
        top = int(probabilities.argmax())
        result: dict[str, Any] = {
            "seq": frame.seq,
            "captured_at": round(frame.wall, 6),
            "latency_ms": round((time.perf_counter() - frame.captured) * 1000, 3),
            "top_class": top,
            "probability": round(float(probabilities[top]), 6),
        }
        if self.class_names is not None:
            result["label"] = self.class_names[top]
        return result


def _cause(failed: BaseExceptionGroup) -> BaseException:
    """What stopped the stream: a user error (a sink that cannot be written) before anything else."""
    errors = list(_leaves(failed))
    return next((error for error in errors if isinstance(error, UsageError)), errors[0])


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error


# ------------------------------------------------------------------------------------------------ running


def run_stream(run_dir: str, options: StreamOptions, trust: Trust = UNTRUSTED) -> dict[str, Any]:
    """Stream `options.source` through the model of the run (opened with `trust`) into `options.sink`; the
    summary's figures."""
    options.check()
    model = load_stream_model(run_dir, options.device, trust)
    model.prepare(options.threads, options.max_batch_size, time_batches=False)
    return stream_through(model, options)


def load_stream_model(run_dir: str, device: str, trust: Trust = UNTRUSTED) -> Any:
    """The run's model as a `ServedModel`, if it classifies images (a stream's frames)."""
    from scaleforge.hardware import select_device
    from scaleforge.serve.model import ServedModel

    model = ServedModel(run_dir, select_device(device), trust=trust)
    if model.info.image is None or model.info.task != "classification":
        raise UsageError(f"stream: {run_dir} holds a model that does not classify images; stream an image classifier")
    return model


def stream_through(model: Any, options: StreamOptions) -> dict[str, Any]:
    """Stream `options.source` through a loaded `model` (its threads set) into `options.sink`."""
    source = open_source(options.source, options.fps)
    try:
        sink = open_sink(options.sink, source.fps)
    except BaseException:
        source.close()
        raise
    model.predict([model.decode_frame(np.zeros((64, 64, 3), dtype=np.uint8))])  # warm: the first frame's latency
    stats = StreamStats()
    try:
        with _metrics_server(options, stats):
            asyncio.run(_main(Pipeline(source, model, sink, options, stats)))
    finally:
        source.close()
        sink.close()
    return {
        "source": source.name,
        "policy": options.policy or ("drop-oldest" if source.live else "block"),
        **stats.summary(),
    }


async def _main(pipeline: Pipeline) -> None:
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        pipeline.stats.stopped_by = pipeline.stats.stopped_by or signal.Signals(signum).name
        pipeline.stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal stops at once
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    progress = asyncio.create_task(_report(pipeline))
    try:
        await pipeline.run()
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _report(pipeline: Pipeline) -> None:
    """Once a second: input and processed fps, drops and p50/p99 latency of the last second, as a line rewritten
    in place on a terminal, or a plain line every 5 seconds in a log; and the live figures for Prometheus."""
    mode = pipeline.options.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "plain"
    stats = pipeline.stats
    last_time, last_captured, last_processed, seen = time.perf_counter(), 0, 0, 0
    ticks = 0
    try:
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            now = time.perf_counter()
            elapsed = now - last_time
            input_fps = (stats.captured - last_captured) / elapsed
            processed_fps = (stats.processed - last_processed) / elapsed
            recent = list(stats.latencies)[-(stats.processed - seen) :] if stats.processed > seen else []
            last_time, last_captured, last_processed, seen = now, stats.captured, stats.processed, stats.processed
            if stats.metrics is not None:
                stats.metrics.fps.labels("input").set(input_fps)
                stats.metrics.fps.labels("processed").set(processed_fps)
                stats.metrics.queue_depth.labels("captured").set(pipeline.captured.depth())
                stats.metrics.queue_depth.labels("preprocessed").set(pipeline.preprocessed.depth())
            line = _progress_line(input_fps, processed_fps, stats, recent)
            if mode == "bar":
                print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
            elif mode == "plain" and ticks % 5 == 0:
                print(line, file=sys.stderr, flush=True)
    finally:
        if mode == "bar" and ticks:
            print(file=sys.stderr)


def _progress_line(input_fps: float, processed_fps: float, stats: StreamStats, recent: list[float]) -> str:
    latency = ""
    if recent:
        p50, p99 = np.percentile(np.array(recent) * 1000, [50, 99])
        latency = f" | latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    return (
        f"in {input_fps:.1f} fps | processed {processed_fps:.1f} fps | dropped {stats.dropped_total}"
        f"{latency} | {stats.processed} frames"
    )


@contextlib.contextmanager
def _metrics_server(options: StreamOptions, stats: StreamStats) -> Iterator[None]:
    """With `metrics_port`: the stream's Prometheus metrics served at http://HOST:PORT/metrics while it runs."""
    if options.metrics_port is None:
        yield
        return
    from prometheus_client import start_http_server

    stats.metrics = StreamMetrics()
    try:
        server, thread = start_http_server(
            options.metrics_port, addr=options.metrics_host, registry=stats.metrics.registry
        )
    except OSError as error:
        raise UsageError(f"--metrics-port {options.metrics_port}: cannot listen there ({error.strerror})") from None
    print(f"metrics: http://{options.metrics_host}:{server.server_port}/metrics", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def print_summary(summary: dict[str, Any], print_table: Callable[..., None]) -> None:
    """The summary as a table."""
    latency = summary["latency_ms"]
    rows = [
        ["frames captured", f"{summary['frames_captured']:,}"],
        ["frames processed", f"{summary['frames_processed']:,}"],
        ["frames dropped", f"{summary['frames_dropped']:,}"],
        ["frames corrupt (skipped)", f"{summary['frames_corrupt']:,}"],
        ["input fps", f"{summary['input_fps']:.1f}"],
        ["processed fps", f"{summary['processed_fps']:.1f}"],
        [
            "latency p50 / p90 / p99 (ms)",
            " / ".join("-" if latency[p] is None else f"{latency[p]:.1f}" for p in ("p50", "p90", "p99")),
        ],  # fmt: skip
        ["mean batch size", f"{summary['mean_batch_size']:.2f}"],
    ]
    if summary["cache_hits"] or summary["cache_misses"]:
        rows.append(["cache hits / misses", f"{summary['cache_hits']:,} / {summary['cache_misses']:,}"])
    for stage, p50 in summary["stage_p50_ms"].items():
        if p50 is not None:
            rows.append([f"{stage} p50 (ms)", f"{p50:.2f}"])
    rows.append(["stopped by", str(summary["stopped_by"])])
    title = f"stream: {summary['source']} ({summary['policy']})"
    print_table(title, ["", "value"], rows)
