"""The process's place in a distributed run (rank, local rank, world size, from the launcher's environment) and
its device."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from scaleforge.errors import ConfigError

# Collectives wait this long for a peer before failing, so a dead or hung peer ends the run instead of stalling it.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits, as torch's elastic launcher (or `torchrun`) describes it in the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls) -> DistEnv:
        """Read RANK, LOCAL_RANK and WORLD_SIZE; a process started without a launcher is rank 0 of 1."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics and final files."""
        return self.rank == 0


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks cuda (this process's GPU: `cuda:LOCAL_RANK`), then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"hardware.device: '{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from error
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ConfigError(f"hardware.device: '{name}' is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Join the process group: nccl on CUDA, gloo otherwise; each process pins its own GPU first."""
    if not env.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT, device_id=device if backend == "nccl" else None)


def teardown_distributed() -> None:
    """Leave the process group. The caller drops its model and optimizer first: gloo can abort at exit otherwise."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
