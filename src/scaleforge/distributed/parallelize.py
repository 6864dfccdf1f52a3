"""`parallelize()`: one function that prepares a plain model for this process's share of the work.

The techniques are applied in one fixed order, each by its own `apply_*` function:

    pipeline split -> tensor parallel -> activation checkpointing -> compile -> FSDP2 | DDP

The order matters: tensor parallelism rewrites layers that checkpointing and compile then wrap; DDP must wrap
the compiled module (not the other way round); FSDP shards whatever the earlier steps produced, block by block.
The result, `ParallelModel`, is what the trainer talks to: it runs a forward-backward pass, a forward for
evaluation, gradient clipping, reductions and the gathering of the full state dict the same way for every
strategy.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from scaleforge.config import ParallelSection, TrainingSection
from scaleforge.distributed.activation_checkpoint import apply_ac
from scaleforge.distributed.compression import FixedSync, GradCompression, GradSync
from scaleforge.distributed.ddp import apply_ddp
from scaleforge.distributed.fsdp import apply_fsdp
from scaleforge.distributed.parallel_dims import ParallelDims
from scaleforge.distributed.pipeline_parallel import (
    StageTie,
    bubble_fraction,
    build_schedule,
    check_pipelinable,
    held_stages,
    keep_stage,
    present_blocks,
    stage_bounds,
    stage_ties,
    stage_view,
)
from scaleforge.distributed.tensor_parallel import apply_tp, check_tp
from scaleforge.errors import ConfigError
from scaleforge.hardware import PRECISIONS, REDUCE_DTYPES, Autocast

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import _PipelineSchedule


class ScaledLoss(nn.Module):
    """`loss_fn(outputs, targets) * scale`: the loss a pipeline schedule applies to each of its micro-batches."""

    def __init__(self, loss_fn: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.scale = scale

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs, targets) * self.scale


@dataclass
class ParallelModel:
    """A model prepared for this process.

    `module` holds this process's parameters (the whole model or its pipeline stage, possibly sharded);
    training calls `train_module` (a DDP wrapper, or `module` itself); `device` is where this process computes.
    Under pipeline parallelism `schedule` runs the process's stages (`stages_per_process` of them) and
    `pipeline_loss` is the loss it applies; `bubble` is the schedule's idle share of a step (`bubble_fraction`).
    """

    module: nn.Module
    train_module: nn.Module
    dims: ParallelDims
    device: torch.device
    mesh: DeviceMesh | None = None
    schedule: _PipelineSchedule | None = None
    pipeline_loss: ScaledLoss | None = None
    microbatches: int = 1
    schedule_name: str = ""
    stages_per_process: int = 1
    bubble: float = 0.0
    ties: list[TiedCopy] = field(default_factory=list)
    # what the gradients' data-parallel reduction sends (ddp and fsdp; None where it is not counted)
    grad_sync: GradSync | None = None
    _eval_rows: int | None = None

    @classmethod
    def single(cls, model: nn.Module) -> ParallelModel:
        """A model on one process, as it is."""
        tensors = itertools.chain(model.parameters(), model.buffers())  # an int8 model holds buffers only
        device = next(tensors, torch.empty(0)).device
        return cls(module=model, train_module=model, dims=ParallelDims("single", 1, 1, 1), device=device)

    def pipeline_summary(self) -> dict[str, Any]:
        """The pipeline's schedule, stages and bubble for the run's summary (nothing without pipelining)."""
        if self.schedule is None:
            return {}
        return {
            "pipeline_schedule": self.schedule_name,
            "pipeline_stages": self.dims.pp * self.stages_per_process,
            "pipeline_microbatches": self.microbatches,
            "pipeline_bubble": self.bubble,
        }

    def coordinate(self, dim: str) -> int:
        """This process's index along mesh dimension `dim` (0 without a mesh)."""
        return self.mesh[dim].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica this process belongs to (its slice of every global batch)."""
        return self.coordinate("dp")

    @property
    def is_first_stage(self) -> bool:
        """Whether this process's pipeline stage reads the inputs (always, without pipelining)."""
        return self.coordinate("pp") == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this process's pipeline stage produces the outputs (always, without pipelining)."""
        return self.coordinate("pp") == self.dims.pp - 1

    @property
    def holds_outputs(self) -> bool:
        """Whether this process's outputs count in reductions: the last pipeline stage, once per tensor-parallel
        group (those processes hold identical copies)."""
        return self.is_last_stage and self.coordinate("tp") == 0

    # ------------------------------------------------------------------------------------------ training

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
        """Forward and backward of one micro-batch with its loss times `loss_scale`; returns that scaled loss
        (zero on pipeline stages that compute no loss), still on the device."""
        if self.schedule is not None:
            assert self.pipeline_loss is not None
            # The schedule adds up its micro-batches' gradients: each carries its share of the scale.
            self.pipeline_loss.scale = loss_scale / self.microbatches
            losses: list[torch.Tensor] = []
            with autocast():
                self.schedule.step(
                    *self._stage_args(inputs), **self._stage_target(targets, losses), return_outputs=False
                )
            if not losses:
                return torch.zeros((), device=self.device)
            return torch.stack([loss.detach().float() for loss in losses]).sum()
        with autocast():
            outputs = self.train_module(inputs)
            # a loss that reads the inputs as well (distillation: its teacher's view of the same batch)
            extra = (inputs,) if takes_inputs(loss_fn) else ()
            loss = loss_fn(outputs, targets, *extra)
            if loss_scale != 1:  # no multiply (a kernel, and a node for backward) for one micro-batch a step
                loss = loss * loss_scale
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    def _stage_args(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (inputs,) if self.is_first_stage else ()

    def _stage_target(self, targets: torch.Tensor, losses: list[torch.Tensor]) -> dict[str, Any]:
        return {"target": targets, "losses": losses} if self.is_last_stage else {}

    def sum_tied_gradients(self) -> None:
        """Add up the gradients of each weight tied across pipeline stages over the processes holding a copy, so
        every copy takes the same step, as the one weight of a single process does (Megatron's embedding
        all-reduce). Called once the step's backward passes are done."""
        for tie in self.ties:
            tie.sum_gradients()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so their total norm, over the whole model, is at most `max_norm`."""
        # Gradients on different meshes (tensor-parallel layers, sharded embeddings, plain tensors) are kept
        # apart: foreach kernels refuse to mix them, and each kind's norm is reduced over its own mesh.
        groups: dict[Any, list[nn.Parameter]] = {}
        copies = {id(tie.param) for tie in self.ties if not tie.counted}  # a tied weight's norm counts once
        for param in self.module.parameters():
            if param.grad is not None and id(param) not in copies:
                mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
                groups.setdefault(mesh, []).append(param)
        squared = torch.zeros((), device=self.device)
        with _quiet_redistribution():
            for params in groups.values():
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                squared = squared + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().pow(2)
        if self.dims.pp > 1:  # each stage holds different parameters: add up the stages' squares
            dist.all_reduce(squared, group=self.mesh["pp"].get_group())  # type: ignore[index]
        total = squared.sqrt()
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        for tie in self.ties:
            if not tie.counted:
                torch.nn.utils.clip_grads_with_norm_([tie.param], max_norm, total)
        return total

    # -------------------------------------------------------------------------------------------- evaluation

    def begin_eval(self) -> None:
        """Prepare for an evaluation: replicas agree on running statistics; batch sizes are measured afresh."""
        self.average_buffers()
        self._eval_rows = None

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

    def eval_shard(self) -> tuple[int, int]:
        """(index, count) of this process's share of the validation split: one share per data-parallel replica."""
        return self.dp_rank, self.dims.dp

    def average_buffers(self) -> None:
        """Average floating-point buffers over the data-parallel replicas.

        Each replica normalises over its own slice of the batch, so BatchNorm's running statistics drift apart
        (SyncBatchNorm does not run on CPU); averaging makes every process evaluate and save the same model.
        """
        if self.mesh is None or self.dims.dp == 1:
            return
        group = self.mesh["dp"].get_group()
        for buffer in self.module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, group=group)
                buffer.div_(self.dims.dp)

    # ---------------------------------------------------------------------------------- across processes

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every process, on this process's device (`tensor` itself for one process)."""
        if self.mesh is None:
            return tensor
        summed = tensor.to(self.device)  # nccl reduces GPU tensors only
        dist.all_reduce(summed)
        return summed

    def any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (rank 0's callbacks asking to stop, say)."""
        return self.any_processes(flag)[0]

    def any_processes(self, *flags: bool) -> list[bool]:
        """For each of `flags`, True on every process when it is true on any: one collective for them all."""
        if self.mesh is None:
            return list(flags)
        return [total > 0 for total in self.all_reduce_sum(torch.tensor([float(flag) for flag in flags])).tolist()]

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
        self.average_buffers()
        if self.mesh is None:
            return {name: tensor.detach().cpu() for name, tensor in self.module.state_dict().items()}
        is_main = dist.get_rank() == 0
        with _quiet_redistribution():
            if self.dims.pp == 1:  # gathered tensor by tensor straight into rank 0's CPU memory
                options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                state = get_model_state_dict(self.module, options=options)
                return state if is_main else None
            stage = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        # Each stage's first process sends its stage's tensors to rank 0 (peers of one run, not untrusted files).
        lead = self.coordinate("dp") == 0 and self.coordinate("tp") == 0
        local = {name: tensor.detach().cpu() for name, tensor in stage.items()} if lead else {}
        del stage
        parts = self.gather(local)
        if parts is None:
            return None
        state = {name: tensor for part in parts for name, tensor in part.items()}
        for tie in self.ties:
            check_tied_copies(state, tie.names)
        return state


@dataclass(frozen=True)
class ParallelPlan:
    """How `parallelize` will cut a model, worked out (and checked) before any process talks to another."""

    stage_bounds: list[range] | None  # the blocks of each pipeline stage, when pp > 1
    tensor_parallel: bool  # whether the model's tensor-parallel plan splits its layers
    microbatches: int  # pipeline micro-batches per replica micro-batch
    stages_per_process: int = 1  # pipeline stages each pipeline process runs
    ties: list[StageTie] = field(default_factory=list)  # weights shared across stages held by different processes


def plan_parallelism(
    model: nn.Module,
    *,
    dims: ParallelDims,
    device: torch.device,
    architecture: str,
    parallel: ParallelSection,
    precision: str,
    micro_batch_size: int,
    compile: bool = False,
) -> ParallelPlan:
    """Check that `dims.strategy` applies to `model` and say how: every refusal is a config error, raised here,
    on every process alike, with no collective involved."""
    if precision == "fp16-mixed" and dims.strategy not in ("single", "ddp"):
        raise ConfigError(
            f"training.precision: fp16-mixed needs a gradient scaler, which parallel.strategy={dims.strategy} does "
            "not support here; use bf16-mixed"
        )
    if parallel.cpu_offload and not dims.shards_data:
        raise ConfigError(
            f"parallel.cpu_offload: only fsdp, and hybrid with parallel.dp above 1, shard parameters; not "
            f"{dims.strategy} with dp={dims.dp}"
        )
    if parallel.cpu_offload and device.type != "cuda":
        raise ConfigError("parallel.cpu_offload: the parameters already live in CPU memory; it needs a GPU")
    bounds, ties = None, []
    microbatches = parallel.microbatches or dims.pp
    per_process = parallel.virtual_stages if dims.pp > 1 else 1
    if dims.pp > 1:
        check_pipelinable(model, architecture)
        option = "parallel.pp" if per_process == 1 else "parallel.pp x parallel.stages_per_process"
        bounds = stage_bounds(model, dims.pp * per_process, parallel.stages, option)
        ties = stage_ties(model, bounds)
        _check_schedule(parallel.schedule, dims.pp, microbatches, compile=compile)
        if micro_batch_size % microbatches:
            raise ConfigError(
                f"parallel.microbatches: each replica's micro-batch of {micro_batch_size} samples "
                "(training.batch_size / (dp x training.grad_accum_steps)) does not split into "
                f"{microbatches} pipeline micro-batches"
            )
        if parallel.schedule == "1f1b" and microbatches < dims.pp:
            raise ConfigError(
                f"parallel.microbatches: the 1f1b schedule needs at least one micro-batch per stage ({dims.pp}), "
                f"got {microbatches}"
            )
    tensor_parallel = dims.tp > 1 or dims.strategy == "tp"
    if tensor_parallel:  # a plan covers the blocks a process holds: under pp, each stage's
        stages = [model] if bounds is None else [stage_view(model, bounds, i) for i in range(len(bounds))]
        for stage in stages:
            check_tp(stage, dims.tp, architecture)
    return ParallelPlan(
        stage_bounds=bounds,
        tensor_parallel=tensor_parallel,
        microbatches=microbatches,
        stages_per_process=per_process,
        ties=ties,
    )


def _check_schedule(schedule: str, pp: int, microbatches: int, *, compile: bool) -> None:
    """What the multi-stage schedules need of the micro-batches and the model."""
    if schedule in ("interleaved_1f1b", "zero_bubble") and microbatches % pp:
        raise ConfigError(
            f"parallel.microbatches: the {schedule} schedule runs micro-batches in rounds of one per pipeline "
            f"process ({pp}); {microbatches} is not a multiple of {pp}"
        )
    if schedule == "zero_bubble" and compile:
        raise ConfigError(
            "training.compile: the zero_bubble schedule splits each backward into its input and weight gradients, "
            "which torch.compile's graphs do not; use interleaved_1f1b or leave compile off"
        )


def parallelize(
    model: nn.Module,
    plan: ParallelPlan,
    *,
    dims: ParallelDims,
    device: torch.device,
    training: TrainingSection,
    parallel: ParallelSection,
    precision: str,
    loss_fn: nn.Module,
) -> ParallelModel:
    """Apply `dims.strategy` to `model` (already on `device`) as `plan` (from `plan_parallelism`) says, in the
    fixed order of the module docstring. Every process of the run calls it: it builds the device mesh.

    Every technique the strategy names is applied, even over one process (ddp on one GPU, say), so a strategy
    behaves the same at every scale.
    """
    mesh = dims.build_mesh(device.type, parallel.timeout_s) if dims.strategy != "single" else None
    held: list[int] = []
    if plan.stage_bounds is not None:
        held = held_stages(mesh["pp"].get_local_rank(), dims.pp, plan.stages_per_process)  # type: ignore[index]
        keep_stage(model, plan.stage_bounds, held)
    if plan.tensor_parallel:
        apply_tp(model, mesh["tp"])  # type: ignore[index]
    if training.activation_checkpointing:
        apply_ac(model)
    if training.compile:
        apply_compile(model, per_block=dims.strategy not in ("single", "ddp"))
    # a process running several stages runs each as a module of its own (views sharing this model's weights)
    parts = [model] if len(held) < 2 else [stage_view(model, plan.stage_bounds, i) for i in held]  # type: ignore[arg-type]
    train_module = model
    sync: GradSync | None = None
    if dims.strategy == "ddp":
        if parallel.grad_compression == "powersgd" and precision == "fp16-mixed":
            raise ConfigError(
                "parallel.grad_compression: powersgd cannot run under fp16-mixed: the loss scaler's overflowing "
                "steps would put inf into PowerSGD's error feedback and factors, which carry over to every later "
                "step; use bf16-mixed or 32"
            )
        train_module = apply_ddp(model, mesh["dp"], device)  # type: ignore[index]
        sync = GradCompression(
            parallel.grad_compression,
            train_module,
            mesh["dp"].get_group(),  # type: ignore[index]
            rank=parallel.powersgd_rank,
            start_step=parallel.powersgd_start_step,
        )
    elif dims.shards_data:
        param_dtype, reduce_dtype = PRECISIONS[precision], REDUCE_DTYPES[parallel.reduce_dtype]
        for part in parts:  # each stage a root of its own
            apply_fsdp(
                part,
                dims.fsdp_mesh(mesh),  # type: ignore[arg-type]
                param_dtype=param_dtype,
                reduce_dtype=reduce_dtype,
                cpu_offload=parallel.cpu_offload,
            )
        if dims.strategy in ("fsdp", "hsdp"):
            sync = FixedSync(fsdp_sync_bytes(model, dims, reduce_dtype))
    if plan.stage_bounds is None:
        return ParallelModel(
            module=model, train_module=train_module, dims=dims, device=device, mesh=mesh, grad_sync=sync
        )

    return _pipelined(model, parts, held, plan, dims=dims, device=device, mesh=mesh, parallel=parallel, loss_fn=loss_fn)


def _pipelined(
    model: nn.Module,
    parts: list[nn.Module],
    held: list[int],
    plan: ParallelPlan,
    *,
    dims: ParallelDims,
    device: torch.device,
    mesh: DeviceMesh,
    parallel: ParallelSection,
    loss_fn: nn.Module,
) -> ParallelModel:
    """`model`, this process's share of a pipeline (its stages `held`, run as `parts`), with its schedule and the
    groups of the weights it shares with other stages."""
    assert plan.stage_bounds is not None
    ties = tied_copies(model, plan.ties, mesh, dims.pp, parallel.timeout_s)
    pipeline_loss = ScaledLoss(loss_fn)
    schedule = build_schedule(
        parts,
        stage_indices=held,
        num_stages=len(plan.stage_bounds),
        device=device,
        group=mesh["pp"].get_group(),
        schedule=parallel.schedule,
        microbatches=plan.microbatches,
        loss_fn=pipeline_loss,
    )
    bubble = bubble_fraction(parallel.schedule, dims.pp, plan.stages_per_process, plan.microbatches, schedule)
    return ParallelModel(
        module=model,
        train_module=model,
        dims=dims,
        device=device,
        mesh=mesh,
        schedule=schedule,
        pipeline_loss=pipeline_loss,
        microbatches=plan.microbatches,
        schedule_name=parallel.schedule,
        stages_per_process=plan.stages_per_process,
        bubble=bubble,
        ties=ties,
    )


@dataclass
class TiedCopy:
    """This process's copy `param` of a weight tied across pipeline stages (`StageTie`), and the group of the
    processes holding the other copies (the same data- and tensor-parallel place on the other stages). `counted`:
    whether this copy's gradient counts in the gradient norm (the first stage's; the sum is the same on each)."""

    param: nn.Parameter
    names: tuple[str, ...]
    group: dist.ProcessGroup
    counted: bool

    def sum_gradients(self) -> None:
        param = self.param
        if param.grad is None:  # this stage did not use it this step
            param.grad = torch.zeros_like(param)
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        dist.all_reduce(grad, group=self.group)


def tied_copies(model: nn.Module, ties: list[StageTie], mesh: DeviceMesh, pp: int, timeout_s: float) -> list[TiedCopy]:
    """For each weight tied across stages on different pipeline processes, this process's copy (if it holds one)
    and its group. Every process creates every group (torch requires it), one per data- and tensor-parallel
    place."""
    from datetime import timedelta

    copies = []
    grid = mesh.mesh.reshape(pp, -1)  # global ranks: pipeline position x every other place
    own = dict(model.named_parameters(remove_duplicate=False))
    for tie in ties:
        positions = sorted({stage % pp for stage in tie.stages})
        if len(positions) < 2:  # one process holds every copy: they are one parameter there
            continue
        mine = None
        for place in range(grid.shape[1]):
            ranks = [int(grid[position, place]) for position in positions]
            group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
            mine = group if dist.get_rank() in ranks else mine
        name = next((name for name in tie.names if name in own), None)
        if name is not None and mine is not None:
            first = mesh["pp"].get_local_rank() == positions[0]
            copies.append(TiedCopy(own[name], tie.names, mine, counted=first))
    return copies


def check_tied_copies(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
    """Every name of a tied weight in `state` (gathered from the stages) holds the same values: the copies took
    the same steps. A difference is a bug, never rounding: the run stops rather than save two weights as one."""
    present = [name for name in names if name in state]
    for name in present[1:]:
        if not torch.equal(state[name], state[present[0]]):
            difference = (state[name].float() - state[present[0]].float()).abs().max().item()
            raise RuntimeError(
                f"the tied weight's copies {present[0]} and {name} differ by up to {difference:.3g} after training"
            )


def fsdp_sync_bytes(model: nn.Module, dims: ParallelDims, reduce_dtype: torch.dtype) -> int:
    """What FSDP2 reduces per step on each process: its whole gradient reduce-scattered within the sharding group,
    then (HSDP) its shard all-reduced across the replicating groups."""
    elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dims.dp_replicate > 1:
        sharded = elements // dims.dp_shard  # a group of one does not reduce-scatter
        elements = (elements if dims.dp_shard > 1 else 0) + sharded
    return elements * reduce_dtype.itemsize


def apply_compile(model: nn.Module, *, per_block: bool) -> None:
    """Compile in place, so parameter names do not change: each block when the blocks are sharded or split (their
    hooks would break one whole-model graph), else the whole model.

    A checkpointed block is compiled inside its checkpoint wrapper: with torch 2.13, dynamo fails to trace a
    checkpoint around tensor-parallel (DTensor) layers, while a checkpoint around compiled layers works.
    """
    if not per_block:
        model.compile()
        return
    for _, block in present_blocks(model):
        getattr(block, "_checkpoint_wrapped_module", block).compile()


@contextlib.contextmanager
def _quiet_redistribution() -> Iterator[None]:
    """Reducing or gathering a 2-D (dp x tp) sharded tensor takes two collectives, which DTensor warns about on
    every tensor; for gradient norms and the final gather that is expected."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def takes_inputs(loss_fn: Any) -> bool:
    """Whether a loss reads the batch's inputs too (`takes_inputs`, on its class or on itself), looked up without
    nn.Module's own lookup of a missing attribute, which raises and catches an error at every step."""
    return bool(getattr(type(loss_fn), "takes_inputs", False) or getattr(loss_fn, "__dict__", {}).get("takes_inputs"))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows."""
    return torch.cat([tensor, tensor[-1:].expand(rows - tensor.shape[0], *tensor.shape[1:])])
