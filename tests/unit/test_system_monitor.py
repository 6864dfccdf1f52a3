"""The system figures' resident memory: the kernel's figure, and a forked process's own."""

from __future__ import annotations

import multiprocessing
import os

import psutil
import pytest

from scaleforge.training.monitoring import resident_bytes

MIB = 2**20


def _child_growth(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    before = resident_bytes()
    held = bytearray(os.urandom(1)) * (256 * MIB)  # touched: resident in this process only
    queue.put(resident_bytes() - before)
    del held


def test_resident_memory_is_the_kernels_figure() -> None:
    assert abs(resident_bytes() - psutil.Process().memory_info().rss) < 8 * MIB


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_process_reads_its_own_resident_memory() -> None:
    resident_bytes()  # the file is open in this process before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_growth, args=(queue,))
    child.start()
    growth = queue.get(timeout=60)
    child.join(timeout=60)
    assert growth > 200 * MIB  # about 0 had it read this process's file
