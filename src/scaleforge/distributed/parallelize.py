"""`parallelize()`: one function that prepares a plain model for this process's share of the work.

The techniques are applied in one fixed order, each by its own `apply_*` function:

    pipeline split -> tensor parallel -> activation checkpointing -> compile -> FSDP2 | DDP

The order matters: tensor parallelism rewrites layers that checkpointing and compile then wrap; DDP must wrap
the compiled module (not the other way round); FSDP shards whatever the earlier steps produced, block by block.
The result, `ParallelModel`, is what the trainer talks to: it runs a forward-backward pass, a forward for
evaluation, gradient clipping and the gathering of the full state dict the same way for every strategy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from scaleforge.config import ParallelSection, TrainingSection
from scaleforge.distributed.activation_checkpoint import apply_ac
from scaleforge.distributed.ddp import apply_ddp
from scaleforge.distributed.fsdp import apply_fsdp
from scaleforge.distributed.parallel_dims import ParallelDims
from scaleforge.distributed.pipeline_parallel import build_schedule, check_pipelinable, keep_stage, stage_bounds
from scaleforge.distributed.tensor_parallel import apply_tp
from scaleforge.errors import ConfigError

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
LOW_PRECISION = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


@dataclass
class ParallelModel:
    """A model prepared for this process: `module` holds this process's parameters (the whole model, or its
    pipeline stage, possibly sharded); training calls `train_module` (a DDP wrapper, or `module` itself)."""

    module: nn.Module
    train_module: nn.Module
    dims: ParallelDims
    mesh: DeviceMesh | None = None
    schedule: PipelineScheduleSingle | None = None
    microbatches: int = 1
    _eval_rows: int | None = None

    def coordinate(self, dim: str) -> int:
        """This process's index along mesh dimension `dim` (0 without a mesh)."""
        return self.mesh[dim].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def is_first_stage(self) -> bool:
        return self.coordinate("pp") == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coordinate("pp") == self.dims.pp - 1

    @property
    def holds_outputs(self) -> bool:
        """Whether this process's outputs count in reductions: the last pipeline stage, once per tensor-parallel
        group (those processes hold identical copies)."""
        return self.is_last_stage and self.coordinate("tp") == 0

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, skip the gradient all-reduce on the micro-steps that do not step the optimizer."""
        if not sync and isinstance(self.train_module, DistributedDataParallel):
            return self.train_module.no_sync()
        return contextlib.nullcontext()

    def forward_backward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: nn.Module,
        *,
        autocast: Autocast,
        scaler: torch.amp.GradScaler | None,
        loss_scale: float,
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its loss times `loss_scale` (zero on pipeline stages
        that compute no loss), still on the device."""
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            with autocast():
                self.schedule.step(
                    *self._stage_args(inputs), **self._stage_target(targets, losses), return_outputs=False
                )
            if not losses:
                return torch.zeros((), device=inputs.device)
            return torch.stack([loss.detach().float() for loss in losses]).mean()  # loss_fn applied loss_scale
        with autocast():
            loss = loss_fn(self.train_module(inputs), targets) * loss_scale
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    def _stage_args(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (inputs,) if self.is_first_stage else ()

    def _stage_target(self, targets: torch.Tensor, losses: list[torch.Tensor]) -> dict[str, Any]:
        return {"target": targets, "losses": losses} if self.is_last_stage else {}

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Outputs for evaluation; None on pipeline stages before the last (which also needs the targets)."""
        if self.schedule is None:
            return self.module(inputs)
        rows = inputs.shape[0]
        # A pipeline fixes its message shapes on its first micro-batch, so every evaluation batch is padded to
        # the first one's size, rounded up to split evenly into micro-batches.
        self._eval_rows = self._eval_rows or -(-rows // self.microbatches) * self.microbatches
        if rows < self._eval_rows:
            inputs, targets = (_pad_rows(t, self._eval_rows) for t in (inputs, targets))
        outputs = self.schedule.eval(*self._stage_args(inputs), **self._stage_target(targets, []))
        return outputs[:rows] if outputs is not None else None

    def begin_eval(self) -> None:
        """Evaluation batches may differ in size from the last evaluation's: measure them afresh."""
        self._eval_rows = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so their total norm, over the whole model, is at most `max_norm`."""
        # Gradients on different meshes (tensor-parallel layers, sharded embeddings, plain tensors) are kept
        # apart: foreach kernels refuse to mix them, and each kind's norm is reduced over its own mesh.
        groups: dict[Any, list[nn.Parameter]] = {}
        for param in self.module.parameters():
            if param.grad is not None:
                mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
                groups.setdefault(mesh, []).append(param)
        squared = torch.zeros((), device=self._device)
        for params in groups.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            squared = squared + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().pow(2)
        if self.dims.pp > 1:  # each stage holds different parameters: add up the stages' squares
            dist.all_reduce(squared, group=self.mesh["pp"].get_group())  # type: ignore[index]
        total = squared.sqrt()
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every process, on this process's device (`tensor` itself for one process)."""
        if self.mesh is None:
            return tensor
        summed = tensor.to(self._device)  # nccl reduces GPU tensors only
        dist.all_reduce(summed)
        return summed

    def any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (rank 0's callbacks asking to stop, say)."""
        if self.mesh is None:
            return flag
        return bool(self.all_reduce_sum(torch.tensor(float(flag), device=self._device)) > 0)

    @property
    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's `value` (small, plain data), in rank order, on rank 0; None on the others."""
        if self.mesh is None:
            return [value]
        gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's unsharded state dict on CPU, under the names of the plain model, on rank 0 (None on
        the others). Every process must call this: sharded tensors are gathered collectively."""
        local = {}
        with _quiet_redistribution():
            for name, tensor in self.module.state_dict().items():
                if isinstance(tensor, DTensor):
                    tensor = tensor.full_tensor()
                local[name] = tensor.detach().cpu()
        if self.mesh is None:
            return local
        is_main = dist.get_rank() == 0
        if self.dims.pp == 1:
            return local if is_main else None
        # Each stage's first process sends its stage's tensors to rank 0 (peers of one run, not untrusted files).
        lead = self.coordinate("dp") == 0 and self.coordinate("tp") == 0
        parts: list[dict[str, torch.Tensor]] | None = [{} for _ in range(dist.get_world_size())] if is_main else None
        dist.gather_object(local if lead else {}, parts, dst=0)
        if parts is None:
            return None
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        return merged

    @classmethod
    def single(cls, model: nn.Module) -> ParallelModel:
        """A model on one process, as it is."""
        return cls(module=model, train_module=model, dims=ParallelDims("single", 1, 1, 1))

    def eval_shard(self) -> tuple[int, int]:
        """(index, count) of this process's share of the validation split: one share per data-parallel replica."""
        return self.dp_rank, self.dims.dp


def parallelize(
    model: nn.Module,
    *,
    dims: ParallelDims,
    device: torch.device,
    architecture: str,
    training: TrainingSection,
    parallel: ParallelSection,
    precision: str,
    loss_fn: nn.Module,
    micro_batch_size: int,
) -> ParallelModel:
    """Apply `dims.strategy` to `model` (already on `device`) in the fixed order; see the module docstring."""
    check_strategy_options(dims, parallel, precision, device)
    mesh = dims.build_mesh(device.type) if dims.world_size > 1 else None
    bounds = None
    if dims.pp > 1:
        check_pipelinable(model, architecture)
        bounds = stage_bounds(model, dims.pp, parallel.stages)
        keep_stage(model, bounds, mesh["pp"].get_local_rank())  # type: ignore[index]
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], architecture)  # type: ignore[index]
    if training.activation_checkpointing:
        apply_ac(model)
    if training.compile:
        apply_compile(model, per_block=dims.strategy not in ("single", "ddp"))
    train_module = model
    if dims.strategy == "ddp":
        train_module = apply_ddp(model, mesh["dp"], device)  # type: ignore[index]
    elif dims.shards_data and dims.dp > 1:
        apply_fsdp(model, mesh["dp"], param_dtype=LOW_PRECISION.get(precision), cpu_offload=parallel.cpu_offload)  # type: ignore[index]
    result = ParallelModel(module=model, train_module=train_module, dims=dims, mesh=mesh)
    if dims.pp > 1:
        microbatches = parallel.microbatches or dims.pp
        if micro_batch_size % microbatches:
            raise ConfigError(
                f"parallel.microbatches: each process's batch of {micro_batch_size} samples does not split into "
                f"{microbatches} pipeline micro-batches"
            )
        result.microbatches = microbatches
        result.schedule = build_schedule(
            model,
            stage_index=result.coordinate("pp"),
            num_stages=dims.pp,
            device=device,
            group=mesh["pp"].get_group(),  # type: ignore[index]
            schedule=parallel.schedule,
            microbatches=microbatches,
            loss_fn=ScaledLoss(loss_fn, 1 / training.grad_accum_steps),
        )
    return result


