"""A trained model's metrics on the validation split of its run's data (`scaleforge.evaluate`, `scaleforge eval`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from scaleforge.config import ComponentSpec, RunConfig
from scaleforge.data.base import DataInfo
from scaleforge.data.loading import eval_batches
from scaleforge.distributed.parallelize import ParallelModel
from scaleforge.errors import ConfigError
from scaleforge.hardware import make_autocast

if TYPE_CHECKING:
    from scaleforge.runs import Trust

from scaleforge.training.trainer import (
    build_data,
    build_objective,
    eval_batch_size,
    evaluate,
    setup_runtime,
)


def evaluate_model(
    model: nn.Module,
    config: RunConfig,
    device: str | None = None,
    tokenizer_file: Path | None = None,
    *,
    expected: DataInfo | None = None,
) -> dict[str, float]:
    """`model`'s metrics on the validation split of `config`'s data, on `device` (default: the config's). A
    trained tokenizer's `tokenizer_file` (a run's `final/tokenizer.json`) encodes text data in place of the one its
    config would train. `expected`: the data the model was built for, which `config`'s must match in shape."""
    if device is not None:
        config = dataclasses.replace(config, hardware=dataclasses.replace(config.hardware, device=device))
    if tokenizer_file is not None and config.data.params.get("tokenizer") == "bpe":
        params = {**config.data.params, "tokenizer": str(tokenizer_file)}
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, params=params))
    device_, precision = setup_runtime(config)
    model = model.to(device_)
    data = build_data(config.data)
    if expected is not None:
        check_same_shape(data.info, expected)
    if config.training.loss.name == "distillation":  # on validation it is cross-entropy: no teacher is needed
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, loss=ComponentSpec("auto")))
    objective = build_objective(config.training, data.info)
    objective.loss.to(device_)
    autocast = make_autocast(precision, device_)
    batches = eval_batches(data.val, eval_batch_size(config.training, data.info), device_, config.data.num_workers)
    return evaluate(ParallelModel.single(model), batches, objective, autocast)


def check_same_shape(info: DataInfo, expected: DataInfo) -> None:
    """A config error unless data of `info` fits a model built for `expected`: the same task, input shape, classes
    and vocabulary."""
    for name in ("task", "input_shape", "num_classes", "vocab_size"):
        given, wanted = getattr(info, name), getattr(expected, name)
        if given != wanted:
            raise ConfigError(f"data: its {name} is {given}, but the run's model was built for {wanted}")


def continual_report(runs: list[str], trust: Trust) -> dict[str, Any]:
    """Each run of a task sequence (in the order the tasks were learned) on the validation split of every task (each
    run's own `data` section): `accuracy[i][j]`, run i on task j; `average_accuracy[i]`, over the tasks 1..i it
    has seen; `forgetting[j]` of each earlier task, its best accuracy before the last task less the last run's
    (Chaudhry et al. 2018, as Avalanche reports it), and their mean."""
    from scaleforge.runs import open_run

    opened = [open_run(run, trust) for run in runs]
    matrix = []
    for run, loaded in zip(runs, opened, strict=True):
        row = []
        for task in opened:
            metrics = evaluate_model(
                loaded.model, dataclasses.replace(loaded.config, data=task.config.data), expected=loaded.info
            )
            if "val_accuracy" not in metrics:
                raise ConfigError(
                    f"{run}: its metrics have no accuracy ({', '.join(metrics)}); the report compares accuracy"
                )
            row.append(metrics["val_accuracy"])
        matrix.append(row)
    last = len(matrix) - 1
    forgetting = [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]
    return {
        "runs": [str(run) for run in runs],
        "accuracy": matrix,
        "average_accuracy": [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(matrix)],
        "forgetting": forgetting,
        "average_forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
    }
