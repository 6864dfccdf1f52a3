"""Gradient compression for ddp's all-reduce (`parallel.grad_compression`), through DDP's communication hooks.

- `bf16`, `fp16`: torch's `bf16_compress_hook` / `fp16_compress_hook`: each bucket is cast down, all-reduced and
  cast back: half the bytes of fp32.
- `powersgd`: torch's `powerSGD_hook` (Vogels et al., 2019): each gradient matrix is all-reduced as two rank-r
  factors, with error feedback (what the approximation left out is added to the next step's gradient) and warm
  start (the factors of the last step start the next). Plain all-reduce runs for the first
  `parallel.powersgd_start_step` steps. Vectors and matrices too small to gain are all-reduced as they are.

`GradCompression.take_bytes` says how many gradient bytes this process contributed to the all-reduces since it was
last asked: from the parameters' sizes for the fixed formats, from PowerSGD's own count of the elements it
all-reduced otherwise. On a ring all-reduce over n processes each sends 2(n - 1)/n times that.

PowerSGD's state (each process's error feedback, the factors its warm start reuses, its step count and random
stream) goes into checkpoints as tensors of each parameter (`state_dict`), not as the hook's pickled state, and is
put back bucket by bucket (`_place`): DDP groups gradients into buckets by the order they became ready in the
first step, which a resumed run has not seen yet when it takes its first step, so the buckets of that step differ
from those the state was saved from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel


# unannotated, as DDP wants a hook (see `PowerSGD.hook`)
def bf16_hook(group, bucket):  # type: ignore[no-untyped-def]
    """torch's `bf16_compress_hook` under another name: DDP refuses that name unless it runs on NCCL 2.10+ (which
    older NCCL lacked bf16 for), but gloo all-reduces bf16 too."""
    return default_hooks.bf16_compress_hook(group, bucket)


HALF_HOOKS: dict[str, Callable[..., Any]] = {"bf16": bf16_hook, "fp16": default_hooks.fp16_compress_hook}
MIN_COMPRESSION_RATE = 2  # torch's default: a matrix is compressed when that shrinks it at least this much


class GradSync(Protocol):
    def take_bytes(self, steps: int) -> int:
        """The gradient bytes this process contributed to the reductions of the last `steps` steps (those since
        the last call)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This process's state of the reduction, as tensors (none for most)."""
        ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def starts_afresh(self, reason: str) -> None:
        """Told that a resumed run's checkpoint holds no state of this process, and why."""
        ...

    def resumed_at(self, step: int) -> None:
        """Told the step a resumed run goes on from."""
        ...

    @property
    def afresh(self) -> str | None:
        """What a resumed run should say about its state starting afresh (None: nothing)."""
        ...


@dataclass
class FixedSync:
    """A reduction that sends the same bytes every step (fsdp's reduce-scatter of each whole gradient)."""

    bytes_per_step: int

    def take_bytes(self, steps: int) -> int:
        return self.bytes_per_step * steps

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def starts_afresh(self, reason: str) -> None:
        pass

    def resumed_at(self, step: int) -> None:
        pass

    @property
    def afresh(self) -> str | None:
        return None


