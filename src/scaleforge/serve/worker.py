"""The model in a process of its own, so that HTTP and inference run in parallel instead of sharing one
interpreter lock: the server's event loop parses and answers requests while the model computes a batch.

The server's model thread hands each batch to the process through a pipe (the instances as NumPy arrays) and
waits for its answers (JSON-ready dicts); the batcher does not change. The process ignores SIGINT and SIGTERM:
the server drains on either and then closes the pipe, which ends the process. If the server dies, however it
dies, the process is killed (`ParentDeathGuard`), mid-batch or loading too, so it never outlives the server. A
process that dies mid-batch fails that batch (503) and is started again for the next one.

`--workers N` serves the model from N such processes (`ModelPool`), the batcher running up to N batches at once,
each on a free process: one HTTP process keeps what every request must see alike (request ids, feedback and A/B
counts, the repository and its reloads, the queue), and the model's compute is spread over the processes.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import queue
import signal
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from scaleforge.errors import UsageError
from scaleforge.processes import ParentDeathGuard
from scaleforge.runs import UNTRUSTED, Trust


class WorkerDied(Exception):
    """The model's process exited while running a batch (it has been started again)."""


class ModelFailed(Exception):
    """The model raised on a batch; the message is its error, in one line."""


class ModelProcess:
    """The run at `path` served by a child process on `device` with `threads` torch threads. Calling it with a
    batch of instances returns their answers (`ServedModel.answer`), from the model thread."""

    def __init__(
        self,
        path: str,
        device: str,
        threads: int,
        batch_size: int,
        *,
        time_batches: bool = False,
        timed_batches: list[tuple[int, float]] | None = None,
        hung_s: float = 60.0,
        trust: Trust = UNTRUSTED,
    ) -> None:
        """`threads` 0: chosen by timing a batch of `batch_size` (`ServedModel.choose_threads`); with
        `time_batches`, batches of 1 and `batch_size` are timed too (`timed_batches`, unless given). A batch
        not answered within `hung_s` is taken for hung: the process is killed and started again. The process is
        started here and not waited for: `wait_ready` does that (`ModelPool` starts several, then waits)."""
        self.hung_s = hung_s
        self.path, self.device, self.threads, self.batch_size = path, device, threads, batch_size
        self.time_batches = time_batches
        self.trust = trust  # how the child opens the run
        self.timed_batches: list[tuple[int, float]] = list(timed_batches or [])
        self.load_seconds = 0.0
        self._launch()

    def _start(self) -> None:
        self._launch()
        self.wait_ready()

    def _launch(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked locks or threads
        self._conn, child = context.Pipe()
        # a restart keeps the threads chosen and the batches timed at the first start
        time_batches = self.time_batches and not self.timed_batches
        # SIGKILL when the server dies: it ignores SIGTERM, and nobody is left to answer. Started from the main
        # thread, and restarted from the model's thread, which lives until the server has drained (the process
        # has nothing left to do after that).
        guard = ParentDeathGuard(signal.SIGKILL)
        self.process = context.Process(
            target=_work,
            args=(guard, child, self.path, self.device, self.threads, self.batch_size, time_batches, self.trust),
            name="scaleforge-model",
            daemon=True,
        )
        self.process.start()
        child.close()

    def wait_ready(self) -> None:
        """Wait for the started process to load the model; a usage error, the process ended, if it could not."""
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            code = self.process.exitcode
            raise UsageError(f"the model's process exited while loading {self.path} (code {code})") from None
        if status == "error":
            self.process.join(timeout=10)
            raise UsageError(value)
        self.load_seconds, self.threads, timed = value
        self.timed_batches = self.timed_batches or timed

    def __call__(self, instances: list[np.ndarray]) -> list[dict[str, Any]]:
        if not self.process.is_alive():  # it died between batches: this one has not reached it
            self._restart()
        try:
            self._conn.send(instances)
            if not self._conn.poll(self.hung_s):
                self.process.kill()
                self._restart()
                raise WorkerDied(
                    f"the model's process did not answer this batch within --batch-timeout-s {self.hung_s:g}; "
                    "it was restarted"
                )
            status, value = self._conn.recv()
        except (EOFError, OSError):
            code = self._restart()
            raise WorkerDied(f"the model's process exited (code {code}) running this batch; it was restarted") from None
        if status == "error":
            raise ModelFailed(value)
        return value

    def _restart(self) -> int | None:
        """End what is left of the process and start a new one; the old one's exit code."""
        self._end(timeout_s=10)
        code = self.process.exitcode
        try:
            self._start()
        except UsageError as error:  # the next batch tries again
            raise WorkerDied(f"the model's process exited (code {code}) and could not be restarted: {error}") from None
        return code

    def close(self) -> None:
        """End the process once it has answered its batch (the server has drained)."""
        self.ask_to_end()
        self._end(timeout_s=30)

    def ask_to_end(self) -> None:
        """Tell the process to exit once it has answered its batch (again: no harm)."""
        with contextlib.suppress(OSError):
            self._conn.send(None)

    def kill(self) -> None:
        """End the process now, whatever it is doing."""
        self._end(timeout_s=0)

    def _end(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the process to exit, kill it if it has not (it ignores SIGTERM), and
        close the pipe."""
        self.process.join(timeout=timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()


class ModelPool:
    """The run at `path` served by `count` model processes (`ModelProcess`), loading at once. Called with a batch
    from up to `count` threads at once (the batcher's, `Batcher(parallel=count)`), it runs each on a free process.
    `batches[i]` counts the batches process `i` has answered."""

    def __init__(
        self,
        count: int,
        path: str,
        device: str,
        threads: int,
        batch_size: int,
        *,
        time_batches: bool = False,
        timed_batches: list[tuple[int, float]] | None = None,
        hung_s: float = 60.0,
        trust: Trust = UNTRUSTED,
    ) -> None:
        """`threads` 0: for one process, chosen by timing as `ModelProcess` does; for several, the CPU's cores
        shared out (at least one each) on a CPU, where a process timing its own threads would take every core as
        if alone, and one each on a GPU, whose work is not theirs. With `time_batches`, the first process times
        batches of 1 and `batch_size` (`timed_batches`, unless given)."""
        if count < 1:
            raise ValueError(f"a pool of {count} processes")
        if not threads and count > 1:
            from scaleforge.serve.model import cpu_cores  # torch's: loaded by the server already

            threads = max(1, cpu_cores() // count) if device.startswith("cpu") else 1
        self.processes: list[ModelProcess] = []
        try:
            for index in range(count):
                self.processes.append(
                    ModelProcess(
                        path,
                        device,
                        threads,
                        batch_size,
                        time_batches=time_batches and index == 0,
                        timed_batches=timed_batches,
                        hung_s=hung_s,
                        trust=trust,
                    )
                )
                if time_batches and index == 0:  # its batches timed before the others load beside it
                    self.processes[0].wait_ready()
            for process in self.processes[1 if time_batches else 0 :]:
                process.wait_ready()
        except BaseException:
            for process in self.processes:
                process.kill()  # loading still, or failed: nothing to finish
            raise
        first = self.processes[0]
        self.threads, self.timed_batches = first.threads, first.timed_batches
        self.load_seconds = max(process.load_seconds for process in self.processes)
        self.batches = [0] * count
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(count):
            self._free.put(index)

    def __call__(self, instances: list[np.ndarray]) -> list[dict[str, Any]]:
        index = self._free.get()  # the batcher runs at most `count` batches at once: one is free
        try:
            answers = self.processes[index](instances)
            self.batches[index] += 1
            return answers
        finally:
            self._free.put(index)

    def close(self) -> None:
        """End every process once it has answered its batch (the server has drained), all at once."""
        for process in self.processes:
            process.ask_to_end()
        for process in self.processes:
            process.close()


def _work(
    guard: ParentDeathGuard,
    conn: Connection,
    path: str,
    device: str,
    threads: int,
    batch_size: int,
    time_batches: bool,
    trust: Trust,
) -> None:
    """The child process: load the model, then answer batches until the pipe says stop or closes."""
    guard()
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):  # the server is gone: so is this
        _answer_batches(conn, path, device, threads, batch_size, time_batches, trust)


def _answer_batches(
    conn: Connection, path: str, device: str, threads: int, batch_size: int, time_batches: bool, trust: Trust
) -> None:
    # the server drains on these and then closes the pipe; dying first would drop the batch in flight
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from scaleforge.serve.model import ServedModel

    try:
        model = ServedModel(path, device, trust=trust)
        threads, timed = model.prepare(threads, batch_size, time_batches=time_batches)
    except Exception as error:  # noqa: BLE001 - told to the server, which reports it and exits
        conn.send(("error", _one_line(error)))
        return
    freeze_garbage()
    conn.send(("ready", (model.load_seconds, threads, timed)))
    while (batch := conn.recv()) is not None:
        try:
            answers = model.answer(batch)
        except Exception as error:  # noqa: BLE001 - the batch fails, the process goes on
            conn.send(("error", f"{type(error).__name__}: {_one_line(error)}"))
            continue
        conn.send(("ok", answers))


def freeze_garbage() -> None:
    """Leave what loading made (torch, the model, FastAPI: some 200,000 objects) out of the cyclic garbage
    collector's full passes, here and in the server: each would stop the process for about 100 ms, a latency
    spike for every request in flight; with them frozen a full pass takes well under a millisecond."""
    gc.collect()
    gc.freeze()


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
