"""Pipeline parallelism with `torch.distributed.pipelining`: the model's blocks are cut into consecutive stages,
one per pipeline process (GPipe, 1F1B) or several (interleaved 1F1B, zero bubble: stage s on process s mod pp),
and each batch flows through them in micro-batches.

A model can be pipelined when it is `embed -> blocks -> head`: submodules named `embed` and `head` around a
`blocks` list, with a forward that runs exactly those in that order. A stage is the same model with the other
stages' parts replaced by `StagePlaceholder`s (identities), so the model's own forward runs any stage and every
parameter keeps the name it has in the whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from scaleforge.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import _PipelineSchedule


class StagePlaceholder(nn.Identity):
    """Stands in for a part of the model that another pipeline stage holds: passes its input through."""


def present_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(index, block) for each block this process holds: all of them, or its pipeline stage's."""
    return [(i, block) for i, block in enumerate(model.blocks) if not isinstance(block, StagePlaceholder)]  # type: ignore[arg-type]


def check_pipelinable(model: nn.Module, architecture: str) -> None:
    """Refuse a model that is not `embed -> blocks -> head`."""
    embed, blocks, head = (getattr(model, name, None) for name in ("embed", "blocks", "head"))
    if not (isinstance(embed, nn.Module) and isinstance(blocks, nn.ModuleList) and isinstance(head, nn.Module)):
        raise ConfigError(
            f"parallel: model '{architecture}' cannot be pipelined: it needs submodules embed, blocks (a ModuleList) "
            "and head, run in that order (gpt, mlp, vit, cnn and resnet are)"
        )


def stage_bounds(
    model: nn.Module, num_stages: int, starts: Sequence[int] | None, option: str = "parallel.pp"
) -> list[range]:
    """The blocks of each stage: cut where `starts` says (`parallel.stages`), else balanced by parameter count.
    `option` is what sets the number of stages, for the error."""
    num_blocks = len(model.blocks)  # type: ignore[arg-type]
    if num_stages > num_blocks:
        raise ConfigError(
            f"{option}: {num_stages} pipeline stages need at least {num_stages} blocks; the model has {num_blocks}"
        )
    if starts is not None:
        if len(starts) != num_stages - 1:
            raise ConfigError(
                f"parallel.stages: {num_stages} stages need {num_stages - 1} start indices, got {list(starts)}"
            )
        if starts and starts[-1] >= num_blocks:
            raise ConfigError(f"parallel.stages: {starts[-1]} is past the model's last block ({num_blocks - 1})")
    else:
        weights = [_parameter_count(block) for block in model.blocks]  # type: ignore[union-attr]
        weights[0] += _parameter_count(model.embed)  # type: ignore[arg-type]
        weights[-1] += _parameter_count(model.head)  # type: ignore[arg-type]
        starts = balanced_starts(weights, num_stages)
    edges = [0, *starts, num_blocks]
    return [range(edges[i], edges[i + 1]) for i in range(num_stages)]


def balanced_starts(weights: Sequence[int], parts: int) -> list[int]:
    """Cut `weights` into `parts` non-empty consecutive runs whose largest sum is as small as possible."""
    count = len(weights)
    prefix = [0]
    for weight in weights:
        prefix.append(prefix[-1] + weight)
    inf = float("inf")
    # cost[k][i]: the smallest possible largest run when the first i items form k runs; cut[k][i]: where run k starts
    cost = [[inf] * (count + 1) for _ in range(parts + 1)]
    cut = [[0] * (count + 1) for _ in range(parts + 1)]
    cost[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, count + 1):
            for j in range(k - 1, i):
                candidate = max(cost[k - 1][j], prefix[i] - prefix[j])
                if candidate < cost[k][i]:
                    cost[k][i], cut[k][i] = candidate, j
    starts, end = [], count
    for k in range(parts, 1, -1):
        end = cut[k][end]
        starts.append(end)
    return starts[::-1]


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class StageTie:
    """A weight that parts on several pipeline stages share (a gpt's token embedding and its head): its names in
    the whole model, and the stages that hold it, in order. Each stage's process keeps a copy; their gradients are
    summed each step (`TiedCopy`), so the copies stay one weight."""

    names: tuple[str, ...]
    stages: tuple[int, ...]


def stage_ties(model: nn.Module, bounds: list[range]) -> list[StageTie]:
    """The weights shared between parts that land on different stages."""
    holders: dict[int, tuple[list[str], list[int]]] = {}
    for index, parts in enumerate(_stage_parts(model, bounds)):
        for part_name, part in parts:
            for param_name, param in part.named_parameters(remove_duplicate=False):
                names, stages = holders.setdefault(id(param), ([], []))
                names.append(f"{part_name}.{param_name}")
                if index not in stages:
                    stages.append(index)
    return [
        StageTie(tuple(dict.fromkeys(names)), tuple(stages)) for names, stages in holders.values() if len(stages) > 1
    ]


