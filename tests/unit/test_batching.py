"""Tests for scaleforge.serve.batching: the batcher alone, on an event loop, with a model that records its calls."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import types

import pytest

from scaleforge.serve import batching
from scaleforge.serve.batching import Batcher, Closed, DeadlineExceeded, ModelHung, QueueFull


class RecordingModel:
    """Doubles each instance; remembers every batch it ran, and can be held back until released."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.started: list[float] = []  # when each batch reached the model (perf_counter)
        self.seconds = seconds
        self.release = threading.Event()
        self.release.set()

    def __call__(self, instances: list[int]) -> list[int]:
        self.started.append(time.perf_counter())
        self.release.wait()
        time.sleep(self.seconds)
        self.batches.append(list(instances))
        return [2 * instance for instance in instances]


def batcher(model: RecordingModel, **options: float) -> Batcher:
    settings = {"max_batch_size": 4, "max_delay_s": 0.05, "max_queue": 100, "timeout_s": 5.0, **options}
    return Batcher(model, **settings)  # type: ignore[arg-type]


def run(coroutine):  # noqa: ANN001, ANN201 - a test helper
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_concurrent_requests_share_batches_of_at_most_the_bound_in_arrival_order() -> None:
    model = RecordingModel()

    async def scenario() -> list:
        b = batcher(model)
        b.start()
        sizes = [1, 3, 2, 2, 1, 4, 1]
        results = await asyncio.gather(*(b.submit(list(range(10 * i, 10 * i + n))) for i, n in enumerate(sizes)))
        await b.close()
        return results

    results = run(scenario())
    assert [r.outputs for r in results] == [
        [2 * x for x in range(10 * i, 10 * i + n)] for i, n in enumerate([1, 3, 2, 2, 1, 4, 1])
    ]
    assert all(len(batch) <= 4 for batch in model.batches)
    flat = [x for batch in model.batches for x in batch]
    assert flat == sorted(flat)  # first come, first served; a request is never split
    assert len(model.batches) < 7 and all(r.batch_size == len(model.batches[0]) for r in results[:2])


def test_a_lone_request_starts_at_once() -> None:
    model = RecordingModel()

    async def scenario() -> float:
        b = batcher(model, max_delay_s=2.0)
        b.start()
        started = time.perf_counter()
        await b.submit([1])
        waited = time.perf_counter() - started
        await b.close()
        return waited

    assert run(scenario()) < 0.5  # nothing else is arriving: the 2 s delay is not waited out


