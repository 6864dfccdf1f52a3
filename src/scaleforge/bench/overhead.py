"""`scaleforge bench overhead`: what the trainer costs per step against a hand-written PyTorch loop.

Two workloads, each trained by a plain loop over tensors held in memory, by the scaleforge trainer with its
default logging on (metrics.jsonl, TensorBoard, progress lines, status, system metrics) and, for the first, by
PyTorch Lightning when it is installed (`make setup EXTRAS=dev,bench`):

- `mlp-128`: an MLP 128-512-256-10 on synthetic rows, batch 128, Adam, timed inside one epoch (no evaluation);
- `digits`: the small common case, an MLP 64-256-256-10 on digits, batch 64, Adam, with the trainer's default
  evaluation after every epoch (22 steps); the plain loop evaluates the same validation split as often and reads
  its loss back once per log interval, as the trainer does.

Each measurement times `steps` steps after a warm-up. The loops run in alternating order (ABC, CBA, ...) and each
repeat gives a throughput ratio against the plain loop measured beside it; the table reports medians over
repeats. A shared 2-core machine needs that: single measurements drift by 10-20% between repeats, paired ratios
far less. Checkpoints are outside the timed window (they have their own benchmark).
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
    """What every loop trains: `mlp-128`, synthetic rows timed inside one epoch."""

    name: str = "mlp-128"
    device: str = "cpu"
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

    def overrides(self, steps: int) -> list[str]:
        """The trainer's config for the same model, data, optimizer and batch."""
        return [
            "model.architecture=mlp",
            f"model.hidden_layers={list(self.hidden_layers)}",
            "model.dropout_rate=0.0",
            "data.dataset=synthetic",
            f"data.num_samples={self.num_samples(steps)}",
            f"data.num_features={self.num_features}",
            f"data.num_classes={self.num_classes}",
            f"training.batch_size={self.batch_size}",
            f"training.learning_rate={self.learning_rate}",
            f"training.max_steps={WARMUP_STEPS + steps}",
            "training.optimizer=adam",
            f"hardware.device={self.device}",
        ]


@dataclass(frozen=True)
class DigitsWorkload:
    """`digits`: MLP 64-256-256-10 on digits, batch 64, Adam, evaluated after every epoch."""

    name: str = "digits"
    device: str = "cpu"
    hidden_layers: tuple[int, ...] = (256, 256)
    batch_size: int = 64
    learning_rate: float = 1e-3

    def overrides(self, steps: int) -> list[str]:
        """The trainer's config: the defaults (digits, dropout, evaluation after each epoch) but for these."""
        return [
            f"model.hidden_layers={list(self.hidden_layers)}",
            f"training.batch_size={self.batch_size}",
            f"training.learning_rate={self.learning_rate}",
            "training.optimizer=adam",
            f"training.max_steps={WARMUP_STEPS + steps}",
            f"hardware.device={self.device}",
        ]


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (a GPU's), so that the clock reads what it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plain_loop(workload: Workload | DigitsWorkload, steps: int) -> float:
    """Seconds per step of a hand-written loop (see the module)."""
    if isinstance(workload, DigitsWorkload):
        return time_plain_digits(workload, steps)
    return time_plain_synthetic(workload, steps)


def time_plain_digits(workload: DigitsWorkload, steps: int) -> float:
    """Seconds per step of a hand-written loop over digits: the trainer's split, order and model, an evaluation of
    the validation split (loss and accuracy read back) after every epoch, the loss read back every log interval.
    Timed from the end of step `WARMUP_STEPS` to the end of the last step, as the trainer's clock is."""
    from scaleforge.data.digits import digits

    config = load_config(None, workload.overrides(steps))
    device = torch.device(workload.device)
    splits = digits()
    inputs, targets = splits.train.inputs.to(device), splits.train.targets.to(device)  # type: ignore[attr-defined]
    val_inputs, val_targets = splits.val.inputs.to(device), splits.val.targets.to(device)  # type: ignore[attr-defined]
    torch.manual_seed(config.seed)
    model = MLP(splits.info.input_shape, 10, workload.hidden_layers, **_mlp_options(config)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=workload.learning_rate)
    batch, total, step, epoch = workload.batch_size, WARMUP_STEPS + steps, 0, 0
    window = torch.zeros((), device=device)
    start = 0.0
    while True:
        order = epoch_permutation(len(inputs), config.seed, epoch).to(device)
        for first in range(0, len(inputs) // batch * batch, batch):
            indices = order[first : first + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs[indices]), targets[indices])
            loss.backward()
            optimizer.step()
            window += loss.detach()
            step += 1
            if step % LOG_INTERVAL == 0:
                float(window)  # the log line's one read back
                window.zero_()
            if step == WARMUP_STEPS:
                synchronize(device)
                start = time.perf_counter()
            if step == total:
                synchronize(device)
                return (time.perf_counter() - start) / steps
        model.eval()
        with torch.no_grad():
            logits = model(val_inputs)
            float(F.cross_entropy(logits, val_targets)), float((logits.argmax(1) == val_targets).float().mean())
        model.train()
        epoch += 1


def _mlp_options(config: Any) -> dict[str, Any]:
    """The MLP's activation and dropout as the trainer builds it from `config`."""
    import inspect

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(MLP).parameters.items()
        if name in ("activation", "dropout_rate")
    }
    return {**defaults, **{k: v for k, v in config.model.params.items() if k in defaults}}


