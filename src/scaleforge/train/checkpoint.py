"""Periodic checkpoints: a named map of state saved with `torch.distributed.checkpoint` (DCP).

Each checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding DCP's shard files for the model and
optimizer, and `progress.json` for the small non-tensor state (step, epoch, data position, scheduler).
It is written under a temporary name and renamed into place, so a folder with the final name is complete.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimizer steps."""
    return f"{PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and "." not in p.name)


def save_checkpoint(
    checkpoint_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint for `progress["step"]`, then delete all but the newest `keep`.

    Every process calls this: each writes its own shards; rank 0 prepares the folder, adds `progress.json` and
    renames it into place once all shards are written.
    """
    distributed = dist.is_initialized()
    is_main = not distributed or dist.get_rank() == 0
    final = checkpoint_dir / checkpoint_name(progress["step"])
    staging = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if distributed:
        dist.barrier()
    # flat optimizer keys (`state.<param name>.<field>`): pipeline stages hold different parameters, and nested
    # param_groups would collide between them
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    with warnings.catch_warnings():  # DCP warns on every single-process save, which is a supported case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging, no_dist=not distributed)
    if is_main:
        (staging / "progress.json").write_text(json.dumps(progress, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if distributed:
        dist.barrier()  # the checkpoint is in place when any process returns
    return final
