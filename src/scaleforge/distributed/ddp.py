"""Data parallelism with DistributedDataParallel: parameters replicated, gradients all-reduced."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device: torch.device) -> DistributedDataParallel:
    """Wrap `model` (already compiled in place, if asked: DDP goes outside compile) for the processes of `dp_mesh`."""
    return DistributedDataParallel(
        model,
        process_group=dp_mesh.get_group(),
        device_ids=[device.index] if device.type == "cuda" else None,
    )