def time_plain_synthetic(workload: Workload, steps: int) -> float:
    """Seconds per step of a hand-written loop: gather a batch from tensors, forward, backward, step."""
    device = torch.device(workload.device)
    inputs, targets = (tensor.to(device) for tensor in workload.data(steps))
    model = workload.model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=workload.learning_rate)
    order = epoch_permutation(len(inputs), 0, 0).to(device)
    batch = workload.batch_size
    window = torch.zeros((), device=device)
    start = 0.0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            synchronize(device)
            start = time.perf_counter()
        indices = order[step * batch : (step + 1) * batch]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs[indices]), targets[indices])
        loss.backward()
        optimizer.step()
        window += loss.detach()
        if (step + 1) % LOG_INTERVAL == 0:
            float(window)  # read back once a log interval, as the trainer does
            window.zero_()
    synchronize(device)
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


def time_trainer(workload: Workload | DigitsWorkload, steps: int) -> float:
    """Seconds per step of `scaleforge.training` with the default logging, on the same workload, after the warm-up."""
    clock = StepClock()
    config = load_config(None, [*workload.overrides(steps), *TRAINER_DEFAULTS])
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        train(config, Path(run_dir), callbacks=[clock])
    return clock.seconds_per_step(after=WARMUP_STEPS)


# what the trainer runs with in every workload: no checkpoints (they have their own benchmark), full precision,
# progress as plain lines, no plot at the end
TRAINER_DEFAULTS = [
    "checkpoint.every_steps=0",
    "training.precision=32",
    "logging.progress=plain",
    "logging.plot=false",
]


