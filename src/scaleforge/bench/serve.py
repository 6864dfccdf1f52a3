"""`scaleforge bench serve RUN_DIR`: serving throughput and latency under bounded load.

Each server runs in a child process on 127.0.0.1: scaleforge with dynamic batching, scaleforge with batches
of one, a bare FastAPI endpoint that answers a constant (the ceiling of this load generator and HTTP stack
here), and LitServe serving the same model through the same contract when it is installed. They are all
started first, and each is paused (SIGSTOP to its process group) but while it is measured, so that none
takes from another's CPU (LitServe polls its queues even when idle). An aiohttp client drives each in turn
with closed-loop levels (a fixed number of requests in flight; `repeats` runs of each, the servers taking
turns, so that a slow spell of the machine falls on all of them alike, and the median reported) and, for
scaleforge with batching, an open-loop overload (arrivals at a multiple of its measured capacity, whatever
the answers), on that server and on one told to keep a latency target. Every level is bounded by a request
count and a time limit. One instance per request, the same for every server. Then, on scaleforge with
batching, the same small requests alone and beside one more client that sends large bodies (full batches of
random numbers at full precision) one after another: the p99 of the small ones with and without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleforge.bench.harness import machine, report
from scaleforge.processes import ParentDeathGuard
from scaleforge.runs import UNTRUSTED, Trust


@dataclass(frozen=True)
class Target:
    """A server to measure: how to start it, where it answers, and whether it is ready."""

    name: str
    command: list[str]
    predict_path: str
    ready_path: str


@dataclass
class Level:
    """One load level's outcome."""

    target: str
    load: str
    seconds: float
    latencies: list[float]  # of the answered (200) requests
    statuses: dict[int, int]
    runs: list[float] | None = None  # with repeats: every run's throughput (this is the median one)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    def summary(self) -> dict[str, Any]:
        ok = sorted(self.latencies)

        def percentile(q: float) -> float | None:
            return 1000 * ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None

        return {
            "target": self.target,
            "load": self.load,
            "requests": sum(self.statuses.values()),
            "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
            "throughput": self.throughput,
            **({"throughput_runs": self.runs} if self.runs else {}),
            "p50_ms": percentile(0.50),
            "p95_ms": percentile(0.95),
            "p99_ms": percentile(0.99),
        }


def trust_flags(trust: Trust) -> list[str]:
    """The command-line flags that open a run with `trust`."""
    signing = ["--signing-key-env", trust.signing_key_env] if trust.signing_key_env else []
    return [*(["--trust-code"] if trust.code else []), *signing]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def targets(
    run_dir: str, *, max_batch_size: int, max_delay_ms: float, litserve: bool, trust: Trust = UNTRUSTED
) -> list[Target]:
    """The servers to compare, each on a port of its own, each opening the run with `trust`."""
    # the server's own queue bound and deadline: the closed-loop levels never fill the queue; the overload does
    serve = [sys.executable, "-m", "scaleforge", "serve", run_dir, "--port", "{port}", *trust_flags(trust)]
    found = [
        Target(
            "scaleforge, batching",
            [*serve, "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(max_delay_ms)],
            "/v1/predict",
            "/health/ready",
        ),
        Target(
            "scaleforge, batch 1",
            [*serve, "--max-batch-size", "1", "--max-delay-ms", "0"],
            "/v1/predict",
            "/health/ready",
        ),
        Target(
            "bare FastAPI, constant",
            [sys.executable, "-m", "scaleforge.bench.serve_targets", "bare", "{port}"],
            "/v1/predict",
            "/health/ready",
        ),
    ]
    if litserve:
        found.append(
            Target(
                "LitServe, batching",
                [
                    sys.executable,
                    "-m",
                    "scaleforge.bench.serve_targets",
                    "litserve",
                    "{port}",
                    run_dir,
                    str(max_batch_size),
                    str(max_delay_ms),
                    *trust_flags(trust),
                ],
                "/predict",
                "/health",
            )
        )
    return found


@dataclass
class Server:
    """A started target: its base URL, and its process group, which can be paused while others are measured."""

    url: str
    group: int

    def pause(self) -> None:  # nothing of it runs, not even LitServe's polling of its queues
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.group, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.group, signal.SIGCONT)


