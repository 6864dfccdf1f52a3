"""Mesh arithmetic: which (dp, tp, pp) a config asks for on a number of processes, and the errors that explain it."""

from __future__ import annotations

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


def test_shards_data_only_for_fsdp_and_hybrid() -> None:
    assert ParallelDims("fsdp", 2, 1, 1).shards_data and ParallelDims("hybrid", 2, 2, 1).shards_data
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
    ],
)
def test_parallel_section_is_checked_at_load_time(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
