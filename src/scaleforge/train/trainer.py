"""The training loop: `train()` builds its parts with short `build_*` helpers, then runs one plain loop.

One step: this process's micro-batches -> autocast forward -> loss / grad_accum -> backward -> (unscale,
clip) -> optimizer step -> scheduler step. The loss stays on the device and is read back once per
`logging.every_steps`, so logging costs one host synchronisation per log line, not one per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scaleforge import registry
from scaleforge.config import (
    DATA_PROVIDED,
    ComponentSpec,
    DataSection,
    ModelSection,
    RunConfig,
    TrainingSection,
    dump_yaml,
    signature_of,
)
from scaleforge.data.base import DataInfo, DatasetSplits
from scaleforge.data.loading import BatchPlan, DataWaitClock, TrainBatches, eval_batches
from scaleforge.distributed.env import select_device
from scaleforge.errors import ConfigError, UsageError
from scaleforge.train.callbacks import Callback, CallbackList, RunState
from scaleforge.train.checkpoint import save_checkpoint
from scaleforge.train.metrics import JsonlLogger, LossPlot, TensorBoardLogger, build_progress
from scaleforge.train.objectives import Objective, default_objective

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


# ------------------------------------------------------------------------------------------ build helpers


def construct(factory: Callable[..., Any], key: str, **kwargs: Any) -> Any:
    """Call a component factory; a ValueError (its way of rejecting a parameter) becomes a config error naming `key`.

    Other exceptions are bugs, in scaleforge or in the component, and propagate with their traceback.
    """
    try:
        return factory(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        name = getattr(factory, "__name__", repr(factory))
        raise ConfigError(f"{key}: {name} rejected its parameters: {error}") from error


def build_data(section: DataSection) -> DatasetSplits:
    """The dataset the config names, split into training and validation."""
    splits = construct(_factory(section.factory, registry.DATASETS, section.dataset), "data", **section.params)
    if not isinstance(splits, DatasetSplits):
        raise ConfigError(f"data.dataset: '{section.dataset}' returned {type(splits).__name__}, not DatasetSplits")
    if len(splits.val) == 0:  # type: ignore[arg-type]
        raise ConfigError(f"data: the validation split of '{section.dataset}' is empty; raise data.val_fraction")
    return splits


def _factory(
    factory: Callable[..., Any] | None, component_registry: registry.Registry, name: str
) -> Callable[..., Any]:
    """The factory the config loader resolved; configs built by hand are resolved here."""
    return factory if factory is not None else component_registry.get(name)


def build_model(section: ModelSection, info: DataInfo) -> nn.Module:
    """The model the config names; it receives the dataset's fields (`num_classes`, ...) its signature names."""
    factory = _factory(section.factory, registry.MODELS, section.architecture)
    kwargs = dict(section.params)
    signature = signature_of(factory).parameters
    for name in DATA_PROVIDED:
        provided = getattr(info, name)
        if name not in signature or provided is None:
            continue
        given = kwargs.get(name)
        if given is not None and _normalise(given) != _normalise(provided):
            raise ConfigError(f"model.{name}: {given} does not match the dataset, which has {name}={provided}")
        kwargs[name] = provided
    model = construct(factory, "model", **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.architecture: '{section.architecture}' built {type(model).__name__}, not nn.Module")
    return model


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def build_objective(section: TrainingSection, info: DataInfo) -> Objective:
    """The loss and metrics: the config's choice, or the task's usual ones for `auto`."""
    objective = default_objective(info)
    loss = objective.loss
    if section.loss.name != "auto":
        loss = _build_for_task(section.loss, registry.LOSSES, "training.loss", info)
    metrics = objective.metrics
    if section.metrics is not None:
        metrics = [
            _build_for_task(spec, registry.METRICS, f"training.metrics.{i}", info)
            for i, spec in enumerate(section.metrics)
        ]
    return Objective(loss=loss, metrics=metrics)


def _build_for_task(spec: ComponentSpec, component_registry: registry.Registry, key: str, info: DataInfo) -> Any:
    """A loss or metric, checked against the dataset: its `tasks` (if it declares them) and `num_classes`."""
    component = construct(_factory(spec.factory, component_registry, spec.name), key, **spec.params)
    tasks = getattr(component, "tasks", None)
    if tasks is not None and info.task not in tasks:
        raise ConfigError(f"{key}: {spec.name} is for {' or '.join(tasks)} data, but the dataset is {info.task}")
    top_k = getattr(component, "top_k", None)
    if top_k is not None and info.num_classes is not None and top_k > info.num_classes:
        raise ConfigError(f"{key}: top_k={top_k} is more than the dataset's {info.num_classes} classes")
    return component


def build_optimizer(section: TrainingSection, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters."""
    factory = _factory(section.optimizer.factory, registry.OPTIMIZERS, section.optimizer.name)
    params = [p for p in model.parameters() if p.requires_grad]
    return construct(
        factory,
        "training.optimizer",
        params=params,
        lr=section.learning_rate,
        weight_decay=section.weight_decay,
        **section.optimizer.params,
    )


def build_scheduler(
    spec: ComponentSpec, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule, stepped once per optimizer step (None: constant)."""
    factory = _factory(spec.factory, registry.SCHEDULERS, spec.name)
    return construct(
        factory,
        "training.scheduler",
        optimizer=optimizer,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        **spec.params,
    )


def build_callbacks(config: RunConfig, run_dir: Path, extra: Sequence[Callback] = ()) -> CallbackList:
    """The standard reporters from `logging`, the config's `training.callbacks`, then `extra`."""
    callbacks: list[Callback] = [JsonlLogger(run_dir / "metrics.jsonl")]
    if config.logging.tensorboard:
        callbacks.append(TensorBoardLogger(run_dir / "tensorboard"))
    progress = build_progress(config.logging.progress)
    if progress is not None:
        callbacks.append(progress)
    if config.logging.plot:
        callbacks.append(LossPlot(run_dir / "loss.png"))
    for i, spec in enumerate(config.training.callbacks):
        factory = _factory(spec.factory, registry.CALLBACKS, spec.name)
        callbacks.append(construct(factory, f"training.callbacks.{i}", **spec.params))
    callbacks.extend(extra)
    return CallbackList(callbacks)


def setup_runtime(config: RunConfig) -> tuple[torch.device, str]:
    """Apply `hardware.threads`, pick the device and resolve the precision for it."""
    if config.hardware.threads is not None:
        torch.set_num_threads(config.hardware.threads)
    device = select_device(config.hardware.device)
    return device, resolve_precision(config.training.precision, device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16-mixed on a GPU that supports it, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32"


def make_autocast(precision: str, device: torch.device) -> Autocast:
    """A factory of autocast contexts for the precision (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def eval_batch_size(training: TrainingSection) -> int:
    """Evaluation needs no gradients, so it takes larger batches than training's micro-batches."""
    return max(256, training.batch_size // training.grad_accum_steps)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_run_dir(run_dir: Path) -> None:
    """A run directory that already holds a run's results is refused, never overwritten."""
    earlier = [name for name in ("final", "checkpoints", "metrics.jsonl") if (run_dir / name).exists()]
    if earlier:
        raise UsageError(f"{run_dir} already holds a run ({', '.join(earlier)}); choose another --run-dir or remove it")


def default_run_dir(config: RunConfig) -> Path:
    """`runs/<name>-<time>`."""
    return Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"


# ---------------------------------------------------------------------------------------------- the loop


def train_step(
    model: nn.Module,
    micro_batches: MicroBatches,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    autocast: Autocast,
    scaler: torch.amp.GradScaler | None,
    clip_grad_norm: float | None,
) -> torch.Tensor:
    """One optimizer step over this process's micro-batches; returns the mean loss, still on the device."""
    optimizer.zero_grad(set_to_none=True)
    accum = len(micro_batches)
    total: torch.Tensor | None = None
    for inputs, targets in micro_batches:
        with autocast():
            loss = loss_fn(model(inputs), targets)
        if accum > 1:
            loss = loss / accum
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    assert total is not None
    return total


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    objective: Objective,
    autocast: Autocast = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss and the objective's metrics over `batches`, as `val_*` values."""
    was_training = model.training
    model.eval()
    for metric in objective.metrics:
        metric.reset()
    loss_sum = torch.zeros(())
    count = 0
    for inputs, targets in batches:
        with autocast():
            outputs = model(inputs)
            batch_loss = objective.loss(outputs, targets).float() * targets.numel()
        loss_sum = loss_sum.to(batch_loss.device) + batch_loss
        count += targets.numel()
        for metric in objective.metrics:
            metric.update(outputs, targets, batch_loss)
    model.train(was_training)
    result = {"val_loss": float(loss_sum) / max(1, count)}
    for metric in objective.metrics:
        result.update({f"val_{name}": value for name, value in metric.compute().items()})
    return result


def train(config: RunConfig, run_dir: Path | None = None, *, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train the model the config describes, write the run directory and return the summary."""
    started = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    check_run_dir(run_dir)
    training = config.training
    device, precision = setup_runtime(config)
    seed_everything(config.seed)

    data = build_data(config.data)
    model = build_model(config.model, data.info).to(device)
    objective = build_objective(training, data.info)
    objective.loss.to(device)
    plan = BatchPlan(training.batch_size, training.grad_accum_steps)
    batches = TrainBatches(data.train, plan, seed=config.seed, device=device, num_workers=config.data.num_workers)
    total_steps = training.max_steps or training.epochs * batches.steps_per_epoch
    epochs = math.ceil(total_steps / batches.steps_per_epoch)
    optimizer = build_optimizer(training, model)
    scheduler = build_scheduler(training.scheduler, optimizer, total_steps, batches.steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
    autocast = make_autocast(precision, device)
    forward_model = torch.compile(model) if training.compile else model

    hooks = build_callbacks(config, run_dir, callbacks)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    state = RunState(run_dir, total_steps, batches.steps_per_epoch, training.batch_size)
    print(
        f"run {run_dir} | {config.model.architecture} ({count_parameters(model):,} parameters) on "
        f"{config.data.dataset} | device {device} | precision {precision} | {total_steps} steps"
    )
    with contextlib.closing(hooks):  # files closed and the progress bar stopped, even on failure
        hooks.on_train_start(state)

        def run_eval() -> dict[str, Any]:
            batches_iter = eval_batches(data.val, eval_batch_size(training), device, config.data.num_workers)
            record = {"step": state.step, "epoch": state.epoch, "time": time.time()}
            record.update(evaluate(forward_model, batches_iter, objective, autocast))
            state.history.append(record)
            hooks.on_eval(state, record)
            return record

        step_losses: list[torch.Tensor] = []
        data_wait = DataWaitClock()
        last_log = {"step": 0, "time": time.perf_counter(), "data_wait": 0.0}
        loop_started = last_log["time"]

        def log_line(lr: float) -> None:
            steps = state.step - last_log["step"]
            mean_loss = float(torch.stack(step_losses).float().sum()) / steps  # the one host sync per log line
            now = time.perf_counter()
            elapsed = max(now - last_log["time"], 1e-9)
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "time": time.time(),
                "loss": mean_loss,
                "lr": lr,
                "samples_per_s": steps * training.batch_size / elapsed,
                "data_wait_share": (data_wait.seconds - last_log["data_wait"]) / elapsed,
            }
            step_losses.clear()
            last_log.update(step=state.step, time=now, data_wait=data_wait.seconds)
            state.history.append(record)
            hooks.on_log(state, record)

        last_eval: dict[str, Any] = {}
        model.train()
        for epoch in range(epochs):
            state.epoch = epoch
            for micro_batches in data_wait.wrap(batches.epoch(epoch)):
                loss = train_step(
                    forward_model,
                    micro_batches,
                    objective.loss,
                    optimizer,
                    autocast=autocast,
                    scaler=scaler,
                    clip_grad_norm=training.clip_grad_norm,
                )
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the scheduler moves it
                if scheduler is not None:
                    scheduler.step()
                step_losses.append(loss)  # no kernel, no sync: summed once per log line
                state.step += 1
                if state.step % config.logging.every_steps == 0 or state.step == total_steps:
                    log_line(lr)
                if training.eval_every_steps and state.step % training.eval_every_steps == 0:
                    last_eval = run_eval()
                if config.checkpoint.every_steps and state.step % config.checkpoint.every_steps == 0:
                    path = save_checkpoint(
                        run_dir / "checkpoints",
                        model=model,
                        optimizer=optimizer,
                        progress=_progress(state, config, scheduler),
                        keep=config.checkpoint.keep,
                    )
                    hooks.on_checkpoint(state, path)
                if state.should_stop or state.step >= total_steps:
                    break
            if not training.eval_every_steps and last_eval.get("step") != state.step:
                last_eval = run_eval()
            if state.should_stop or state.step >= total_steps:
                break
        if step_losses:  # stopped early between log lines
            log_line(lr)
        loop_time = time.perf_counter() - loop_started
        if last_eval.get("step") != state.step:
            last_eval = run_eval()

        save_final(run_dir / "final", model, config, data.info)
        summary = {
            "num_parameters": count_parameters(model),
            "steps": state.step,
            "epochs": state.epoch + 1,
            **{k: v for k, v in last_eval.items() if k.startswith("val_")},
            "wall_time_s": time.perf_counter() - started,
            "loop_time_s": loop_time,
            "samples_per_s": state.step * training.batch_size / max(loop_time, 1e-9),
            "data_wait_s": data_wait.seconds,
            "data_wait_share": data_wait.seconds / max(loop_time, 1e-9),
            "device": str(device),
            "precision": precision,
            "stopped_early": state.should_stop,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        hooks.on_train_end(state, summary)
    return summary


def _progress(state: RunState, config: RunConfig, scheduler: Any) -> dict[str, Any]:
    return {
        "step": state.step,
        "epoch": state.epoch,
        "seed": config.seed,
        "global_sample_position": state.step * config.training.batch_size,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_final(final_dir: Path, model: nn.Module, config: RunConfig, info: DataInfo) -> None:
    """`final/`: the full state dict as safetensors, the resolved config and the dataset's description."""
    from safetensors.torch import save_file

    final_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        # safetensors refuses shared storage (tied weights): such names get their own copy.
        tensors[name] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    save_file(tensors, str(final_dir / "model.safetensors"))
    (final_dir / "config.yaml").write_text(dump_yaml(config))
    info_data = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(info).items()}
    (final_dir / "data_info.json").write_text(json.dumps(info_data, indent=2) + "\n")
