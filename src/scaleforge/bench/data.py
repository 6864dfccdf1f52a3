"""`scaleforge bench data CONFIG`: how fast images reach the model from each place they can live, against the data
loader a user would write with torchvision.

The same images are read as an image folder, as shards on disk (`scaleforge data prepare`) and as shards in a
local object store (moto's S3 server on 127.0.0.1, started and stopped here). Without a folder in the config, the
benchmark draws one: scikit-learn's digits, upscaled, shifted, tinted and noised, as PNGs in 10 class folders.

1. The loader alone, one epoch per source and repeat (sources interleaved, medians reported): torchvision's
   `ImageFolder` with `Resize`, `ToTensor` and `Normalize` in a `DataLoader` of the same workers and batch size (a
   line-for-line equivalent when torchvision does not import), scaleforge's `image_folder` (which decodes every
   image into its cache on the first repeat, and reads the cache on the others, as later runs do), and `shards`
   from disk and from the store, read in windows of two shards. The store is read with a cold cache (emptied
   before each repeat: every shard is downloaded, the prefetcher fetching the next window while the workers
   decode the current one, as in a run's first epoch) and with a warm one (the next epoch from the cache the cold
   one filled, as a run's later epochs). Samples/s and MB/s of encoded bytes read; every source delivers
   normalised float pixels.
2. Training (`scaleforge train` in a child process, the config's model) on the shards and on the image folder:
   the run's `data_wait_share` and samples/s.
3. Memory: the same training on shards of the images and of 8 copies of them, the same steps: the peak of RssAnon
   summed over the training process and its loader workers (anonymous memory: the shards' memory maps are file
   pages, which the kernel can drop and which do not grow a process's own memory), sampled every 50 ms.

Targets: shards >= 1.0x torchvision's images/s at equal workers; a data-wait share under 5%; memory at 8x the data
<= 1.10x memory at 1x + 30 MiB. Table, JSON and a PNG.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scaleforge.bench.harness import config_arguments, machine, report, train_in_child
from scaleforge.config import load_config
from scaleforge.distributed.launch import threads_per_process
from scaleforge.errors import UsageError
from scaleforge.network import free_port
from scaleforge.processes import ParentDeathGuard

if TYPE_CHECKING:
    from scaleforge.data.prepare import PrepareOptions

SOURCES = ("torchvision", "image_folder", "shards_disk", "shards_store", "shards_store_warm")
SHARD_SOURCES = ("shards_disk", "shards_store", "shards_store_warm")
LABELS = {
    "torchvision": "torchvision ImageFolder",
    "image_folder": "scaleforge image_folder",
    "shards_disk": "shards on disk",
    "shards_store": "shards in the object store, cold cache",
    "shards_store_warm": "shards in the object store, warm cache",
}
DATA_WAIT_TARGET = 0.05
MEMORY_SCALE = 8
MEMORY_TARGET = (1.10, 30.0)  # peak at 8x the data <= 1.10 x peak at 1x + 30 MiB
SAMPLE_EVERY_S = 0.05
PREPARE_POOL_FROM = 2000  # images
BUCKET = "bench"
# Shards of 4 MB: the default 4,000 images make about 24 MB of training shards, so 6 shards; of 64 MB (`data
# prepare`'s default), they would make one, which a reader downloads as it starts, leaving nothing to fetch ahead.
SHARD_SIZE = "4MB"
# A window of two shards, so that an epoch crosses windows as one of a dataset larger than the default window
# (2 GB of shards) does, and the next window's shards can be fetched while the current one is read.
SHARDS_PER_WINDOW = 2


@dataclass(frozen=True)
class DataBenchOptions:
    """What `bench data` is asked for."""

    images: int = 4000  # drawn when the config names no folder
    image_px: int = 64  # their size, and the size every loader decodes to unless data.image_size says otherwise
    workers: int = 2
    repeats: int = 3
    steps: int = 20
    shard_size: str = SHARD_SIZE
    object_store: bool = True
    out: Path = Path("runs/bench-data")
    as_json: bool = False


@dataclass(frozen=True)
class _Setup:
    """The benchmark's inputs once prepared: the run config's arguments, the folder, its shards, the batch size."""

    config_args: list[str]
    folder: Path
    shards: Path
    store_url: str | None
    image_size: int
    batch_size: int
    model: str


def moto_available() -> bool:
    """Whether moto's S3 server can be started here (the default of `--object-store`)."""
    import importlib.util

    return importlib.util.find_spec("moto") is not None and importlib.util.find_spec("boto3") is not None


