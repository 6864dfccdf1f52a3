"""Dynamic batching: concurrent requests merged into batches of at most `max_batch_size` instances.

A pure asyncio object, tested without HTTP. Requests wait in a bounded queue; one loop takes them in arrival
order into a batch and runs it on the model's own thread, off the event loop. A batch starts as soon as the
model is free and the queue has stopped growing: when a pass through the event loop brings no new request
(so a lone request starts at once, and a burst of requests that arrived together is one batch), when it is
full, or when its oldest request has waited `max_delay_s` while requests kept arriving. While a batch runs the
next one gathers, so under load batches fill by themselves. A request is refused at once when the queue is
full (`QueueFull`), answered `DeadlineExceeded` when it is still queued `timeout_s` after it arrived (it is
then never run), and dropped from the queue when its caller goes away (cancellation). A request is also
refused at once when the work queued before it would take longer than `timeout_s` (estimated from recent
batches): it would only wait to be refused, and the requests that are admitted keep their latency. A batch
that the model has not answered within `hung_after_s` fails its requests and those queued (`ModelHung`), and
new ones are refused the same way until the model answers it: a model's thread cannot be stopped, and
requests behind it would only wait for their deadlines. With `parallel` > 1 (a pool of model processes), up to
that many batches run at once, each on a thread of its own: the next batch gathers while a slot is free.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# passes through the event loop that must bring no new request before a batch that is not full starts: one for
# the loop to read what the sockets hold, one for the requests it read to reach the queue
QUIET_PASSES = 2


class QueueFull(Exception):
    """The queue holds `max_queue` requests already: come back later."""


class DeadlineExceeded(Exception):
    """The request was still queued `timeout_s` after it arrived; it was not run."""


class Closed(Exception):
    """The batcher is draining or stopped and admits no new request."""


class ModelHung(Exception):
    """The model has run one batch for longer than `hung_after_s`: no request is admitted until it answers."""


@dataclass(frozen=True)
class Result:
    """A request's outputs, with how long it queued and how long its batch ran."""

    outputs: list[Any]
    queue_wait_s: float
    inference_s: float
    batch_size: int


@dataclass(eq=False)
class Ticket:
    """A queued request: `Batcher.wait` gives its `Result`; cancelling its `future` drops it if still queued."""

    instances: Sequence[Any]
    future: asyncio.Future[Result]
    arrived: float
    state: str = "queued"  # queued -> running -> done, or queued -> expired | cancelled | refused
    deadline: asyncio.TimerHandle | None = None
    predicted: float = 0.0  # with a latency target: when it was expected to be answered, in seconds from arrival


class BatchCost:
    """How long a batch of `rows` takes: `fixed + per_row * rows`, fitted to recent batches by least squares
    over moving averages (the last 20 batches or so). While every batch had the same size, the cost is taken
    as proportional to the rows, which errs long for larger batches."""

    def __init__(self) -> None:
        self.batches = 0
        self._r = self._t = self._rr = self._rt = 0.0

    def add(self, rows: int, seconds: float) -> None:
        self.batches += 1
        weight = max(0.05, 1 / self.batches)
        self._r += weight * (rows - self._r)
        self._t += weight * (seconds - self._t)
        self._rr += weight * (rows * rows - self._rr)
        self._rt += weight * (rows * seconds - self._rt)

    def _line(self) -> tuple[float, float]:
        variance = self._rr - self._r**2
        if variance > 0.25:
            per_row = max(0.0, (self._rt - self._r * self._t) / variance)
            return max(0.0, self._t - per_row * self._r), per_row
        return 0.0, self._t / max(1.0, self._r)

    def seconds(self, rows: int) -> float:
        fixed, per_row = self._line()
        return fixed + per_row * rows

    def rows_within(self, seconds: float) -> int:
        """The most rows a batch can hold and still take at most `seconds` (at least 1)."""
        fixed, per_row = self._line()
        if per_row <= 0:
            return 2**31
        return max(1, int((seconds - fixed) / per_row))