def test_requests_that_keep_arriving_share_a_batch_until_they_stop_or_the_delay_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a clock the test moves, 1 ms a pass through the event loop: what a loaded machine does to real time
    (passes that take longer) cannot change the batches."""
    model = RecordingModel()
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(batching, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    async def scenario() -> int:
        b = batcher(model, max_batch_size=100_000, max_queue=100_000, max_delay_s=0.05)
        b.start()
        burst = []
        for value in range(6):  # a request each pass through the event loop, then none; no time passes
            burst.append(asyncio.ensure_future(b.submit([value])))
            await asyncio.sleep(0)
        await asyncio.gather(*burst)
        stream = []
        for _ in range(300):  # a request each pass for 0.3 s
            stream.append(asyncio.ensure_future(b.submit([7])))
            await asyncio.sleep(0)
            clock.now += 0.001
        await asyncio.gather(*stream)
        await b.close()
        return len(stream)

    sent = run(scenario())
    assert model.batches[0] == list(range(6))  # the burst: one batch, started once it stopped
    streamed = model.batches[1:]
    # the stream's first batch is cut by the 50 ms delay: about 50 of the 300 requests, not all of them
    assert sum(map(len, streamed)) == sent and 45 <= len(streamed[0]) <= 55, [len(batch) for batch in streamed]


def test_a_full_queue_refuses_at_once() -> None:
    model = RecordingModel()
    model.release.clear()  # the first batch holds the model

    async def scenario() -> list:
        b = batcher(model, max_batch_size=1, max_queue=2, max_delay_s=0.0)
        b.start()
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.05)  # running
        queued = [asyncio.ensure_future(b.submit([i])) for i in (2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit([4])
        model.release.set()
        results = await asyncio.gather(first, *queued)
        await b.close()
        return results

    assert [r.outputs for r in run(scenario())] == [[2], [4], [6]]


def test_a_request_queued_past_its_deadline_is_refused_and_never_run() -> None:
    model = RecordingModel(seconds=0.3)

    async def scenario() -> None:
        b = batcher(model, max_batch_size=1, max_delay_s=0.0, timeout_s=0.1)
        b.start()
        running = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded):
            await b.submit([2])  # waits behind the 0.3 s batch
        assert (await running).outputs == [2]  # a running request outlives the deadline
        await b.close()

    run(scenario())
    assert model.batches == [[1]]


def test_each_queued_request_expires_at_its_own_deadline() -> None:
    model = RecordingModel(seconds=0.5)

    async def scenario() -> list[float]:
        b = batcher(model, max_batch_size=1, max_delay_s=0.0, timeout_s=0.1)
        b.start()
        running = asyncio.ensure_future(b.submit([1]))  # runs at once: its deadline passes with nothing due

        async def expires_after(delay: float) -> float:
            await asyncio.sleep(delay)
            arrived = time.perf_counter()
            with pytest.raises(DeadlineExceeded):
                await b.submit([2])
            return time.perf_counter() - arrived

        waits = await asyncio.gather(expires_after(0.01), expires_after(0.06), expires_after(0.13))
        await running
        await b.close()
        return waits

    waits = run(scenario())
    assert all(0.1 - 1e-3 <= wait < 0.15 for wait in waits), waits
    assert model.batches == [[1]]


def test_a_request_whose_caller_left_is_dropped_from_the_queue() -> None:
    model = RecordingModel()
    model.release.clear()

    async def scenario() -> None:
        b = batcher(model, max_batch_size=1, max_delay_s=0.0)
        b.start()
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit([2]))
        await asyncio.sleep(0.01)
        gone.cancel()
        kept = asyncio.ensure_future(b.submit([3]))
        await asyncio.sleep(0.01)
        model.release.set()
        await asyncio.gather(first, kept)
        await b.close()

    run(scenario())
    assert model.batches == [[1], [3]]


def test_close_answers_what_was_admitted_and_refuses_the_rest() -> None:
    model = RecordingModel(seconds=0.05)

    async def scenario() -> list:
        b = batcher(model, max_batch_size=2)
        b.start()
        admitted = [asyncio.ensure_future(b.submit([i])) for i in range(6)]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0)
        with pytest.raises(Closed):
            await b.submit([99])
        results = await asyncio.gather(*admitted)
        await closing
        return results

    assert [r.outputs for r in run(scenario())] == [[2 * i] for i in range(6)]


def fails_once(message: str):  # noqa: ANN201 - a test helper
    """A callable that raises RuntimeError(`message`) on its first call only."""
    calls = []

    def call(*args: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError(message)

    return call


@pytest.mark.parametrize("where", ["model", "after the model"])
def test_an_error_fails_its_batch_only(where: str) -> None:
    model = RecordingModel()
    broken = fails_once("boom")

    def flaky(instances: list[int]) -> list[int]:
        broken()
        return model(instances)

    async def scenario() -> None:
        options = {"max_batch_size": 1, "max_delay_s": 0.0, "max_queue": 10, "timeout_s": 5.0}
        if where == "model":
            b = Batcher(flaky, **options)  # type: ignore[arg-type]
        else:  # the metrics callback, say
            b = Batcher(model, on_batch=lambda size, seconds: broken(), **options)  # type: ignore[arg-type]
        b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit([1])
        assert (await b.submit([2])).outputs == [4]  # the loop goes on
        await b.close()

    run(scenario())


def test_a_request_that_would_only_wait_to_be_refused_is_refused_at_once() -> None:
    model = RecordingModel(seconds=0.1)

    async def scenario() -> list:
        b = batcher(model, max_batch_size=1, max_delay_s=0.0, timeout_s=0.25)
        b.start()
        await b.submit([0])  # the pace: 0.1 s a batch
        outcomes = []

        async def one(value: int) -> None:
            try:
                outcomes.append((await b.submit([value])).outputs)
            except (QueueFull, DeadlineExceeded) as error:
                outcomes.append(type(error).__name__)

        tasks = []
        for value in range(1, 6):
            tasks.append(asyncio.ensure_future(one(value)))
            await asyncio.sleep(0.005)  # in this order
        await asyncio.gather(*tasks)
        await b.close()
        return outcomes

    outcomes = run(scenario())
    # 1 runs at once; 2 waits for it (0.1 s); 3 for it and 2 (0.2 s, within the 0.25 s); 4 and 5 would wait
    # 0.3 s and more: refused at once, and no admitted request misses its deadline
    assert outcomes.count("QueueFull") == 2 and "DeadlineExceeded" not in outcomes, outcomes
    assert [outcome for outcome in outcomes if isinstance(outcome, list)] == [[2], [4], [6]]


def test_callers_that_keep_leaving_before_their_batch_never_stop_the_loop() -> None:
    model = RecordingModel()

    async def scenario() -> list:
        b = batcher(model, max_delay_s=0.05, timeout_s=2.0)  # a delay no stall of a loaded machine outlasts
        b.start()
        for value in range(1200):  # each leaves while its batch is still filling, before the delay is out
            gone = asyncio.ensure_future(b.submit([value]))
            await asyncio.sleep(0)
            gone.cancel()
            await asyncio.sleep(0.003)
        result = await b.submit([7])
        await b.close()
        return result.outputs

    assert run(scenario()) == [14] and model.batches == [[7]]


def test_batch_cost_fits_a_fixed_and_a_per_row_part() -> None:
    from scaleforge.serve.batching import BatchCost

    cost = BatchCost()
    for rows in [1, 4, 8, 16, 32] * 8:
        cost.add(rows, 0.002 + 0.001 * rows)
    assert abs(cost.seconds(10) - 0.012) < 1e-6 and cost.rows_within(0.022) == 20


def test_a_latency_target_keeps_batches_small_and_refuses_what_would_miss_it() -> None:
    model = RecordingModel(seconds=0.0)

    def per_row(instances: list[int]) -> list[int]:
        time.sleep(0.05 * len(instances))  # 50 ms a row: a compute-bound model
        return model(instances)

    async def scenario() -> tuple[list, list[float]]:
        b = Batcher(per_row, max_batch_size=32, max_delay_s=0.0, max_queue=500, timeout_s=5.0, latency_target_s=1.0)
        b.start()
        for rows in (1, 2, 4, 1, 3):  # learn the cost
            await b.submit(list(range(rows)))
        outcomes: list = []
        latencies: list[float] = []

        async def one(value: int) -> None:
            started = time.perf_counter()
            try:
                await b.submit([value])
                latencies.append(time.perf_counter() - started)
            except QueueFull as error:
                outcomes.append(str(error))

        await asyncio.gather(*(one(value) for value in range(100)))  # 5 s of work at once
        await b.close()
        return outcomes, latencies

    refused, latencies = run(scenario())
    sizes = [len(batch) for batch in model.batches[5:]]
    assert max(sizes) <= 10 and len(refused) >= 60, (sizes, len(refused))  # 10 rows: 500 ms, half the target
    assert "more than --latency-target-ms 1000" in refused[0]
    # the target, with half a second for a busy machine's stalls (times long enough that they are small beside it)
    assert max(latencies) < 1.5, max(latencies)


def test_a_latency_target_never_refuses_an_idle_model() -> None:
    model = RecordingModel()

    async def scenario() -> list:
        # timed at 1 s a row: any request would miss a 100 ms target, but refusing it would teach nothing
        b = Batcher(model, max_batch_size=4, max_delay_s=0.0, max_queue=10, timeout_s=5.0, latency_target_s=0.1,
                    timed_batches=[(1, 1.0), (4, 4.0)])  # fmt: skip
        b.start()
        outputs = [(await b.submit([value])).outputs for value in (1, 2)]
        await b.close()
        return outputs

    assert run(scenario()) == [[2], [4]]


def test_a_latency_target_learns_how_far_its_estimates_fall_short() -> None:
    calls = []

    def uneven(instances: list[int]) -> list[int]:  # every fourth batch takes 8x as long: beyond a mean's reach
        calls.append(len(instances))
        time.sleep(0.08 if len(calls) % 4 == 0 else 0.01)
        return [2 * instance for instance in instances]

    async def scenario() -> tuple[Batcher, dict[int, float]]:
        b = Batcher(uneven, max_batch_size=4, max_delay_s=0.0, max_queue=1000, timeout_s=5.0, latency_target_s=0.15)
        b.start()
        latencies: dict[int, float] = {}  # of the admitted, by arrival

        async def one(value: int) -> None:
            started = time.perf_counter()
            with contextlib.suppress(QueueFull):
                await b.submit([value])
                latencies[value] = time.perf_counter() - started

        pending = []
        for value in range(400):  # 400 a second for 1 s: several times what the model can take
            pending.append(asyncio.ensure_future(one(value)))
            await asyncio.sleep(0.0025)
        await asyncio.gather(*pending)
        await b.close()
        return b, latencies

    b, latencies = run(scenario())
    assert b.shortfall > 1.2, b.shortfall  # answers came later than estimated, and it knows by how much
    later = sorted(seconds for value, seconds in latencies.items() if value >= 200)  # once it has learnt
    assert later and later[int(0.95 * len(later))] <= 0.15, later[-10:]  # so the admitted keep the target


def test_an_idle_model_takes_a_request_whatever_the_last_batches_took() -> None:
    model = RecordingModel()

    async def scenario() -> list:
        b = batcher(model, max_batch_size=1, max_delay_s=0.0, timeout_s=0.1)
        b.start()
        model.seconds = 0.3  # a batch far slower than the deadline (a model's process restarted within it, say)
        first = (await b.submit([1])).outputs
        model.seconds = 0.0
        second = (await b.submit([2])).outputs  # the pace says 0.3 s, but nothing is queued or running
        await b.close()
        return [first, second]

    assert run(scenario()) == [[2], [4]]


def test_a_cancelled_ticket_leaves_the_queue_at_once_and_never_runs() -> None:
    ran: list[list[int]] = []

    def record(instances: list[int]) -> list[int]:
        ran.append(list(instances))
        time.sleep(0.05)
        return instances

    async def scenario() -> tuple[list[object], int]:
        b = Batcher(record, max_batch_size=2, max_delay_s=0.0, max_queue=2, timeout_s=5.0)
        b.start()
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.01)  # running alone
        waiting = [b.enqueue([2]), b.enqueue([3])]  # the queue is full
        assert b.cancel(waiting[0]) and not b.cancel(waiting[0])
        queued = b.queued  # room again at once, before any task has run
        b.enqueue([4])
        outcomes = await asyncio.gather(first, *(b.wait(t) for t in waiting), return_exceptions=True)
        await b.close()
        return outcomes, queued

    outcomes, queued = run(scenario())
    assert queued == 1
    assert isinstance(outcomes[1], asyncio.CancelledError) and outcomes[2].outputs == [3]
    assert [3, 4] in ran and all(2 not in batch for batch in ran)


def test_a_batch_past_hung_after_s_fails_with_the_queue_and_refuses_new_requests_until_the_model_answers() -> None:
    model = RecordingModel()
    model.release.clear()  # the model's thread blocks on its first batch

    async def scenario() -> None:
        b = batcher(model, max_batch_size=1, hung_after_s=0.2, timeout_s=30.0)
        b.start()
        stuck = asyncio.ensure_future(b.submit([1]))
        while not model.started:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit([2]))
        assert not b.hung
        with pytest.raises(ModelHung, match="within 0.2 s"):
            await stuck  # failed at the timeout, its thread still blocked
        with pytest.raises(ModelHung):
            await queued  # it would only have waited for its deadline
        assert b.hung and b.queued == 0
        with pytest.raises(ModelHung, match="refused until it does"):
            await b.submit([3])
        model.release.set()
        while b.hung:
            await asyncio.sleep(0.01)
        assert (await b.submit([4])).outputs == [8]  # served again once the model answered
        await b.close()
        assert model.batches == [[1], [4]]  # the refused ones never ran

    run(scenario())


@pytest.mark.parametrize("parallel", [1, 2])
def test_with_parallel_slots_that_many_batches_run_at_once_and_no_more(parallel: int) -> None:
    running, most = 0, 0
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=1.0)  # a batch waits here for a second one to run beside it

    def model(instances: list[int]) -> list[int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            with contextlib.suppress(threading.BrokenBarrierError):
                both.wait()
            time.sleep(0.05)
            return [2 * instance for instance in instances]
        finally:
            with lock:
                running -= 1

    async def scenario() -> tuple[list, float]:
        b = Batcher(model, max_batch_size=2, max_delay_s=0.0, max_queue=100, timeout_s=30.0, parallel=parallel)
        b.start()
        results = await asyncio.gather(*(b.submit([i]) for i in range(12)))
        wait = b.expected_wait_s(2)
        await b.close()
        return results, wait

    results, _ = run(scenario())
    assert [result.outputs for result in results] == [[2 * i] for i in range(12)]
    with pytest.raises(ValueError, match="hung_after_s watches a model on one thread"):
        Batcher(model, max_batch_size=2, max_delay_s=0.0, max_queue=1, timeout_s=1.0, parallel=2, hung_after_s=1.0)
    assert most == parallel  # the pool's processes all busy, never one batch too many


def test_the_wait_a_request_faces_is_shared_among_parallel_slots() -> None:
    async def wait_for(parallel: int) -> float:
        model = RecordingModel()
        model.release.clear()
        b = batcher(model, max_batch_size=2, parallel=parallel)
        b._batch_seconds, b._batch_size = 0.1, 2.0  # as if recent batches took 0.1 s for 2 instances
        b.start()
        pending = [asyncio.ensure_future(b.submit([i])) for i in range(8)]
        while len(model.started) < parallel:  # every slot busy
            await asyncio.sleep(0.01)
        wait = b.expected_wait_s(2)
        model.release.set()
        await asyncio.gather(*pending)
        await b.close()
        return wait

    one, two = run(wait_for(1)), run(wait_for(2))
    assert one > 0 and two < one  # the queue ahead drains through two slots at once
