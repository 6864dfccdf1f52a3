"""Where prepared shards live: a local folder, or an S3-compatible store read through a bounded local cache.

Object storage goes through boto3, so credentials come from the standard chain (`AWS_ACCESS_KEY_ID` and
`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, instance roles) and a store that is not AWS is named by `AWS_ENDPOINT_URL`;
none of them is ever logged. Requests are retried by botocore (standard mode: bounded attempts with exponential
backoff and jitter) before an unreachable store becomes one `data error:` line naming the URL.

The cache holds whole shard files named by their SHA-256, each checked against it before it is used. When the
cache passes its limit, the files read least recently are removed (a process still reading a removed file keeps
its memory map: the file is only unlinked). Several processes and data-loader workers share a cache folder: a
per-file lock makes one of them download a shard while the others wait for it, and keeps eviction off a file
being opened. A boto3 client is made per process (a forked worker makes its own). A `Prefetcher` downloads the
files an epoch reads next in a background thread, ahead of the readers.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from scaleforge.errors import ConfigError, DataError, UsageError
from scaleforge.files import cache_home, flocked, remove_unless_locked, sha256_of

SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
MANIFEST = "shards.json"  # a prepared dataset's index
STAMP_DAYS = 30  # a verification stamp older than this is removed: the file it stood for is hashed once more
DAY_S = 24 * 3600
T = TypeVar("T")


def parse_size(text: str | int, key: str) -> int:
    """Bytes from `64MB`, `1.5GiB` or a plain number; `ConfigError` naming `key` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ConfigError(f"{key}: must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}: {text!r} is not a size (such as 512MB, 2GiB or a number of bytes)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def format_size(count: float, *, up: bool = False) -> str:
    """`146.8 MB`; rounded up with `up` (a size that must be reached: never one below it)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            if unit == "B":
                return f"{math.ceil(count) if up else round(count)} {unit}"
            return f"{math.ceil(count * 10) / 10 if up else count:.1f} {unit}"
        count /= 1000
    raise AssertionError  # pragma: no cover


def is_remote(location: str) -> bool:
    """Whether `location` names an object store (`s3://bucket/prefix`) rather than a local folder."""
    return location.startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix without a trailing slash) of `s3://bucket/prefix`."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", url)
    if not match:
        raise ConfigError(f"{url}: an object-store location is s3://bucket/prefix")
    return match.group(1), match.group(2).strip("/")


def s3_client(max_attempts: int = 4) -> Any:
    """A boto3 S3 client from the standard credential chain and endpoint settings, making at most `max_attempts`
    attempts per request."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", config=config)


def describe_s3_error(error: Exception, url: str) -> DataError:
    """One `data error:` line for a failed request to `url`, without credentials or a traceback."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "?")
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            return DataError(f"{url}: not found in the object store ({code})")
        return DataError(f"{url}: the object store refused the request ({code})")
    if isinstance(error, NoCredentialsError):
        return DataError(f"{url}: no credentials for the object store (set AWS_ACCESS_KEY_ID or AWS_PROFILE)")
    if isinstance(error, EndpointConnectionError):
        return DataError(f"{url}: the object store is unreachable after retries ({error})")
    cause = error.__cause__ or error.__context__
    if isinstance(cause, Exception) and cause is not error and not isinstance(error, ValueError):
        return describe_s3_error(cause, url)  # boto3's transfer errors wrap botocore's
    return DataError(f"{url}: object store error after retries ({type(error).__name__}: {error})")


def guarded_s3(url: str, call: Callable[[], Any]) -> Any:
    """`call()`, with boto3's errors (and a malformed endpoint setting) turned into one `data error:` line."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except (BotoCoreError, ClientError, Boto3Error, ValueError) as error:
        raise describe_s3_error(error, url) from None


def check_destination(url: str, overwrite: bool) -> None:
    """Before any work: the bucket of `url` is reachable, and holds no prepared dataset there unless `overwrite`."""
    bucket, prefix = split_url(url)
    client = guarded_s3(url, s3_client)
    guarded_s3(f"s3://{bucket}", lambda: client.head_bucket(Bucket=bucket))
    key = "/".join(filter(None, [prefix, MANIFEST]))
    found = guarded_s3(url, lambda: client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1))
    if found.get("KeyCount", 0) and not overwrite:
        raise UsageError(f"--out {url}: already holds a prepared dataset (pass --overwrite to replace it)")


