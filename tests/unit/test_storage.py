"""Tests for scaleforge.data.storage's upkeep: verification stamps older than STAMP_DAYS are removed, at most once
a day."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from scaleforge.data.storage import DAY_S, STAMP_DAYS, ShardStore, remove_old_stamps, stamp_folder


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
