"""PowerSGD's state kept per parameter: a run whose buckets are regrouped, or whose state goes through a
checkpoint's tensors into a new DDP model, takes the same steps as one that never stopped (one gloo process:
the all-reduce is the identity, the compression and its error feedback are not)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scaleforge.distributed.compression import GradCompression


@pytest.fixture
def group(tmp_path: Path) -> Iterator[dist.ProcessGroup]:
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def build_with(
    model: nn.Module, group: dist.ProcessGroup, bucket_mb: float = 0.004
) -> tuple[DistributedDataParallel, GradCompression]:
    ddp = DistributedDataParallel(copy.deepcopy(model), process_group=group, bucket_cap_mb=bucket_mb)
    return ddp, GradCompression("powersgd", ddp, group, rank=2, start_step=2)


def steps(ddp: DistributedDataParallel, optimizer: torch.optim.Optimizer, first: int, last: int) -> None:
    for step in range(first, last):
        generator = torch.Generator().manual_seed(step)
        inputs, targets = torch.randn(16, 24, generator=generator), torch.randint(0, 6, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(inputs), targets).backward()
        optimizer.step()


# a bucket for about every layer, or one for all: then the two 48x24 matrices, another shape between them, are
# laid out together (PowerSGD groups a bucket's factors by shape)
@pytest.mark.parametrize("bucket_mb", [0.004, 1.0])
def test_powersgd_state_survives_regrouped_buckets_and_a_checkpoint(group: dist.ProcessGroup, bucket_mb: float) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 24), nn.Linear(24, 48), nn.Linear(48, 6)]
    model = nn.Sequential(*[part for layer in layers for part in (layer, nn.ReLU())][:-1])
    build = functools.partial(build_with, bucket_mb=bucket_mb)

    reference, _ = build(model, group)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    steps(reference, reference_optimizer, 0, 10)

    regrouped, compression = build(model, group)
    optimizer = torch.optim.SGD(regrouped.parameters(), lr=0.1, momentum=0.9)
    steps(regrouped, optimizer, 0, 5)
    powersgd = compression.powersgd
    assert powersgd is not None and len(powersgd.layouts) == (1 if bucket_mb == 1.0 else 4)
    assert powersgd.state.error_dict
    powersgd._keep_all()  # as when DDP regroups its buckets: the state back to the parameters, placed again
    assert powersgd.kept and not powersgd.state.error_dict
    saved = {key: value.clone() for key, value in compression.state_dict().items()}
    steps(regrouped, optimizer, 5, 10)
    for mine, theirs in zip(regrouped.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)

    # a new process from step 5: the weights and the optimizer as they were then (the same 5 steps again), new
    # DDP buckets, PowerSGD's state from the tensors a checkpoint holds
    again, _ = build(model, group)
    again_optimizer = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    steps(again, again_optimizer, 0, 5)
    resumed, compression = build(model, group)
    compression.load_state_dict(saved)
    assert compression.powersgd is not None and compression.powersgd.state.iter == 5
    resumed.module.load_state_dict(again.module.state_dict())
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(again_optimizer.state_dict())
    steps(resumed, resumed_optimizer, 5, 10)
    for mine, theirs in zip(resumed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_without_its_state_a_resumed_powersgd_run_takes_other_steps(group: dist.ProcessGroup) -> None:
    """The test above fails if the state is not carried: the error feedback changes the steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 6))
    reference, _ = build_with(model, group)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    steps(reference, reference_optimizer, 0, 8)
    restarted, compression = build_with(model, group)
    optimizer = torch.optim.SGD(restarted.parameters(), lr=0.1)
    steps(restarted, optimizer, 0, 4)
    fresh, fresh_compression = build_with(model, group)
    fresh.module.load_state_dict(restarted.module.state_dict())
    fresh_compression.powersgd.state.iter = 4  # type: ignore[union-attr]
    steps(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), 4, 8)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), reference.parameters(), strict=True))