def time_lightning(workload: Workload, steps: int) -> float:
    """Seconds per step of PyTorch Lightning used the usual way (LightningModule, DataLoader, Trainer)."""
    import logging

    import lightning as L

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # its banner lines would break the table
        logging.getLogger(name).setLevel(logging.ERROR)

    device = torch.device(workload.device)
    inputs, targets = (tensor.to(device) for tensor in workload.data(steps))  # where Lightning trains

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

    loader = InMemoryBatches(inputs, targets, workload.batch_size)  # the plain loop's batches, gathered alike
    with (
        tempfile.TemporaryDirectory() as root,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
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


class InMemoryBatches:
    """Batches gathered from tensors in memory by a shuffled order, one indexing each, as the plain loop makes
    them: what Lightning is fed (a `DataLoader` over a `TensorDataset` would collate sample by sample)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> None:
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inputs) // self.batch_size

    def __iter__(self) -> Any:
        order = epoch_permutation(len(self.inputs), 0, self.epoch).to(self.inputs.device)
        self.epoch += 1
        for step in range(len(self)):
            indices = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self.inputs[indices], self.targets[indices]


def lightning_available() -> bool:
    """Whether PyTorch Lightning can be imported."""
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    return True


def run_overhead_benchmark(
    *,
    steps: int = 300,
    repeats: int = 7,
    lightning: bool = True,
    as_json: bool = False,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure, print (table or JSON) and return the step times of each loop on each workload.

    `steps` is rounded up to a whole number of the trainer's default log intervals.
    """
    steps = -(-steps // LOG_INTERVAL) * LOG_INTERVAL
    if threads is not None:
        torch.set_num_threads(threads)
    workloads: list[Workload | DigitsWorkload] = [Workload(device=device), DigitsWorkload(device=device)]
    loops: dict[str, Callable[[Any, int], float]] = {
        "plain PyTorch loop": time_plain_loop,
        "scaleforge trainer": time_trainer,
    }
    if lightning and lightning_available():
        loops["PyTorch Lightning"] = time_lightning
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(repeats):
        for workload in workloads:
            order = [(name, measure) for name, measure in loops.items() if _applies(name, workload)]
            for name, measure in order if repeat % 2 == 0 else reversed(order):
                times.setdefault((workload.name, name), []).append(measure(workload, steps))
        if not as_json:
            print(
                f"repeat {repeat + 1}/{repeats}: "
                + " | ".join(f"{w} {n} {t[-1] * 1e3:.3f} ms" for (w, n), t in times.items()),
                flush=True,
            )
    rows = []
    for workload in workloads:
        plain = times[workload.name, "plain PyTorch loop"]
        for (name_of_workload, name), samples in times.items():
            if name_of_workload != workload.name:
                continue
            median = statistics.median(samples)
            rows.append(
                {
                    "workload": workload.name,
                    "loop": name,
                    "median_step_ms": median * 1e3,
                    "min_step_ms": min(samples) * 1e3,
                    "max_step_ms": max(samples) * 1e3,
                    "samples_per_s": workload.batch_size / median,
                    "throughput_vs_plain": statistics.median(p / t for p, t in zip(plain, samples, strict=True)),
                    "pair_ratios": [p / t for p, t in zip(plain, samples, strict=True)],
                }
            )
    result = {
        "benchmark": "overhead",
        "workloads": [_described(workload) for workload in workloads],
        "steps": steps,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(torch.device(device))})",
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "results": rows,
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return result


def _applies(loop: str, workload: Workload | DigitsWorkload) -> bool:
    """Whether `loop` runs on `workload`: Lightning on `mlp-128` alone (its evaluation loop is not wired here)."""
    return loop != "PyTorch Lightning" or isinstance(workload, Workload)


def _described(workload: Workload | DigitsWorkload) -> dict[str, Any]:
    if isinstance(workload, DigitsWorkload):
        layers = "64-" + "-".join(map(str, workload.hidden_layers)) + "-10"
        evaluation = "after every epoch"
    else:
        layers = f"{workload.num_features}-{'-'.join(map(str, workload.hidden_layers))}-{workload.num_classes}"
        evaluation = "none in the timed steps"
    return {
        "name": workload.name,
        "model": f"MLP {layers}",
        "batch_size": workload.batch_size,
        "optimizer": "adam",
        "evaluation": evaluation,
    }


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Trainer overhead: {result['steps']} steps x {result['repeats']} repeats, {result['threads']} threads, "
        f"torch {result['torch']}",
        caption="; ".join(
            f"{w['name']}: {w['model']}, batch {w['batch_size']}, {w['optimizer']}, evaluation {w['evaluation']}"
            for w in result["workloads"]
        ),
    )
    columns = ("workload", "loop", "median step (ms)", "min-max (ms)", "samples/s", "vs plain (median of pairs)")
    for column in columns:
        table.add_column(column, justify="left" if column in ("workload", "loop") else "right")
    for row in result["results"]:
        table.add_row(
            row["workload"],
            row["loop"],
            f"{row['median_step_ms']:.3f}",
            f"{row['min_step_ms']:.3f}-{row['max_step_ms']:.3f}",
            f"{row['samples_per_s']:,.0f}",
            f"{row['throughput_vs_plain']:.3f}",
        )
    Console().print(table)