def upload_folder(folder: Path, url: str, progress: Callable[[int], None] | None = None) -> None:
    """Every file under `folder` to `url` (same relative keys); the manifest last, so a reader never finds a
    manifest whose shards are not all there."""
    bucket, prefix = split_url(url)
    client = guarded_s3(url, s3_client)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == MANIFEST)  # the manifest after every shard
    manifest_key = "/".join(filter(None, [prefix, MANIFEST]))
    guarded_s3(url, lambda: client.delete_object(Bucket=bucket, Key=manifest_key))  # a replaced dataset's, first
    for path in files:
        key = "/".join(filter(None, [prefix, path.relative_to(folder).as_posix()]))
        guarded_s3(f"s3://{bucket}/{key}", lambda path=path, key=key: client.upload_file(str(path), bucket, key))
        if progress is not None:
            progress(path.stat().st_size)


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")


def check_name(name: object) -> str:
    """A file name from a manifest, refused unless it is a relative path inside the dataset (no `..`, no absolute
    path): a manifest is data, and never says where on this machine to read or write."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name.split("/"):
        raise ValueError(f"file name {name!r} is not a relative path inside the dataset")
    return name


class StoredFile(NamedTuple):
    """A file of a dataset as its manifest lists it: its name relative to the dataset's root, its size in bytes and
    its SHA-256."""

    name: str
    size: int
    sha256: str


class ShardStore:
    """Shard files by their path relative to a dataset's root (`train/data-00000-of-00004.arrow`), opened as local
    files.

    A local root is read in place. A remote one is read through the cache (`cache_dir`, at most `cache_limit`
    bytes), where each file is named by its SHA-256, so that datasets sharing a cache, or prepared again at the
    same place, never mistake one file for another. A file is opened under its lock (one process downloads it,
    the others wait), and eviction passes over files being opened. Every file is checked against its SHA-256
    once per node: the check leaves a stamp, keyed by the file's path, size, modification time and inode, that the
    node's other processes and workers find; stamps older than `STAMP_DAYS` are removed (`remove_old_stamps`).
    """

    def __init__(self, location: str, cache_dir: str | None = None, cache_limit: int | None = None) -> None:
        self.location = location.rstrip("/")
        self.remote = is_remote(location)
        self.cache_limit = cache_limit
        self.verified: set[str] = set()  # stamps this process has seen
        self._client: Any = None
        self._client_pid = -1
        if self.remote:
            bucket, _ = split_url(self.location)
            key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
            self.cache = Path(cache_dir) if cache_dir else cache_home("shards") / f"{bucket}-{key}"
            self.remove_partial_downloads()
        else:
            self.cache = Path(self.location)
            if not self.cache.is_dir():
                raise DataError(f"data.path: {location} is not a folder of prepared shards")
        remove_old_stamps()

    def __getstate__(self) -> dict[str, Any]:  # a worker started by spawn makes its own client
        return {**self.__dict__, "_client": None, "_client_pid": -1}

    def url(self, name: str) -> str:
        """Where `name` lives, for messages."""
        return f"{self.location}/{name}"

    def read_manifest(self) -> bytes:
        """The manifest's bytes (always fetched afresh from a remote store)."""
        if not self.remote:
            path = self.cache / MANIFEST
            if not path.is_file():
                raise DataError(
                    f"data.path: {self.location} has no {MANIFEST}; prepare it with `scaleforge data prepare`"
                )
            return path.read_bytes()
        bucket, prefix = split_url(self.location)
        key = "/".join(filter(None, [prefix, MANIFEST]))
        url = self.url(MANIFEST)
        answer = guarded_s3(url, lambda: self.client().get_object(Bucket=bucket, Key=key))
        return guarded_s3(url, lambda: answer["Body"].read())

    def client(self) -> Any:
        """This process's S3 client (made on first use: a forked worker makes its own)."""
        if self._client_pid != os.getpid():
            self._client, self._client_pid = guarded_s3(self.location, s3_client), os.getpid()
        return self._client

    def open(self, name: str, size: int, sha256: str, opener: Callable[[Path], T]) -> T:
        """`opener(path)` of a local, verified copy of file `name` (downloaded into the cache if remote)."""
        if not self.remote:
            path = self.cache / name
            if not path.is_file():
                raise DataError(f"{self.url(name)}: shard file missing")
            self._verify(path, name, size, sha256)
            return opener(path)
        path = self._cached(name, sha256)
        with open(lock_of(path), "a") as lock, flocked(lock):
            self._fetch(path, name, size, sha256, self.client)
            os.utime(lock.fileno())  # recently used: evicted last
            opened = opener(path)  # a memory map outlives the file's removal by an eviction
        self._evict(keep=path)
        return opened

    def fetch(self, file: StoredFile, client: Callable[[], Any]) -> None:
        """Download `file` into the cache (through `client()`) and check it, marked as recently used, unless another
        reader holds its lock (downloading or opening it, so it is on its way): what the `Prefetcher` does."""
        path = self._cached(file.name, file.sha256)
        with open(lock_of(path), "a") as lock, flocked(lock, wait=False) as held:
            if not held:
                return
            self._fetch(path, file.name, file.size, file.sha256, client)
            os.utime(lock.fileno())  # recently used: evicted after the files read before it
        self._evict(keep=path)

    def _cached(self, name: str, sha256: str) -> Path:
        """Where file `name` is kept in the cache: under its SHA-256."""
        path = self.cache / f"{sha256}{Path(name).suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _fetch(self, path: Path, name: str, size: int, sha256: str, client: Callable[[], Any]) -> None:
        """With the file's lock held: `path` downloaded unless it is there, and checked; a damaged copy is
        downloaded once more."""
        for attempt in (1, 2):
            if not path.is_file():
                self._download(name, path, client)
            try:
                self._verify(path, name, size, sha256)
                return
            except DataError:
                path.unlink(missing_ok=True)  # damaged in the cache: fetched once more
                if attempt == 2:
                    raise

    def _verify(self, path: Path, name: str, size: int, sha256: str) -> None:
        stat = path.stat()
        if stat.st_size != size:
            raise DataError(f"{self.url(name)}: shard file does not match the manifest ({stat.st_size} bytes, the "
                            f"manifest says {size})")  # fmt: skip
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{sha256}"
        stamp = stamp_folder() / hashlib.sha256(key.encode()).hexdigest()
        if key in self.verified:
            return
        stamp.parent.mkdir(parents=True, exist_ok=True)
        # the node's other readers wait for this check, then find it done
        with open(stamp, "a+") as file, flocked(file):
            file.seek(0)
            if file.read() != "verified":
                if sha256_of(path) != sha256:
                    raise DataError(f"{self.url(name)}: shard file does not match the manifest (SHA-256 differs)")
                file.write("verified")
        self.verified.add(key)

    def _download(self, name: str, path: Path, client: Callable[[], Any]) -> None:
        bucket, prefix = split_url(self.location)
        key = "/".join(filter(None, [prefix, name]))
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(handle)
        try:
            guarded_s3(self.url(name), lambda: client().download_file(bucket, key, temp))
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def remove_partial_downloads(self) -> None:
        """Delete what downloads of a killed run left in the cache (a download in progress holds its file's lock,
        and is left alone)."""
        for temp in self.cache.glob(".*.*.*"):
            remove_unless_locked(temp, lock_of(temp.with_name(temp.name[1:].rsplit(".", 1)[0])))

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used files until the cache is within its limit, passing over the files other
        readers are opening. When a file was last used is its lock file's modification time: the file's own stays
        that of its download, which its verification stamp is keyed by (touching it would have every process hash
        it again)."""
        if self.cache_limit is None:
            return
        files = []
        for path in self.cache.glob("*"):
            if path.suffix == ".lock" or path.name.startswith("."):
                continue
            try:  # another process may remove a file meanwhile
                stat = path.stat()
            except FileNotFoundError:
                continue
            try:
                used = lock_of(path).stat().st_mtime
            except FileNotFoundError:
                used = stat.st_mtime
            files.append((used, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.cache_limit:
                break
            if path != keep and remove_unless_locked(path, lock_of(path)):
                total -= size


def stamp_folder() -> Path:
    """Where verification stamps are left: `$XDG_CACHE_HOME/scaleforge/verified`."""
    return cache_home("verified")


def remove_old_stamps(folder: Path | None = None, days: int = STAMP_DAYS) -> int:
    """Remove the verification stamps in `folder` (`stamp_folder()`) older than `days`, at most once a day (the
    modification time of the folder's `.swept` file says when it last ran); how many it removed. A stamp removed
    while another process reads or writes it only costs that file one more hash."""
    folder = folder if folder is not None else stamp_folder()
    marker, now = folder / ".swept", time.time()
    try:
        if now - marker.stat().st_mtime < DAY_S:
            return 0
    except FileNotFoundError:
        pass
    try:
        marker.touch()  # before the sweep: processes that start together do not all sweep
    except OSError:  # no folder (nothing verified yet), or one this user cannot write to
        return 0
    removed = 0
    for stamp in folder.iterdir():
        try:
            if stamp != marker and now - stamp.stat().st_mtime > days * DAY_S:
                stamp.unlink()
                removed += 1
        except OSError:  # removed meanwhile by another process's sweep, or not this user's
            continue
    return removed


class Prefetcher:
    """Downloads into a remote store's cache, in a background thread, the files that the readers of an epoch will
    open next, so that they find them there instead of waiting for each download.

    The epoch reads its files window by window (`windows`, each window's files in reading order, ending at sample
    `window_ends` of the epoch's order). While the readers are in a window, the thread fetches the files of that
    window they have not fetched yet and then the next window's, as many as the cache holds beside the current
    window's: eviction then removes older files first (every file fetched is marked as recently used), never the
    ones about to be read. A file that a reader holds (downloading or opening it) is passed over. A download that
    fails is left to the reader that needs the file, which tries again and reports it as it would without a
    prefetcher. The thread's own client makes one attempt per request, so that it never waits out retries, nor
    draws botocore's backoff jitter from Python's random stream, which a checkpoint records: prefetching changes
    when files arrive, never what a run computes or saves.
    """

    def __init__(self, store: ShardStore, windows: Sequence[Sequence[StoredFile]], window_ends: Sequence[int]) -> None:
        self.store = store
        self.windows = [list(window) for window in windows]
        self.window_ends = list(window_ends)
        self._window = 0
        self._stopping = False
        self._changed = threading.Condition()

    def start(self, position: int) -> None:
        """Fetch ahead of the readers from sample `position` of the epoch's order on. Start it after the data
        loader's worker processes exist, so that none is forked with the thread in a download (holding a lock)."""
        self.advance(position)
        # made here, not in the thread: a client may be used from any thread, but boto3's session that makes it may
        # not (and makes it cheaply once this process has made its own)
        client = guarded_s3(self.store.location, lambda: s3_client(max_attempts=1))
        threading.Thread(target=self._run, args=(client,), name="scaleforge-prefetch", daemon=True).start()

    def advance(self, position: int) -> None:
        """The samples before `position` of the epoch's order have been read."""
        window = min(bisect.bisect_right(self.window_ends, position), len(self.windows) - 1)
        with self._changed:
            if window != self._window:
                self._window = window
                self._changed.notify()

    def stop(self) -> None:
        """Fetch nothing more: the thread ends once the file it may be downloading is in (a daemon, it never holds
        up the process's exit)."""
        with self._changed:
            self._stopping = True
            self._changed.notify()

    def _due(self) -> list[StoredFile]:
        """The files the readers need soon, in reading order: the current window's, then the next window's as far as
        the cache holds them beside the current window's."""
        current = self.windows[self._window]
        following = self.windows[self._window + 1] if self._window + 1 < len(self.windows) else []
        limit = self.store.cache_limit
        room = (float("inf") if limit is None else limit) - sum(file.size for file in current)
        due = list(current)
        for file in following:
            if file.size > room:
                break
            room -= file.size
            due.append(file)
        return due

    def _next(self, done: set[str]) -> StoredFile | None:
        """The first due file not handled yet, once there is one; None once stopped."""
        with self._changed:
            while not self._stopping:
                waiting = [file for file in self._due() if file.name not in done]
                if waiting:
                    return waiting[0]
                self._changed.wait()
        return None

    def _run(self, client: Any) -> None:
        done: set[str] = set()
        while (file := self._next(done)) is not None:
            done.add(file.name)
            # whatever fails, the reader that needs the file tries again, and says why if it fails too
            with contextlib.suppress(Exception):
                self.store.fetch(file, lambda: client)


def lock_of(path: Path) -> Path:
    """The lock file beside a cached file."""
    return path.with_name(path.name + ".lock")
