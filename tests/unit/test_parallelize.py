"""`plan_parallelism`: a strategy that cannot apply to the model is a config error that names the key and says
why, raised on each process alike before any collective (that rank 0 alone says it, once, through the launcher,
is tested in tests/integration/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from scaleforge import load_config
from scaleforge.components import build_model
from scaleforge.data.loading import BatchPlan
from scaleforge.distributed.parallel_dims import ParallelDims
from scaleforge.distributed.parallelize import plan_parallelism
from scaleforge.distributed.pipeline_parallel import StageTie, bubble_fraction, stage_ties
from scaleforge.errors import ConfigError
from scaleforge.training.trainer import build_data
from tests.integration.distributed_runs import MODEL, RUN


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.strategy=tp", "model.architecture=lstm"], "model 'lstm' declares no tensor-parallel plan"),
        (["parallel.strategy=tp", "model.n_heads=3", "model.d_model=48"], "3 attention heads, which do not split"),
        (["parallel.strategy=pp", "model.n_layers=1"], "parallel.pp: 2 pipeline stages need at least 2 blocks"),
        (["parallel.strategy=pp", "parallel.microbatches=3"], "does not split into 3 pipeline micro-batches"),
        (["parallel.strategy=fsdp", "training.precision=fp16-mixed"], "training.precision: fp16-mixed needs"),
        (
            ["parallel.strategy=pp", "parallel.schedule=interleaved_1f1b"],
            "parallel.pp x parallel.stages_per_process: 4 pipeline stages need at least 4 blocks; the model has 2",
        ),
        (
            ["parallel.strategy=pp", "parallel.schedule=zero_bubble", "model.n_layers=4", "parallel.microbatches=1"],
            "the zero_bubble schedule runs micro-batches in rounds of one per pipeline process",
        ),
        (
            ["parallel.strategy=pp", "parallel.schedule=zero_bubble", "model.n_layers=4", "training.compile=true"],
            "training.compile: the zero_bubble schedule splits each backward",
        ),
    ],
    ids=[
        "tp-without-plan",
        "tp-heads",
        "pp-too-few-blocks",
        "pp-microbatches",
        "fsdp-fp16",
        "interleaved-too-few-blocks",
        "zero-bubble-rounds",
        "zero-bubble-compiled",
    ],
)
def test_strategies_that_cannot_apply_to_the_model_are_config_errors(overrides: list[str], message: str) -> None:
    model_args = [] if "model.architecture=lstm" in overrides else MODEL
    config = load_config(None, [*model_args, *RUN, *overrides])
    dims = ParallelDims.resolve(config.parallel, 2)
    model = build_model(config.model, build_data(config.data).info)
    plan = BatchPlan(config.training.batch_size, config.training.grad_accum_steps, world_size=dims.dp)
    with pytest.raises(ConfigError, match=message):
        plan_parallelism(
            model,
            dims=dims,
            device=torch.device("cpu"),
            architecture=config.model.architecture,
            parallel=config.parallel,
            precision=config.training.precision,
            micro_batch_size=plan.micro_batch_size,
            compile=config.training.compile,
        )


@pytest.mark.parametrize(
    ("schedule", "per_process", "microbatches", "expected"),
    [
        ("1f1b", 1, 4, 1 / 5),
        ("gpipe", 1, 2, 1 / 3),
        ("interleaved_1f1b", 2, 4, 1 / 9),
        ("interleaved_1f1b", 4, 8, 1 / 33),
    ],
)
def test_the_bubble_shrinks_with_micro_batches_and_stages_a_process(
    schedule: str, per_process: int, microbatches: int, expected: float
) -> None:
    assert bubble_fraction(schedule, 2, per_process, microbatches) == pytest.approx(expected)


def test_the_zero_bubble_schedules_idle_slots_are_counted_from_its_order() -> None:
    class Built:  # what the schedule computed: two processes, an idle slot at either end of the first one's six
        pipeline_order = {0: [None, "F", "I", "W", "F", None], 1: ["F", "F", "I", "I", "W", "W"]}

    assert bubble_fraction("zero_bubble", 2, 2, 2, Built()) == pytest.approx(2 / 12)


def test_a_weight_tied_across_stages_is_found_with_its_names_and_stages() -> None:
    config = load_config(None, [*MODEL, *RUN, "model.tie_embeddings=true", "model.n_layers=4"])
    model = build_model(config.model, build_data(config.data).info)
    bounds = [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    (tie,) = stage_ties(model, bounds)
    assert tie == StageTie(("embed.token.weight", "head.proj.weight"), (0, 3))
    assert stage_ties(model, [range(0, 4)]) == []  # one stage: one weight