def check_strategy_options(dims: ParallelDims, parallel: ParallelSection, precision: str, device: torch.device) -> None:
    """Combinations that cannot work, refused before any work starts."""
    if precision == "fp16-mixed" and dims.strategy not in ("single", "ddp"):
        raise ConfigError(
            f"training.precision: fp16-mixed needs a gradient scaler, which parallel.strategy={dims.strategy} does "
            "not support here; use bf16-mixed"
        )
    if parallel.cpu_offload and not dims.shards_data:
        raise ConfigError(f"parallel.cpu_offload: only fsdp and hybrid shard parameters, not {dims.strategy}")
    if parallel.cpu_offload and device.type != "cuda":
        raise ConfigError("parallel.cpu_offload: the parameters already live in CPU memory; it needs a GPU")


def apply_compile(model: nn.Module, *, per_block: bool) -> None:
    """Compile in place, so parameter names do not change: each block when the blocks are sharded or split (their
    hooks would break one whole-model graph), else the whole model.

    A checkpointed block is compiled inside its checkpoint wrapper: with torch 2.13, dynamo fails to trace a
    checkpoint around tensor-parallel (DTensor) layers, while a checkpoint around compiled layers works.
    """
    if not per_block:
        model.compile()
        return
    for block in model.blocks:  # type: ignore[union-attr]
        if not isinstance(block, nn.Identity):
            getattr(block, "_checkpoint_wrapped_module", block).compile()


@contextlib.contextmanager
def _quiet_redistribution() -> Iterator[None]:
    """Gathering a 2-D (dp x tp) sharded tensor takes two all-gathers, which DTensor warns about on every tensor;
    for a one-off gather at the end of training that is expected."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows."""
    return torch.cat([tensor, tensor[-1:].expand(rows - tensor.shape[0], *tensor.shape[1:])])


class ScaledLoss(nn.Module):
    """`loss_fn(outputs, targets) * scale`: the pipeline's per-micro-batch loss under gradient accumulation."""

    def __init__(self, loss_fn: nn.Module, scale: float) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.scale = scale

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(outputs, targets)
        return loss * self.scale if self.scale != 1 else loss
