"""Tests for scaleforge.data.prepare's staging: what a killed prepare left beside its destination is removed by the
next one (a prepare in progress is left alone)."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from scaleforge.data.prepare import STAGING_PREFIX, PrepareOptions, prepare
from scaleforge.files import OWNER

pytest.importorskip("datasets")


def write_table(path: Path) -> Path:
    rows = [f"{i % 7},{i % 5},{i % 2}" for i in range(40)]
    path.write_text("\n".join(["a,b,target", *rows]) + "\n")
    return path


def staging(parent: Path, name: str) -> Path:
    """A staging folder as a prepare leaves it: its owner file written, some shards in it."""
    folder = parent / f"{STAGING_PREFIX}{name}"
    (folder / "out" / "train").mkdir(parents=True)
    (folder / "out" / "train" / "data-00000-of-00001.arrow").write_bytes(b"x" * 1000)
    (folder / OWNER).write_text("12345\n")
    return folder


def test_a_prepare_removes_the_staging_of_a_killed_one_and_leaves_one_in_progress(tmp_path: Path) -> None:
    killed, running = staging(tmp_path, "killed"), staging(tmp_path, "running")
    with open(running / OWNER) as owner:  # the lock a prepare holds for as long as it runs
        fcntl.flock(owner, fcntl.LOCK_EX)
        prepare(str(write_table(tmp_path / "table.csv")), str(tmp_path / "out"), PrepareOptions(workers=1))
        assert not killed.exists() and running.is_dir()
    assert (tmp_path / "out" / "shards.json").is_file()
    assert sorted(path.name for path in tmp_path.glob(f"{STAGING_PREFIX}*")) == [running.name]  # its own: gone
