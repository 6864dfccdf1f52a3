"""The training loop: `train()` builds its parts with short `build_*` helpers, then runs one plain loop.

One step: this process's micro-batches -> autocast forward -> loss / grad_accum -> backward -> (unscale,
clip) -> optimizer step -> scheduler step. The loss stays on the device and is read back once per
`logging.every_steps`, so logging costs one host synchronisation per log line, not one per step.

The same loop runs every strategy: `parallelize()` hands it a `ParallelModel` that knows how to run a
forward-backward pass on this process's share. Every process runs the loop; only rank 0 reports and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import resource
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from scaleforge import registry
from scaleforge.components import build_model, construct, factory_of
from scaleforge.config import (
    DATA_PROVIDED,
    ComponentSpec,
    DataSection,
    LoggingSection,
    RunConfig,
    TrainingSection,
    dump_yaml,
    signature_of,
)
from scaleforge.data.base import DataInfo, DatasetSplits
from scaleforge.data.loading import BatchPlan, DataWaitClock, TrainBatches, eval_batches
from scaleforge.distributed.env import (
    DistEnv,
    check_device_per_process,
    errors_agreed,
    hangs_named,
    init_distributed,
    teardown_distributed,
)
from scaleforge.distributed.launch import is_launched_worker
from scaleforge.distributed.parallel_dims import ParallelDims
from scaleforge.distributed.parallelize import ParallelModel, parallelize, plan_parallelism
from scaleforge.errors import AgreedError, ConfigError, UsageError
from scaleforge.hardware import Autocast, make_autocast, resolve_precision, select_device
from scaleforge.runs import load_weights, run_signing_key, save_final, verify_final
from scaleforge.training.callbacks import Callback, CallbackList, RunState
from scaleforge.training.checkpoint import (
    Checkpointer,
    checkpoint_name,
    load_checkpoint,
)
from scaleforge.training.metrics import JsonlLogger, LossPlot, TensorBoardLogger, build_progress
from scaleforge.training.monitoring import PrometheusExporter, SystemMonitor
from scaleforge.training.objectives import Objective, default_objective
from scaleforge.training.run_dir import default_run_dir, resume_point
from scaleforge.training.signals import Interrupted, StopRequest
from scaleforge.training.status import STATUS, StatusHeartbeat, this_process, write_status

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------ build helpers


def build_data(section: DataSection) -> DatasetSplits:
    """The dataset the config names, split into training and validation."""
    splits = construct(factory_of(section.factory, registry.DATASETS, section.dataset), "data", **section.params)
    if not isinstance(splits, DatasetSplits):
        raise ConfigError(f"data.dataset: '{section.dataset}' returned {type(splits).__name__}, not DatasetSplits")
    if len(splits.val) == 0:  # type: ignore[arg-type]
        raise ConfigError(f"data: the validation split of '{section.dataset}' is empty; raise data.val_fraction")
    return splits


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
    factory = factory_of(spec.factory, component_registry, spec.name)
    params = dict(spec.params)
    signature = signature_of(factory).parameters
    for name in DATA_PROVIDED:  # the dataset's fields the component's signature names, as models get them
        if name in signature and name not in params and getattr(info, name) is not None:
            params[name] = getattr(info, name)
    component = construct(factory, key, **params)
    tasks = getattr(component, "tasks", None)
    if tasks is not None and info.task not in tasks:
        raise ConfigError(f"{key}: {spec.name} is for {' or '.join(tasks)} data, but the dataset is {info.task}")
    top_k = getattr(component, "top_k", None)
    if top_k is not None and info.num_classes is not None and top_k > info.num_classes:
        raise ConfigError(f"{key}: top_k={top_k} is more than the dataset's {info.num_classes} classes")
    return component


def build_optimizer(section: TrainingSection, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters."""
    factory = factory_of(section.optimizer.factory, registry.OPTIMIZERS, section.optimizer.name)
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
    factory = factory_of(spec.factory, registry.SCHEDULERS, spec.name)
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
    callbacks: list[Callback] = [JsonlLogger(run_dir / "metrics.jsonl"), StatusHeartbeat()]
    if config.logging.tensorboard:
        callbacks.append(TensorBoardLogger(run_dir / "tensorboard"))
    progress = build_progress(config.logging.progress)
    if progress is not None:
        callbacks.append(progress)
    if config.logging.plot:
        callbacks.append(LossPlot(run_dir / "loss.png"))
    for i, spec in enumerate(config.training.callbacks):
        factory = factory_of(spec.factory, registry.CALLBACKS, spec.name)
        callbacks.append(construct(factory, f"training.callbacks.{i}", **spec.params))
    callbacks.extend(extra)
    return CallbackList(callbacks)


