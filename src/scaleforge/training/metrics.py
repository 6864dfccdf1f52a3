"""What a run reports: metrics.jsonl, TensorBoard event files, a progress bar or log lines, a loss plot."""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from scaleforge.training.callbacks import Callback, RunState


class JsonlLogger(Callback):
    """One JSON object per logged step and per evaluation, appended to `metrics.jsonl` as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: TextIO | None = None

    def on_train_start(self, state: RunState) -> None:
        # a run that starts at step 0 (a restarted one included) starts the file afresh; a resumed one goes on
        self.file = self.path.open("w" if state.step == 0 else "a", buffering=1)

    def _write(self, record: dict[str, Any]) -> None:
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        self._write(record)

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        self._write(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class TensorBoardLogger(Callback):
    """Scalars under `train/` and `val/` in TensorBoard event files (`EventFile`).

    Each record becomes one event holding all its values, rather than one event per scalar as `add_scalar`
    writes.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.events: EventFile | None = None

    def on_train_start(self, state: RunState) -> None:
        # A resumed run logs again what came after its checkpoint: TensorBoard hides the earlier run's events
        # from the step after the checkpoint on, so that no step shows twice (a fresh run has none to hide).
        self.events = EventFile(self.log_dir, purge_step=state.step + 1)

    def _scalars(self, prefix: str, record: dict[str, Any]) -> None:
        values = [
            (f"{prefix}/{name.removeprefix('val_')}", value)
            for name, value in record.items()
            if name not in ("step", "epoch", "time") and isinstance(value, int | float)
        ]
        assert self.events is not None
        self.events.add(record["step"], record["time"], values)

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        self._scalars("train", record)

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        self._scalars("val", record)

    def on_checkpoint(self, state: RunState, path: Path) -> None:
        if self.events is not None:
            self.events.flush()  # what a resume from this checkpoint does not log again is on disk

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


_event_files = itertools.count()  # the last part of an event file's name: several in one second stay apart


class EventFile:
    """One TensorBoard event file, in the name and records `SummaryWriter` writes. Events are kept as plain values
    and written, from the training thread, every `FLUSH_S` seconds (and by `flush` and `close`): what TensorBoard
    can read is what was flushed, which `SummaryWriter` does every 120 s.

    Not `SummaryWriter`'s file writer: it hands each event to a writer thread, which checksums it in pure Python
    while the training thread waits for the interpreter. Measured on digits' MLP on 2 cores: 92 us of training
    time an event through the thread, 25 us written at once from the training thread; within a run, between steps
    that have just used the caches, an event written at once took 92-117 us (`scaleforge bench overhead`'s
    `digits`: about 0.5% of its throughput), against a few microseconds kept and written with the others.
    """

    FLUSH_S = 5.0

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_event_files)}"
        self.file = (log_dir / name).open("wb")
        self.records = RecordWriter(self.file)
        self.event_type, self.summary_type = Event, Summary
        self.pending: list[tuple[int, float, list[tuple[str, float]]]] = []
        self.records.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        if purge_step is not None:  # TensorBoard hides the events of this step on that are older than this one
            start = SessionLog(status=SessionLog.START)
            self.records.write(Event(wall_time=time.time(), step=purge_step, session_log=start).SerializeToString())
        self.flush()

    def add(self, step: int, wall_time: float, values: list[tuple[str, float]]) -> None:
        """One event holding `values` (tag, number) at `step`."""
        self.pending.append((step, wall_time, values))
        if time.monotonic() - self.flushed >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the events kept so far and flush the file."""
        Value = self.summary_type.Value  # noqa: N806 - the protobuf class
        for step, wall_time, values in self.pending:
            summary = self.summary_type(value=[Value(tag=tag, simple_value=value) for tag, value in values])
            self.records.write(self.event_type(summary=summary, step=step, wall_time=wall_time).SerializeToString())
        self.pending.clear()
        self.file.flush()
        self.flushed = time.monotonic()

    def close(self) -> None:
        if not self.file.closed:
            self.flush()
            self.file.close()


# how a log line shows the system figures (`train.monitoring`); '' leaves one to metrics.jsonl and TensorBoard
SYSTEM_FIGURES = {
    "cpu_percent": "cpu {:.0f}%",
    "rss_mib": "rss {:,.0f} MiB",
    "tokens_per_s": "{:,.0f} tokens/s",
    "gpu_memory_allocated_mib": "gpu {:,.0f} MiB",
    "gpu_memory_reserved_mib": "",
    "gpu_memory_peak_mib": "",
    "gpu_utilization_percent": "gpu busy {:.0f}%",
    "gpu_power_w": "",
    "power_w": "power {:,.0f} W",
    "energy_j": "",
}


def _format_record(record: dict[str, Any]) -> str:
    parts = []
    for name, value in record.items():
        if name in ("step", "epoch", "time"):
            continue
        if name == "lr":
            parts.append(f"lr {value:.2e}")
        elif name == "samples_per_s":
            parts.append(f"{value:,.0f} samples/s")
        elif name == "data_wait_share":
            parts.append(f"data wait {value:.0%}")
        elif name == "grad_sync_bytes":
            parts.append(f"grad sync {value / 2**20:,.2f} MiB/step")
        elif name in SYSTEM_FIGURES:
            if SYSTEM_FIGURES[name]:
                parts.append(SYSTEM_FIGURES[name].format(value))
        elif isinstance(value, float):
            parts.append(f"{name} {value:.4f}")
    return " | ".join(parts)


class PlainProgress(Callback):
    """Plain log lines, for logs and pipes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.start = 0.0

    def on_train_start(self, state: RunState) -> None:
        self.start = time.perf_counter()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, state.step) * (state.total_steps - state.step)
        self._print(
            f"step {state.step}/{state.total_steps} | epoch {state.epoch + 1} | {_format_record(record)} "
            f"| eta {timedelta(seconds=round(eta))}"
        )

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        self._print(f"eval step {state.step} | {_format_record(record)}")


