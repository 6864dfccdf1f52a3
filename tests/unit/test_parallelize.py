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
from scaleforge.errors import ConfigError
from scaleforge.training.trainer import build_data
from tests.integration.distributed_runs import MODEL, RUN


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.strategy=tp", "model.architecture=lstm"], "model 'lstm' declares no tensor-parallel plan"),
        (["parallel.strategy=tp", "model.n_heads=3", "model.d_model=48"], "3 attention heads, which do not split"),
        (["parallel.strategy=pp", "model.n_layers=1"], "parallel.pp: 2 pipeline stages need at least 2 blocks"),
        (["parallel.strategy=pp", "model.tie_embeddings=true"], "are one tied weight"),
        (["parallel.strategy=pp", "parallel.microbatches=3"], "does not split into 3 pipeline micro-batches"),
        (["parallel.strategy=fsdp", "training.precision=fp16-mixed"], "training.precision: fp16-mixed needs"),
    ],
    ids=["tp-without-plan", "tp-heads", "pp-too-few-blocks", "pp-tied", "pp-microbatches", "fsdp-fp16"],
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
        )