class GradCompression:
    """How `ddp`'s gradients are all-reduced (`kind`), and the bytes this process contributes to it."""

    def __init__(
        self, kind: str, ddp: DistributedDataParallel, group: dist.ProcessGroup, *, rank: int, start_step: int
    ):
        self.kind = kind
        params = [p for p in ddp.module.parameters() if p.requires_grad]
        full = sum(p.numel() * p.element_size() for p in params)
        # bytes a step of the fixed formats all-reduces (DDP's own all-reduce without a hook)
        self.bytes_per_step = full // 2 if kind in HALF_HOOKS else full
        self.powersgd: PowerSGD | None = None
        self._afresh: str | None = None
        if kind in HALF_HOOKS:
            ddp.register_comm_hook(group, HALF_HOOKS[kind])
        elif kind == "powersgd":
            self.powersgd = PowerSGD(group, dict(ddp.module.named_parameters()), rank=rank, start_step=start_step)
            ddp.register_comm_hook(self.powersgd.state, self.powersgd.hook)

    def take_bytes(self, steps: int) -> int:
        """The gradient bytes all-reduced over the last `steps` steps (those since the last call)."""
        if self.powersgd is None:
            return self.bytes_per_step * steps
        taken, self.powersgd.bytes = self.powersgd.bytes, 0
        return taken

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This process's compression state as tensors (none for the stateless formats)."""
        return self.powersgd.state_dict() if self.powersgd is not None else {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.powersgd is not None:
            self.powersgd.load_state_dict(tensors)

    def starts_afresh(self, reason: str) -> None:
        if self.powersgd is not None:
            self._afresh = f"PowerSGD's error feedback and factors start afresh: {reason}"

    def resumed_at(self, step: int) -> None:
        """A resumed run goes on from `step`: PowerSGD, whose state started afresh, still starts at its step."""
        if self.powersgd is not None and self._afresh is not None:
            self.powersgd.state.iter = step

    @property
    def afresh(self) -> str | None:
        return self._afresh


class PowerSGD:
    """torch's `powerSGD_hook` and its state, with the state kept per parameter across changes of DDP's buckets and
    checkpoints, and the elements it all-reduced counted."""

    def __init__(self, group: dist.ProcessGroup, named: dict[str, nn.Parameter], *, rank: int, start_step: int):
        self.state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=start_step,
            min_compression_rate=MIN_COMPRESSION_RATE,
            use_error_feedback=True,
            warm_start=True,
            random_seed=0,
            compression_stats_logging_frequency=2**62,  # its own log lines: the trainer logs the bytes
        )
        self.names = {id(param): name for name, param in named.items()}
        self.params = {name: param for name, param in named.items()}
        self.layouts: dict[int, list[tuple[str, int]]] = {}  # bucket -> (parameter, offset) in its flat buffer
        self.kept: dict[str, dict[str, torch.Tensor]] = {}  # per parameter: `error`, `q`, not yet in a bucket
        self.last: torch.futures.Future[Any] | None = None  # the latest bucket's all-reduce
        self.bytes = 0

    # unannotated: DDP compares a hook's annotations with its classes, and annotations here are strings
    def hook(self, state, bucket):  # type: ignore[no-untyped-def]
        if self.last is not None:
            # PowerSGD chains each bucket's three all-reduces in callbacks, which gloo runs on its own threads:
            # with several buckets in flight the processes issued them in different orders (a collective
            # mismatch that aborted the run, or a hang). A bucket starts once the one before it is done, and
            # so does any change to the state below.
            self.last.wait()
        index, buffer = bucket.index(), bucket.buffer()
        layout = [
            (self.names[id(param)], grad.storage_offset() - buffer.storage_offset())
            for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True)
        ]
        recorded = self.layouts.get(index)
        if recorded is not None and recorded != layout:
            # DDP has regrouped its buckets (at the start of a step: the last step's state is complete): every
            # bucket's state goes back to its parameters, to be placed in the new buckets as they come
            self._keep_all()
        self.layouts[index] = layout
        if self.kept and state.iter >= state.start_powerSGD_iter:
            self._place(index, buffer)
        compressed = state.iter >= state.start_powerSGD_iter
        before = state.total_numel_after_compression
        future = self.last = powerSGD_hook.powerSGD_hook(state, bucket)
        elements = state.total_numel_after_compression - before if compressed else buffer.numel()
        self.bytes += elements * buffer.element_size()
        return future

    # ------------------------------------------------------------------------- state per parameter

    def _factors(self, names: Iterable[str]) -> list[tuple[str, int, int]]:
        """The compressed gradients among `names` (a bucket's, in order) and their Q factors' sizes (columns x
        rank), in the order `powerSGD_hook` lays them out: grouped by shape, in order of first appearance."""
        groups: dict[tuple[int, int], list[str]] = {}
        for name in names:
            param = self.params[name]
            rows = param.shape[0] if param.dim() else 1
            columns = param.numel() // max(rows, 1)
            rank = min(rows, columns, self.state.matrix_approximation_rank)
            if (rows + columns) * rank * MIN_COMPRESSION_RATE < rows * columns:
                groups.setdefault((rows, columns), []).append(name)
        rank_of = self.state.matrix_approximation_rank
        return [
            (name, columns, min(rows, columns, rank_of)) for (rows, columns), names in groups.items() for name in names
        ]

    def _split(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        """Bucket `index`'s error and Q factors, per parameter (views)."""
        layout, state = self.layouts[index], self.state
        found: dict[str, dict[str, torch.Tensor]] = {}
        error = state.error_dict.get(index)
        if error is not None:
            for name, offset in layout:
                found.setdefault(name, {})["error"] = error[offset : offset + self.params[name].numel()]
        q = state.q_memory_dict.get(index)
        if q is not None:
            start = 0
            for name, columns, rank in self._factors(name for name, _ in layout):
                found.setdefault(name, {})["q"] = q[start : start + columns * rank]
                start += columns * rank
        return found

    def _keep_all(self) -> None:
        """Move every bucket's state to `kept`, per parameter, and forget the buckets."""
        for index in list(self.layouts):
            for name, parts in self._split(index).items():
                self.kept.setdefault(name, {}).update({key: value.clone() for key, value in parts.items()})
        self.layouts.clear()
        self.state.error_dict.clear()
        self.state.p_memory_dict.clear()
        self.state.q_memory_dict.clear()

    def _place(self, index: int, buffer: torch.Tensor) -> None:
        """Build bucket `index`'s state from its parameters' kept state: the error feedback of each (zero for one
        without), the Q factors where every compressed parameter has one of the size it needs now (else all are
        drawn afresh, as torch does for a new bucket)."""
        layout = self.layouts[index]
        names = [name for name, _ in layout]
        if any("error" in self.kept.get(name, {}) for name in names):
            error = torch.zeros_like(buffer)
            for name, offset in layout:
                kept = self.kept.get(name, {}).pop("error", None)
                if kept is not None and kept.numel() == self.params[name].numel():
                    error[offset : offset + kept.numel()] = kept.to(buffer).reshape(-1)
            self.state.error_dict[index] = error
        factors = self._factors(names)
        kept_q = [self.kept.get(name, {}).pop("q", None) for name, _, _ in factors]
        sizes = [(q, columns * rank) for q, (_, columns, rank) in zip(kept_q, factors, strict=True)]
        if all(q is not None and q.numel() == size for q, size in sizes):
            qs = [q.to(buffer).reshape(-1) for q in kept_q if q is not None]
            rows = sum(self.params[name].shape[0] * rank for name, _, rank in factors)
            # an empty pair for a bucket without matrices to compress, as torch leaves it: no draw from the stream
            self.state.q_memory_dict[index] = torch.cat(qs) if qs else buffer.new_empty(0)
            self.state.p_memory_dict[index] = buffer.new_empty(rows)
        for name in names:
            self.kept.pop(name, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        per_parameter = {name: dict(parts) for name, parts in self.kept.items()}
        for index in self.layouts:
            for name, parts in self._split(index).items():
                per_parameter.setdefault(name, {}).update(parts)
        tensors = {
            f"{key}.{name}": value.detach().clone()
            for name, parts in per_parameter.items()
            for key, value in parts.items()
        }
        _, keys, position, has_gauss, gauss = self.state.rng.get_state()
        tensors["iter"] = torch.tensor(self.state.iter, dtype=torch.int64)
        tensors["rng_keys"] = torch.from_numpy(keys.astype(np.int64))
        tensors["rng_position"] = torch.tensor([position, has_gauss], dtype=torch.int64)
        tensors["rng_gauss"] = torch.tensor(gauss, dtype=torch.float64)
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.layouts.clear()
        self.state.error_dict.clear()
        self.state.p_memory_dict.clear()
        self.state.q_memory_dict.clear()
        self.kept = {}
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            if kind in ("error", "q") and name in self.params:  # a parameter the model no longer has: dropped
                self.kept.setdefault(name, {})[kind] = value
        self.state.iter = int(tensors["iter"])
        position, has_gauss = (int(v) for v in tensors["rng_position"])
        keys = tensors["rng_keys"].numpy().astype(np.uint32)
        self.state.rng.set_state(("MT19937", keys, position, has_gauss, float(tensors["rng_gauss"])))
