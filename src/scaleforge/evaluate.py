"""`scaleforge eval`: a finished run's metrics on its validation split."""

from __future__ import annotations

from pathlib import Path

from scaleforge.data.loading import eval_batches
from scaleforge.distributed.parallelize import ParallelModel
from scaleforge.runs import load_run
from scaleforge.train.precision import make_autocast
from scaleforge.train.trainer import (
    build_data,
    build_objective,
    eval_batch_size,
    evaluate,
    setup_runtime,
)


def evaluate_run(run_dir: str | Path) -> dict[str, float]:
    """Load `final/` of a run and evaluate it on the validation split of the data it was trained on."""
    run = load_run(run_dir)
    config = run.config
    device, precision = setup_runtime(config)
    model = run.model.to(device)
    data = build_data(config.data)
    objective = build_objective(config.training, data.info)
    objective.loss.to(device)
    autocast = make_autocast(precision, device)
    batches = eval_batches(data.val, eval_batch_size(config.training), device, config.data.num_workers)
    return evaluate(ParallelModel.single(model), batches, objective, autocast)
