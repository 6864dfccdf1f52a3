from __future__ import annotations

import fcntl
import io
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaleforge.data import image_folder as module
from scaleforge.data.base import ImageInput
from scaleforge.data.image_folder import DecodeProgress, FolderImages, GatheredImages, decoded_cache, image_folder
from scaleforge.data.loading import eval_batches
from scaleforge.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _write_images(root: Path, count: int, size: int = 20, classes: int = 2) -> list[Path]:
    rng = np.random.default_rng(count)
    files = []
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size + i % 5, size, 3), dtype=np.uint8)  # several sizes, resized
        pixels[..., i % classes % 3] //= 4  # a class shows in the colour of its pixels
        Image.fromarray(pixels).save(folder / f"{i}.png")
        files.append(folder / f"{i}.png")
    return files


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images each decode pass decodes."""
    counted: list[int] = []
    decode_all = module.decode_all

    def counting(pixels_path, root, files, *args, **kwargs):  # type: ignore[no-untyped-def]
        counted.append(len(files))
        return decode_all(pixels_path, root, files, *args, **kwargs)

    monkeypatch.setattr(module, "decode_all", counting)
    return counted


def _relative(root: Path, files: list[Path]) -> list[str]:
    return [str(file.relative_to(root)) for file in sorted(files)]


def _served(spec: ImageInput, file: Path) -> torch.Tensor:
    """What serving makes of `file`: the reference for every training and validation input."""
    with Image.open(file) as image:
        return spec.normalise(spec.pixels(image))


def test_the_splits_hold_what_serving_makes_of_each_file(tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 30)
    splits = image_folder(str(tmp_path / "images"), image_size=8, augment=False, cache_dir=str(tmp_path / "c"))
    spec = splits.info.image
    assert spec is not None and (len(splits.train), len(splits.val)) == (24, 6)
    for split in (splits.train, splits.val):
        assert isinstance(split, GatheredImages)
        files = sorted((tmp_path / "images").rglob("*.png"))
        for index in range(len(split)):
            inputs, target = split[index]
            file = files[int(split.rows[index])]
            assert torch.equal(inputs, _served(spec, file)) and int(target) == int(file.parent.name[-1])
        inputs, targets = split[torch.arange(len(split))]  # a whole batch in one read
        assert all(torch.equal(inputs[i], split[i][0]) and targets[i] == split[i][1] for i in range(len(split)))


def test_the_mean_and_std_are_the_training_splits(tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 30)
    splits = image_folder(str(tmp_path / "images"), image_size=8, augment=False, cache_dir=str(tmp_path / "c"))
    spec = splits.info.image
    assert spec is not None
    plain = ImageInput(size=8, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    files = sorted((tmp_path / "images").rglob("*.png"))
    pixels = torch.stack([_served(plain, files[int(row)]) for row in splits.train.rows]).double()  # type: ignore[attr-defined]
    assert torch.allclose(torch.tensor(spec.mean), pixels.mean(dim=(0, 2, 3)).float(), atol=1e-6)
    assert torch.allclose(torch.tensor(spec.std), pixels.std(dim=(0, 2, 3)).float(), atol=1e-6)


def test_the_cache_is_built_once_and_reused(tmp_path: Path, decodes: list[int]) -> None:
    _write_images(tmp_path / "images", 12)
    first = image_folder(str(tmp_path / "images"), image_size=8, cache_dir=str(tmp_path / "c"))
    written = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "c").iterdir()}
    second = image_folder(str(tmp_path / "images"), image_size=8, cache_dir=str(tmp_path / "c"))
    assert decodes == [12] and {path.name: path.stat().st_mtime_ns for path in (tmp_path / "c").iterdir()} == written
    assert first.info == second.info
    assert all(torch.equal(first.val[i][0], second.val[i][0]) for i in range(len(first.val)))
    image_folder(str(tmp_path / "images"), image_size=12, cache_dir=str(tmp_path / "c"))  # another size: its own
    assert decodes == [12, 12] and len(list((tmp_path / "c").glob("*.pixels"))) == 2


def test_a_changed_file_invalidates_the_cache_and_the_old_one_goes(tmp_path: Path, decodes: list[int]) -> None:
    files = _write_images(tmp_path / "images", 12)
    image_folder(str(tmp_path / "images"), image_size=8, cache_dir=str(tmp_path / "c"))
    old = {path.name for path in (tmp_path / "c").glob("*.pixels")}
    Image.new("RGB", (20, 20), (255, 255, 0)).save(files[3])
    os.utime(files[3], ns=(1, 1))  # a new modification time, whatever the clock's resolution
    splits = image_folder(str(tmp_path / "images"), image_size=8, augment=False, cache_dir=str(tmp_path / "c"))
    assert decodes == [12, 12]
    assert {path.name for path in (tmp_path / "c").glob("*.pixels")}.isdisjoint(old)
    assert len(list((tmp_path / "c").glob("*.pixels"))) == 1
    spec = splits.info.image
    assert spec is not None
    everything = [split[i][0] for split in (splits.train, splits.val) for i in range(len(split))]  # type: ignore[arg-type]
    assert any(torch.equal(inputs, _served(spec, files[3])) for inputs in everything)


def test_a_failed_decode_leaves_no_cache_and_names_the_first_bad_file(tmp_path: Path, decodes: list[int]) -> None:
    files = _write_images(tmp_path / "images", 40)
    for index in (33, 7):
        files[index].write_bytes(b"not an image")
    first_bad = sorted(files[i] for i in (33, 7))[0]
    with pytest.raises(DataError, match=f"^{first_bad}: not a readable image"):
        decoded_cache(tmp_path / "images", _relative(tmp_path / "images", files), 8, 3, tmp_path / "c", processes=2)
    assert sorted(path.suffix for path in (tmp_path / "c").iterdir()) == [".lock"]  # no partial files


def test_a_decode_killed_outright_leaves_temporary_files_the_next_one_removes(tmp_path: Path) -> None:
    files = _relative(tmp_path / "images", _write_images(tmp_path / "images", 6))
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    killed = [cache_dir / f"{'a' * 32}.pixels.99999.tmp", cache_dir / f"{'a' * 32}.sums.npy.99999.tmp"]
    running = cache_dir / f"{'b' * 32}.pixels.99998.tmp"
    for path in [*killed, running]:
        path.write_bytes(b"\0" * 100)
    with open(cache_dir / f"{'b' * 32}.lock", "a") as lock:  # held by a decode in progress
        fcntl.flock(lock, fcntl.LOCK_EX)
        decoded_cache(tmp_path / "images", files, 8, 3, cache_dir, processes=1)
        assert running.exists() and not any(path.exists() for path in killed)
    assert [path.name for path in cache_dir.glob("*.tmp")] == [running.name]


def test_a_cache_dir_that_cannot_be_made_is_a_data_error(tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 4)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match=f"^data.cache_dir: {tmp_path / 'file' / 'c'} cannot hold the decoded images"):
        image_folder(str(tmp_path / "images"), cache_dir=str(tmp_path / "file" / "c"))


def test_several_processes_write_the_same_cache_as_one(tmp_path: Path) -> None:
    files = _relative(tmp_path / "images", _write_images(tmp_path / "images", 40))
    one = decoded_cache(tmp_path / "images", files, 8, 3, tmp_path / "one", processes=1)
    three = decoded_cache(tmp_path / "images", files, 8, 3, tmp_path / "three", processes=3)
    assert np.array_equal(one.pixels(), three.pixels()) and one.shape == (40, 3, 8, 8)
    assert np.array_equal(np.load(one.sums_path), np.load(three.sums_path))
    description = json.loads(one.pixels_path.with_suffix(".json").read_text())
    assert description["shape"] == [40, 3, 8, 8] and description["root"] == str((tmp_path / "images").resolve())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks")
def test_processes_that_ask_at_once_decode_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _relative(tmp_path / "images", _write_images(tmp_path / "images", 40))
    decode_all = module.decode_all

    def marking(pixels_path, root, files, *args, **kwargs):  # type: ignore[no-untyped-def]
        (tmp_path / f"decoded-by-{os.getpid()}").touch()
        return decode_all(pixels_path, root, files, *args, **kwargs)

    monkeypatch.setattr(module, "decode_all", marking)  # in the processes forked below too
    arguments = (tmp_path / "images", files, 8, 3, tmp_path / "c", 1)
    processes = [multiprocessing.get_context("fork").Process(target=decoded_cache, args=arguments) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert len(list(tmp_path.glob("decoded-by-*"))) == 1
    cache = decoded_cache(*arguments)
    assert cache.pixels().shape == (40, 3, 8, 8) and len(list(tmp_path.glob("decoded-by-*"))) == 1


def test_grey_images_and_train_and_val_folders(tmp_path: Path) -> None:
    _write_images(tmp_path / "images" / "train", 10)
    _write_images(tmp_path / "images" / "val", 4)
    splits = image_folder(str(tmp_path / "images"), image_size=6, channels=1, cache_dir=str(tmp_path / "c"))
    assert (len(splits.train), len(splits.val)) == (10, 4) and splits.info.input_shape == (1, 6, 6)
    spec = splits.info.image
    assert spec is not None
    val_files = sorted((tmp_path / "images" / "val").rglob("*.png"))
    assert all(torch.equal(splits.val[i][0], _served(spec, val_files[i])) for i in range(4))
    inputs, targets = next(eval_batches(splits.val, 4, torch.device("cpu")))
    assert inputs.shape == (4, 1, 6, 6) and targets.tolist() == [0, 0, 1, 1]


def test_an_augmented_split_pickles_as_its_file_not_its_pixels(tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 12)
    train = image_folder(str(tmp_path / "images"), image_size=32, cache_dir=str(tmp_path / "c")).train
    assert isinstance(train, FolderImages)
    copy = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 12 * 3 * 32 * 32 and isinstance(copy.pixels, np.memmap)
    for index in range(len(train)):
        torch.manual_seed(index)
        inputs, target = copy[index]
        torch.manual_seed(index)
        assert torch.equal(inputs, train[index][0]) and target == train[index][1]


def test_decode_progress_is_silent_when_quick_and_plain_lines_otherwise() -> None:
    quiet = io.StringIO()
    progress = DecodeProgress(10, 2, stream=quiet)
    progress.advance(10)
    progress.close()
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    progress = DecodeProgress(10, 2, stream=shown, delay_s=0, every_s=0)
    progress.advance(4)
    progress.advance(6)
    progress.close()
    lines = shown.getvalue().splitlines()
    assert lines[0] == "image_folder: decoding 10 images with 2 processes, once: later runs reuse them"
    assert lines[1:3] == ["image_folder: decoded 4/10 images", "image_folder: decoded 10/10 images"]
    assert lines[3].startswith("image_folder: decoded 10/10 images in ")


MEASURE = """
import sys, torch
from scaleforge.data.image_folder import image_folder
from scaleforge.data.loading import BatchPlan, TrainBatches, eval_batches

splits = image_folder(sys.argv[1], image_size=16, cache_dir=sys.argv[2])
batches = TrainBatches(splits.train, BatchPlan(40), seed=0, device=torch.device("cpu"))
seen = sum(len(inputs) for step in batches.epoch(0) for inputs, _ in step)
seen += sum(len(inputs) for inputs, _ in eval_batches(splits.val, 40, torch.device("cpu")))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(seen, int(status["RssAnon"].split()[0]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_anonymous_memory_stays_flat_with_eight_times_the_images(tmp_path: Path) -> None:
    measured = {}
    for count in (200, 1600):
        root = tmp_path / str(count)
        _write_images(root, count, size=16, classes=4)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        command = [sys.executable, "-c", textwrap.dedent(MEASURE), str(root), str(tmp_path / "cache")]
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True, timeout=240)
        seen, rss_anon_kib = map(int, result.stdout.split())
        assert seen == count
        measured[count] = rss_anon_kib
    print(measured)
    assert measured[1600] <= 1.10 * measured[200] + 30 * 1024, measured
