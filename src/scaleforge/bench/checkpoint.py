"""`scaleforge bench checkpoint`: what a checkpoint costs, against `torch.save` of the same state.

The config's model is built on one process with its optimizer, given one step so the optimizer holds its
state, then checkpointed repeatedly into `--out`: a synchronous save (sharded write hashed as it goes, fsync,
manifest, rename), interleaved with `torch.save` of the same model and optimizer state dicts to the same disk
(fsynced too) as the reference; an asynchronous save (how long training is blocked, and how long until it is
committed; the first async save, which allocates the staging buffer the later ones reuse, is shown apart); a
verified load, and `torch.load(weights_only=True)` as its reference. Each figure is the median over `--repeats`;
the save throughput against torch.save is the median of each repeat's ratio.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scaleforge.bench.harness import machine, report
from scaleforge.config import RunConfig, load_config
from scaleforge.training.checkpoint import Checkpointer, load_checkpoint, verify


def _seconds(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _median_seconds(action: Callable[[], Any], repeats: int) -> float:
    return statistics.median(_seconds(action) for _ in range(repeats))


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*model.state_dict().values()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Subject:
    """The model and optimizer state that every save writes, with the progress beside it, and where it goes."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    progress: dict[str, int]
    out: Path
    sync_saver: Checkpointer

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoints" / "step-00000001"

    def fresh(self) -> None:
        shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        (self.out / "torch.pt").unlink(missing_ok=True)
        os.sync()  # each save starts with nothing of the last one still on its way to the disk

    def sync_save(self) -> None:
        self.sync_saver.save(model=self.model, optimizer=self.optimizer, progress=self.progress)

    def torch_save(self) -> None:
        path = self.out / "torch.pt"
        with path.open("wb") as file:  # as durable as a checkpoint: on disk, not only in the page cache
            torch.save({"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}, file)
            file.flush()
            os.fsync(file.fileno())


def run_checkpoint_benchmark(
    config_path: str | None, overrides: Sequence[str], *, repeats: int, out: Path, as_json: bool
) -> dict[str, Any]:
    """Measure, print and return the table; results and the checkpoints written go under `out`."""
    config = load_config(config_path, overrides)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subject = _subject(config, out)
    mib = _state_bytes(subject.model, subject.optimizer) / 2**20
    saves = _interleaved_saves(subject, repeats)
    verify_time = _median_seconds(lambda: verify(subject.checkpoint), repeats)
    load_time = _median_seconds(
        lambda: load_checkpoint(subject.checkpoint, model=subject.model, optimizer=subject.optimizer), repeats
    )
    subject.torch_save()
    torch_load_time = _median_seconds(lambda: torch.load(out / "torch.pt", weights_only=True), repeats)
    first_blocked, blocked, committed = _async_saves(subject, repeats)
    torch_save_time, sync_save_time = statistics.median(saves["torch"]), statistics.median(saves["sync"])
    result = {
        "benchmark": "checkpoint",
        "config": config_path,
        "overrides": list(overrides),
        "model": config.model.architecture,
        "num_parameters": sum(p.numel() for p in subject.model.parameters()),
        "state_mib": mib,
        "repeats": repeats,
        **machine(),
        "seconds": {
            "torch.save + fsync (reference)": torch_save_time,
            "checkpoint, sync (write + SHA-256 + fsync + manifest + rename)": sync_save_time,
            "checkpoint, async: training blocked": statistics.median(blocked),
            "checkpoint, async: training blocked, first save": first_blocked,
            "checkpoint, async: until committed": statistics.median(committed),
            "torch.load(weights_only=True) (reference)": torch_load_time,
            "checkpoint load (DCP, resharding-capable)": load_time,
            "checkpoint verify (SHA-256 of every file)": verify_time,
        },
        # the median over repeats of each repeat's ratio: the disk's speed drifts from one repeat to the next
        "save_throughput_vs_torch_save": statistics.median(
            t / c for t, c in zip(saves["torch"], saves["sync"], strict=True)
        ),
        "async_blocked_vs_sync_save": statistics.median(blocked) / sync_save_time,
    }
    _report(result, out, as_json=as_json)
    return result


def _subject(config: RunConfig, out: Path) -> _Subject:
    """The config's model and optimizer, given one step so that the optimizer holds its state."""
    from scaleforge.training.trainer import build_data, build_model, build_optimizer

    data = build_data(config.data)
    model = build_model(config.model, data.info)
    optimizer = build_optimizer(config.training, model)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    progress = {"step": 1, "epoch": 0, "seed": config.seed, "global_sample_position": 0}
    return _Subject(model, optimizer, progress, out, Checkpointer(out / "checkpoints", keep=1))


def _interleaved_saves(subject: _Subject, repeats: int) -> dict[str, list[float]]:
    """Seconds of each `torch.save` and each sync save; leaves one sync checkpoint behind, for the loads."""
    # interleaved, in alternating order, so that a disk that is slower for a while slows both alike
    saves: dict[str, list[float]] = {"torch": [], "sync": []}
    for repeat in range(repeats):
        order = [("torch", subject.torch_save), ("sync", subject.sync_save)]
        for name, action in order if repeat % 2 == 0 else order[::-1]:
            subject.fresh()
            saves[name].append(_seconds(action))
    subject.fresh()
    subject.sync_save()
    return saves


def _async_saves(subject: _Subject, repeats: int) -> tuple[float, list[float], list[float]]:
    """How long the first async save blocks training, then, for each later one, how long it blocks training and
    how long until it is committed (the first allocates the staging buffer that the others reuse)."""
    async_saver = Checkpointer(subject.out / "checkpoints", keep=1, use_async=True)
    blocked, committed = [], []
    for _ in range(repeats + 1):
        subject.fresh()
        started = time.perf_counter()
        async_saver.save(model=subject.model, optimizer=subject.optimizer, progress=subject.progress)
        blocked.append(time.perf_counter() - started)
        async_saver.wait()
        committed.append(time.perf_counter() - started)
    async_saver.close()
    return blocked[0], blocked[1:], committed[1:]


def _report(result: dict[str, Any], out: Path, *, as_json: bool) -> None:
    """Print the table (or JSON) and write `OUT/checkpoint.json`."""
    mib = result["state_mib"]
    rows = [[name, f"{seconds:.3f}", f"{mib / seconds:,.0f}"] for name, seconds in result["seconds"].items()]
    report(
        result,
        out / "checkpoint.json",
        as_json=as_json,
        title=f"Checkpoint of {result['model']} ({result['num_parameters']:,} parameters), "
        f"{mib:,.0f} MiB of model and optimizer state, median of {result['repeats']}",
        columns=["operation", "seconds", "MiB/s"],
        rows=rows,
        notes=[
            f"save throughput vs torch.save: {result['save_throughput_vs_torch_save']:.2f}; training blocked by "
            f"an async save: {result['async_blocked_vs_sync_save']:.2f} of a sync save; results in {out}/",
        ],
    )
