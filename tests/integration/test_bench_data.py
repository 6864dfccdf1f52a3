"""`scaleforge bench data` from the CLI on a few tiny drawn images: every source is read (the object store is moto's
S3 server, started and stopped by the benchmark), the training and memory runs finish, and the table, JSON and
plot say so. Speed is never asserted (the figures depend on the machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from scaleforge.bench.data import moto_available
from tests.integration.test_bench_distributed import PNG_MAGIC, table_rows

TINY = ["model.architecture=cnn", "training.batch_size=32", "--images", "200", "--image-px", "16"]
TINY += ["--repeats", "1", "--steps", "2"]


@pytest.mark.skipif(not moto_available(), reason="needs moto's S3 server")
@pytest.mark.timeout(180)
@pytest.mark.slow
def test_bench_data_reads_every_source_and_reports_throughput_data_wait_and_memory(cli, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    endpoint_before = os.environ.get("AWS_ENDPOINT_URL")
    result = cli("bench", "data", *TINY, "--object-store", "--out", str(out))
    assert result.code == 0, result.err
    assert "Data loading: 200 images at 16 px, batch 32, 2 workers, median of 1; training cnn for 2 steps" in result.out
    rows = {row[0]: row for row in table_rows(result.out)}
    assert list(rows) == [
        "torchvision ImageFolder",
        "scaleforge image_folder",
        "shards on disk",
        "shards in the object store, cold cache",
        "shards in the object store, warm cache",
        "shards, 1x the data (training)",
        "shards, 8x the data (training)",
    ]
    assert rows["torchvision ImageFolder"][5] == "1.00x" and rows["shards, 8x the data (training)"][1] == "1,280"
    assert "repeat 1/1, shards in the object store, cold cache:" in result.err
    assert "moto at http://127.0.0.1:" in result.err

    saved = json.loads((out / "data.json").read_text())
    loaders = {row["source"]: row for row in saved["loaders"]}
    assert list(loaders) == ["torchvision", "image_folder", "shards_disk", "shards_store", "shards_store_warm"]
    assert loaders["torchvision"]["samples"] == 200  # the whole folder; the others read their training split
    assert all(row["samples"] == 160 // 32 * 32 for name, row in loaders.items() if name != "torchvision")
    assert all(row["samples_per_s"] > 0 and row["mb_per_s"] > 0 for row in loaders.values())
    for run in saved["training"].values():
        assert run["steps"] == 2 and 0 <= run["data_wait_share"] < 1 and run["samples_per_s"] > 0
        assert 0 < run["peak_pss_anon_mib"] <= run["peak_rss_anon_mib"]  # shared pages counted once, not per process
    memory = saved["memory"]
    assert [row["scale"] for row in memory["rows"]] == [1, 8] and [row["samples"] for row in memory["rows"]] == [
        160,
        1280,
    ]
    for row in memory["rows"]:
        # the training process and its two loader workers, at least
        assert row["processes"] >= 3 and row["peak_rss_anon_mib"] > 0
        assert sum(row["each_mib"]) == pytest.approx(row["peak_rss_anon_mib"], abs=1)
    assert len(saved["targets"]) == 5 and all(
        ("(met)" in text or "(not met)" in text) for text in saved["targets"].values()
    )
    assert (out / "data.png").read_bytes().startswith(PNG_MAGIC)
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint_before  # the store's settings are taken back
    left = [" ".join(child.cmdline()) for child in psutil.Process().children(recursive=True)]
    assert not [command for command in left if "moto" in command], left  # the store's server is gone


def test_bench_data_refuses_a_missing_image_folder_before_any_work(cli, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = cli("bench", "data", "data.dataset=image_folder", f"data.path={missing}", "--out", str(tmp_path / "b"))
    assert result.code == 2
    assert f"data.path: {missing} is not a folder" in result.err
    assert not (tmp_path / "b").exists()
