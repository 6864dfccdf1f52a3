"""What a run reports: metrics.jsonl, TensorBoard event files, a progress bar or log lines, a loss plot."""

from __future__ import annotations

import json
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
    """Scalars under `train/` and `val/` in TensorBoard event files.

    Each record becomes one event holding all its values, rather than one event per scalar as `add_scalar`
    writes: TensorBoard checksums every event in pure Python on a writer thread that competes with training
    for the CPU.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None
        self.summary_type: Any = None

    def on_train_start(self, state: RunState) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary  # TensorBoard is imported only when used
        from torch.utils.tensorboard.writer import SummaryWriter

        # A resumed run logs again what came after its checkpoint: TensorBoard hides the earlier run's events
        # from the step after the checkpoint on, so that no step shows twice (a fresh run has none to hide).
        self.writer = SummaryWriter(str(self.log_dir), purge_step=state.step + 1).file_writer
        self.summary_type = Summary

    def _scalars(self, prefix: str, record: dict[str, Any]) -> None:
        values = [
            self.summary_type.Value(tag=f"{prefix}/{name.removeprefix('val_')}", simple_value=value)
            for name, value in record.items()
            if name not in ("step", "epoch", "time") and isinstance(value, int | float)
        ]
        self.writer.add_summary(self.summary_type(value=values), record["step"], record["time"])

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        self._scalars("train", record)

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        self._scalars("val", record)

    def on_checkpoint(self, state: RunState, path: Path) -> None:
        self.writer.flush()  # what a resume from this checkpoint does not log again is on disk

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