def run_data_benchmark(config_path: str | None, overrides: Sequence[str], options: DataBenchOptions) -> dict[str, Any]:
    """Measure, print and return the benchmark for the config's images (drawn when it names no folder); JSON, PNG,
    images, shards and runs go under `options.out`."""
    from scaleforge.extras import require

    require("data", "scaleforge bench data")
    config = load_config(config_path, overrides)  # a bad config fails here, before any work
    params = config.data.params
    if config.data.dataset == "image_folder" and not Path(str(params.get("path"))).is_dir():
        raise UsageError(f"data.path: {params.get('path')} is not a folder of class folders of images")
    options.out.mkdir(parents=True, exist_ok=True)
    with _object_store(options.object_store, options.out) as endpoint:
        setup = _prepare(config_path, overrides, config, options, endpoint)
        loaders = _loaders(setup, options)
        training = {
            name: _training_row(setup, options, name, path)
            for name, path in (("shards_disk", str(setup.shards)), ("image_folder", str(setup.folder)))
        }
        memory = _memory(setup, options, training["shards_disk"])
    result = {
        "benchmark": "data",
        "config": config_path,
        "overrides": list(overrides),
        "model": setup.model,
        "folder": str(setup.folder),
        "images": _count_images(setup.folder),
        "image_size": setup.image_size,
        "batch_size": setup.batch_size,
        "workers": options.workers,
        "repeats": options.repeats,
        "steps": options.steps,
        "baseline": _baseline_kind(),
        **machine(),
        "loaders": loaders,
        "training": training,
        "memory": memory,
    }
    result["targets"] = _targets(result)
    _plot(result, options.out / "data.png")
    _report(result, options.out, as_json=options.as_json)
    return result