def held_stages(pp_rank: int, pp: int, per_process: int) -> list[int]:
    """The stages pipeline process `pp_rank` of `pp` runs: `pp_rank`, `pp_rank + pp`, ... (torch's loop placement,
    which the interleaved and zero-bubble schedules expect): the first stage on the first process, the last on
    the last."""
    return [pp_rank + round_ * pp for round_ in range(per_process)]


def keep_stage(model: nn.Module, bounds: list[range], stage_index: int | Sequence[int]) -> None:
    """Turn `model` in place into stage `stage_index` (or the stages listed, together): the other stages' parts
    become placeholders."""
    held = [stage_index] if isinstance(stage_index, int) else list(stage_index)
    kept = {block for index in held for block in bounds[index]}
    blocks: nn.ModuleList = model.blocks  # type: ignore[assignment]
    for index in range(len(blocks)):
        if index not in kept:
            blocks[index] = StagePlaceholder()
    if 0 not in held:
        model.embed = StagePlaceholder()
    if len(bounds) - 1 not in held:
        model.head = StagePlaceholder()


def stage_view(model: nn.Module, bounds: list[range], stage_index: int) -> nn.Module:
    """What `keep_stage` would leave of `model` for stage `stage_index`, as a new module sharing the submodules
    and weights: for per-stage checks before any process splits its model, and as each stage's module where a
    process runs several. Its own containers and hooks are its own, so that FSDP2 may shard it as a root of its
    own, beside the other stages' views."""
    if model._parameters or model._buffers:  # noqa: SLF001 - a root's own tensors would not be shared
        raise ConfigError("parallel: a pipelined model keeps its parameters in embed, blocks and head, not at its root")
    view = copy.copy(model)
    for name, value in vars(model).items():
        if isinstance(value, dict):  # _modules, _parameters and every hook table
            setattr(view, name, copy.copy(value))
    view.blocks = nn.ModuleList(list(model.blocks))  # type: ignore[arg-type]
    keep_stage(view, bounds, stage_index)
    return view


def _stage_parts(model: nn.Module, bounds: list[range]) -> list[list[tuple[str, nn.Module]]]:
    parts: list[list[tuple[str, nn.Module]]] = []
    for index, block_range in enumerate(bounds):
        stage = [(f"blocks.{i}", model.blocks[i]) for i in block_range]  # type: ignore[index]
        if index == 0:
            stage.insert(0, ("embed", model.embed))  # type: ignore[arg-type]
        if index == len(bounds) - 1:
            stage.append(("head", model.head))  # type: ignore[arg-type]
        parts.append(stage)
    return parts


def build_schedule(
    stage_modules: Sequence[nn.Module],
    *,
    stage_indices: Sequence[int],
    num_stages: int,
    device: torch.device,
    group: ProcessGroup,
    schedule: str,
    microbatches: int,
    loss_fn: nn.Module,
) -> _PipelineSchedule:
    """The schedule that runs this process's stages (`stage_modules[i]` is stage `stage_indices[i]`); `loss_fn` is
    applied per micro-batch on the last stage.

    The schedule adds up the micro-batches' gradients without rescaling them (`scale_grads=False`): its own
    rescaling divides everything accumulated in `.grad`, which is wrong under gradient accumulation, so the
    loss function carries the 1 / micro-batches factor instead.
    """
    # imported here: torch.distributed.pipelining imports torch._dynamo, 0.4 s of every process's start otherwise
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    stages = [
        PipelineStage(module, index, num_stages, device, group=group)
        for module, index in zip(stage_modules, stage_indices, strict=True)
    ]
    if schedule in ("gpipe", "1f1b"):
        single = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        return single(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    multi = {"interleaved_1f1b": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}[schedule]
    return multi(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def bubble_fraction(schedule: str, pp: int, per_process: int, microbatches: int, built: Any = None) -> float:
    """The share of a training step each pipeline process idles, by the schedule's own shape: (p - 1) / (m + p - 1)
    for GPipe and 1F1B over p processes and m micro-batches, (p - 1) / (v m + p - 1) interleaved over v stages a
    process (Megatron's figures); for zero bubble, the idle slots of the schedule `built` (its `pipeline_order`),
    a forward, an input-gradient and a weight-gradient step each taking one slot."""
    if pp == 1:
        return 0.0
    if schedule != "zero_bubble" or built is None:
        return (pp - 1) / (per_process * microbatches + pp - 1)
    order = built.pipeline_order
    makespan = max(len(actions) for actions in order.values())
    busy = sum(action is not None for actions in order.values() for action in actions)
    return 1 - busy / (makespan * len(order))
