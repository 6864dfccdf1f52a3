"""Datasets prepared as shards with `scaleforge data prepare`: images, a table and text train from them as from their
sources; the order of the samples does not depend on the number of loader workers or processes; a sorted source
still gives mixed batches; and every kind of damage is one `data error:` line."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleforge.data.loading import windowed_permutation
from scaleforge.data.shards import shards
from scaleforge.network import free_port
from tests.conftest import run_subprocess
from tests.integration.distributed_runs import TOLERANCE, max_difference, read_weights

QUIET = ["logging.progress=plain", "logging.tensorboard=false", "logging.plot=false", "hardware.threads=1"]
IMAGES = ["data.dataset=shards", "data.image_size=8", "data.channels=1", "training.batch_size=32", *QUIET]


def write_digit_pngs(root: Path) -> Path:
    """scikit-learn's digits as 8-pixel PNGs in class folders (a class-sorted source)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image / 16 * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_pngs(tmp_path_factory.mktemp("digits") / "images")


@pytest.fixture(scope="module")
def digit_shards(digit_folder: Path) -> Path:
    out = digit_folder.parent / "shards"
    result = run_subprocess("data", "prepare", str(digit_folder), "--out", str(out), "--shard-size", "40kB")
    assert result.code == 0, result.err
    assert "train from it with: data.dataset=shards" in result.out
    return out


def test_prepare_writes_an_index_that_lists_every_shard_and_hugging_face_datasets_opens_it(
    digit_shards: Path, cli
) -> None:
    import datasets

    manifest = json.loads((digit_shards / "shards.json").read_text())
    assert manifest["kind"] == "images" and manifest["images"]["class_names"] == [str(i) for i in range(10)]
    train = manifest["splits"]["train"]
    assert len(train["shards"]) >= 8 and train["rows"] + manifest["splits"]["val"]["rows"] == 1797
    for shard in train["shards"]:
        assert (digit_shards / shard["file"]).stat().st_size == shard["bytes"]
    opened = datasets.load_from_disk(str(digit_shards / "train"))
    assert len(opened) == train["rows"] and opened.features["label"].names == manifest["images"]["class_names"]
    result = cli("data", "show", str(digit_shards))
    assert result.code == 0 and "1438" in result.out and "shards" in result.out
    again = cli("data", "prepare", str(digit_shards.parent / "images"), "--out", str(digit_shards))
    assert again.code == 2 and "already exists" in again.err


def test_images_train_from_shards_as_from_their_folder(digit_folder: Path, digit_shards: Path, tmp_path: Path) -> None:
    common = ["data.image_size=8", "data.channels=1", "training.epochs=3", "data.augment=false", *QUIET]
    from_shards = run_subprocess(
        "train", *common, "data.dataset=shards", f"data.path={digit_shards}", "--run-dir", str(tmp_path / "shards")
    )
    from_folder = run_subprocess(
        "train",
        *common,
        "data.dataset=image_folder",
        f"data.path={digit_folder}",
        "--run-dir",
        str(tmp_path / "folder"),
    )
    assert from_shards.code == 0 and from_folder.code == 0, from_shards.err + from_folder.err
    accuracy = {
        name: json.loads((tmp_path / name / "summary.json").read_text())["val_accuracy"]
        for name in ("shards", "folder")
    }
    assert accuracy["shards"] > 0.85 and abs(accuracy["shards"] - accuracy["folder"]) < 0.05, accuracy


