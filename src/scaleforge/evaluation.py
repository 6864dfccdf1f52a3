"""A trained model's metrics on the validation split of its run's data (`scaleforge.evaluate`, `scaleforge eval`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from scaleforge.config import ComponentSpec, RunConfig
from scaleforge.data.base import DataInfo
from scaleforge.data.loading import eval_batches
from scaleforge.distributed.parallelize import ParallelModel
from scaleforge.errors import ConfigError
from scaleforge.hardware import make_autocast
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
