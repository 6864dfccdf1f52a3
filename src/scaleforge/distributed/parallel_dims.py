"""The sizes of the data-, tensor- and pipeline-parallel dimensions, checked against the world size, and the
device mesh they span."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch._C._distributed_c10d import Backend
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from scaleforge.config import MESH_DIMENSIONS, ParallelSection
from scaleforge.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """`strategy` over `dp` x `tp` x `pp` processes (mesh order: pp, dp, tp; tp innermost, on neighbouring ranks)."""

    strategy: str
    dp: int
    tp: int
    pp: int

    @classmethod
    def resolve(cls, section: ParallelSection, world_size: int) -> ParallelDims:
        """The dimensions `section` asks for on `world_size` processes; bad arithmetic is a config error."""
        strategy = section.strategy
        if strategy == "auto":
            strategy = "single" if world_size == 1 else "ddp"
        if strategy == "single":
            if world_size > 1:
                raise ConfigError(
                    f"parallel.strategy: single runs one process, but {world_size} were started; "
                    "use ddp, fsdp, tp, pp or hybrid"
                )
            return cls("single", 1, 1, 1)
        if strategy == "pp" and world_size == 1:
            raise ConfigError("parallel.strategy: pp needs a process per stage, at least 2; start them with --nproc")
        sizes = {"dp": section.dp, "tp": section.tp, "pp": section.pp}
        dimensions = MESH_DIMENSIONS[strategy]
        if len(dimensions) == 1:  # one dimension spans every process
            only = dimensions[0]
            given = sizes[only]
            if given not in (None, 1) and given != world_size:
                raise ConfigError(
                    f"parallel.{only}: {given} does not match the {world_size} processes of "
                    f"parallel.strategy={strategy}"
                )
            sizes = {"dp": 1, "tp": 1, "pp": 1, only: world_size}
        elif sizes["dp"] is None:
            model_parallel = section.tp * section.pp
            if world_size % model_parallel:
                raise ConfigError(
                    f"parallel: {world_size} processes do not divide into parallel.tp={section.tp} x "
                    f"parallel.pp={section.pp} = {model_parallel}"
                )
            sizes["dp"] = world_size // model_parallel
        dims = cls(strategy, sizes["dp"], sizes["tp"], sizes["pp"])  # type: ignore[arg-type]
        if dims.dp * dims.tp * dims.pp != world_size:
            raise ConfigError(
                f"parallel: dp={dims.dp} x tp={dims.tp} x pp={dims.pp} = {dims.dp * dims.tp * dims.pp}, "
                f"but {world_size} processes were started; the product must equal the number of processes"
            )
        return dims

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def shards_data(self) -> bool:
        """Whether parameters are sharded over the dp dimension (FSDP2) rather than replicated (DDP)."""
        return self.strategy == "fsdp" or (self.strategy == "hybrid" and self.dp > 1)

    def build_mesh(self, device_type: str, timeout_s: float) -> DeviceMesh:
        """The (pp, dp, tp) device mesh over every process; size-1 dimensions are kept so code can always slice.
        Its process groups wait `timeout_s` for a peer, as the default group does (left alone, the groups of a
        dimension smaller than the world would wait torch's default of 30 minutes)."""
        names = ("pp", "dp", "tp")
        options = group_options(device_type, timedelta(seconds=timeout_s))
        return init_device_mesh(
            device_type,
            (self.pp, self.dp, self.tp),
            mesh_dim_names=names,
            backend_override=dict.fromkeys(names, options),
        )


def group_options(device_type: str, timeout: timedelta) -> Backend.Options:
    """Options for a new process group on `device_type` (nccl on CUDA, else gloo) that waits `timeout`."""
    if device_type == "cuda":
        options = dist.ProcessGroupNCCL.Options()  # nccl accepts no other kind
        options._timeout = timeout
        return options
    return Backend.Options("gloo", timeout)