def _say(line: str) -> None:
    print(f"bench data: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ the data


def _prepare(
    config_path: str | None, overrides: Sequence[str], config: Any, options: DataBenchOptions, endpoint: str | None
) -> _Setup:
    """The folder (the config's, or drawn under OUT/images), its shards under OUT/shards and, with a store, at
    s3://bench/images; the arguments every training run starts from."""
    from scaleforge.data.prepare import prepare

    params = config.data.params
    if config.data.dataset == "image_folder":
        folder = Path(str(params["path"]))
    else:
        folder, drawn = options.out / "images", options.out / "images.json"
        wanted = json.dumps({"images": options.images, "image_px": options.image_px})
        if not drawn.is_file() or drawn.read_text() != wanted or _count_images(folder) != options.images:
            _say(f"drawing {options.images} PNGs of {options.image_px} px in {folder}")
            generate_images(folder, options.images, options.image_px)
            drawn.write_text(wanted)  # the next run with the same options reuses them
    image_size = int(params.get("image_size", options.image_px))
    shards = options.out / "shards"
    prepare_options = _prepare_options(options, _count_images(folder))
    _say(f"preparing shards of {folder} in {shards}")
    prepare(str(folder), str(shards), prepare_options)
    store_url = None
    if endpoint is not None:
        store_url = f"s3://{BUCKET}/images"
        _say(f"preparing shards of {folder} at {store_url} (moto at {endpoint})")
        prepare(str(folder), store_url, prepare_options)
    config_args = [*config_arguments(config_path, overrides), f"data.image_size={image_size}"]
    config_args.append(f"data.num_workers={options.workers}")
    return _Setup(
        config_args, folder, shards, store_url, image_size, config.training.batch_size, config.model.architecture
    )


def _prepare_options(options: DataBenchOptions, images: int) -> PrepareOptions:
    """`data prepare`'s options for `images` images: `--workers` processes, one below `PREPARE_POOL_FROM` images
    (starting a pool costs more than it saves there)."""
    from scaleforge.data.prepare import PrepareOptions

    workers = options.workers if images >= PREPARE_POOL_FROM else 1
    return PrepareOptions(kind="images", workers=max(1, workers), shard_size=options.shard_size, overwrite=True)


def generate_images(root: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` RGB PNGs of `size` pixels in 10 class folders under `root` (replaced): scikit-learn's digits
    upscaled to 7/8 of the square, shifted, tinted and noised, so that they compress as photos of digits do."""
    from PIL import Image
    from sklearn.datasets import load_digits

    shutil.rmtree(root, ignore_errors=True)
    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    inner = max(1, size * 7 // 8)
    for index in range(count):
        source = digits.images[index % len(digits.images)]
        digit = Image.fromarray((source / 16 * 255).astype(np.uint8)).resize((inner, inner), Image.Resampling.BILINEAR)
        canvas = np.zeros((size, size), np.float32)
        top, left = rng.integers(0, size - inner + 1, 2)
        canvas[top : top + inner, left : left + inner] = np.asarray(digit, np.float32) / 255
        tint = rng.integers(80, 256, 3)
        rgb = canvas[..., None] * tint + rng.integers(-8, 9, (size, size, 3))
        label = digits.target[index % len(digits.images)]
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(root / str(label) / f"{index:06d}.png")


def _count_images(folder: Path) -> int:
    from scaleforge.data.image_folder import IMAGE_SUFFIXES

    if not folder.is_dir():
        return 0
    return sum(1 for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _replicated(folder: Path, copies: int, out: Path) -> Path:
    """`folder`'s images `copies` times under new names in `out` (hard links where the file system allows)."""
    shutil.rmtree(out, ignore_errors=True)
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder)
        (out / relative.parent).mkdir(parents=True, exist_ok=True)
        for copy in range(copies):
            target = out / relative.parent / f"{relative.stem}-{copy}{relative.suffix}"
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    return out


@contextlib.contextmanager
def _object_store(enabled: bool, out: Path) -> Iterator[str | None]:
    """moto's S3 server on a free port of 127.0.0.1 with the bucket `bench`, named to this process and its children
    through AWS_ENDPOINT_URL and the standard credential variables (restored afterwards); None when not `enabled`."""
    if not enabled:
        yield None
        return
    port = free_port()
    log = (out / "moto.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=ParentDeathGuard(signal.SIGKILL),  # nothing of the store outlives the benchmark
    )
    settings = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        _create_bucket(server, settings["AWS_ENDPOINT_URL"])
        yield settings["AWS_ENDPOINT_URL"]
    finally:
        server.kill()
        server.wait()
        log.close()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _create_bucket(server: subprocess.Popen, endpoint: str, timeout_s: float = 30.0) -> None:
    """Create the bucket once the server answers."""
    from scaleforge.data.storage import s3_client

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            s3_client().create_bucket(Bucket=BUCKET)
            return
        except Exception:  # the server is still starting: any connection error looks like this
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server at {endpoint} did not start (see moto.log)") from None
            time.sleep(0.2)


# ------------------------------------------------------------------------------------------ the loader alone


# What a training pipeline gives the model: float pixels normalised per channel (the statistics do not change the
# cost), as `ToTensor` and `Normalize` make them and as scaleforge's loaders deliver them.
BASELINE_MEAN, BASELINE_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class ImageFolderBaseline(Dataset):
    """torchvision's `ImageFolder(root, transform=Compose([Resize((size, size)), ToTensor(), Normalize(mean, std)]))`,
    line for line in what it does per sample: used when torchvision does not import beside this torch."""

    def __init__(self, root: Path, size: int) -> None:
        from scaleforge.data.image_folder import IMAGE_SUFFIXES

        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        self.samples = [
            (os.path.join(root, name, file), index)
            for index, name in enumerate(classes)
            for file in sorted(os.listdir(os.path.join(root, name)))
            if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES
        ]
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, target = self.samples[index]
        with open(path, "rb") as file:  # torchvision's pil_loader
            image = Image.open(file).convert("RGB")
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)  # Resize on a PIL image
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()  # ToTensor
        pixels = pixels.to(torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(BASELINE_MEAN, dtype=pixels.dtype).view(-1, 1, 1)  # Normalize, per call as torchvision
        std = torch.as_tensor(BASELINE_STD, dtype=pixels.dtype).view(-1, 1, 1)
        return pixels.sub_(mean).div_(std), target


def _baseline_kind() -> str:
    try:
        import torchvision
    except Exception:  # a torchvision built for another torch fails with one of several errors as it imports
        return "torchvision-equivalent (ImageFolder + Resize + ToTensor + Normalize; torchvision does not import here)"
    return f"torchvision {torchvision.__version__}"


def baseline_dataset(root: Path, size: int) -> Dataset:
    """torchvision's ImageFolder with Resize, ToTensor and Normalize when torchvision imports, else its equivalent."""
    try:
        from torchvision import datasets, transforms
    except Exception:
        return ImageFolderBaseline(root, size)
    pipeline = [
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(BASELINE_MEAN, BASELINE_STD),
    ]
    return datasets.ImageFolder(str(root), transform=transforms.Compose(pipeline))


def _epoch_of(source: str, setup: _Setup, options: DataBenchOptions) -> tuple[int, int]:
    """One epoch of `source` through its loader: (samples delivered, encoded bytes read)."""
    from scaleforge.data.image_folder import image_folder
    from scaleforge.data.loading import BatchPlan, TrainBatches
    from scaleforge.data.shards import shards

    if source == "torchvision":
        loader = DataLoader(
            baseline_dataset(setup.folder, setup.image_size),
            batch_size=setup.batch_size,
            shuffle=True,
            num_workers=options.workers,
        )
        return sum(len(targets) for _, targets in loader), _folder_bytes(setup.folder)
    if source == "image_folder":
        # its decoded-image cache under --out: the first repeat decodes, the others read the cache, as later runs do
        cache = str(options.out / "image-cache")
        splits = image_folder(str(setup.folder), image_size=setup.image_size, augment=False, cache_dir=cache)
        encoded = _folder_bytes(setup.folder)  # every image is decoded as the dataset is built
    else:
        location = str(setup.shards) if source == "shards_disk" else str(setup.store_url)
        cache = options.out / "cache"
        if source == "shards_store":
            shutil.rmtree(cache, ignore_errors=True)  # a cold cache: every shard is downloaded
        splits = shards(location, image_size=setup.image_size, augment=False, cache_dir=str(cache))
        train = splits.train
        train.shuffle_window = SHARDS_PER_WINDOW * len(train) // len(train.shard_sizes)
        encoded = sum(shard.bytes for shard in train.reader.shards)  # type: ignore[attr-defined]
    batches = TrainBatches(
        splits.train, BatchPlan(setup.batch_size), seed=0, device=torch.device("cpu"), num_workers=options.workers
    )
    epoch = 1 if source == "shards_store_warm" else 0  # the epoch after the one that filled the cold cache
    delivered = sum(len(targets) for step in batches.epoch(epoch) for _, targets in step)
    return delivered, encoded


def _loaders(setup: _Setup, options: DataBenchOptions) -> list[dict[str, Any]]:
    """Each source's median samples/s and MB/s over `repeats` epochs, the sources taken in turn each repeat."""
    sources = [source for source in SOURCES if not source.startswith("shards_store") or setup.store_url is not None]
    times: dict[str, list[float]] = {source: [] for source in sources}
    counts: dict[str, tuple[int, int]] = {}
    for repeat in range(options.repeats):
        for source in sources:
            started = time.perf_counter()
            counts[source] = _epoch_of(source, setup, options)
            times[source].append(time.perf_counter() - started)
            samples = counts[source][0]
            _say(f"repeat {repeat + 1}/{options.repeats}, {LABELS[source]}: {samples / times[source][-1]:,.0f} img/s")
    rows = []
    for source in sources:
        seconds = statistics.median(times[source])
        samples, encoded = counts[source]
        rows.append({
            "source": source,
            "samples": samples,
            "encoded_mb": encoded / 1e6,
            "seconds": seconds,
            "samples_per_s": samples / seconds,
            "mb_per_s": encoded / 1e6 / seconds,
            "seconds_each": times[source],
        })  # fmt: skip
    baseline = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_torchvision"] = row["samples_per_s"] / baseline
    return rows


# -------------------------------------------------------------------------------------- training and memory


def _training_row(setup: _Setup, options: DataBenchOptions, source: str, path: str, scale: int = 1) -> dict[str, Any]:
    """`options.steps` steps of the config's model on `source` (at `path`, `scale` times the images) in a child
    process: its data-wait share, samples/s and peak RssAnon (summed over it and its loader workers)."""
    dataset = "image_folder" if source == "image_folder" else "shards"
    what = LABELS[source] + (f", {scale}x the images" if scale != 1 else "")
    _say(f"training {setup.model} on {what} for {options.steps} steps, {options.workers} workers")
    config_args = [*setup.config_args, f"data.dataset={dataset}", f"data.path={path}"]
    if dataset == "image_folder":  # its decoded-image cache under --out, not the user's cache folder
        config_args.append(f"data.cache_dir={options.out / 'image-cache'}")
    # evaluation only after the loop: with eval_every_steps=0 the trainer evaluates at the end of an epoch, inside
    # the loop's time, which would dilute the data-wait share
    config_args += [f"training.max_steps={options.steps}", f"training.eval_every_steps={options.steps + 1}"]
    run_dir = options.out / "runs" / (source if scale == 1 else f"{source}-x{scale}")
    with sampled_rss_anon() as peak:
        run = train_in_child(config_args, nproc=1, threads=threads_per_process(1), run_dir=run_dir)
    run.check()
    summary = run.summary
    row = {
        "source": source,
        "scale": scale,
        "steps": summary["steps"],
        "samples_per_s": summary["samples_per_s"],
        "data_wait_share": summary["data_wait_share"],
        "peak_rss_anon_mib": peak["bytes"] / 2**20,
        "peak_pss_anon_mib": peak["pss_bytes"] / 2**20,
        "processes": peak["processes"],
        "each_mib": [round(value / 2**20, 1) for value in peak["each"]],
        "run_dir": str(run.run_dir),
    }
    _say(f"{what}: data wait {row['data_wait_share']:.1%}, {row['samples_per_s']:,.0f} samples/s, peak RssAnon "
         f"{row['peak_rss_anon_mib']:,.0f} MiB over {row['processes']} processes (PssAnon "
         f"{row['peak_pss_anon_mib']:,.0f})")  # fmt: skip
    return row


def _memory(setup: _Setup, options: DataBenchOptions, one: dict[str, Any]) -> dict[str, Any]:
    """Peak RssAnon of training on shards of the images (`one`, the shards' training row) and of `MEMORY_SCALE`
    copies of them, the same steps."""
    from scaleforge.data.prepare import prepare

    bigger = _replicated(setup.folder, MEMORY_SCALE, options.out / f"images-x{MEMORY_SCALE}")
    bigger_shards = options.out / f"shards-x{MEMORY_SCALE}"
    _say(f"preparing shards of {MEMORY_SCALE}x the images in {bigger_shards}")
    prepare(str(bigger), str(bigger_shards), _prepare_options(options, MEMORY_SCALE * _count_images(setup.folder)))
    shutil.rmtree(bigger, ignore_errors=True)
    rows = []
    for row, shards_path in (
        (one, setup.shards),
        (_training_row(setup, options, "shards_disk", str(bigger_shards), MEMORY_SCALE), bigger_shards),
    ):
        rows.append({
            **{key: row[key] for key in ("scale", "peak_rss_anon_mib", "peak_pss_anon_mib", "processes", "each_mib",
                                         "run_dir")},  # fmt: skip
            "samples": _manifest_rows(shards_path),
            "shard_mb": _folder_bytes(shards_path) / 1e6,
        })  # fmt: skip
    first, last = rows[0]["peak_rss_anon_mib"], rows[-1]["peak_rss_anon_mib"]
    return {"rows": rows, "ratio": last / first, "limit_mib": MEMORY_TARGET[0] * first + MEMORY_TARGET[1]}


def _manifest_rows(shards_path: Path) -> int:
    return int(json.loads((shards_path / "shards.json").read_text())["splits"]["train"]["rows"])


def anonymous_memory(pid: int) -> tuple[int, int]:
    """Process `pid`'s anonymous resident memory in bytes: RssAnon, and Pss_Anon (each page it shares with
    processes forked from the same parent divided among them); (0, 0) when it has gone."""
    figures = {"RssAnon:": 0, "Pss_Anon:": 0}
    for name in ("status", "smaps_rollup"):
        try:
            with open(f"/proc/{pid}/{name}") as lines:
                for line in lines:
                    key = line.split(maxsplit=1)[0] if line.strip() else ""
                    if key in figures:
                        figures[key] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return figures["RssAnon:"], figures["Pss_Anon:"]


@contextlib.contextmanager
def sampled_rss_anon(every_s: float = SAMPLE_EVERY_S) -> Iterator[dict[str, Any]]:
    """While the block runs, RssAnon summed over the processes it starts (this process's descendants started
    within it, with theirs), every `every_s`: the highest sum (`bytes`), how many processes made it and each one's
    share (`each`, bytes, largest first); and the highest sum of their Pss_Anon (`pss_bytes`), which counts pages
    that forked loader workers share with their parent once."""
    import psutil

    me = psutil.Process()
    before = {child.pid for child in me.children()}  # the object store's server, started earlier, is left out
    peak: dict[str, Any] = {"bytes": 0, "processes": 0, "each": [], "pss_bytes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            pids: list[int] = []
            for child in me.children():
                if child.pid in before:
                    continue
                with contextlib.suppress(psutil.Error):
                    pids += [child.pid, *(grandchild.pid for grandchild in child.children(recursive=True))]
            rss, pss = zip(*(anonymous_memory(pid) for pid in pids), strict=True) if pids else ((), ())
            if sum(rss) > peak["bytes"]:
                peak.update(bytes=sum(rss), processes=len(pids), each=sorted(rss, reverse=True))
            peak["pss_bytes"] = max(peak["pss_bytes"], sum(pss))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


# ------------------------------------------------------------------------------------------------ the report


def _targets(result: dict[str, Any]) -> dict[str, str]:
    loaders = {row["source"]: row for row in result["loaders"]}
    workers = result["workers"]
    lines = {}
    for source in SHARD_SOURCES:
        if source in loaders:
            ratio = loaders[source]["vs_torchvision"]
            lines[f"{LABELS[source]} >= 1.0x torchvision's images/s at {workers} workers"] = (
                f"{ratio:.2f}x ({'met' if ratio >= 1.0 else 'not met'})"
            )
    share = result["training"]["shards_disk"]["data_wait_share"]
    lines[f"data-wait share < {DATA_WAIT_TARGET:.0%} ({result['model']}, {result['image_size']} px shards, "
          f"{workers} workers)"] = f"{share:.1%} ({'met' if share < DATA_WAIT_TARGET else 'not met'})"  # fmt: skip
    memory = result["memory"]
    first, last = (row["peak_rss_anon_mib"] for row in (memory["rows"][0], memory["rows"][-1]))
    lines[f"memory at {MEMORY_SCALE}x the data <= {MEMORY_TARGET[0]:.2f}x 1x + {MEMORY_TARGET[1]:.0f} MiB"] = (
        f"{first:,.0f} -> {last:,.0f} MiB, {memory['ratio']:.3f}x "
        f"({'met' if last <= memory['limit_mib'] else 'not met'})"
    )
    return lines


def _report(result: dict[str, Any], out: Path, *, as_json: bool) -> None:
    """Print the table (or JSON) and write `OUT/data.json`."""
    training = result["training"]
    rows = []
    for row in result["loaders"]:
        run = training.get(row["source"])
        rows.append([
            LABELS[row["source"]], f"{row['samples']:,}", f"{row['encoded_mb']:,.1f}", f"{row['samples_per_s']:,.0f}",
            f"{row['mb_per_s']:,.1f}", f"{row['vs_torchvision']:.2f}x",
            f"{run['samples_per_s']:,.0f}" if run else "", f"{run['data_wait_share']:.1%}" if run else "",
            f"{run['peak_rss_anon_mib']:,.0f}" if run else "", f"{run['peak_pss_anon_mib']:,.0f}" if run else "",
        ])  # fmt: skip
    for row in result["memory"]["rows"]:
        memory = [f"{row['peak_rss_anon_mib']:,.0f}", f"{row['peak_pss_anon_mib']:,.0f}"]
        rows.append([f"shards, {row['scale']}x the data (training)", f"{row['samples']:,}", f"{row['shard_mb']:,.1f}",
                     "", "", "", "", "", *memory])  # fmt: skip
    report(
        result,
        out / "data.json",
        as_json=as_json,
        title=f"Data loading: {result['images']:,} images at {result['image_size']} px, batch {result['batch_size']}, "
        f"{result['workers']} workers, median of {result['repeats']}; training {result['model']} for "
        f"{result['steps']} steps",
        columns=[
            "source",
            "samples",
            "MB read",
            "samples/s",
            "MB/s",
            "vs torchvision",
            "train samples/s",
            "data wait",
            "peak RssAnon MiB",
            "peak PssAnon MiB",
        ],  # fmt: skip
        rows=rows,
        notes=[
            f"baseline: {result['baseline']}",
            *(f"{name}: {text}" for name, text in result["targets"].items()),
            f"results in {out}/ (data.json, data.png)",
        ],
    )


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (speed, wait, memory) = plt.subplots(1, 3, figsize=(14, 4), dpi=120)
    loaders = result["loaders"]
    names = [LABELS[row["source"]].replace(" ", "\n", 1) for row in loaders]
    speed.bar(names, [row["samples_per_s"] for row in loaders], color="tab:blue")
    speed.set(ylabel="images/s", title=f"Loader alone, {result['workers']} workers")
    speed.tick_params(axis="x", labelsize=7)
    training = list(result["training"].values())
    wait.bar([LABELS[row["source"]] for row in training], [100 * row["data_wait_share"] for row in training])
    wait.axhline(100 * DATA_WAIT_TARGET, color="tab:red", linestyle="--", label="target")
    wait.set(ylabel="% of the loop waiting for data", title=f"Training {result['model']}")
    wait.legend()
    rows = result["memory"]["rows"]
    places = np.arange(len(rows))
    memory.bar(places - 0.2, [row["peak_rss_anon_mib"] for row in rows], 0.4, color="tab:grey", label="RssAnon")
    memory.bar(places + 0.2, [row["peak_pss_anon_mib"] for row in rows], 0.4, color="tab:olive", label="PssAnon")
    memory.set_xticks(places, [f"{row['scale']}x data" for row in rows])
    memory.axhline(result["memory"]["limit_mib"], color="tab:red", linestyle="--", label="RssAnon target at 8x")
    memory.set(ylabel="MiB", title="Peak anonymous memory, training + workers")
    memory.legend(loc="lower center")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
