"""Tests for scaleforge.data.prepare's staging: what a killed prepare left beside its destination is removed by the
next one (a prepare in progress is left alone), and a full disk is one data error that leaves nothing behind."""

from __future__ import annotations

import errno
import fcntl
import tempfile
from pathlib import Path

import pytest

from scaleforge.data import prepare as prepare_module
from scaleforge.data import storage
from scaleforge.data.prepare import STAGING_PREFIX, PrepareOptions, prepare
from scaleforge.errors import DataError
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


def full_disk(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_data_error_and_the_staging_folder_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_module._Writer, "save", full_disk)
    with pytest.raises(DataError, match=f"{tmp_path}: no space left on its disk .*; free space there"):
        prepare(str(write_table(tmp_path / "table.csv")), str(tmp_path / "out"), PrepareOptions(workers=1))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["table.csv"]


def test_an_object_store_prepare_stages_in_tmpdir_and_removes_it_on_success_and_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp, source = tmp_path / "tmp", write_table(tmp_path / "table.csv")
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(storage, "check_destination", lambda url, overwrite: None)
    uploaded: list[str] = []
    monkeypatch.setattr(prepare_module, "upload_folder", lambda folder, url: uploaded.extend(
        sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.json"))))  # fmt: skip
    killed = staging(temp, "killed")
    prepare(str(source), "s3://bucket/table", PrepareOptions(workers=1))
    assert "shards.json" in uploaded and not killed.exists() and list(temp.iterdir()) == []
    monkeypatch.setattr(prepare_module._Writer, "save", full_disk)
    with pytest.raises(DataError, match=f"{temp}: no space left on its disk .*; set TMPDIR to a folder"):
        prepare(str(source), "s3://bucket/table", PrepareOptions(workers=1))
    assert list(temp.iterdir()) == []
