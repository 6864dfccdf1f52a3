"""`scaleforge bench overhead`: what the trainer costs per step against a hand-written PyTorch loop.

The same MLP, data, optimizer and batch run in three loops: a plain loop over tensors held in memory,
the scaleforge trainer with its default logging on (metrics.jsonl, TensorBoard, progress lines), and
PyTorch Lightning when it is installed (`make setup EXTRAS=dev,bench`). Each measurement times `steps`
steps after a warm-up. The loops run in alternating order (ABC, CBA, ...) and each repeat gives a
throughput ratio against the plain loop measured beside it; the table reports medians over repeats.
A shared 2-core machine needs that: single measurements drift by 10-20% between repeats, paired ratios
far less. Evaluation and checkpoints are outside the timed window (each has its own benchmark): the
dataset is sized so that the timed steps fall inside one epoch.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from scaleforge.config import LoggingSection, load_config
from scaleforge.data.loading import epoch_permutation
from scaleforge.models.mlp import MLP
from scaleforge.training.callbacks import Callback, RunState
from scaleforge.training.trainer import train

# The trainer's clock is read at its log lines, so warm-up and timed steps are whole log intervals.
LOG_INTERVAL = LoggingSection().every_steps
WARMUP_STEPS = LOG_INTERVAL


@dataclass(frozen=True)
class Workload:
    """What every loop trains."""

    num_features: int = 128
    num_classes: int = 10
    hidden_layers: tuple[int, ...] = (512, 256)
    batch_size: int = 128
    learning_rate: float = 1e-3

    def num_samples(self, steps: int) -> int:
        """Enough training samples that warm-up and timed steps fit in one epoch (20% go to validation)."""
        return int((WARMUP_STEPS + steps + 1) * self.batch_size / 0.8) + self.batch_size

    def data(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same rows the trainer's `synthetic` dataset generates, training split only."""
        from scaleforge.data.synthetic import synthetic

        splits = synthetic(
            num_samples=self.num_samples(steps), num_features=self.num_features, num_classes=self.num_classes
        )
        return splits.train.inputs, splits.train.targets  # type: ignore[attr-defined]

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return MLP((self.num_features,), self.num_classes, self.hidden_layers, "relu", 0.0)


def time_plain_loop(workload: Workload, steps: int) -> float:
    """Seconds per step of a hand-written loop: gather a batch from tensors, forward, backward, step."""
    inputs, targets = workload.data(steps)
    model = workload.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=workload.learning_rate)
    order = epoch_permutation(len(inputs), 0, 0)
    batch = workload.batch_size
    start = 0.0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        indices = order[step * batch : (step + 1) * batch]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs[indices]), targets[indices])
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


class StepClock(Callback):
    """Reads the clock at every log line (the trainer always logs its last step)."""

    def __init__(self) -> None:
        self.marks: dict[int, float] = {}

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        self.marks[state.step] = time.perf_counter()

    def seconds_per_step(self, after: int) -> float:
        """Mean step time from the first log line at or after step `after` to the last step."""
        first = min(step for step in self.marks if step >= after)
        last = max(self.marks)
        return (self.marks[last] - self.marks[first]) / (last - first)


def time_trainer(workload: Workload, steps: int) -> float:
    """Seconds per step of `scaleforge.training` with the default logging, on the same workload."""
    overrides = [
        "model.architecture=mlp",
        f"model.hidden_layers={list(workload.hidden_layers)}",
        "model.dropout_rate=0.0",
        "data.dataset=synthetic",
        f"data.num_samples={workload.num_samples(steps)}",
        f"data.num_features={workload.num_features}",
        f"data.num_classes={workload.num_classes}",
        f"training.batch_size={workload.batch_size}",
        f"training.learning_rate={workload.learning_rate}",
        f"training.max_steps={WARMUP_STEPS + steps}",
        "training.optimizer=adam",
        "checkpoint.every_steps=0",
        "hardware.device=cpu",  # where the other two loops run, also on a machine with a GPU
        "training.precision=32",
        "logging.progress=plain",
        "logging.plot=false",
    ]
    config = load_config(None, overrides)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        train(config, Path(run_dir), callbacks=[clock])
    return clock.seconds_per_step(after=WARMUP_STEPS)


