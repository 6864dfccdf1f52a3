"""The shard cache's upkeep: verification stamps older than STAMP_DAYS are removed, at most once a day; and its
locks, released for other readers as soon as a reader is done with a file, even while a process forked meanwhile
(a data loader's worker) holds its copy of the locked file open."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from scaleforge.data.storage import DAY_S, STAMP_DAYS, ShardStore, lock_of, remove_old_stamps, stamp_folder
from scaleforge.files import flocked, remove_unless_locked


def stamps(folder: Path, **ages_in_days: float) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, age in ages_in_days.items():
        path = folder / name
        path.write_text("verified")
        then = time.time() - age * DAY_S
        os.utime(path, (then, then))
        made[name] = path
    return made


def test_old_stamps_are_removed_at_most_once_a_day(tmp_path: Path) -> None:
    made = stamps(tmp_path, old=STAMP_DAYS + 1, fresh=1)
    assert remove_old_stamps(tmp_path) == 1
    assert not made["old"].exists() and made["fresh"].exists()
    again = stamps(tmp_path, older=STAMP_DAYS + 2)
    assert remove_old_stamps(tmp_path) == 0 and again["older"].exists()  # swept less than a day ago
    yesterday = time.time() - DAY_S - 60
    os.utime(tmp_path / ".swept", (yesterday, yesterday))
    assert remove_old_stamps(tmp_path) == 1 and not again["older"].exists()


def test_no_stamps_yet_is_nothing_to_do(tmp_path: Path) -> None:
    assert remove_old_stamps(tmp_path / "absent") == 0 and not (tmp_path / "absent").exists()


def test_opening_a_store_sweeps_the_stamps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    made = stamps(stamp_folder(), old=STAMP_DAYS + 1, fresh=0)
    (tmp_path / "shards").mkdir()
    ShardStore(str(tmp_path / "shards"))
    assert not made["old"].exists() and made["fresh"].exists()


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


def test_a_cached_shard_is_hashed_once_however_often_it_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from scaleforge.data import storage

    content = b"rows of a shard"
    sha = hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(ShardStore, "_download", lambda self, name, path, client: path.write_bytes(content))
    hashed = []
    monkeypatch.setattr(storage, "sha256_of", lambda path: hashed.append(path) or sha)
    for _ in range(3):  # each a loader worker of its own: a store that has seen no stamp
        store = ShardStore("s3://bucket/data", cache_dir=str(tmp_path / "cache"), cache_limit=1 << 20)
        assert store.open("train/shard.arrow", len(content), sha, lambda path: path.read_bytes()) == content
    assert len(hashed) == 1  # opening marks the file as recently used without changing what its stamp is keyed by


def test_a_size_to_reach_is_rounded_up() -> None:
    from scaleforge.data.storage import format_size

    assert format_size(6_010_000) == "6.0 MB" and format_size(6_010_000, up=True) == "6.1 MB"
    assert format_size(6_000_000, up=True) == "6.0 MB" and format_size(999.5, up=True) == "1000 B"
