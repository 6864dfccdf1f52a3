"""Files on this machine: the SHA-256 of a file, and the folder caches are kept in."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
