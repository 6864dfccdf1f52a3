"""Files on this machine: the SHA-256 of a file, the folder caches are kept in, and the scratch folders and files
that a process killed outright (SIGKILL, a lost node) leaves behind, found by their owner's lock and removed."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

OWNER = ".owner"  # in a scratch folder: the file its process holds locked while the folder is in use


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_home(name: str) -> Path:
    """`$XDG_CACHE_HOME/scaleforge/<name>`, or `~/.cache/scaleforge/<name>` when the variable is not set."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scaleforge" / name


@contextmanager
def owned_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder `parent/<prefix>...`, removed on exit. While it is in use its process holds the lock of the
    folder's owner file, so that `remove_abandoned` can tell a folder whose process was killed from one in use."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        with open(folder / OWNER, "w") as owner, flocked(owner):
            owner.write(f"{os.getpid()}\n")  # written under the lock: an empty owner file is one not yet locked
            owner.flush()
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders `owned_folder(parent, prefix)` made whose process has died (the owner file is written
    and no longer locked); the folders removed. A folder in use, or one whose owner file is not yet written (being
    made this instant), is left alone."""
    removed = []
    for folder in sorted(parent.glob(f"{prefix}*")):
        try:
            handle = os.open(folder / OWNER, os.O_RDONLY)  # never created here: a new folder's is its process's
        except OSError:
            continue
        with os.fdopen(handle) as owner, flocked(owner, wait=False) as held:
            if held and owner.read():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def remove_unless_locked(path: Path, lock_path: Path) -> bool:
    """Remove `path` unless another process holds `lock_path` (writing, downloading or opening the file); whether
    it did."""
    with open(lock_path, "a") as lock, flocked(lock, wait=False) as held:
        if held:
            path.unlink(missing_ok=True)
    return held


@contextmanager
def flocked(file: IO[Any], *, wait: bool = True) -> Iterator[bool]:
    """`file` locked (flock, exclusive) for the block: whether it was, which is always so when `wait`. The lock is
    released explicitly before the file is closed: it belongs to the open file description, which a process forked
    meanwhile (a data loader's worker, while another thread holds a lock) shares, so closing this process's
    descriptor alone would leave the file locked for as long as that process lives."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(file, fcntl.LOCK_UN)
