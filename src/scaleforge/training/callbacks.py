"""Callbacks observe a run: logging, progress, plots, early stopping. None of them owns a training step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scaleforge.errors import ConfigError
from scaleforge.registry import register_callback


@dataclass
class RunState:
    """What callbacks may read about the run in progress; `should_stop` is the one thing they may set."""

    run_dir: Path
    total_steps: int
    steps_per_epoch: int
    global_batch_size: int
    is_main_process: bool = True
    step: int = 0
    epoch: int = 0
    should_stop: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    energy_j: float = 0.0  # the job's energy through the last log line (earlier attempts' included, see energy.py)


class Callback:
    """Base class with empty hooks; override the ones you need."""

    def on_train_start(self, state: RunState) -> None:
        """Once, after everything is built and before the first step."""

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        """Every `logging.every_steps` steps, with the mean training loss and learning rate since the last log."""

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        """After each evaluation on the validation split."""

    def on_checkpoint(self, state: RunState, path: Path) -> None:
        """After a checkpoint has been written."""

    def on_train_end(self, state: RunState, summary: dict[str, Any]) -> None:
        """Once, after the final model has been written."""

    def close(self) -> None:
        """Release files and displays; called when the run ends, also when it fails."""


class CallbackList(Callback):
    """Calls each hook of every callback in order."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, state: RunState) -> None:
        for callback in self.callbacks:
            callback.on_train_start(state)

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_log(state, record)

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_eval(state, record)

    def on_checkpoint(self, state: RunState, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(state, path)

    def on_train_end(self, state: RunState, summary: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_train_end(state, summary)

    def close(self) -> None:
        for callback in self.callbacks:
            callback.close()


@register_callback("early_stopping")
class EarlyStopping(Callback):
    """Stop when the monitored validation metric has not improved for `patience` evaluations."""

    def __init__(
        self, monitor: str = "val_loss", patience: int = 3, mode: Literal["min", "max"] = "min", min_delta: float = 0.0
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.monitor = monitor
        self.patience = patience
        self.sign = 1.0 if mode == "min" else -1.0
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_evals = 0

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        if self.monitor not in record:
            raise ConfigError(
                f"training.callbacks: early_stopping monitors '{self.monitor}', which is not an evaluation metric; "
                f"available: {', '.join(k for k in record if k.startswith('val_'))}"
            )
        value = self.sign * record[self.monitor]
        if value < self.best - self.min_delta:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            state.should_stop = True