def setup_runtime(config: RunConfig, env: DistEnv | None = None) -> tuple[torch.device, str]:
    """Apply `hardware.threads`, pick this process's device and resolve the precision for it."""
    if config.hardware.threads is not None:
        torch.set_num_threads(config.hardware.threads)
    env = env or DistEnv()
    check_device_per_process(config.hardware.device, env)
    device = select_device(config.hardware.device, env.local_rank)
    return device, resolve_precision(config.training.precision, device)


def eval_batch_size(training: TrainingSection) -> int:
    """Evaluation needs no gradients, so it takes larger batches than training's micro-batches."""
    return max(256, training.batch_size // training.grad_accum_steps)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- the loop


def train_step(
    parallel: ParallelModel,
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
    for index, (inputs, targets) in enumerate(micro_batches):
        with parallel.sync_gradients(index == accum - 1):  # DDP: all-reduce once, on the last micro-step
            loss = parallel.forward_backward(
                inputs, targets, loss_fn, autocast=autocast, scaler=scaler, loss_scale=1 / accum
            )
        total = loss if total is None else total + loss
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        parallel.clip_grad_norm_(clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    assert total is not None
    return total


@torch.no_grad()
def evaluate(
    parallel: ParallelModel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    objective: Objective,
    autocast: Autocast = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss and the objective's metrics over `batches` (this process's share), as `val_*` values combined
    over every process."""
    module = parallel.module
    was_training = module.training
    module.eval()
    parallel.begin_eval()
    for metric in objective.metrics:
        metric.reset()
    totals = torch.zeros(2)  # loss sum, count
    for inputs, targets in batches:
        with autocast():
            outputs = parallel.forward(inputs, targets)
            if outputs is None or not parallel.holds_outputs:
                continue
            batch_loss = objective.loss(outputs, targets).float() * targets.numel()
        count = torch.tensor(targets.numel(), device=batch_loss.device)
        totals = totals.to(batch_loss.device) + torch.stack([batch_loss, count])
        for metric in objective.metrics:
            metric.update(outputs, targets, batch_loss)
    module.train(was_training)
    if parallel.dims.world_size > 1:  # as check_metrics_combine requires
        totals = parallel.all_reduce_sum(totals)
        for metric in objective.metrics:
            metric.sync(parallel.all_reduce_sum)  # type: ignore[attr-defined]
    loss_sum, count = totals.tolist()
    result = {"val_loss": loss_sum / max(1, count)}
    for metric in objective.metrics:
        result.update({f"val_{name}": value for name, value in metric.compute().items()})
    return result


def train(
    config: RunConfig, run_dir: Path | None = None, *, callbacks: Sequence[Callback] = (), resume: str = "auto"
) -> dict[str, Any]:
    """Train the model the config describes on this process's share, write the run directory (rank 0) and
    return the summary (with `run_dir`, which rank 0 chose when none was given).

    `resume`: `auto` continues from the newest good checkpoint in the run directory (if there is one), `never`
    starts afresh, a path starts from that checkpoint. Workers restarted by the launcher always resume `auto`.
    """
    env = DistEnv.from_environ()
    dims = ParallelDims.resolve(config.parallel, env.world_size)
    device, precision = setup_runtime(config, env)
    init_distributed(env, device, timeout_s=config.parallel.timeout_s, required=dims.strategy != "single")
    try:
        run_dir = agree_on_run_dir(run_dir, config, env)
        checkpoint = agree_on_checkpoint(run_dir, "auto" if env.restart_count else resume, env, config)
        if env.is_main and env.restart_count:
            where = f"resuming from {checkpoint}" if checkpoint else "no checkpoint yet: training starts over"
            print(f"restart {env.restart_count}: the workers failed and were started again; {where}")
        if env.distributed:
            dist.barrier()  # every process has checked before rank 0 starts writing
        try:
            summary = _train(config, run_dir, env, dims, device, precision, callbacks, checkpoint)
        except BaseException as error:
            if env.is_main and (run_dir / STATUS).is_file():  # a run that had started, not one refused before
                state = "stopped" if isinstance(error, Interrupted | KeyboardInterrupt) else "failed"
                write_status(run_dir, state, error=" ".join(str(error).split())[:500] or type(error).__name__)
            raise
        if env.is_main:
            write_status(run_dir, "finished", strategy=dims.strategy, processes=dims.world_size)
    finally:
        teardown_distributed()
    return {**summary, "run_dir": str(run_dir)}


def agree_on_checkpoint(run_dir: Path, resume: str, env: DistEnv, config: RunConfig) -> Path | None:
    """The checkpoint to start from (rank 0 finds and verifies it; every process gets its answer), after
    checking that `run_dir` may be used: a finished run is never trained again, and a run is never overwritten."""
    found: list[Any] = [None]
    if env.is_main:
        try:
            found = [resume_point(run_dir, resume, run_signing_key(config))]
        except UsageError as error:
            found = [error]
    if env.distributed:
        dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], UsageError):
        raise found[0] if env.is_main else AgreedError(found[0].one_line())
    return found[0]


def agree_on_run_dir(run_dir: Path | None, config: RunConfig, env: DistEnv) -> Path:
    """The run directory: the one given, else rank 0's default, shared with every process."""
    if not env.distributed:
        return Path(run_dir) if run_dir is not None else default_run_dir(config)
    chosen = [str(run_dir) if run_dir is not None else str(default_run_dir(config))]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def _train(
    config: RunConfig,
    run_dir: Path,
    env: DistEnv,
    dims: ParallelDims,
    device: torch.device,
    precision: str,
    callbacks: Sequence[Callback],
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    training = config.training
    seed_everything(config.seed)  # the same on every process: every replica starts from the same weights

    with errors_agreed(env):  # a user error here, on any process, stops them all with one message
        data = build_data(config.data)
        model = build_model(config.model, data.info).to(device)
        if training.init_from is not None:
            load_initial_weights(model, training.init_from)
        if training.quantization_aware:
            model = quantization_aware(model, data.info, dims)
        num_parameters = count_parameters(model)
        objective = build_objective(training, data.info)
        objective.loss.to(device)
        check_metrics_combine(objective, dims)
        check_loss_sees_inputs(objective, training.loss.name, dims)
        plan = BatchPlan(training.batch_size, training.grad_accum_steps, world_size=dims.dp)
        layout = plan_parallelism(
            model,
            dims=dims,
            device=device,
            architecture=config.model.architecture,
            parallel=config.parallel,
            precision=precision,
            micro_batch_size=plan.micro_batch_size,
        )
        if len(data.val) < dims.dp:  # type: ignore[arg-type]
            raise ConfigError(f"data: {len(data.val)} validation samples cannot be shared by {dims.dp} processes")  # type: ignore[arg-type]
        hooks = build_callbacks(config, run_dir, callbacks) if env.is_main else CallbackList([])
        if config.logging.prometheus_port is not None and (env.is_main or config.logging.prometheus_ranks == "all"):
            hooks.callbacks.append(prometheus_exporter(config.logging, env))
    parallel = parallelize(
        model,
        layout,
        dims=dims,
        device=device,
        training=training,
        parallel=config.parallel,
        precision=precision,
        loss_fn=objective.loss,
    )
    plan = dataclasses.replace(plan, rank=parallel.dp_rank)
    batches = TrainBatches(data.train, plan, seed=config.seed, device=device, num_workers=config.data.num_workers)
    total_steps = training.max_steps or training.epochs * batches.steps_per_epoch
    epochs = math.ceil(total_steps / batches.steps_per_epoch)
    optimizer = build_optimizer(training, parallel.module)
    if training.keep_zeros:
        keep_zeros(parallel.module, optimizer)
    scheduler = build_scheduler(training.scheduler, optimizer, total_steps, batches.steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
    autocast = make_autocast(precision, device)

    state = RunState(run_dir, total_steps, batches.steps_per_epoch, training.batch_size)
    start_step = 0  # within the first epoch the loop runs
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, model=parallel.module, optimizer=optimizer)
        state.step, state.epoch, start_step = resume_position(progress, config, batches.steps_per_epoch, checkpoint)
        if scheduler is not None and progress.get("scheduler") is not None:
            scheduler.load_state_dict(progress["scheduler"])
        if scaler is not None and progress.get("scaler") is not None:
            scaler.load_state_dict(progress["scaler"])
        if env.is_main:
            state.history.extend(keep_metrics_until(run_dir / "metrics.jsonl", state.step))
    ranks: list[Any] = [this_process()]  # in status.json: a new run into this directory waits for or refuses them
    if env.distributed:
        ranks = [None] * env.world_size
        dist.all_gather_object(ranks, this_process())
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(config))
        write_status(run_dir, "running", strategy=dims.strategy, processes=dims.world_size, ranks=ranks)
        resumed = f" | resumed at step {state.step} from {checkpoint.name}" if checkpoint is not None else ""
        print(
            f"run {run_dir} | {config.model.architecture} ({num_parameters:,} parameters) on "
            f"{config.data.dataset} | device {device} | precision {precision} | {total_steps} steps | "
            f"{describe(dims)}{resumed}"
        )
    # files closed and the progress bar stopped, even on failure; SIGTERM and SIGINT stop at a step boundary; a
    # collective that times out names the process that hung
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        keep=config.checkpoint.keep,
        use_async=config.checkpoint.async_,
        timeout_s=config.parallel.timeout_s,
        signing_key=run_signing_key(config),
    )
    with (
        hangs_named(env, config.parallel.timeout_s, lambda: state.step),
        contextlib.closing(hooks),
        checkpointer.open(),
        StopRequest(patient=is_launched_worker()).installed() as stop_signal,
    ):
        hooks.on_train_start(state)
        state.should_stop = parallel.any_process(state.should_stop)  # callbacks run on rank 0 alone

        def run_eval() -> dict[str, Any]:
            share = parallel.eval_shard()
            batches_iter = eval_batches(data.val, eval_batch_size(training), device, config.data.num_workers, share)
            record = {"step": state.step, "epoch": state.epoch, "time": time.time()}
            record.update(evaluate(parallel, batches_iter, objective, autocast))
            state.history.append(record)
            hooks.on_eval(state, record)
            state.should_stop = parallel.any_process(state.should_stop)
            return record

        step_losses: list[torch.Tensor] = []
        tokens_per_sample = data.info.seq_len if data.info.vocab_size is not None else None
        monitor = SystemMonitor(device, tokens_per_sample) if config.logging.system_metrics else None
        data_wait = DataWaitClock()
        last_log = {"step": state.step, "time": time.perf_counter(), "data_wait": 0.0}
        loop_started = last_log["time"]
        # The mean over data-parallel replicas: the processes that hold a loss (the last pipeline stage, once
        # per tensor-parallel group) each add their share.
        loss_weight = 1 / dims.dp if parallel.holds_outputs else 0.0

        def log_line(lr: float) -> None:
            steps = state.step - last_log["step"]
            step_sum = torch.stack(step_losses).float().sum() * loss_weight
            mean_loss = float(parallel.all_reduce_sum(step_sum)) / steps  # the one host sync per log line
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
            if monitor is not None:
                record.update(monitor.sample(record["samples_per_s"]))
            step_losses.clear()
            last_log.update(step=state.step, time=now, data_wait=data_wait.seconds)
            state.history.append(record)
            hooks.on_log(state, record)
            state.should_stop = parallel.any_process(state.should_stop)

        def save() -> Path:
            progress = _progress(state, config, scheduler, scaler)
            path = checkpointer.save(model=parallel.module, optimizer=optimizer, progress=progress)
            hooks.on_checkpoint(state, path)
            state.should_stop = parallel.any_process(state.should_stop)
            return path

        last_eval: dict[str, Any] = {}
        parallel.module.train()

        def stopped(path: Path) -> NoReturn:
            checkpointer.wait()  # committed before the process leaves
            signum = stop_signal.signum or signal.SIGTERM  # the processes that did not receive it heard of it
            message = f"stopped by {signal.Signals(signum).name} after step {state.step}; checkpoint {path} holds "
            raise Interrupted(signum, message + "the run: the same command resumes it")

        for epoch in range(state.epoch, epochs):
            if state.step >= total_steps:  # resumed from the checkpoint of the last step
                break
            state.epoch = epoch
            first_step, start_step = start_step, 0
            for micro_batches in data_wait.wrap(batches.epoch(epoch, first_step)):
                loss = train_step(
                    parallel,
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
                saved = config.checkpoint.every_steps and state.step % config.checkpoint.every_steps == 0
                if saved:
                    save()
                # a signal reaches the processes at different moments: they agree on the step they stop after
                if parallel.any_process(stop_signal.signum is not None) and state.step < total_steps:
                    stopped(save() if not saved else run_dir / "checkpoints" / checkpoint_name(state.step))
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

        memory = parallel.gather(process_memory(optimizer, device))
        full_state = parallel.full_state_dict()  # every process takes part in gathering the shards
        summary = {
            "num_parameters": num_parameters,
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
            "strategy": dims.strategy,
            "processes": dims.world_size,
            "stopped_early": state.should_stop,
            "memory_per_process": memory,
        }
        if env.is_main:
            assert full_state is not None
            save_final(run_dir / "final", full_state, config, data.info)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            hooks.on_train_end(state, summary)
    return summary  # the model and optimizer go with this frame, before `train` leaves the process group


def load_initial_weights(model: nn.Module, source: str) -> None:
    """`training.init_from`: the weights of a run directory (or its final/ folder) or of a .safetensors file."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"training.init_from: {source} does not exist")
    try:
        load_weights(model, path if path.is_file() else verify_final(path) / "model.safetensors")
    except UsageError as error:
        raise ConfigError(f"training.init_from: {error}") from error


def quantization_aware(model: nn.Module, info: DataInfo, dims: ParallelDims) -> nn.Module:
    """`training.quantization_aware`: the model exported and fake-quantized for int8 (PT2E QAT)."""
    from scaleforge.compress.quantize import prepared_for_int8
    from scaleforge.runs import example_inputs

    if dims.strategy not in ("single", "ddp"):
        raise ConfigError(
            f"training.quantization_aware: runs on one process or under ddp, not {dims.strategy} (the exported, "
            "fake-quantized graph cannot be sharded or split)"
        )
    device = next(model.parameters()).device
    return prepared_for_int8(model, example_inputs(info, 2).to(device), qat=True)


def keep_zeros(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """`training.keep_zeros`: after every optimizer step, the weights that were zero at the start are zero again.
    Applied to the parallelized module (a sharded parameter gets a mask sharded as it is), after the step rather
    than to gradients, which FSDP assigns without autograd's hooks."""
    masks = [(p, p.detach() != 0) for p in model.parameters() if p.requires_grad and not bool((p != 0).all())]

    @torch.no_grad()
    def reapply(*_: Any) -> None:
        for parameter, mask in masks:
            parameter.mul_(mask)

    optimizer.register_step_post_hook(reapply)


def process_memory(optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """This process's memory in MiB: its share of the parameters, gradients and optimizer state, and its peak
    (allocated GPU memory on CUDA, else the process's peak resident set, which includes the runtime).

    Parameters are counted from the optimizer, which holds the sharded ones (an FSDP module may still hold its
    root's gathered copies after the last forward)."""

    def mib(tensors: Iterable[torch.Tensor]) -> float:
        local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
        return sum(t.numel() * t.element_size() for t in local) / 2**20

    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer_state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, kind = rss / (2**20 if sys.platform == "darwin" else 2**10), "rss"
    return {
        "parameters_mib": mib(parameters),
        "gradients_mib": mib(p.grad for p in parameters if p.grad is not None),
        "optimizer_mib": mib(optimizer_state),
        "peak_mib": peak,
        "peak_kind": kind,
    }


def describe(dims: ParallelDims) -> str:
    """`ddp on 2 processes (dp=2 x tp=1 x pp=1)`."""
    if dims.strategy == "single":
        return "1 process"
    processes = f"{dims.world_size} process{'es' if dims.world_size > 1 else ''}"
    return f"{dims.strategy} on {processes} (dp={dims.dp} x tp={dims.tp} x pp={dims.pp})"


def check_metrics_combine(objective: Objective, dims: ParallelDims) -> None:
    """Over several processes each metric must be able to add up its state across them (`sync`)."""
    if dims.world_size == 1:
        return
    for metric in objective.metrics:
        if not callable(getattr(metric, "sync", None)):
            raise ConfigError(
                f"training.metrics: {type(metric).__name__} has no sync(reduce_sum) method, which combines a "
                f"metric over the {dims.world_size} processes"
            )


def prometheus_exporter(section: LoggingSection, env: DistEnv) -> PrometheusExporter:
    """`logging.prometheus_port`: this process's exporter; with `prometheus_ranks: all`, rank r listens on the
    port + its local rank (the processes of one node cannot share a port)."""
    port = section.prometheus_port or 0
    if port and port + env.local_rank > 65535:
        raise ConfigError(f"logging.prometheus_port: {port} + local rank {env.local_rank} is past port 65535")
    return PrometheusExporter(port + env.local_rank if port else 0, section.prometheus_host, env.rank)


def check_loss_sees_inputs(objective: Objective, name: str, dims: ParallelDims) -> None:
    """A loss that reads the batch's inputs (`takes_inputs`: distillation) cannot run where the last pipeline
    stage computes the loss without them."""
    if getattr(objective.loss, "takes_inputs", False) and dims.pp > 1:
        raise ConfigError(
            f"training.loss: {name} reads the batch's inputs, which pipeline stages after the first never see; use ddp"
        )


def _progress(state: RunState, config: RunConfig, scheduler: Any, scaler: Any) -> dict[str, Any]:
    """What a checkpoint stores besides tensors. The data cursor is the global sample position, which does not
    depend on the number of processes: a run resumed on any number sees the global batches it would have seen."""
    return {
        "step": state.step,
        "epoch": state.epoch,
        "seed": config.seed,
        "global_batch_size": config.training.batch_size,
        "global_sample_position": state.step * config.training.batch_size,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def resume_position(
    progress: dict[str, Any], config: RunConfig, steps_per_epoch: int, checkpoint: Path
) -> tuple[int, int, int]:
    """(steps done, epoch, step within the epoch) where a resumed run continues; a config whose data order
    differs from the checkpoint's cannot continue it."""
    for key, value in (("seed", config.seed), ("global_batch_size", config.training.batch_size)):
        if progress.get(key, value) != value:
            raise ConfigError(
                f"{'seed' if key == 'seed' else 'training.batch_size'}: {value} differs from the "
                f"{progress[key]} of checkpoint {checkpoint}, which fixes the order of the data it continues"
            )
    step = progress["global_sample_position"] // config.training.batch_size
    return step, step // steps_per_epoch, step % steps_per_epoch


def keep_metrics_until(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the records of `path` logged after `step` (a resumed run logs them again) and return the rest."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [record for record in records if record.get("step", 0) <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    return kept


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
