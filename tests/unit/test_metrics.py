"""The reporters: the progress bar follows the step counter; TensorBoard gets one event per record."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from rich.console import Console

from scaleforge.training.callbacks import RunState
from scaleforge.training.metrics import BarProgress, TensorBoardLogger


def test_bar_follows_the_step_counter_without_calls_from_the_loop(tmp_path: Path) -> None:
    output = io.StringIO()
    bar = BarProgress(console=Console(file=output, force_terminal=True, width=120))
    state = RunState(tmp_path, total_steps=40, steps_per_epoch=20, global_batch_size=8)
    bar.on_train_start(state)
    state.step, state.epoch = 27, 1
    bar.progress.refresh()
    task = bar.progress.tasks[0]
    assert task.completed == 27 and task.fields["epoch"] == 2
    bar.on_log(state, {"step": 27, "loss": 0.5, "lr": 1e-3, "samples_per_s": 100.0})
    state.step = 40
    bar.close()
    assert "40/40" in output.getvalue() and "loss 0.5000" in output.getvalue()


def test_tensorboard_writes_one_event_per_record(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    state = RunState(tmp_path, total_steps=2, steps_per_epoch=2, global_batch_size=8)
    logger.on_train_start(state)
    logger.on_log(state, {"step": 1, "epoch": 0, "time": time.time(), "loss": 2.0, "lr": 0.1})
    logger.on_log(state, {"step": 2, "epoch": 0, "time": time.time(), "loss": 1.0, "lr": 0.1})
    logger.on_eval(state, {"step": 2, "epoch": 0, "time": time.time(), "val_loss": 0.5, "val_accuracy": 0.75})
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr", "val/accuracy", "val/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/accuracy")] == [(2, 0.75)]


def test_tensorboard_events_reach_the_disk_every_flush_interval_before_the_file_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live TensorBoard reads a running run's events: written from the training thread, they are flushed once
    `FLUSH_S` has passed since the last flush (a clock the test moves), not only at checkpoints and the end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scaleforge.training import metrics

    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    logger = TensorBoardLogger(tmp_path)
    state = RunState(tmp_path, total_steps=3, steps_per_epoch=3, global_batch_size=8)
    logger.on_train_start(state)

    def shown() -> list[int]:
        events = EventAccumulator(str(tmp_path))
        events.Reload()
        if "train/loss" not in events.Tags()["scalars"]:
            return []
        return [event.step for event in events.Scalars("train/loss")]

    logger.on_log(state, {"step": 1, "epoch": 0, "time": time.time(), "loss": 2.0})
    assert shown() == []  # within the interval since the file was opened: kept, not yet written
    now[0] += metrics.EventFile.FLUSH_S
    logger.on_log(state, {"step": 2, "epoch": 0, "time": time.time(), "loss": 1.5})
    assert shown() == [1, 2]
    logger.on_log(state, {"step": 3, "epoch": 0, "time": time.time(), "loss": 1.0})
    logger.on_checkpoint(state, tmp_path)
    assert shown() == [1, 2, 3]
    logger.close()
