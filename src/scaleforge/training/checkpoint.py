"""Checkpoints: sharded, atomic and verified, holding everything a run needs to continue as if nothing happened.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/`:

    __R_0.distcp, .metadata   model and optimizer, written by `torch.distributed.checkpoint` (DCP): each process
                              writes its own shards, nothing is gathered to rank 0
    progress.json             step, epoch, the data cursor (a global sample position), scheduler, grad scaler
    rng-R.json                the random states of process R (Python, NumPy, torch, CUDA)
    manifest.json             the size and SHA-256 of every other file, written last

It is written as `step-NNNNNNNN.tmp`, every file is fsynced, the manifest is written, and only then is the folder
renamed into place. A folder without a complete manifest is never loaded, and one whose files do not match
their manifest is reported and passed over for the previous good one. Tensors go through DCP, everything else
scaleforge writes is JSON; DCP's own pickles (its metadata, the optimizer's non-tensor values) are read back by
restricted unpicklers (`_MetadataUnpickler`, `_SafeLoadPlanner`), so that a crafted checkpoint runs nothing.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from scaleforge.errors import ScaleforgeWarning, UsageError, first_line
from scaleforge.runs import (
    HASH_THREADS,
    SIGNATURE,
    ManifestMismatch,
    check_manifest,
    fsync_dir,
    sign,
    write_durably,
)

PREFIX = "step-"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"

# flat optimizer keys (`state.<param name>.<field>`): pipeline stages hold different parameters, and nested
# param_groups would collide between them
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Files (and threads) each process writes its shards with: the writes and the hashing then run in parallel;
# 2 made a 0.8 GB single-process save 1.5x faster on 2 cores (`scaleforge bench checkpoint`).
WRITER_THREADS = HASH_THREADS  # the count its files are hashed with when checked
# How much of a file is written before the kernel is asked to write it back (see `_HashingStream`); not on macOS.
WRITEBACK_BYTES = 16 << 20
FADVISE = getattr(os, "posix_fadvise", None)
DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", 4)
# DCP warns on every single-process save and load (also from its async writer's thread), a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


class DamagedCheckpoint(Exception):
    """A checkpoint folder whose files do not match its manifest (or that has none)."""


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimizer steps."""
    return f"{PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint folders committed into place (renamed from their temporary name), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and "." not in p.name)


# ------------------------------------------------------------------------------------------------ saving