@contextlib.contextmanager
def started(target: Target, log: Path) -> Iterator[Server]:
    """Start `target` on a free port; yields it once it answers ready, and stops it after."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in target.command]
    with log.open("w") as output:
        # a session of its own: the server and every process it starts (LitServe's workers outlive a SIGTERM to
        # its main process) are stopped together; killed if the benchmark dies, when nobody sends it requests
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=ParentDeathGuard(signal.SIGKILL),
        )
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(_wait_ready(url + target.ready_path, process, log))
            yield Server(url, process.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)  # were it paused, it could not stop
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
            process.wait()


async def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    import aiohttp

    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}; see {log}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the server did not get ready in 120 s; see {log}")


class _Tally:
    """What a load level's requests got: latencies of the answered (200) ones, and a count per status (0: the
    connection failed)."""

    headers = {"content-type": "application/json"}

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}

    async def post(self, session: Any, url: str, body: bytes) -> None:
        import aiohttp

        began = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=self.headers) as response:
                await response.read()
                status = response.status
        except aiohttp.ClientError:
            status = 0
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies.append(time.perf_counter() - began)


async def closed_loop(
    url: str, body: bytes, concurrency: int, requests: int, seconds: float, beside: bytes | None = None
) -> tuple:
    """`concurrency` clients, each sending its next request when its last is answered; with `beside`, one more
    client sends that body over and over meanwhile, its answers counted apart (the fourth item: statuses)."""
    import aiohttp

    tally, beside_tally = _Tally(), _Tally()
    sent = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 1)) as session:
        deadline = time.perf_counter() + seconds
        done = False

        async def client() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                await tally.post(session, url, body)

        async def beside_client() -> None:
            while beside is not None and not done:
                await beside_tally.post(session, url, beside)

        began = time.perf_counter()
        background = asyncio.ensure_future(beside_client())
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        done = True
        await background
        return tally.latencies, tally.statuses, elapsed, beside_tally.statuses


async def open_loop(url: str, body: bytes, rate: float, requests: int, seconds: float) -> tuple:
    """Requests sent at `rate` per second whatever the answers (at most 4096 in flight)."""
    import aiohttp

    tally = _Tally()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4096)) as session:
        count = min(requests, int(rate * seconds))
        began = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(tally.post(session, url, body)))
        await asyncio.gather(*tasks)
        return tally.latencies, tally.statuses, time.perf_counter() - began


def run_serve_benchmark(
    run_dir: str,
    *,
    concurrency: Sequence[int],
    requests: int,
    seconds: float,
    max_batch_size: int,
    max_delay_ms: float,
    overload: float,
    litserve: bool,
    out: Path,
    as_json: bool,
    repeats: int = 1,
    beside_large: int = 0,
    trust: Trust = UNTRUSTED,
) -> dict[str, Any]:
    """Measure every target at every level (`repeats` times, in turn, reporting the median run) and, with
    `beside_large`, that many small requests in flight alone and beside large bodies; print and return the
    results (JSON and a PNG plot in `out`)."""
    from scaleforge.serve.model import ServedModel

    model = ServedModel(run_dir, trust=trust)  # checks the run and gives an instance of the right shape
    instance = _instance(model.card.input_schema)
    body = json.dumps({"inputs": [instance]}).encode()
    if litserve:
        try:
            import litserve as _  # noqa: F401
        except ImportError:
            litserve = False  # optional: `make setup EXTRAS=dev,bench`
    out.mkdir(parents=True, exist_ok=True)
    found = targets(run_dir, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms, litserve=litserve, trust=trust)
    runs: dict[tuple[str, int], list[Level]] = {}
    levels: list[Level] = []
    capacity = 0.0  # the batching server's best throughput: what the overload is a multiple of
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        for index, target in enumerate(found):  # all up at once, each paused but while it is measured
            log = out / f"{target.name.split(',')[0].replace(' ', '-')}-{index}.log"
            server = servers[target.name] = stack.enter_context(started(target, log))
            asyncio.run(closed_loop(server.url + target.predict_path, body, 4, 50, 10))  # warm-up
            server.pause()
        for clients in concurrency:
            for _ in range(repeats):
                for target in found:  # in turn: a slow spell of the machine falls on every server alike
                    servers[target.name].resume()
                    endpoint = servers[target.name].url + target.predict_path
                    run = asyncio.run(closed_loop(endpoint, body, clients, requests, seconds))
                    servers[target.name].pause()
                    level = Level(target.name, f"{clients} in flight", run[2], run[0], run[1])
                    runs.setdefault((target.name, clients), []).append(level)
        for target in found:
            for clients in concurrency:  # the run of median throughput, with every run's throughput beside it
                measured = sorted(runs[target.name, clients], key=lambda level: level.throughput)
                median = measured[len(measured) // 2]
                median.runs = [level.throughput for level in runs[target.name, clients]]
                levels.append(median)
            if overload > 0 and target is found[0]:
                capacity = max(level.throughput for level in levels)
                servers[target.name].resume()
                endpoint = servers[target.name].url + target.predict_path
                levels.append(_overload(endpoint, body, target.name, overload, capacity, requests, seconds))
                servers[target.name].pause()
        large: dict[str, Any] | None = None
        if beside_large:
            server = servers[found[0].name]
            server.resume()
            large_body = json.dumps({"inputs": _large_batch(model.card.input_schema, max_batch_size)}).encode()
            large = _beside_large(
                server.url + found[0].predict_path, body, large_body, beside_large, requests, seconds, repeats
            )
            server.pause()
    if overload > 0:
        # the same overload on a server told to keep its latency: --latency-target-ms twice its own unloaded
        # p99, which a latency target changes (a core is left to HTTP), so measured first on a server of its own
        # (an idle model always takes a request: the target does not change the unloaded level)
        command = [*found[0].command, "--latency-target-ms"]
        probe = Target(
            "probe", [*command, str(2 * (levels[0].summary()["p99_ms"] or 1.0))], "/v1/predict", "/health/ready"
        )
        with started(probe, out / "scaleforge-target-probe.log") as server:
            endpoint = server.url + probe.predict_path
            asyncio.run(closed_loop(endpoint, body, 4, 50, 10))  # warm-up
            run = asyncio.run(closed_loop(endpoint, body, 1, requests, seconds))
        target_ms = 2 * (Level("probe", "", run[2], run[0], run[1]).summary()["p99_ms"] or 1.0)
        name = f"scaleforge, batching, --latency-target-ms {target_ms:.0f}"
        bounded = Target(name, [*command, f"{target_ms:.1f}"], "/v1/predict", "/health/ready")
        with started(bounded, out / "scaleforge-target.log") as server:
            endpoint = server.url + bounded.predict_path
            asyncio.run(closed_loop(endpoint, body, 4, 50, 10))  # warm-up
            run = asyncio.run(closed_loop(endpoint, body, 1, requests, seconds))
            levels.append(Level(name, "unloaded (1 in flight)", run[2], run[0], run[1]))
            levels.append(_overload(endpoint, body, name, overload, capacity, requests, seconds))
    summaries = [level.summary() for level in levels]
    result = {
        "benchmark": "serve",
        "run_dir": run_dir,
        "model": model.card.name,
        "max_batch_size": max_batch_size,
        "max_delay_ms": max_delay_ms,
        "requests_per_level": requests,
        "seconds_per_level": seconds,
        "repeats": repeats,
        **machine(),
        "levels": summaries,
        **({"beside_large": large} if large else {}),
    }
    _plot(summaries, concurrency, out / "serve.png")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def row(s: dict[str, Any]) -> list[str]:
        return [
            s["target"],
            s["load"],
            str(s["requests"]),
            ", ".join(f"{k}: {v}" for k, v in s["statuses"].items()),
            f"{s['throughput']:,.0f}",
            ms(s["p50_ms"]),
            ms(s["p95_ms"]),
            ms(s["p99_ms"]),
        ]

    rows = [row(s) for s in summaries]
    notes = [f"plot: {out / 'serve.png'}; results: {out / 'serve.json'}"]
    if large:
        rows += [row(large["alone"]), row(large["beside"])]
        statuses = ", ".join(f"{k}: {v}" for k, v in large["large_statuses"].items())
        notes.insert(
            0,
            f"small requests' p99 beside large bodies: {large['p99_ratio']:.2f}x their p99 alone (target: within "
            f"2x); the large bodies' statuses: {statuses}",
        )
    report(
        result,
        out / "serve.json",
        as_json=as_json,
        title=f"Serving {model.card.name}: one instance per request, batches of <= {max_batch_size}, "
        f"delay <= {max_delay_ms:g} ms",
        columns=["server", "load", "requests", "statuses", "answered/s", "p50 ms", "p95 ms", "p99 ms"],
        rows=rows,
        notes=notes,
    )
    return result


def _overload(
    endpoint: str, body: bytes, name: str, multiple: float, capacity: float, requests: int, seconds: float
) -> Level:
    """The open-loop level: arrivals at `multiple` times `capacity` per second, whatever the answers."""
    rate = multiple * capacity
    latencies, statuses, elapsed = asyncio.run(open_loop(endpoint, body, rate, requests, seconds))
    return Level(name, f"{multiple:g}x capacity ({rate:,.0f}/s, open loop)", elapsed, latencies, statuses)


def _beside_large(
    endpoint: str, small: bytes, large: bytes, concurrency: int, requests: int, seconds: float, repeats: int
) -> dict[str, Any]:
    """`concurrency` small requests in flight alone, then beside a client sending `large` bodies one after another
    (in turn, `repeats` times each, the runs of median p99 reported); their summaries and the ratio of p99s."""
    name = "scaleforge, batching"
    runs: dict[str, list[Level]] = {"alone": [], "beside": []}
    large_statuses: dict[int, int] = {}
    for _ in range(repeats):
        for kind in runs:
            run = asyncio.run(
                closed_loop(endpoint, small, concurrency, requests, seconds, large if kind == "beside" else None)
            )
            load = f"{concurrency} in flight" + (f" + large bodies ({len(large):,} bytes)" if kind == "beside" else "")
            runs[kind].append(Level(name, load, run[2], run[0], run[1]))
            for status, count in run[3].items():
                large_statuses[status] = large_statuses.get(status, 0) + count
    found: dict[str, Any] = {"large_body_bytes": len(large), "large_statuses": dict(sorted(large_statuses.items()))}
    for kind, levels in runs.items():
        ordered = sorted(levels, key=lambda level: level.summary()["p99_ms"] or 0.0)
        found[kind] = ordered[len(ordered) // 2].summary()
    found["p99_ratio"] = (found["beside"]["p99_ms"] or 0.0) / (found["alone"]["p99_ms"] or 1.0)
    return found


def _large_batch(schema: dict[str, Any], rows: int) -> list[Any]:
    """A full batch of `rows` instances as a client's `tensor.tolist()` writes them: random numbers at full
    precision (or random token ids, at full length)."""
    generator = random.Random(0)
    if "shape" not in schema:
        return [[generator.randrange(schema["vocab_size"]) for _ in range(schema["max_length"])] for _ in range(rows)]

    def numbers(shape: list[int]) -> Any:
        if not shape:
            return generator.random()
        return [numbers(shape[1:]) for _ in range(shape[0])]

    return [numbers(schema["shape"]) for _ in range(rows)]


def _instance(schema: dict[str, Any]) -> Any:
    """A valid instance for the model: mid-grey numbers of its shape, or a few token ids."""
    if "shape" not in schema:
        return [1] * min(8, schema["max_length"])
    value: Any = 0.5
    for size in reversed(schema["shape"]):
        value = [value] * size
    return value


def _plot(summaries: list[dict[str, Any]], concurrency: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for target in dict.fromkeys(s["target"] for s in summaries):
        closed = [s for s in summaries if s["target"] == target and s["load"].endswith("in flight")]
        if not closed:
            continue  # an overload level only
        left.plot(concurrency, [s["throughput"] for s in closed], marker="o", label=target)
        right.plot(concurrency, [s["p99_ms"] or float("nan") for s in closed], marker="o", label=target)
    left.set(xlabel="requests in flight", ylabel="answered requests/s", xscale="log", yscale="log", title="throughput")
    right.set(xlabel="requests in flight", ylabel="p99 latency (ms)", xscale="log", yscale="log", title="p99")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