def test_a_table_and_text_train_from_their_shards(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    header = ",".join([f"p{i}" for i in range(64)] + ["target"])
    rows = [",".join([*map(str, x.astype(int)), str(y)]) for x, y in zip(digits.data, digits.target, strict=True)]
    (tmp_path / "digits.csv").write_text("\n".join([header, *rows]) + "\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * (200 + 100 * i))
    for source, out, *flags in ((tmp_path / "digits.csv", "table"), (corpus, "text", "--tokenizer", "bpe")):
        result = run_subprocess(
            "data", "prepare", str(source), "--out", str(tmp_path / out), "--shard-size", "8kB", *flags
        )
        assert result.code == 0, result.err
    table = run_subprocess(
        "train",
        "data.dataset=shards",
        f"data.path={tmp_path / 'table'}",
        "training.epochs=3",
        *QUIET,
        "--run-dir",
        str(tmp_path / "table-run"),
    )
    text = run_subprocess(
        "train",
        "data.dataset=shards",
        f"data.path={tmp_path / 'text'}",
        "data.seq_len=32",
        "model.architecture=gpt",
        "model.n_layers=1",
        "model.d_model=32",
        "model.n_heads=2",
        "training.max_steps=30",
        "training.learning_rate=0.01",
        *QUIET,
        "--run-dir",
        str(tmp_path / "text-run"),
    )
    assert table.code == 0 and text.code == 0, table.err + text.err
    table_summary = json.loads((tmp_path / "table-run" / "summary.json").read_text())
    assert table_summary["val_accuracy"] > 0.9
    text_summary = json.loads((tmp_path / "text-run" / "summary.json").read_text())
    saved = json.loads((tmp_path / "text-run" / "final" / "tokenizer.json").read_text())
    assert saved["kind"] == "bpe" and saved == json.loads((tmp_path / "text" / "tokenizer.json").read_text())
    assert 0 < text_summary["val_bits_per_byte"] < 8
    assert text_summary["val_loss"] < 3.0  # far below a uniform guess over bytes (5.5)
    small = run_subprocess(
        "train", "data.dataset=shards", f"data.path={tmp_path / 'text'}", "model.architecture=gpt",
        "model.vocab_size=300", *QUIET, "--run-dir", str(tmp_path / "small-run"),
    )  # fmt: skip
    assert small.code == 2 and len(small.err.strip().splitlines()) == 1
    assert small.err.startswith(f"data error: the tokenizer {tmp_path / 'text' / 'tokenizer.json'} has")
    assert "more than the model's vocabulary (model.vocab_size=300)" in small.err


def test_batches_from_a_class_sorted_source_mix_classes_within_the_shuffle_window(digit_shards: Path) -> None:
    manifest = json.loads((digit_shards / "shards.json").read_text())
    sizes = [shard["rows"] for shard in manifest["splits"]["train"]["shards"]]
    labels = np.concatenate(
        [
            np.asarray(__import__("datasets").Dataset.from_file(str(digit_shards / s["file"]))["label"])
            for s in manifest["splits"]["train"]["shards"]
        ]
    )
    assert (np.diff(labels) >= 0).all(), "the shards are written in the source's class order"

    def classes_per_batch(window: int) -> float:
        order = windowed_permutation(sizes, window, seed=0, epoch=0).numpy()
        assert sorted(order.tolist()) == list(range(len(labels)))  # every sample once
        batches = labels[order[: len(order) // 32 * 32]].reshape(-1, 32)
        return float(np.mean([len(np.unique(batch)) for batch in batches]))

    assert classes_per_batch(1) < 2.5  # one shard at a time: nearly one class per batch
    assert classes_per_batch(600) > 6  # windows of several shards: mixed
    assert classes_per_batch(len(labels)) > 8
    splits = shards(str(digit_shards), image_size=8, channels=1, shuffle_window=600)
    assert splits.train.shuffle_window == 600 and splits.train.shard_sizes == sizes


def test_the_order_does_not_depend_on_the_number_of_loader_workers(digit_shards: Path, tmp_path: Path) -> None:
    losses = {}
    for workers in (0, 2):
        run_dir = tmp_path / f"workers-{workers}"
        result = run_subprocess(
            "train",
            *IMAGES,
            f"data.path={digit_shards}",
            "data.shuffle_window=300",
            f"data.num_workers={workers}",
            "training.max_steps=12",
            "logging.every_steps=1",
            "--run-dir",
            str(run_dir),
        )
        assert result.code == 0, result.err
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        losses[workers] = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    assert len(losses[0]) == 12 and losses[0] == losses[2]  # augmented (random crops) and shuffled alike, bit for bit


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(1, 2), (2, 1)], ids=["1-to-2", "2-to-1"])
def test_a_run_on_shards_resumes_on_another_number_of_processes(
    digit_shards: Path, tmp_path: Path, first: int, then: int
) -> None:
    run = [
        *IMAGES,
        f"data.path={digit_shards}",
        "data.augment=false",
        "data.shuffle_window=400",
        "training.max_steps=24",
        "training.optimizer=sgd",
        "model.dropout_rate=0",
        "checkpoint.every_steps=10",
    ]

    def launch(nproc: int, run_dir: Path, *flags: str) -> None:
        launch_flags = ["--nproc", str(nproc), "parallel.strategy=ddp"] if nproc > 1 else []
        result = run_subprocess("train", *run, *launch_flags, "--run-dir", str(run_dir), *flags, timeout=300)
        assert result.code == 0, result.err

    launch(1, tmp_path / "reference")
    launch(first, tmp_path / "first")
    launch(then, tmp_path / "resumed", "--resume", str(tmp_path / "first" / "checkpoints" / "step-00000010"))
    assert max_difference(read_weights(tmp_path / "reference"), read_weights(tmp_path / "resumed")) <= TOLERANCE


def damaged_copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_damaged_shards_are_one_data_error_line_naming_the_file(digit_shards: Path, tmp_path: Path) -> None:
    manifest = json.loads((digit_shards / "shards.json").read_text())
    first = manifest["splits"]["train"]["shards"][3]["file"]

    missing = damaged_copy(digit_shards, tmp_path / "missing")
    (missing / first).unlink()
    corrupt = damaged_copy(digit_shards, tmp_path / "corrupt")
    data = bytearray((corrupt / first).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / first).write_bytes(bytes(data))
    miscounted = damaged_copy(digit_shards, tmp_path / "miscounted")
    wrong = json.loads((miscounted / "shards.json").read_text())
    wrong["splits"]["train"]["rows"] += 1
    (miscounted / "shards.json").write_text(json.dumps(wrong))
    outside = damaged_copy(digit_shards, tmp_path / "outside")
    escape = json.loads((outside / "shards.json").read_text())
    escape["splits"]["train"]["shards"][0]["file"] = "../../../../etc/passwd"  # a manifest never names a path
    (outside / "shards.json").write_text(json.dumps(escape))
    no_stats = damaged_copy(digit_shards, tmp_path / "no-stats")
    lacking = json.loads((no_stats / "shards.json").read_text())
    del lacking["images"]["stats"]["grey"]
    (no_stats / "shards.json").write_text(json.dumps(lacking))
    a_list = damaged_copy(digit_shards, tmp_path / "a-list")
    (a_list / "shards.json").write_text("[]")
    not_prepared = tmp_path / "empty"
    not_prepared.mkdir()
    from scaleforge.errors import DataError

    found_while_building = {
        miscounted: "not a valid shard index (the train split's shards do not add up to its rows)",
        not_prepared: "has no shards.json",
        outside: "file name '../../../../etc/passwd' is not a relative path inside the dataset",
        no_stats: "not a valid shard index (no images.stats.grey.mean)",
        a_list: "not a valid shard index",
    }
    for path, message in found_while_building.items():
        with pytest.raises(DataError, match=re.escape(message)):
            shards(str(path), image_size=8, channels=1)
    # found by the data loader's worker that reads the shard, and reported by the run as one line
    cases = {
        missing: f"{first}: shard file missing",
        corrupt: f"{first}: shard file does not match the manifest",
        miscounted: "not a valid shard index",
    }
    for path, message in cases.items():
        result = run_subprocess(
            "train",
            *IMAGES,
            f"data.path={path}",
            "data.num_workers=1",
            "training.max_steps=40",
            "--run-dir",
            str(tmp_path / f"run-{path.name}"),
        )
        assert result.code == 2, (path.name, result.err[-2000:])
        lines = result.err.strip().splitlines()
        assert lines[-1].startswith("data error:") and message in lines[-1], (path.name, result.err[-2000:])
        assert "Traceback" not in result.err


def test_settings_of_another_kind_are_refused_and_samples_read_as_the_model_takes_them(digit_shards: Path) -> None:
    from scaleforge.errors import ConfigError

    with pytest.raises(ConfigError, match="data.seq_len: does not apply"):
        shards(str(digit_shards), seq_len=16)
    assert len(shards(str(digit_shards)).train) == 1438
    first = shards(str(digit_shards), image_size=8, channels=1).train
    image, label = first[0]
    assert image.shape == (1, 8, 8) and label.dtype == torch.int64


# ------------------------------------------------------------------------------------------------ object storage


@pytest.fixture(scope="module")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server (moto's) on 127.0.0.1, with a bucket `data`; its endpoint is given to every
    process as a user gives it, through AWS_ENDPOINT_URL and the standard credential variables."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path_factory.mktemp("moto") / "server.log").open("w"),
    )
    settings = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="data")
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield settings["AWS_ENDPOINT_URL"]
    finally:
        server.kill()
        server.wait()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def remote_shards(object_store: str, digit_folder: Path) -> str:
    url = "s3://data/digits"
    result = run_subprocess("data", "prepare", str(digit_folder), "--out", url, "--shard-size", "40kB")
    assert result.code == 0, result.err
    return url


def remote_run(url: str, cache: Path) -> list[str]:
    # a cache of 300 kB holds 7 of the 8 training shards of 40 kB: two windows of 300 samples, up to 3 shards each
    return [*IMAGES, f"data.path={url}", f"data.cache_dir={cache}", "data.cache_limit=300kB", "data.num_workers=2",
            "data.shuffle_window=300", "training.max_steps=30", "logging.every_steps=1",
            "checkpoint.every_steps=5"]  # fmt: skip


@pytest.mark.slow
def test_a_run_reading_shards_from_an_object_store_killed_mid_epoch_resumes_bitwise(
    remote_shards: str, tmp_path: Path
) -> None:
    from tests.integration.test_resume import assert_bitwise_equal, logged

    reference = tmp_path / "reference"
    result = run_subprocess("train", *remote_run(remote_shards, tmp_path / "cache-1"), "--run-dir", str(reference))
    assert result.code == 0, result.err
    cached = sum(p.stat().st_size for p in (tmp_path / "cache-1").glob("*.arrow"))
    assert 0 < cached <= 300_000

    run_dir, cache = tmp_path / "killed", tmp_path / "cache-2"
    command = [
        sys.executable,
        "-m",
        "scaleforge",
        "train",
        *remote_run(remote_shards, cache),
        "--run-dir",
        str(run_dir),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step 17/"):  # mid-epoch (44 steps make one), two steps after the checkpoint of step 15
            break
    process.kill()
    process.wait()
    (cache / f".{'0' * 64}.arrow.left-by-a-killed-download").write_bytes(b"partial")
    resumed = run_subprocess("train", *remote_run(remote_shards, cache), "--run-dir", str(run_dir))
    assert resumed.code == 0, resumed.err
    assert "resumed at step 15" in resumed.out
    assert_bitwise_equal(reference, run_dir)
    assert logged(run_dir) == logged(reference)
    assert not list(cache.glob(".*.arrow.*")), "a partial download of the killed run was left in the cache"


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "scaleforge-prefetch"]


def all_stopped(threads: list[threading.Thread], within_s: float = 20.0) -> bool:
    for thread in threads:
        thread.join(within_s)
    return not any(thread.is_alive() for thread in threads)


def test_the_next_windows_shards_are_fetched_while_the_reader_is_still_in_the_first(
    remote_shards: str, tmp_path: Path
) -> None:
    from scaleforge.data.loading import BatchPlan, TrainBatches, shard_windows

    cache = tmp_path / "cache"
    train = shards(remote_shards, image_size=8, channels=1, shuffle_window=300, cache_dir=str(cache),
                   cache_limit="300kB").train  # fmt: skip
    cached = {shard.file: cache / f"{shard.sha256}.arrow" for shard in train.reader.shards}  # type: ignore[attr-defined]
    names = [shard.file for shard in train.reader.shards]  # type: ignore[attr-defined]
    windows = [[names[i] for i in window] for window in shard_windows(train.shard_sizes, 300, seed=0, epoch=0)]
    assert len(windows) >= 3
    # no workers: the loader reads a batch only when the loop asks for one, so while the loop holds its first step,
    # nothing but the prefetcher can fetch a shard
    batches = TrainBatches(train, BatchPlan(32), seed=0, device=torch.device("cpu"), num_workers=0)
    steps = batches.epoch(0)
    next(steps)
    deadline = time.monotonic() + 20
    while not all(cached[name].is_file() for name in windows[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(cached[name].is_file() for name in windows[0] + windows[1]), "the next window was not fetched ahead"
    assert not any(cached[name].is_file() for name in windows[2]), "fetched beyond the next window"
    threads = prefetch_threads()
    assert len(threads) == 1 and threads[0].daemon
    steps.close()  # as a run that stops mid-epoch leaves it
    assert all_stopped(threads), "the prefetcher outlived its epoch"
    assert sum(path.stat().st_size for path in cache.glob("*.arrow")) <= 300_000


def test_training_on_shards_from_an_object_store_with_prefetching_is_bitwise_training_on_them_from_disk(
    remote_shards: str, digit_shards: Path, tmp_path: Path
) -> None:
    losses = {}
    # past the end of the first epoch (44 steps), whose evaluation forks its loader's workers
    for name, path in (("store", remote_shards), ("disk", str(digit_shards))):
        run_dir = tmp_path / name
        run = [*remote_run(path, tmp_path / "cache"), "training.max_steps=50", "--run-dir", str(run_dir)]
        result = run_subprocess("train", *run)
        assert result.code == 0, result.err
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        losses[name] = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    assert len(losses["disk"]) == 50 and losses["store"] == losses["disk"]
    from tests.integration.test_resume import assert_bitwise_equal

    assert_bitwise_equal(tmp_path / "disk", tmp_path / "store")


def test_a_failing_prefetch_leaves_the_reader_to_fetch_the_shard_or_report_it_in_one_line(
    remote_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    from scaleforge.data.loading import BatchPlan, TrainBatches

    # the prefetcher cannot reach the store (its client is made after the endpoint moves away); the reader's client,
    # made as the dataset was built, still can: three windows are read, the reader downloading every shard
    train = shards(remote_shards, image_size=8, channels=1, shuffle_window=300, cache_dir=str(tmp_path / "cache"),
                   cache_limit="300kB").train  # fmt: skip
    closed = free_port()
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    batches = TrainBatches(train, BatchPlan(32), seed=0, device=torch.device("cpu"), num_workers=0)
    steps = batches.epoch(0)
    assert sum(len(step) for step in itertools.islice(steps, 30)) == 30
    steps.close()
    assert all_stopped(prefetch_threads())
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)

    # a dataset whose shards are gone from the store: the prefetcher's downloads fail, then a worker's, which is
    # the run's one line
    client = boto3.client("s3")
    manifest = client.get_object(Bucket="data", Key="digits/shards.json")["Body"].read()
    client.put_object(Bucket="data", Key="no-shards/shards.json", Body=manifest)
    result = run_subprocess("train", *remote_run("s3://data/no-shards", tmp_path / "cache-2"), "--run-dir",
                            str(tmp_path / "run"), timeout=120)  # fmt: skip
    assert result.code == 2, result.err[-2000:]
    last = result.err.strip().splitlines()[-1]
    assert re.fullmatch(r"data error: s3://data/no-shards/train/\S+: not found in the object store \(404\)", last), last
    assert "Traceback" not in result.err


def test_an_unreachable_store_and_a_window_the_cache_cannot_hold_are_one_line_each(
    remote_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    too_small = run_subprocess("train", *IMAGES, f"data.path={remote_shards}", "data.cache_limit=100kB",
                               "data.shuffle_window=500", "--run-dir", str(tmp_path / "small"))  # fmt: skip
    assert too_small.code == 2 and too_small.err.startswith("config error: data.cache_limit: 100.0 kB cannot hold")
    closed = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    unreachable = run_subprocess("train", *IMAGES, f"data.path={remote_shards}", "--run-dir", str(tmp_path / "r"))
    assert unreachable.code == 2, unreachable.err
    assert unreachable.err.strip() == (
        f"data error: {remote_shards}/shards.json: the object store is unreachable after retries "
        f'(Could not connect to the endpoint URL: "http://127.0.0.1:{closed}/data/digits/shards.json")'
    )
    assert "test" not in unreachable.err.replace("digits", "")  # no credential in the message


def test_undecodable_images_stop_the_preparation_or_the_run_or_are_skipped_and_counted(
    digit_folder: Path, digit_shards: Path, tmp_path: Path
) -> None:
    import shutil

    import datasets

    from scaleforge.data.storage import sha256_of

    source = damaged_copy(digit_folder, tmp_path / "source")
    (source / "3" / "broken.png").write_bytes(b"not a png")
    refused = run_subprocess("data", "prepare", str(source), "--out", str(tmp_path / "never"))
    assert refused.code == 2 and refused.err.strip().splitlines()[-1] == (
        f"data error: {source / '3' / 'broken.png'}: not a readable image (cannot identify image file "
        f"'{source / '3' / 'broken.png'}')"
    )
    assert not (tmp_path / "never").exists()

    # shards written by another tool, with five training and three validation images that do not decode, and a
    # manifest that matches the files
    damaged = damaged_copy(digit_shards, tmp_path / "damaged")
    manifest = json.loads((damaged / "shards.json").read_text())
    for split, count in (("train", 5), ("val", 3)):
        entry = manifest["splits"][split]["shards"][0]
        original = datasets.Dataset.from_file(str(digit_shards / entry["file"]))
        broken = original.map(
            lambda row, i, n=count: {"image": b"garbage" if i < n else row["image"]}, with_indices=True
        )
        broken.save_to_disk(str(tmp_path / f"rewritten-{split}"))
        shutil.copyfile(next((tmp_path / f"rewritten-{split}").glob("*.arrow")), damaged / entry["file"])
        entry.update(bytes=(damaged / entry["file"]).stat().st_size, sha256=sha256_of(damaged / entry["file"]))
    (damaged / "shards.json").write_text(json.dumps(manifest))
    train_file = manifest["splits"]["train"]["shards"][0]["file"]

    run = ["train", *IMAGES, f"data.path={damaged}", "training.epochs=1", "data.num_workers=2"]
    stopped = run_subprocess(*run, "--run-dir", str(tmp_path / "stopped"))
    assert stopped.code == 2 and "Traceback" not in stopped.err
    last = stopped.err.strip().splitlines()[-1]
    assert last.startswith(f"data error: {damaged}/{train_file}: row ") and "is not a readable image" in last
    skip = [*run, "data.on_error=skip", "training.eval_every_steps=20", "checkpoint.every_steps=20"]
    skipped = run_subprocess(*skip, "--run-dir", str(tmp_path / "skipped"))
    assert skipped.code == 0, skipped.err
    summary = json.loads((tmp_path / "skipped" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "skipped" / "metrics.jsonl").open()]
    assert 1 <= summary["skipped_samples"] <= 5 and summary["skipped_samples"] in [
        r.get("skipped_samples") for r in records
    ]
    assert {r["val_skipped_samples"] for r in records if "val_loss" in r} == {3}  # every evaluation reads them all

    # stopped at step 20 and resumed, the run counts on from the checkpoint's count
    first = run_subprocess(*skip, "training.max_steps=20", "--run-dir", str(tmp_path / "first"))
    assert first.code == 0, first.err
    checkpoint = tmp_path / "first" / "checkpoints" / "step-00000020"
    assert json.loads((checkpoint / "progress.json").read_text())["skipped_samples"] > 0
    resumed = run_subprocess(*skip, "--resume", str(checkpoint), "--run-dir", str(tmp_path / "resumed"))
    assert resumed.code == 0, resumed.err
    assert (
        json.loads((tmp_path / "resumed" / "summary.json").read_text())["skipped_samples"] == summary["skipped_samples"]
    )


def test_a_checkpoint_continues_only_in_the_order_it_was_written_in(digit_shards: Path, tmp_path: Path) -> None:
    run = ["train", *IMAGES, f"data.path={digit_shards}", "data.shuffle_window=300", "checkpoint.every_steps=3"]
    first = run_subprocess(*run, "training.max_steps=3", "--run-dir", str(tmp_path / "first"))
    assert first.code == 0, first.err
    checkpoint = tmp_path / "first" / "checkpoints" / "step-00000003"
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["data_order"].startswith("8 shards, window 300, ")
    moved = run_subprocess(*run, "data.shuffle_window=600", "training.max_steps=6", "--resume", str(checkpoint),
                           "--run-dir", str(tmp_path / "moved"))  # fmt: skip
    assert moved.code == 2 and moved.err.startswith("config error: data: the shards are now read in another order")


@pytest.mark.slow
def test_a_dataset_prepared_again_in_the_store_is_refused_then_replaced_and_read_afresh(
    remote_shards: str, digit_folder: Path, tmp_path: Path
) -> None:
    url = "s3://data/again"
    prepare = ["data", "prepare", str(digit_folder), "--out", url, "--shard-size", "40kB"]
    assert run_subprocess(*prepare).code == 0
    run = ["train", *IMAGES, f"data.path={url}", f"data.cache_dir={tmp_path / 'cache'}", "training.max_steps=3"]
    assert run_subprocess(*run, "--run-dir", str(tmp_path / "before")).code == 0
    refused = run_subprocess(*prepare)
    assert refused.code == 2
    assert refused.err.strip().endswith("already holds a prepared dataset (pass --overwrite to replace it)")
    replaced = run_subprocess(*prepare[:-1], "60kB", "--overwrite")
    assert replaced.code == 0, replaced.err
    after = run_subprocess(*run, "--run-dir", str(tmp_path / "after"))  # the same cache, other shards by name
    assert after.code == 0, after.err
    manifest = json.loads(run_subprocess("data", "show", url, "--json").out)
    assert len(manifest["splits"]["train"]["shards"]) < 8
