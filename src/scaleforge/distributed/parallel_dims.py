"""The sizes of the data-, tensor- and pipeline-parallel dimensions, checked against the world size, and the
device mesh they span (with the data-parallel dimension split into replicating and sharding groups for HSDP)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch._C._distributed_c10d import Backend
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from scaleforge.config import MESH_DIMENSIONS, SPLITS_DP, ParallelSection
from scaleforge.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """`strategy` over `dp` x `tp` x `pp` processes (mesh order: pp, dp, tp; tp innermost, on neighbouring ranks).
    Under HSDP the dp processes are `dp_replicate` groups of `dp_shard` (mesh order: pp, dp_replicate, dp_shard, tp:
    a sharding group on neighbouring ranks, within a node where it fits)."""

    strategy: str
    dp: int
    tp: int
    pp: int
    dp_replicate: int = 1

    @classmethod
    def resolve(cls, section: ParallelSection, world_size: int, per_node: int | None = None) -> ParallelDims:
        """The dimensions `section` asks for on `world_size` processes, `per_node` of them on each node (default:
        all on one); bad arithmetic is a config error."""
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
        if strategy in SPLITS_DP:
            replicate = _replicas(section, dims.dp, per_node or world_size, hsdp=strategy == "hsdp")
            dims = cls(strategy, dims.dp, dims.tp, dims.pp, replicate)
        return dims

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def dp_shard(self) -> int:
        """Processes that shard one copy of the model (every dp process but under HSDP)."""
        return self.dp // self.dp_replicate

    @property
    def shards_data(self) -> bool:
        """Whether parameters are sharded (or, under HSDP, replicated) over the dp dimension by FSDP2, not DDP."""
        return self.strategy in ("fsdp", "hsdp") or (self.strategy == "hybrid" and self.dp > 1)

    def build_mesh(self, device_type: str, timeout_s: float) -> DeviceMesh:
        """The (pp, dp, tp) device mesh over every process; size-1 dimensions are kept so code can always slice.
        Under HSDP, dp is (dp_replicate, dp_shard), flattened into one dimension named dp as well: the data split
        and the reductions over every replica read it, FSDP2 takes the two. Its process groups wait `timeout_s`
        for a peer, as the default group does (left alone, the groups of a dimension smaller than the world would
        wait torch's default of 30 minutes)."""
        split = self.dp_replicate > 1
        names = ("pp", "dp_replicate", "dp_shard", "tp") if split else ("pp", "dp", "tp")
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp) if split else (self.pp, self.dp, self.tp)
        options = group_options(device_type, timedelta(seconds=timeout_s))
        mesh = init_device_mesh(
            device_type, shape, mesh_dim_names=names, backend_override=dict.fromkeys(names, options)
        )
        if split:
            mesh["dp_replicate", "dp_shard"]._flatten("dp", backend_override=options)
        return mesh

    def fsdp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The mesh FSDP2 shards over: dp, or (dp_replicate, dp_shard) for HSDP (sharded within a group,
        replicated across groups)."""
        return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp"]


def _replicas(section: ParallelSection, dp: int, per_node: int, *, hsdp: bool) -> int:
    """How many groups replicate the model over `dp` processes (`parallel.dp_replicate` x `parallel.dp_shard`):
    one size given, the other what remains; neither, for hsdp, a group per node (sharded within it), else 1."""
    replicate, shard = section.dp_replicate, section.dp_shard
    if replicate is None and shard is None:
        if not hsdp:
            return 1
        if dp % per_node:
            raise ConfigError(
                f"parallel.strategy: hsdp shards within a node by default, but {per_node} processes a node do not "
                f"divide its {dp}; set parallel.dp_shard (or parallel.dp_replicate)"
            )
        return dp // per_node
    if replicate is None:
        replicate = dp // shard if shard and dp % shard == 0 else 0
        if not replicate:
            raise ConfigError(f"parallel.dp_shard: {shard} does not divide the {dp} data-parallel processes")
    shard = dp // replicate if shard is None and dp % replicate == 0 else shard
    if shard is None or replicate * shard != dp:
        raise ConfigError(
            f"parallel: dp_replicate={replicate} x dp_shard={shard or '?'} does not make the {dp} data-parallel "
            "processes; the product must equal them"
        )
    return replicate


def group_options(device_type: str, timeout: timedelta) -> Backend.Options:
    """Options for a new process group on `device_type` (nccl on CUDA, else gloo) that waits `timeout`."""
    if device_type == "cuda":
        options = dist.ProcessGroupNCCL.Options()  # nccl accepts no other kind
        options._timeout = timeout
        return options
    return Backend.Options("gloo", timeout)
