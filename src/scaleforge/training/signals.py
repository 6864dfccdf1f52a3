"""Stopping on SIGTERM or SIGINT (preemption, Ctrl-C) at the next step boundary, with a checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; the CLI exits with 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequest:
    """Records the first SIGTERM or SIGINT instead of dying on it; a second SIGINT interrupts at once, unless
    `patient` (a worker under the launcher: Ctrl-C reaches it both from the terminal and from the launcher)."""

    def __init__(self, patient: bool = False) -> None:
        self.signum: int | None = None
        self.patient = patient

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT and not self.patient:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the signals while the block runs (in the main thread only, where Python delivers them)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