class Batcher:
    """Batches `submit`ted instances for `run_batch` (a list of instances in, one output per instance out).

    `on_batch(size, seconds)` is told of every batch that ran (for metrics); `timed_batches` are (rows,
    seconds) of batches timed before serving, to start the cost model from. Call `start` inside the event loop
    before the first `submit`, and `close` to finish what was admitted. With `latency_target_s`, batches hold
    no more rows than run in half the target (less the delay), so that a request waiting behind a running
    batch still has its answer within the target, and a request that could not be answered within it is
    refused at once: under overload the excess is refused and the admitted keep their latency, at the cost of
    smaller batches. With `hung_after_s`, a batch running longer is taken for hung (`hung`, see the module's
    docstring).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        timeout_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        latency_target_s: float = 0.0,
        timed_batches: Sequence[tuple[int, float]] = (),
        hung_after_s: float = 0.0,
        parallel: int = 1,
    ) -> None:
        if (
            min(max_batch_size, max_queue, parallel) < 1
            or min(max_delay_s, latency_target_s, hung_after_s) < 0
            or timeout_s <= 0
        ):
            raise ValueError(
                "max_batch_size, max_queue and parallel must be at least 1, max_delay_s >= 0, timeout_s > 0, "
                "latency_target_s >= 0, hung_after_s >= 0"
            )
        if parallel > 1 and hung_after_s:
            raise ValueError(
                "hung_after_s watches a model on one thread; parallel batches run on processes, watched there"
            )
        self.latency_target_s = latency_target_s
        self.hung_after_s = hung_after_s  # 0: a batch is never taken for hung
        self.hung = False  # the running batch has outlived hung_after_s, and the model has not answered it yet
        self.cost = BatchCost()
        for rows, seconds in timed_batches:  # measured before serving: the cost is known from the first request
            self.cost.add(rows, seconds)
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.on_batch = on_batch
        self._queue: collections.deque[Ticket] = collections.deque()  # may hold tickets no longer queued
        self.queued = 0  # requests waiting for a batch
        self._queued_rows = 0  # their instances
        self._arrival = asyncio.Event()
        self.parallel = parallel  # batches run at once
        # the model's own thread (one for each batch that may run at once)
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="model")
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.running = 0  # instances in the batches being run
        self._batches: dict[int, tuple[float, int]] = {}  # the running batches' starts and rows, by id
        # moving averages over recent batches, for the wait a new request would face (None: none has run yet)
        self._batch_seconds: float | None = None
        self._batch_size = 1.0
        self._arrivals = 0  # requests queued since the start: tells whether a pass through the loop brought more
        # with a latency target: how far the estimates fell short, answered / expected for recent requests; their
        # 95th percentile scales the next estimates (contention for the cores, batches slower than the cost model
        # says), so that the target holds for nearly every admitted request, not only the typical one
        self._shortfalls: collections.deque[float] = collections.deque(maxlen=200)
        self.shortfall = 1.0

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def close(self) -> None:
        """Admit nothing more, finish every admitted request, then stop the model's thread."""
        self._closing = True
        self._arrival.set()
        if self._loop_task is not None:
            await self._loop_task
        self._executor.shutdown(wait=True)

    async def submit(self, instances: Sequence[Any]) -> Result:
        """Queue `instances` (at most `max_batch_size`) and return their outputs once their batch has run."""
        return await self.wait(self.enqueue(instances))

    def enqueue(self, instances: Sequence[Any]) -> Ticket:
        """Queue `instances`, or refuse them at once (`Closed`, `QueueFull`); `wait` gives the result."""
        if not 1 <= len(instances) <= self.max_batch_size:
            raise ValueError(f"a request holds 1 to {self.max_batch_size} instances, not {len(instances)}")
        predicted = self.admit(len(instances))
        loop = asyncio.get_running_loop()
        ticket = Ticket(instances, loop.create_future(), time.perf_counter(), predicted=predicted)
        ticket.deadline = loop.call_at(loop.time() + self.timeout_s, self._expire, ticket)
        self._queue.append(ticket)
        self.queued += 1
        self._queued_rows += len(instances)
        self._arrivals += 1
        self._arrival.set()
        return ticket

    async def wait(self, ticket: Ticket) -> Result:
        """`ticket`'s outputs once its batch has run; `DeadlineExceeded` if it was still queued `timeout_s`
        after it arrived. Cancelled (the caller went away, or `ticket.future` was cancelled) while queued, it is
        never run."""
        try:
            return await ticket.future
        except asyncio.CancelledError:
            self._leave_queue(ticket, "cancelled")
            raise
        finally:
            if ticket.deadline is not None:
                ticket.deadline.cancel()

    def cancel(self, ticket: Ticket) -> bool:
        """Take `ticket` out of the queue now, if it is still queued (its `wait` raises `CancelledError`); False
        if its batch has started, or it is done."""
        if not self._leave_queue(ticket, "cancelled"):
            return False
        ticket.future.cancel()
        return True

    def admit(self, instances: int) -> float:
        """Refuse `instances` more at once if they could not be answered in time (`Closed`, `QueueFull`), so
        that a caller can ask before preparing them; else when they are expected to be answered (0: no
        latency target)."""
        if self._closing:
            raise Closed("the server is shutting down")
        if self.hung:
            raise ModelHung(self.hung_message())
        if self.queued >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are queued already")
        if not self.queued and not self.running:
            # an idle model always takes a request: it starts at once, it could not be answered sooner, and its
            # batch corrects an estimate gone stale (a restart of the model's process timed as a batch, say)
            return 0.0
        predicted = 0.0
        if self.latency_target_s and self.cost.batches:
            predicted = self.expected_answer_s(instances)
            answered_in = predicted * self.shortfall
            if answered_in > self.latency_target_s:
                raise QueueFull(
                    f"the queued work would have this request answered in about {answered_in * 1000:.0f} ms, "
                    f"more than --latency-target-ms {self.latency_target_s * 1000:g}"
                )
        wait = self.expected_wait_s(instances)
        if wait > self.timeout_s:
            raise QueueFull(
                f"the queued work would take about {wait * 1000:.0f} ms, more than the {self.timeout_s * 1000:g} ms "
                "a request may wait"
            )
        return predicted

    def expected_wait_s(self, instances: int) -> float:
        """How long `instances` more would wait for their batch to start (what the deadline bounds), at the pace
        of recent batches (0 before any): the running batch, and those of the queue ahead of theirs."""
        if self._batch_seconds is None:
            return 0.0
        ahead = max(0.0, (self._queued_rows + instances) / max(1.0, self._batch_size) - 1)
        busy = 1 if len(self._batches) >= self.parallel else 0  # no slot free: the first to end frees one
        return (ahead / self.parallel + busy) * self._batch_seconds

    def batch_rows(self) -> int:
        """The most rows the next batch may hold: `max_batch_size`, or fewer to keep `latency_target_s`."""
        if not self.latency_target_s or not self.cost.batches:
            return self.max_batch_size
        budget = (self.latency_target_s - self.max_delay_s) / 2  # its own batch, and the one before it
        return min(self.max_batch_size, self.cost.rows_within(budget))

    def expected_answer_s(self, instances: int) -> float:
        """When `instances` more would be answered, from now: the running batch's rest, then full batches of
        the queue and them (by the fitted `cost`)."""
        rows = self.batch_rows()
        running = 0.0
        if len(self._batches) >= self.parallel:  # until the first running batch ends
            now = time.perf_counter()
            running = min(max(0.0, since + self.cost.seconds(n) - now) for since, n in self._batches.values())
        batches = -(-(self._queued_rows + instances) // rows)  # ceiling
        return running + -(-batches // self.parallel) * self.cost.seconds(rows)

    def _leave_queue(self, ticket: Ticket, state: str) -> bool:
        """Take `ticket` out of the queue's counts, as `state`; False if it was not queued."""
        if ticket.state != "queued":
            return False
        ticket.state = state
        self.queued -= 1
        self._queued_rows -= len(ticket.instances)
        return True

    def _expire(self, ticket: Ticket) -> None:
        if self._leave_queue(ticket, "expired") and not ticket.future.done():
            ticket.future.set_exception(DeadlineExceeded(f"queued for more than {self.timeout_s * 1000:g} ms"))

    async def _batch_loop(self) -> None:
        slots = asyncio.Semaphore(self.parallel)  # a batch gathers only while one may start
        runs: set[asyncio.Task[None]] = set()
        while True:
            await slots.acquire()
            batch = await self._next_batch()
            if not batch:
                break  # closing, and nothing left
            run = asyncio.get_running_loop().create_task(self._settled(batch))
            runs.add(run)
            run.add_done_callback(runs.discard)
            run.add_done_callback(lambda _: slots.release())
        if runs:
            await asyncio.wait(runs)

    async def _settled(self, batch: list[Ticket]) -> None:
        """Run `batch`; if that raises, its requests fail with the error (and the loop goes on)."""
        try:
            await self._run(batch)
        except Exception as error:  # noqa: BLE001
            for ticket in batch:
                ticket.state = "done"
                if not ticket.future.done():
                    ticket.future.set_exception(error)

    async def _run(self, batch: list[Ticket]) -> None:
        instances = [instance for ticket in batch for instance in ticket.instances]
        started = time.perf_counter()
        key = id(batch)
        self._batches[key] = (started, len(instances))
        self.running += len(instances)
        try:
            running = asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, instances)
            if self.hung_after_s:
                await asyncio.wait({running}, timeout=self.hung_after_s)
                if not running.done():
                    await self._wait_out_hang(batch, running)
                    return
            outputs = await running
        finally:
            self.running -= len(instances)
            del self._batches[key]
        seconds = time.perf_counter() - started
        if self._batch_seconds is None:
            self._batch_seconds, self._batch_size = seconds, float(len(instances))
        else:  # the last 10 batches or so
            self._batch_seconds += 0.1 * (seconds - self._batch_seconds)
            self._batch_size += 0.1 * (len(instances) - self._batch_size)
        self.cost.add(len(instances), seconds)
        if self.on_batch is not None:
            self.on_batch(len(instances), seconds)
        done = time.perf_counter()
        offset = 0
        for ticket in batch:
            if ticket.predicted > 0:
                self._shortfalls.append((done - ticket.arrived) / ticket.predicted)
            count = len(ticket.instances)
            result = Result(outputs[offset : offset + count], started - ticket.arrived, seconds, len(instances))
            offset += count
            ticket.state = "done"
            if not ticket.future.done():
                ticket.future.set_result(result)
        if len(self._shortfalls) >= 20:
            self.shortfall = max(0.5, sorted(self._shortfalls)[int(0.95 * len(self._shortfalls))])

    async def _wait_out_hang(self, batch: list[Ticket], running: asyncio.Future[list[Any]]) -> None:
        """Fail `batch` and every queued request (`ModelHung`), and refuse new ones until the model answers."""
        self.hung = True
        error = ModelHung(self.hung_message())
        for ticket in batch:
            ticket.state = "done"
        queued = [ticket for ticket in self._queue if self._leave_queue(ticket, "refused")]
        for ticket in [*batch, *queued]:
            if not ticket.future.done():
                ticket.future.set_exception(error)
        try:
            with contextlib.suppress(Exception):  # how it ends: its requests were answered already
                await running  # the model's thread cannot be stopped: the next batch waits for it
        finally:
            self.hung = False

    def hung_message(self) -> str:
        """What a request refused while the model is hung is told."""
        return (
            f"the model has not answered its batch within {self.hung_after_s:g} s (--batch-timeout-s); "
            "requests are refused until it does"
        )

    async def _next_batch(self) -> list[Ticket]:
        """Wait for a live request, then until the batch is due (see the module's docstring)."""
        while not await self._filled():
            pass  # everyone waiting left: start over
        batch: list[Ticket] = []
        rows, most = 0, self.batch_rows()
        while self._queue:
            head = self._queue[0]
            if head.state != "queued":
                self._queue.popleft()
            elif rows + len(head.instances) > most and batch:  # a request larger than `most` runs alone
                break
            else:
                self._queue.popleft()
                self._leave_queue(head, "running")
                batch.append(head)
                rows += len(head.instances)
        return batch

    async def _filled(self) -> bool:
        """Wait until a batch is due (False: every request waiting left meanwhile; True also when closing)."""
        while True:
            self._drop_dead()
            if self._queue:
                break
            if self._closing:
                return True
            self._arrival.clear()
            await self._arrival.wait()
        fill_by = self._queue[0].arrived + self.max_delay_s
        quiet = 0
        while quiet < QUIET_PASSES and self._queued_rows < self.batch_rows() and not self._closing:
            if time.perf_counter() >= fill_by:
                break
            arrivals = self._arrivals
            await asyncio.sleep(0)  # one pass through the event loop: what has arrived is read and queued
            quiet = quiet + 1 if self._arrivals == arrivals else 0
            self._drop_dead()
            if not self._queue:
                return False
        return True

    def _drop_dead(self) -> None:
        """Forget requests that expired or whose caller went away, at the head of the queue and everywhere."""
        while self._queue and self._queue[0].state != "queued":
            self._queue.popleft()
        if len(self._queue) != self.queued:
            self._queue = collections.deque(ticket for ticket in self._queue if ticket.state == "queued")
