"""Fully sharded data parallelism with FSDP2 (`fully_shard`): parameters, gradients and optimizer state are
sharded over the data-parallel processes and gathered block by block for compute."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from scaleforge.distributed.pipeline_parallel import present_blocks


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard each block, then the root (which takes what is left: embeddings, head).

    With a low-precision `param_dtype`, parameters are gathered and computed in it while the sharded master
    copy and optimizer stay in fp32; gradients are reduce-scattered in `reduce_dtype` (`parallel.reduce_dtype`).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for _, block in present_blocks(model):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, offload_policy=offload)
    return model