def time_lightning(workload: Workload, steps: int) -> float:
    """Seconds per step of PyTorch Lightning used the usual way (LightningModule, DataLoader, Trainer)."""
    import logging

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # its banner lines would break the table
        logging.getLogger(name).setLevel(logging.ERROR)

    inputs, targets = workload.data(steps)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = workload.model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=workload.learning_rate)

    clock = StepClock()

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            clock.marks[trainer.global_step] = time.perf_counter()

    loader = DataLoader(TensorDataset(inputs, targets), batch_size=workload.batch_size, shuffle=True, drop_last=True)
    with (
        tempfile.TemporaryDirectory() as root,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=WARMUP_STEPS + steps,
            log_every_n_steps=LOG_INTERVAL,  # the same logging cadence as the trainer's default
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=[Clock()],
        )
        trainer.fit(Module(), loader)
    return clock.seconds_per_step(after=WARMUP_STEPS)


def lightning_available() -> bool:
    """Whether PyTorch Lightning can be imported."""
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    return True


def run_overhead_benchmark(
    *, steps: int = 300, repeats: int = 5, lightning: bool = True, as_json: bool = False, threads: int | None = None
) -> dict[str, Any]:
    """Measure, print (table or JSON) and return the step times of each loop.

    `steps` is rounded up to a whole number of the trainer's default log intervals.
    """
    steps = -(-steps // LOG_INTERVAL) * LOG_INTERVAL
    if threads is not None:
        torch.set_num_threads(threads)
    workload = Workload()
    loops: dict[str, Callable[[Workload, int], float]] = {
        "plain PyTorch loop": time_plain_loop,
        "scaleforge trainer": time_trainer,
    }
    if lightning and lightning_available():
        loops["PyTorch Lightning"] = time_lightning
    times: dict[str, list[float]] = {name: [] for name in loops}
    for repeat in range(repeats):
        order = list(loops.items())
        for name, measure in order if repeat % 2 == 0 else reversed(order):
            times[name].append(measure(workload, steps))
        if not as_json:
            print(
                f"repeat {repeat + 1}/{repeats}: " + " | ".join(f"{n} {t[-1] * 1e3:.3f} ms" for n, t in times.items()),
                flush=True,
            )
    plain = times["plain PyTorch loop"]
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "loop": name,
                "median_step_ms": median * 1e3,
                "min_step_ms": min(samples) * 1e3,
                "max_step_ms": max(samples) * 1e3,
                "samples_per_s": workload.batch_size / median,
                "throughput_vs_plain": statistics.median(p / t for p, t in zip(plain, samples, strict=True)),
            }
        )
    result = {
        "benchmark": "overhead",
        "workload": {**vars(workload), "hidden_layers": list(workload.hidden_layers), "optimizer": "adam"},
        "steps": steps,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "results": rows,
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return result


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    workload = result["workload"]
    table = Table(
        title=f"Trainer overhead: MLP {workload['num_features']}-{'-'.join(map(str, workload['hidden_layers']))}-"
        f"{workload['num_classes']}, batch {workload['batch_size']}, adam; {result['steps']} steps x "
        f"{result['repeats']} repeats, {result['threads']} threads, torch {result['torch']}"
    )
    for column in ("loop", "median step (ms)", "min-max (ms)", "samples/s", "throughput vs plain (median of pairs)"):
        table.add_column(column, justify="left" if column == "loop" else "right")
    for row in result["results"]:
        table.add_row(
            row["loop"],
            f"{row['median_step_ms']:.3f}",
            f"{row['min_step_ms']:.3f}-{row['max_step_ms']:.3f}",
            f"{row['samples_per_s']:,.0f}",
            f"{row['throughput_vs_plain']:.3f}",
        )
    Console().print(table)
