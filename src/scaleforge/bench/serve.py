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
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleforge.bench.harness import machine, report
from scaleforge.network import free_port
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


def targets(
    run_dir: str,
    *,
    max_batch_size: int,
    max_delay_ms: float,
    litserve: bool,
    trust: Trust = UNTRUSTED,
    workers: Sequence[int] = (),
) -> list[Target]:
    """The servers to compare, each on a port of its own, each opening the run with `trust`; for each count of
    `workers`, scaleforge with that many model processes and that many whole servers sharing a port."""
    # the server's own queue bound and deadline: the closed-loop levels never fill the queue; the overload does
    serve = [sys.executable, "-m", "scaleforge", "serve", run_dir, "--port", "{port}", *trust_flags(trust)]
    batching = [*serve, "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(max_delay_ms)]
    found = [
        Target("scaleforge, batching", batching, "/v1/predict", "/health/ready"),
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
    for count in workers:
        found += _scaled_out(count, batching, [run_dir, str(max_batch_size), str(max_delay_ms)], trust)
    if litserve:
        module = [sys.executable, "-m", "scaleforge.bench.serve_targets"]
        run = [run_dir, str(max_batch_size), str(max_delay_ms), *trust_flags(trust)]
        for name, kind in (("LitServe, batching", "litserve"), ("LitServe, batching, fast_queue", "litserve-fast")):
            found.append(Target(name, [*module, kind, "{port}", *run], "/predict", "/health"))
    return found


def _scaled_out(count: int, batching: list[str], run: list[str], trust: Trust) -> list[Target]:
    """scaleforge with `--workers count` (`batching`: its command but that flag), and `count` whole servers on
    one port (`run`: the run directory, batch size and delay, as `serve_targets reuseport` takes them)."""
    reuseport = [sys.executable, "-m", "scaleforge.bench.serve_targets", "reuseport", "{port}", *run, str(count)]
    return [
        Target(
            f"scaleforge, batching, {count} workers",
            [*batching, "--workers", str(count)],
            "/v1/predict",
            "/health/ready",
        ),
        Target(
            f"{count} servers, one port (SO_REUSEPORT)",
            [*reuseport, *trust_flags(trust)],
            "/v1/predict",
            "/health/ready",
        ),
    ]


@dataclass
class Server:
    """A started target: its base URL and prediction endpoint, and its process group, which can be paused while
    others are measured."""

    url: str
    group: int
    endpoint: str  # where it takes predictions

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        """Resumed for the block, paused again after it."""
        self.resume()
        try:
            yield self
        finally:
            self.pause()

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
            yield Server(url, process.pid, url + target.predict_path)
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


@dataclass(frozen=True)
class Workload:
    """What every server is sent: one body (one instance per request), the levels of requests in flight, the
    request count and time limit that bound each level, how many times each is run, and the overload's multiple
    of capacity (0: none)."""

    body: bytes
    concurrency: Sequence[int]
    requests: int
    seconds: float
    repeats: int
    overload: float

    def warm_up(self, endpoint: str) -> None:
        """A few requests, unmeasured, so that no level pays for the server's first ones."""
        asyncio.run(closed_loop(endpoint, self.body, 4, 50, 10))

    def closed(self, name: str, endpoint: str, clients: int, load: str | None = None) -> Level:
        """A closed-loop level: `clients` requests in flight."""
        latencies, statuses, elapsed, _ = asyncio.run(
            closed_loop(endpoint, self.body, clients, self.requests, self.seconds)
        )
        return Level(name, f"{clients} in flight" if load is None else load, elapsed, latencies, statuses)

    def overloaded(self, name: str, endpoint: str, capacity: float) -> Level:
        """The open-loop level: arrivals at `overload` times `capacity` per second, whatever the answers."""
        rate = self.overload * capacity
        latencies, statuses, elapsed = asyncio.run(open_loop(endpoint, self.body, rate, self.requests, self.seconds))
        return Level(name, f"{self.overload:g}x capacity ({rate:,.0f}/s, open loop)", elapsed, latencies, statuses)


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
    workers: Sequence[int] = (),
) -> dict[str, Any]:
    """Measure every target at every level (`repeats` times, in turn, reporting the median run) and, with
    `beside_large`, that many small requests in flight alone and beside large bodies; print and return the
    results (JSON and a PNG plot in `out`)."""
    from scaleforge.serve.model import ServedModel

    model = ServedModel(run_dir, trust=trust)  # checks the run and gives an instance of the right shape
    body = json.dumps({"inputs": [_instance(model.card.input_schema)]}).encode()
    workload = Workload(body, concurrency, requests, seconds, repeats, overload)
    litserve = litserve and _litserve_installed()
    out.mkdir(parents=True, exist_ok=True)
    found = targets(
        run_dir,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        litserve=litserve,
        trust=trust,
        workers=workers,
    )
    batching = found[0]  # scaleforge with batching: the server that the overload and the large bodies go to
    large: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        servers = _start_paused(found, out, workload, stack)
        medians = _closed_loop_medians(found, servers, workload)
        capacity = max(level.throughput for level in medians[batching.name])  # what the overload is a multiple of
        levels = [*medians[batching.name]]
        if overload > 0:
            with servers[batching.name].running() as server:
                levels.append(workload.overloaded(batching.name, server.endpoint, capacity))
        levels += [level for target in found[1:] for level in medians[target.name]]
        if beside_large:
            large_body = json.dumps({"inputs": _large_batch(model.card.input_schema, max_batch_size)}).encode()
            with servers[batching.name].running() as server:
                large = _beside_large(server.endpoint, workload, large_body, beside_large)
    if overload > 0:
        levels += _latency_target_levels(batching, levels[0], capacity, workload, out)
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
    _report(result, out, as_json=as_json)
    return result


def _litserve_installed() -> bool:
    try:
        import litserve  # noqa: F401
    except ImportError:
        return False  # optional: `make setup EXTRAS=dev,bench`
    return True


def _start_paused(
    found: Sequence[Target], out: Path, workload: Workload, stack: contextlib.ExitStack
) -> dict[str, Server]:
    """Start every target, warm it up and pause it: all are up at once, each paused but while it is measured;
    `stack` stops them. By target name."""
    servers: dict[str, Server] = {}
    for index, target in enumerate(found):
        log = out / f"{target.name.split(',')[0].replace(' ', '-')}-{index}.log"
        server = servers[target.name] = stack.enter_context(started(target, log))
        workload.warm_up(server.endpoint)
        server.pause()
    return servers


def _closed_loop_medians(
    found: Sequence[Target], servers: dict[str, Server], workload: Workload
) -> dict[str, list[Level]]:
    """Every target at every level of `workload.concurrency`, `repeats` times; by target name, each level's run
    of median throughput, with every run's throughput beside it."""
    runs: dict[tuple[str, int], list[Level]] = {}
    for clients in workload.concurrency:
        for _ in range(workload.repeats):
            for target in found:  # in turn: a slow spell of the machine falls on every server alike
                with servers[target.name].running() as server:
                    level = workload.closed(target.name, server.endpoint, clients)
                runs.setdefault((target.name, clients), []).append(level)
    medians: dict[str, list[Level]] = {}
    for target in found:
        for clients in workload.concurrency:
            measured = sorted(runs[target.name, clients], key=lambda level: level.throughput)
            median = measured[len(measured) // 2]
            median.runs = [level.throughput for level in runs[target.name, clients]]
            medians.setdefault(target.name, []).append(median)
    return medians


def _beside_large(endpoint: str, workload: Workload, large: bytes, concurrency: int) -> dict[str, Any]:
    """`concurrency` small requests in flight alone, then beside a client sending `large` bodies one after another
    (in turn, `repeats` times each, the runs of median p99 reported); their summaries and the ratio of p99s."""
    name = "scaleforge, batching"
    runs: dict[str, list[Level]] = {"alone": [], "beside": []}
    large_statuses: dict[int, int] = {}
    for _ in range(workload.repeats):
        for kind in runs:
            beside = large if kind == "beside" else None
            latencies, statuses, elapsed, beside_statuses = asyncio.run(
                closed_loop(endpoint, workload.body, concurrency, workload.requests, workload.seconds, beside)
            )
            suffix = f" + large bodies ({len(large):,} bytes)" if kind == "beside" else ""
            runs[kind].append(Level(name, f"{concurrency} in flight{suffix}", elapsed, latencies, statuses))
            for status, count in beside_statuses.items():
                large_statuses[status] = large_statuses.get(status, 0) + count
    found: dict[str, Any] = {"large_body_bytes": len(large), "large_statuses": dict(sorted(large_statuses.items()))}
    for kind, levels in runs.items():
        ordered = sorted(levels, key=lambda level: level.summary()["p99_ms"] or 0.0)
        found[kind] = ordered[len(ordered) // 2].summary()
    found["p99_ratio"] = (found["beside"]["p99_ms"] or 0.0) / (found["alone"]["p99_ms"] or 1.0)
    return found


def _latency_target_levels(
    batching: Target, unloaded: Level, capacity: float, workload: Workload, out: Path
) -> list[Level]:
    """The same overload on a server told to keep its latency: --latency-target-ms twice its own unloaded p99
    (`unloaded`: the batching server's first level); that server's unloaded level and its overload level."""
    # a latency target changes the unloaded p99 (a core is left to HTTP), so it is measured first on a server of
    # its own (an idle model always takes a request: the target does not change the unloaded level)
    command = [*batching.command, "--latency-target-ms"]
    probe = Target("probe", [*command, str(2 * (unloaded.summary()["p99_ms"] or 1.0))], "/v1/predict", "/health/ready")
    with started(probe, out / "scaleforge-target-probe.log") as server:
        workload.warm_up(server.endpoint)
        probed = workload.closed("probe", server.endpoint, 1, "")
    target_ms = 2 * (probed.summary()["p99_ms"] or 1.0)
    name = f"scaleforge, batching, --latency-target-ms {target_ms:.0f}"
    bounded = Target(name, [*command, f"{target_ms:.1f}"], "/v1/predict", "/health/ready")
    with started(bounded, out / "scaleforge-target.log") as server:
        workload.warm_up(server.endpoint)
        return [
            workload.closed(name, server.endpoint, 1, "unloaded (1 in flight)"),
            workload.overloaded(name, server.endpoint, capacity),
        ]


def _report(result: dict[str, Any], out: Path, *, as_json: bool) -> None:
    """Print the table (or JSON) and write `OUT/serve.json`."""
    rows = [_table_row(summary) for summary in result["levels"]]
    notes = [f"plot: {out / 'serve.png'}; results: {out / 'serve.json'}"]
    large = result.get("beside_large")
    if large:
        rows += [_table_row(large["alone"]), _table_row(large["beside"])]
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
        title=f"Serving {result['model']}: one instance per request, batches of <= {result['max_batch_size']}, "
        f"delay <= {result['max_delay_ms']:g} ms",
        columns=["server", "load", "requests", "statuses", "answered/s", "p50 ms", "p95 ms", "p99 ms"],
        rows=rows,
        notes=notes,
    )


def _table_row(summary: dict[str, Any]) -> list[str]:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return [
        summary["target"],
        summary["load"],
        str(summary["requests"]),
        ", ".join(f"{k}: {v}" for k, v in summary["statuses"].items()),
        f"{summary['throughput']:,.0f}",
        ms(summary["p50_ms"]),
        ms(summary["p95_ms"]),
        ms(summary["p99_ms"]),
    ]


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
