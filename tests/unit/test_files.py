"""Tests for scaleforge.files: scratch folders and files that a killed process left are told from ones in use by
their owner's lock."""

from __future__ import annotations

import fcntl
from pathlib import Path

from scaleforge.files import OWNER, owned_folder, remove_abandoned, remove_unless_locked

PREFIX = ".scratch-"


def abandoned(parent: Path, name: str, owner: str | None = "12345\n") -> Path:
    """A folder as `owned_folder` leaves it when its process is killed: the owner file written, no lock held."""
    folder = parent / f"{PREFIX}{name}"
    (folder / "part").mkdir(parents=True)
    (folder / "part" / "shard.arrow").write_bytes(b"x" * 100)
    if owner is not None:
        (folder / OWNER).write_text(owner)
    return folder


def test_only_a_folder_whose_owner_is_gone_is_removed(tmp_path: Path) -> None:
    dead = abandoned(tmp_path, "dead")
    unrecorded = abandoned(tmp_path, "unrecorded", owner="")  # its process between making it and locking it
    foreign = abandoned(tmp_path, "foreign", owner=None)
    with owned_folder(tmp_path, PREFIX) as live:
        (live / "shard.arrow").write_bytes(b"y")
        assert remove_abandoned(tmp_path, PREFIX) == [dead]
        assert live.is_dir() and unrecorded.is_dir() and foreign.is_dir() and not dead.exists()
    assert not live.exists()  # its own folder, removed on leaving


def test_an_owned_folder_is_removed_on_an_error_too(tmp_path: Path) -> None:
    try:
        with owned_folder(tmp_path, PREFIX) as folder:
            raise RuntimeError("failed")
    except RuntimeError:
        pass
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_a_file_is_removed_unless_its_lock_is_held(tmp_path: Path) -> None:
    (tmp_path / "free").write_text("x")
    (tmp_path / "held").write_text("x")
    with open(tmp_path / "held.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert not remove_unless_locked(tmp_path / "held", tmp_path / "held.lock")
    assert remove_unless_locked(tmp_path / "free", tmp_path / "free.lock")
    assert (tmp_path / "held").exists() and not (tmp_path / "free").exists()