class Checkpointer:
    """Writes a run's checkpoints into `checkpoint_dir`, keeping the newest `keep` good ones.

    Every process calls `save`: each writes its own shards and random states, hashing them as it writes; rank 0
    prepares the folder, adds `progress.json`, gathers every process's file digests and commits the checkpoint
    (manifest, rename, retention) once every process has written. With `use_async`, `save` returns as soon as
    the state is copied into a CPU buffer that is kept between checkpoints: DCP writes it from a thread (over a
    gloo process group of its own), and the commit follows in another; at most one checkpoint is in flight, and
    `wait` (called by the next `save` and at the end) returns once it is committed.
    """

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        keep: int,
        use_async: bool = False,
        timeout_s: float = 600.0,
        signing_key: bytes | None = None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.keep = keep
        self.signing_key = signing_key  # each manifest is signed with it (HMAC-SHA256)
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        # async saves need a CPU group of their own (also on one process in a group, which DCP checks), waiting
        # `timeout_s` for a peer like the others
        self._group = None
        if use_async and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if use_async else None
        # one writer for every async save, so that its staging buffer (a CPU copy of the state) is reused
        self._async_writer = _Writer(checkpoint_dir, cache_staged_state_dict=True) if use_async else None
        self._pending: Future[Any] | None = None

    def save(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        progress: dict[str, Any],
        own: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Checkpoint the state after `progress["step"]` steps; returns the folder it is (or will be) committed to.
        `own` holds tensors of this process alone (PowerSGD's error feedback), saved under `comm.rankR`."""
        self.wait()
        final = self.checkpoint_dir / checkpoint_name(progress["step"])
        staging = final.with_name(final.name + ".tmp")
        files: dict[str, Any] = {}  # this process's files and their digests
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            files[PROGRESS] = _write_json(staging / PROGRESS, progress)
        if self.distributed:
            dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
        files[f"rng-{self.rank}.json"] = _write_json(staging / f"rng-{self.rank}.json", capture_rng())
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
        if own:
            state[OWN] = {f"rank{self.rank}": own}
        writer = self._async_writer or _Writer(staging)
        writer.fs = digests = _HashingFileSystem()
        if self._committer is None:
            dcp.save(state, checkpoint_id=staging, storage_writer=writer, no_dist=not self.distributed)
            self._commit_when_written(None, files, digests, staging, final)
            if self.distributed:
                dist.barrier()  # the checkpoint is in place when any process returns
            return final
        # returns once the state is copied to CPU memory; the future is done when every process has written
        # its shards and rank 0 the metadata
        written = dcp.async_save(
            state,
            checkpoint_id=staging,
            storage_writer=writer,
            process_group=self._group,
            no_dist=not self.distributed,
        )
        self._pending = self._committer.submit(self._commit_when_written, written, files, digests, staging, final)
        return final

    def wait(self) -> None:
        """Return once the checkpoint in flight (if any) is written and committed; its failure is raised here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Wait for the checkpoint in flight and stop the writer threads."""
        try:
            self.wait()
        finally:
            if self._committer is not None:
                self._committer.shutdown()

    @contextlib.contextmanager
    def open(self) -> Iterator[Checkpointer]:
        """Close on the way out; on an error, leave the checkpoint in flight uncommitted rather than wait for
        it (its peers may be gone), which loses nothing: the previous checkpoint stays in place."""
        try:
            yield self
        except BaseException:
            if self._committer is not None:
                self._committer.shutdown(wait=False, cancel_futures=True)
            raise
        self.close()

    def _commit_when_written(
        self,
        written: Future[Any] | None,
        files: dict[str, Any],
        digests: _HashingFileSystem,
        staging: Path,
        final: Path,
    ) -> None:
        """Every process: once its shards are written, hand their digests to rank 0, which commits."""
        if written is not None:
            written.result()
        files.update(digests.files)
        every: list[Any] | None = [files]
        if self.distributed:
            every = [None] * dist.get_world_size() if self.rank == 0 else None
            dist.gather_object(files, every, dst=0, group=self._group)
        if every is not None:  # rank 0
            self._commit(staging, final, {name: d for process in every for name, d in process.items()})

    def _commit(self, staging: Path, final: Path, files: dict[str, Any]) -> None:
        """Rank 0: manifest last, then the rename that makes the checkpoint count; only then older ones go."""
        manifest: dict[str, Any] = {"files": dict(sorted(files.items()))}
        if self.signing_key is not None:
            manifest[SIGNATURE] = sign(manifest["files"], self.signing_key)
        _write_json(staging / MANIFEST, manifest)
        fsync_dir(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        fsync_dir(self.checkpoint_dir)
        for old in list_checkpoints(self.checkpoint_dir)[: -self.keep]:  # never the newest good one
            shutil.rmtree(old, ignore_errors=True)


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer with WRITER_THREADS threads (each process writes that many shard files), whose staging
    buffer for async saves is pinned only where there is a GPU (DCP pins it always, which fails without one)."""

    fs: _HashingFileSystem

    def __init__(self, path: Path, cache_staged_state_dict: bool = False) -> None:
        super().__init__(path, thread_count=WRITER_THREADS, cache_staged_state_dict=cache_staged_state_dict)
        self._cached_layout: list[tuple[str, Any, Any]] | None = None

    def write_data(self, plan: Any, planner: Any) -> Future[Any]:
        # DCP's extra writer threads die silently on an error (a full disk), leaving items unwritten: fail the
        # save instead (on every process: DCP shares the failure), so that no such checkpoint is committed
        written = super().write_data(plan, planner)
        results = written.wait()
        if len(results) != len(plan.items):
            cause = self.fs.failures[0] if self.fs.failures else None
            missing = len(plan.items) - len(results)
            raise OSError(f"{missing} of {len(plan.items)} items were not written to {self.path}: {cause}") from cause
        return written

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if not self.cache_staged_state_dict:
            return super().stage(state_dict)
        self.per_thread_copy_ahead = 0  # as DCP's: the state is already on the CPU when it is written
        layout = _layout(state_dict)
        if self.state_dict_cache is None or layout != self._cached_layout:  # a process's own tensors may change
            self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
            self._cached_layout = layout
        return _copy_state_dict(state_dict, self.state_dict_cache)


def _layout(state: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The names, shapes and dtypes of a (nested) state dict's tensors: what a staging buffer must match."""
    if isinstance(state, dict):
        return [entry for key, value in state.items() for entry in _layout(value, f"{prefix}{key}.")]
    if isinstance(state, torch.Tensor):
        return [(prefix, tuple(state.shape), state.dtype)]
    return [(prefix, None, None)]


class _HashingFileSystem(FileSystem):
    """DCP's local file system, except that each file's size and SHA-256 are taken from the bytes as they are
    written (the manifest needs no second read), and the kernel is asked to write them to disk every
    WRITEBACK_BYTES, so that the disk works while the rest is still being produced rather than all at the final
    fsync. Reading the files again to hash them cost 0.26 s for 794 MiB; the early writeback took a save from
    1.00 to 0.92 s (medians; `scaleforge bench checkpoint`, benchmarks/RESULTS.md)."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream)
            try:
                yield hashing
            except BaseException as error:
                with self._lock:
                    self.failures.append(error)
                raise
            finally:
                hashing.close()  # into the file while it is open
        with self._lock:
            self.files[Path(path).name] = hashing.record()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes its metadata under a temporary name first
        with self._lock:
            if Path(path).name in self.files:
                self.files[Path(new_path).name] = self.files.pop(Path(path).name)


class _HashingStream(io.RawIOBase):
    """A file open for writing that hashes what passes through it. DCP writes each file front to back."""

    def __init__(self, raw: io.IOBase) -> None:
        super().__init__()
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0
        self.written_back = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        count = self.raw.write(data)
        self.digest.update(memoryview(data)[:count])
        self.size += count
        if FADVISE is not None and self.size - self.written_back >= WRITEBACK_BYTES:
            self.raw.flush()
            # starts writing the range back to disk without waiting for it (Linux); the fsync at the end waits
            with contextlib.suppress(OSError):
                FADVISE(self.raw.fileno(), self.written_back, self.size - self.written_back, DONTNEED)
            self.written_back = self.size
        return count

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        # DCP asks for it to fsync the file, sometimes before it flushes: what is buffered must reach the file first
        self.raw.flush()
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def record(self) -> dict[str, Any]:
        """The manifest's entry for this file."""
        return {"bytes": self.size, "sha256": self.digest.hexdigest()}


def _write_json(path: Path, data: Any) -> dict[str, Any]:
    """Write `path` durably; returns its manifest entry."""
    return write_durably(path, json.dumps(data, indent=1).encode())


# ------------------------------------------------------------------------------------------------ loading


def verify(folder: Path, signing_key: bytes | None = None) -> None:
    """Check every file of `folder` against its manifest (`check_manifest`: and its signature when a `signing_key`
    is given), and its metadata; raise `DamagedCheckpoint` saying what is wrong."""
    try:
        files = check_manifest(folder, signing_key)
    except ManifestMismatch as error:
        raise DamagedCheckpoint(str(error)) from error
    for name in (PROGRESS, ".metadata"):
        if name not in files:
            raise DamagedCheckpoint(f"its manifest does not list {name}")
    metadata = read_metadata(folder)  # read safely here, so that a crafted one is refused before DCP opens it
    try:
        holding = {info.relative_path for info in (metadata.storage_data or {}).values()}
    except (AttributeError, TypeError) as error:
        raise DamagedCheckpoint(f"its metadata does not say where its tensors are ({error})") from error
    unlisted = holding - files.keys()
    if unlisted:
        raise DamagedCheckpoint(f"its manifest does not list {', '.join(sorted(unlisted))}, which hold its tensors")


def read_metadata(folder: Path) -> Metadata:
    """DCP's `.metadata` of `folder`, unpickled by `_MetadataUnpickler`; `DamagedCheckpoint` if it is refused."""
    try:
        with (folder / ".metadata").open("rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except Exception as error:  # whatever a crafted or cut-short file makes the unpickler raise: damaged
        detail = str(error) if isinstance(error, pickle.UnpicklingError) else f"{type(error).__name__}: {error}"
        raise DamagedCheckpoint(f"its metadata is refused: {detail}") from error
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpoint(f"its metadata is a {type(metadata).__name__}, not DCP metadata")
    return metadata


def newest_good_checkpoint(checkpoint_dir: Path, warn: bool = True, signing_key: bytes | None = None) -> Path | None:
    """The newest checkpoint that verifies; each damaged (or, with `signing_key`, unsigned or wrongly signed) newer
    one is reported (when `warn`) and passed over."""
    for folder in reversed(list_checkpoints(checkpoint_dir)):
        try:
            verify(folder, signing_key)
        except DamagedCheckpoint as error:
            if warn:
                warnings.warn(
                    f"checkpoint {folder} is damaged and is skipped: {error}", ScaleforgeWarning, stacklevel=2
                )
            continue
        return folder
    return None


def checked_checkpoint(path: Path, signing_key: bytes | None = None) -> Path:
    """`path` (a checkpoint folder given by the user), verified; a usage error says what is wrong."""
    if not path.is_dir():
        raise UsageError(f"--resume: {path} is not a checkpoint folder")
    try:
        verify(path, signing_key)
    except DamagedCheckpoint as error:
        raise UsageError(f"--resume: checkpoint {path} cannot be used: {error}") from error
    return path


def load_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    own: OwnState | None = None,
    tied: Sequence[Sequence[str]] = (),
) -> dict[str, Any]:
    """Load `folder` (already verified) into `model` and `optimizer` and this process's random states, whatever
    the number of processes that wrote it; returns its progress. `own` gets this process's own tensors (see
    `Checkpointer.save`) when as many processes wrote the checkpoint as read it, else nothing (`own.starts_afresh`
    says why). `tied` lists the names of each weight tied across pipeline stages: a checkpoint written by a
    process that held the weight once keeps its optimizer state under one of them, which the others read."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    model_state, optim_state = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
    renamed = _tied_renames(optim_state, read_metadata(folder), tied) if tied else {}
    _rename_optimizer_state(optim_state, renamed)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    rank = dist.get_rank() if distributed else 0
    if own is not None:
        mine = own_template(read_metadata(folder), rank, dist.get_world_size() if distributed else 1, own)
        if mine is not None:
            state[OWN] = {f"rank{rank}": mine}
    try:
        dcp.load(
            state, storage_reader=SafeFileSystemReader(folder), planner=_SafeLoadPlanner(), no_dist=not distributed
        )
    except CheckpointException as error:  # a value the weights-only unpickler refused, a shard cut short, ...
        causes = [cause for cause, _ in error.failures.values()]
        detail = first_line(causes[0]) if causes else first_line(error)
        raise UsageError(f"checkpoint {folder} cannot be loaded: {detail}") from error
    _rename_optimizer_state(state["optim"], {saved: name for name, saved in renamed.items()})
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=STATE_DICT_OPTIONS,
    )
    if own is not None and OWN in state:
        own.load_state_dict(state[OWN][f"rank{rank}"])
    rng_file = folder / f"rng-{rank}.json"
    # a run resumed on more processes than wrote the checkpoint: the new ones take rank 0's streams
    restore_rng(json.loads((rng_file if rng_file.is_file() else folder / "rng-0.json").read_text()))
    return json.loads((folder / PROGRESS).read_text())


def _tied_renames(optim_state: dict[str, Any], metadata: Metadata, tied: Sequence[Sequence[str]]) -> dict[str, str]:
    """{a tied weight's name here: the name the checkpoint keeps its optimizer state under}, where they differ
    (the optimizer's state dict is flat: `state.<name>.<key>`, `param_groups.<name>.<key>`)."""
    saved = [key.removeprefix("optim.") for key in metadata.state_dict_metadata if key.startswith("optim.state.")]
    renames = {}
    for names in tied:
        present = [name for name in names if any(key.startswith(f"state.{name}.") for key in saved)]
        for name in names:
            held = any(key.startswith(f"state.{name}.") for key in optim_state)
            if held and present and name not in present:
                renames[name] = present[0]
    return renames


def _rename_optimizer_state(optim_state: dict[str, Any], renames: dict[str, str]) -> None:
    """Move parameters' entries of a flat optimizer state dict to other names, in place."""
    for old, new in renames.items():
        for kind in ("state", "param_groups"):
            for key in [key for key in optim_state if key.startswith(f"{kind}.{old}.")]:
                optim_state[f"{kind}.{new}.{key.removeprefix(f'{kind}.{old}.')}"] = optim_state.pop(key)


OWN = "comm"  # the checkpoint's tensors of each process alone: comm.rankR.<name>


class OwnState(Protocol):
    """What holds tensors of one process alone (a gradient reduction's error feedback, say)."""

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def starts_afresh(self, reason: str) -> None:
        """Told that the checkpoint holds nothing for this process, and why."""
        ...


def own_template(metadata: Metadata, rank: int, world_size: int, own: OwnState) -> dict[str, torch.Tensor] | None:
    """Empty tensors of this process's own entries in a checkpoint's metadata, to load them into; None (and `own`
    told why) when the checkpoint has none, or was written by another number of processes."""
    prefix = f"{OWN}.rank"
    writers = {key[len(prefix) :].partition(".")[0] for key in metadata.state_dict_metadata if key.startswith(prefix)}
    if not writers:
        own.starts_afresh("the checkpoint holds none")
        return None
    if len(writers) != world_size:
        own.starts_afresh(f"the checkpoint's was written by {len(writers)} processes, this run has {world_size}")
        return None
    mine = f"{prefix}{rank}."
    template = {}
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith(mine):
            size, dtype = entry.size, entry.properties.dtype  # type: ignore[union-attr]
            template[key[len(mine) :]] = torch.empty(size, dtype=dtype)
    return template


PATHLIB = ("pathlib", "pathlib._local")


def _metadata_classes() -> dict[tuple[str, str], Any]:
    """Every global a DCP `.metadata` may name, by exact (module, name): its dataclasses and enum, torch's `Size`,
    dtypes and layout lookup, and the path of the checkpoint. Nothing else can be named, and no name is resolved
    through a module's attributes (pickle would follow a dotted `os.system` through any module that imports os)."""
    import collections
    import pathlib

    from torch.distributed.checkpoint import metadata
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    classes: list[Any] = [
        metadata.Metadata,
        metadata.MetadataIndex,
        metadata.StorageMeta,
        metadata.TensorProperties,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata._MEM_FORMAT_ENCODING,
        _StorageInfo,
        torch.Size,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        collections.OrderedDict,
    ]
    allowed = {(c.__module__, c.__qualname__): c for c in classes}
    # paths pickle under the module that defines them: `pathlib` up to Python 3.12, `pathlib._local` after
    allowed |= {(module, c.__qualname__): c for c in (pathlib.PosixPath, pathlib.PurePosixPath) for module in PATHLIB}
    # `torch.strided` and the like are pickled as a call of this lookup with the layout's name
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return allowed


class _MetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP's `.metadata` and nothing else (the pattern of Python's `pickle` docs, "Restricting
    Globals"): only the exact globals of `_metadata_classes` can be named, so that the only things a file can
    call are those classes' constructors and the layout lookup. The pure-Python unpickler, so that BUILD (which
    sets attributes) can be refused on anything but an instance of those classes: on a class itself it would
    rewrite that class for the whole process. A `.metadata` is a few KiB to a few MiB, read once per load."""

    ALLOWED = _metadata_classes()
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        allowed = self.ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return allowed

    def load_build(self) -> None:
        instance = self.stack[-2]  # below the state BUILD sets on it
        if isinstance(instance, type) or type(instance) not in self._buildable:
            raise pickle.UnpicklingError(f"a {type(instance).__name__} is not built by a checkpoint's metadata")
        super().load_build()

    def load_extension(self) -> None:
        raise pickle.UnpicklingError("a checkpoint's metadata names no pickle extension codes")

    dispatch[pickle.BUILD[0]] = load_build
    for _code in (pickle.EXT1, pickle.EXT2, pickle.EXT4):  # resolved through copyreg's cache, not find_class
        dispatch[_code[0]] = load_extension
    del _code
    # instances only, and not an enum's members: those are shared by the whole process
    _buildable = frozenset(c for c in ALLOWED.values() if isinstance(c, type) and not issubclass(c, enum.Enum))


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that values stored as bytes rather than tensors (the optimizer's
    hyperparameters: floats, bools, tuples) are unpickled by torch's weights-only unpickler: DCP's own planner
    reads them with `torch.load(weights_only=False)`, which would run whatever a crafted checkpoint holds."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)  # refused here if it is more than data
        checked.seek(0)
        super().load_bytes(read_item, checked)  # which unpickles, unrestricted, only what was just written


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, except that the metadata is read by `_MetadataUnpickler` rather than `pickle.load`
    (tensors DCP reads as raw storage; other values `_SafeLoadPlanner` reads)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # scaleforge writes one global metadata file
            raise FileNotFoundError(self._get_metadata_path(kwargs["rank"]))
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------------------------------------------ random states


def capture_rng() -> dict[str, Any]:
    """This process's random states (Python, NumPy, torch CPU and every CUDA device) as JSON-able data."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": position, "has_gauss": has_gauss, "cached": cached},
        "torch": _encode(torch.get_rng_state()),
        "cuda": [_encode(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng(states: dict[str, Any]) -> None:
    """Set this process's random states from `capture_rng`'s data."""
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = states["numpy"]
    keys = np.array(numpy["keys"], dtype=np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(_decode(states["torch"]))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(_decode_all(states["cuda"][: torch.cuda.device_count()]))


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _decode_all(texts: Iterable[str]) -> list[torch.Tensor]:
    return [_decode(text) for text in texts]
