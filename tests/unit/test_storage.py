"""The shard cache's locks: released for other readers as soon as a reader is done with a file, even while a
process forked meanwhile (a data loader's worker) holds its copy of the locked file open."""

from __future__ import annotations

import os
from pathlib import Path

from scaleforge.data.storage import flocked, lock_of, remove_unless_locked


def test_a_lock_is_released_while_a_process_forked_under_it_still_holds_the_file_open(tmp_path: Path) -> None:
    cached = tmp_path / "shard.arrow"
    cached.write_bytes(b"rows")
    read_end, write_end = os.pipe()
    with open(lock_of(cached), "a") as lock, flocked(lock):
        assert not remove_unless_locked(cached, lock_of(cached))  # held: eviction passes over the file
        child = os.fork()
        if child == 0:  # keeps its copy of the locked file open until the test lets it go
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
    os.close(read_end)
    try:
        assert remove_unless_locked(cached, lock_of(cached)) and not cached.exists()
    finally:
        os.close(write_end)
        os.waitpid(child, 0)
