"""`scaleforge eval`: a finished run's metrics on its validation split."""

from __future__ import annotations

from pathlib import Path

import torch

from scaleforge.data.loading import eval_batches
from scaleforge.distributed.env import select_device
from scaleforge.runs import load_run
from scaleforge.train.trainer import (
    build_data,
    build_objective,
    eval_batch_size,
    evaluate,
    make_autocast,
    resolve_precision,
)


def evaluate_run(run_dir: str | Path) -> dict[str, float]:
    """Load `final/` of a run and evaluate it on the validation split of the data it was trained on."""
    run = load_run(run_dir)
    config = run.config
    if config.hardware.threads is not None:
        torch.set_num_threads(config.hardware.threads)
    device = select_device(config.hardware.device)
    model = run.model.to(device)
    data = build_data(config.data)
    objective = build_objective(config.training, data.info)
    objective.loss.to(device)
    autocast = make_autocast(resolve_precision(config.training.precision, device), device)
    batches = eval_batches(data.val, eval_batch_size(config.training), device, config.data.num_workers)
    return evaluate(model, batches, objective, autocast)
