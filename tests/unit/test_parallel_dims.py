"""Mesh arithmetic: which (dp, tp, pp) a config asks for on a number of processes, and the errors that explain it."""

from __future__ import annotations

import re

import pytest

from scaleforge.config import ParallelSection, load_config
from scaleforge.distributed.parallel_dims import ParallelDims
from scaleforge.errors import ConfigError


@pytest.mark.parametrize(
    ("section", "world", "expected"),
    [
        (ParallelSection(), 1, ("single", 1, 1, 1)),
        (ParallelSection(), 4, ("ddp", 4, 1, 1)),
        (ParallelSection(strategy="fsdp"), 2, ("fsdp", 2, 1, 1)),
        (ParallelSection(strategy="tp"), 2, ("tp", 1, 2, 1)),
        (ParallelSection(strategy="tp", tp=2), 2, ("tp", 1, 2, 1)),
        (ParallelSection(strategy="pp"), 3, ("pp", 1, 1, 3)),
        (ParallelSection(strategy="hybrid", tp=2), 4, ("hybrid", 2, 2, 1)),  # dp takes what remains
        (ParallelSection(strategy="hybrid", tp=2, pp=2), 8, ("hybrid", 2, 2, 2)),
        (ParallelSection(strategy="hybrid", dp=2, pp=2), 4, ("hybrid", 2, 1, 2)),
    ],
)
def test_dims_follow_the_strategy_and_the_world_size(section: ParallelSection, world: int, expected: tuple) -> None:
    dims = ParallelDims.resolve(section, world)
    assert (dims.strategy, dims.dp, dims.tp, dims.pp) == expected
    assert dims.world_size == world


@pytest.mark.parametrize(
    ("section", "world", "message"),
    [
        (ParallelSection(strategy="single"), 2, "single runs one process, but 2 were started"),
        (ParallelSection(strategy="pp", pp=4), 2, "parallel.pp: 4 does not match the 2 processes"),
        (ParallelSection(strategy="hybrid", tp=2), 3, "3 processes do not divide into parallel.tp=2 x parallel.pp=1"),
        (ParallelSection(strategy="hybrid", dp=2, tp=2), 8, "dp=2 x tp=2 x pp=1 = 4, but 8 processes were started"),
    ],
)
def test_bad_arithmetic_is_explained(section: ParallelSection, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims.resolve(section, world)


@pytest.mark.parametrize(
    ("section", "world", "per_node", "expected"),
    [
        (ParallelSection(strategy="hsdp", dp_replicate=2), 4, None, (4, 2, 2)),
        (ParallelSection(strategy="hsdp", dp_shard=4), 8, None, (8, 2, 4)),
        (ParallelSection(strategy="hsdp", dp_replicate=2, dp_shard=1), 2, None, (2, 2, 1)),
        (ParallelSection(strategy="hsdp"), 8, 4, (8, 2, 4)),  # sharded within each node of 4, replicated across 2
        (ParallelSection(strategy="hsdp"), 4, None, (4, 1, 4)),  # one node: fsdp over it
        (ParallelSection(strategy="hybrid", tp=2, dp_replicate=2), 8, None, (4, 2, 2)),
        (ParallelSection(strategy="hybrid", tp=2), 8, 4, (4, 1, 4)),  # hybrid splits dp only when asked
    ],
)
def test_hsdp_splits_dp_into_replicas_of_sharding_groups(
    section: ParallelSection, world: int, per_node: int | None, expected: tuple
) -> None:
    dims = ParallelDims.resolve(section, world, per_node)
    assert (dims.dp, dims.dp_replicate, dims.dp_shard) == expected
    assert dims.shards_data and dims.world_size == world


@pytest.mark.parametrize(
    ("section", "world", "per_node", "message"),
    [
        (ParallelSection(strategy="hsdp", dp_replicate=3), 4, None, "dp_replicate=3 x dp_shard=? does not make the 4"),
        (ParallelSection(strategy="hsdp", dp_shard=3), 4, None, "parallel.dp_shard: 3 does not divide the 4"),
        (ParallelSection(strategy="hsdp", dp_replicate=2, dp_shard=3), 4, None, "dp_replicate=2 x dp_shard=3"),
        (ParallelSection(strategy="hsdp"), 6, 4, "4 processes a node do not divide its 6"),
    ],
)
def test_bad_hsdp_arithmetic_is_explained(
    section: ParallelSection, world: int, per_node: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ParallelDims.resolve(section, world, per_node)


def test_shards_data_only_for_fsdp_hsdp_and_hybrid() -> None:
    assert ParallelDims("fsdp", 2, 1, 1).shards_data and ParallelDims("hybrid", 2, 2, 1).shards_data
    assert ParallelDims("hsdp", 4, 1, 1, dp_replicate=2).shards_data
    assert not ParallelDims("ddp", 2, 1, 1).shards_data and not ParallelDims("tp", 1, 2, 1).shards_data
    assert not ParallelDims("hybrid", 1, 2, 2).shards_data  # no dp dimension to shard over


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.strategy=ddp", "parallel.pp=2"], "parallel.pp: sizes a mesh dimension that parallel.strategy=ddp"),
        (["parallel.strategy=fsdp", "parallel.tp=2"], "parallel.tp: sizes a mesh dimension"),
        (["parallel.stages=[0]"], "parallel.stages: expected increasing block indices above 0"),
        (["parallel.stages=[3, 3]"], "parallel.stages: expected increasing block indices above 0"),
        (["parallel.schedule=interleaved"], "parallel.schedule"),
        (["parallel.microbatches=0"], "parallel.microbatches"),
        (["parallel.strategy=pp", "parallel.stages_per_process=2"], "the 1f1b schedule runs one stage a process"),
        (["parallel.strategy=ddp", "parallel.stages_per_process=2"], "parallel.stages_per_process: shapes pipeline"),
        (
            ["parallel.strategy=fsdp", "parallel.dp_replicate=2"],
            "parallel.dp_replicate: splits the dp dimension of hsdp",
        ),
        (
            ["parallel.dp_shard=2"],
            "parallel.dp_shard: splits the dp dimension of hsdp or hybrid, not of parallel.strat",
        ),
        (["parallel.strategy=hsdp", "parallel.dp_shard=0"], "parallel.dp_shard"),
        (["parallel.strategy=hsdp", "parallel.grad_compression=bf16"], "for its gradient reduction use parallel.red"),
    ],
)
def test_parallel_section_is_checked_at_load_time(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
