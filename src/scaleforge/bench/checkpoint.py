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
from pathlib import Path
from typing import Any

import torch

from scaleforge.bench.harness import machine, report
from scaleforge.config import load_config
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


def run_checkpoint_benchmark(
    config_path: str | None, overrides: Sequence[str], *, repeats: int, out: Path, as_json: bool
) -> dict[str, Any]:
    """Measure, print and return the table; results and the checkpoints written go under `out`."""
    from scaleforge.training.trainer import build_data, build_model, build_optimizer

    config = load_config(config_path, overrides)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = build_data(config.data)
    model = build_model(config.model, data.info)
    optimizer = build_optimizer(config.training, model)
    for parameter in model.parameters():  # one step, so that the optimizer holds its state
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    size = _state_bytes(model, optimizer)
    progress = {"step": 1, "epoch": 0, "seed": config.seed, "global_sample_position": 0}

    def fresh() -> None:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "torch.pt").unlink(missing_ok=True)
        os.sync()  # each save starts with nothing of the last one still on its way to the disk

    sync_saver = Checkpointer(out / "checkpoints", keep=1)

    def sync_save() -> None:
        sync_saver.save(model=model, optimizer=optimizer, progress=progress)

    def torch_save() -> None:
        path = out / "torch.pt"
        with path.open("wb") as file:  # as durable as a checkpoint: on disk, not only in the page cache
            torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, file)
            file.flush()
            os.fsync(file.fileno())

    # interleaved, in alternating order, so that a disk that is slower for a while slows both alike
    saves: dict[str, list[float]] = {"torch": [], "sync": []}
    for repeat in range(repeats):
        order = [("torch", torch_save), ("sync", sync_save)]
        for name, action in order if repeat % 2 == 0 else order[::-1]:
            fresh()
            saves[name].append(_seconds(action))
    fresh()
    sync_save()
    checkpoint = out / "checkpoints" / "step-00000001"
    verify_time = _median_seconds(lambda: verify(checkpoint), repeats)
    load_time = _median_seconds(lambda: load_checkpoint(checkpoint, model=model, optimizer=optimizer), repeats)
    torch_save()
    torch_load_time = _median_seconds(lambda: torch.load(out / "torch.pt", weights_only=True), repeats)

    async_saver = Checkpointer(out / "checkpoints", keep=1, use_async=True)
    blocked, committed = [], []
    for _ in range(repeats + 1):  # the first allocates the staging buffer that the others reuse
        fresh()
        started = time.perf_counter()
        async_saver.save(model=model, optimizer=optimizer, progress=progress)
        blocked.append(time.perf_counter() - started)
        async_saver.wait()
        committed.append(time.perf_counter() - started)
    async_saver.close()
    first_blocked = blocked.pop(0)
    committed.pop(0)
    torch_save_time, sync_save_time = statistics.median(saves["torch"]), statistics.median(saves["sync"])

    mib = size / 2**20
    rows_data = [
        ("torch.save + fsync (reference)", torch_save_time, None),
        ("checkpoint, sync (write + SHA-256 + fsync + manifest + rename)", sync_save_time, None),
        ("checkpoint, async: training blocked", statistics.median(blocked), None),
        ("checkpoint, async: training blocked, first save", first_blocked, None),
        ("checkpoint, async: until committed", statistics.median(committed), None),
        ("torch.load(weights_only=True) (reference)", torch_load_time, None),
        ("checkpoint load (DCP, resharding-capable)", load_time, None),
        ("checkpoint verify (SHA-256 of every file)", verify_time, None),
    ]
    result = {
        "benchmark": "checkpoint",
        "config": config_path,
        "overrides": list(overrides),
        "model": config.model.architecture,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "state_mib": mib,
        "repeats": repeats,
        **machine(),
        "seconds": {name: seconds for name, seconds, _ in rows_data},
        # the median over repeats of each repeat's ratio: the disk's speed drifts from one repeat to the next
        "save_throughput_vs_torch_save": statistics.median(
            t / c for t, c in zip(saves["torch"], saves["sync"], strict=True)
        ),
        "async_blocked_vs_sync_save": statistics.median(blocked) / sync_save_time,
    }
    rows = [[name, f"{seconds:.3f}", f"{mib / seconds:,.0f}"] for name, seconds, _ in rows_data]
    report(
        result,
        out / "checkpoint.json",
        as_json=as_json,
        title=f"Checkpoint of {config.model.architecture} ({result['num_parameters']:,} parameters), "
        f"{mib:,.0f} MiB of model and optimizer state, median of {repeats}",
        columns=["operation", "seconds", "MiB/s"],
        rows=rows,
        notes=[
            f"save throughput vs torch.save: {result['save_throughput_vs_torch_save']:.2f}; training blocked by "
            f"an async save: {result['async_blocked_vs_sync_save']:.2f} of a sync save; results in {out}/",
        ],
    )
    return result