class StepProgress(Progress):
    """A rich progress display whose refresh thread reads the run's step and epoch counters itself."""

    def __init__(self, state: RunState, *columns: Any, **options: Any) -> None:
        super().__init__(*columns, **options)
        self.state = state

    def get_renderables(self) -> Iterator[Any]:
        for task in self.tasks:
            self.update(task.id, completed=self.state.step, epoch=self.state.epoch + 1)
        yield from super().get_renderables()


class BarProgress(Callback):
    """A live progress bar (step, loss, lr, samples/s, ETA) for a terminal.

    The bar's display thread reads the step counter ten times a second, so the bar moves with every step
    without a call from the training loop; loss and lr change with each log line. On a GPU the counter can
    run ahead of the device between log lines, by as many steps as the CPU has queued.
    """

    def __init__(self, console: Any = None) -> None:
        self.console = console
        self.progress: StepProgress | None = None
        self.task: Any = None

    def on_train_start(self, state: RunState) -> None:
        self.progress = StepProgress(
            state,
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=state.total_steps, epoch=1, stats="")
        self.progress.start()

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        assert self.progress is not None
        self.progress.update(self.task, stats=_format_record(record))

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        assert self.progress is not None
        self.progress.console.print(f"eval step {state.step} | {_format_record(record)}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class LossPlot(Callback):
    """`loss.png`: training and validation loss against step, and validation accuracy when there is one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, state: RunState, summary: dict[str, Any]) -> None:
        train = [r for r in state.history if "loss" in r]
        val = [r for r in state.history if "val_loss" in r]
        if not train and not val:
            return
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
        axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
        axis.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", color="tab:orange")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.set_yscale("log")
        handles, labels = axis.get_legend_handles_labels()
        if any("val_accuracy" in r for r in val):
            right = axis.twinx()
            right.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "s--", color="tab:green")
            right.set_ylabel("val accuracy")
            handles.append(right.lines[0])
            labels.append("val accuracy")
        axis.legend(handles, labels, loc="center right")
        axis.set_title(state.run_dir.name)
        figure.tight_layout()
        figure.savefig(self.path)
        plt.close(figure)


def build_progress(mode: str) -> Callback | None:
    """The progress reporter for `logging.progress` (auto: a bar on a terminal, plain lines otherwise)."""
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() else "plain"
    return {"bar": BarProgress, "plain": PlainProgress}.get(mode, lambda: None)()
