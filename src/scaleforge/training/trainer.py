"""The training loop: `train()` builds a `Trainer` with short `build_*` helpers, then runs its one plain loop.

A `Trainer` is one run's parts and progress, the one object its phases share, each a method read top to bottom:
`setup` (build, resume, announce), then `run`: `start`, `loop` (each `step`, then `log`, `validate` and
`save_checkpoint` when they are due) and `finish` (final/ and summary.json). What a training field turns on around
the model (`init_from`, `quantization_aware`, `keep_zeros`) comes from `training.preparations`' registered hooks.

One step: this process's micro-batches -> autocast forward -> loss / grad_accum -> backward -> (unscale,
clip) -> optimizer step -> scheduler step. The loss stays on the device and is read back once per
`logging.every_steps`, so logging costs one host synchronisation per log line, not one per step.

The same loop runs every strategy: `parallelize()` hands it a `ParallelModel` that knows how to run a
forward-backward pass on this process's share. Every process runs the loop; only rank 0 reports and writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import random
import resource
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
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
from scaleforge.data.base import DataInfo, DatasetSplits, InMemoryDataset, keep_classes
from scaleforge.data.loading import BatchPlan, DataWaitClock, EvalBatches, TrainBatches
from scaleforge.data.partition import keep_part
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
from scaleforge.distributed.parallelize import (
    ParallelModel,
    ParallelPlan,
    parallelize,
    plan_parallelism,
    takes_inputs,
)
from scaleforge.distributed.peer_watch import PeerWatch, job_store, started_before
from scaleforge.errors import AgreedError, ConfigError, UsageError
from scaleforge.hardware import Autocast, make_autocast, resolve_precision, select_device
from scaleforge.runs import run_signing_key, save_final
from scaleforge.training.callbacks import Callback, CallbackList, RunState
from scaleforge.training.checkpoint import (
    Checkpointer,
    checkpoint_name,
    load_checkpoint,
)
from scaleforge.training.continual import (
    EWC_FILE,
    PENALISED,
    REPLAY_FILE,
    EWCLoss,
    check_continual,
    earlier_buffer,
    earlier_file,
    ewc_state,
    lwf_loss,
    select_buffer,
    with_buffer,
)
from scaleforge.training.energy import EnergyMeter, energy_meter
from scaleforge.training.flops import StepFlops, flops_per_sample, peak_flops, transformer_flops_per_token
from scaleforge.training.metrics import JsonlLogger, LossPlot, TensorBoardLogger, build_progress
from scaleforge.training.monitoring import PrometheusExporter, SystemMonitor
from scaleforge.training.objectives import Objective, default_objective
from scaleforge.training.preparations import PreparationContext, prepare_model, prepare_optimizer
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
    if section.classes is not None:
        splits = keep_classes(splits, section.classes)
    splits = keep_part(splits, section.partition)
    if len(splits.val) == 0:  # type: ignore[arg-type]
        raise ConfigError(f"data: the validation split of '{section.dataset}' is empty; raise data.val_fraction")
    return splits


def with_earlier_tasks(data: DatasetSplits, config: RunConfig, dims: ParallelDims) -> DatasetSplits:
    """The data with what `training.continual` adds of the earlier tasks: their replay buffer (none without
    replay, or when the run it starts from kept none); every strategy checked against the data and the layout."""
    continual, training = config.training.continual, config.training
    if training.proximal_mu > 0 and dims.strategy not in PENALISED:
        raise ConfigError(f"training.proximal_mu: the proximal term reads whole parameters: it runs under single or "
                          f"ddp, not {dims.strategy}")  # fmt: skip
    if continual.strategy == "none":
        return data
    check_continual(
        continual, data.info.task, dims.strategy, training.init_from, quantization_aware=training.quantization_aware
    )
    if continual.strategy != "replay":
        return data
    buffer = earlier_buffer(training.init_from, config.checkpoint.signing_key_env)
    return with_buffer(data, buffer) if buffer is not None else data


def ewc_penalty(
    config: RunConfig, model: nn.Module, loss: nn.Module
) -> tuple[dict[str, torch.Tensor] | None, nn.Module | None]:
    """Under `ewc`: the earlier tasks' state that the run `init_from` names kept (None if it kept none), and the
    training loss with its penalty on `model`'s parameters (built before the strategy wraps the model: activation
    checkpointing renames parameters, and DDP and FSDP-free strategies keep these objects). Under
    `training.proximal_mu`, that loss (or the plain one) also gets FedProx's proximal term: EWC's penalty with a
    Fisher of ones, anchored to the weights training starts from."""
    training = config.training
    earlier, train_loss = None, None
    if training.continual.strategy == "ewc":
        earlier = earlier_file(training.init_from, EWC_FILE, config.checkpoint.signing_key_env)
        if earlier is not None:
            train_loss = EWCLoss(loss, model, earlier, training.continual.ewc_lambda)
    if training.proximal_mu > 0:
        anchors = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        state = {f"{kind}.{name}": (torch.ones_like(p) if kind == "fisher" else p) for name, p in anchors.items()
                 for kind in ("fisher", "anchor")}  # fmt: skip
        train_loss = EWCLoss(train_loss or loss, model, state, training.proximal_mu)
    return earlier, train_loss


def continual_training(training: TrainingSection) -> TrainingSection:
    """`training` with the loss `training.continual` trains with: `lwf`'s distillation from the run it starts
    from; the section as it is otherwise."""
    continual = training.continual
    if continual.strategy != "lwf" or training.init_from is None:
        return training
    return dataclasses.replace(training, loss=lwf_loss(continual, training.init_from))


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


EVAL_ROWS = 512  # an evaluation batch's rows, at most, unless training's micro-batches are larger
EVAL_LOGITS = 2**26  # a language model's evaluation batch holds at most this many logits (256 MiB in float32)


def eval_batch_size(training: TrainingSection, info: DataInfo | None = None) -> int:
    """Evaluation needs no gradients, so it takes larger batches than training's micro-batches: `EVAL_ROWS` (a small
    validation split is one batch, whose fixed costs it pays once), fewer for a language model whose batch of
    logits (rows x seq_len x vocabulary) would pass `EVAL_LOGITS`, and never fewer than a micro-batch."""
    rows = EVAL_ROWS
    if info is not None and info.vocab_size and info.seq_len:
        rows = min(rows, max(1, EVAL_LOGITS // (info.seq_len * info.vocab_size)))
    return max(rows, training.batch_size // training.grad_accum_steps)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_checked_objective(
    training: TrainingSection, info: DataInfo, dims: ParallelDims, device: torch.device
) -> Objective:
    """The objective on `device`, checked against the parallel layout: its metrics combine over the processes and
    its loss sees what it reads."""
    objective = build_objective(training, info)
    objective.loss.to(device)
    check_metrics_combine(objective, dims)
    check_loss_sees_inputs(objective, training.loss.name, dims)
    return objective


def plan_training(
    config: RunConfig, model: nn.Module, dims: ParallelDims, device: torch.device, precision: str
) -> tuple[BatchPlan, ParallelPlan]:
    """How the global batch splits into micro-batches over the data-parallel replicas, and how the strategy applies
    to `model` (every refusal a config error, raised before any collective)."""
    plan = BatchPlan(config.training.batch_size, config.training.grad_accum_steps, world_size=dims.dp)
    layout = plan_parallelism(
        model,
        dims=dims,
        device=device,
        architecture=config.model.architecture,
        parallel=config.parallel,
        precision=precision,
        micro_batch_size=plan.micro_batch_size,
        compile=config.training.compile,
    )
    return plan, layout


def check_validation_share(data: DatasetSplits, dims: ParallelDims) -> None:
    """Every data-parallel replica evaluates at least one validation sample."""
    if len(data.val) < dims.dp:  # type: ignore[arg-type]
        raise ConfigError(f"data: {len(data.val)} validation samples cannot be shared by {dims.dp} processes")  # type: ignore[arg-type]


def build_process_callbacks(
    config: RunConfig, run_dir: Path, env: DistEnv, extra: Sequence[Callback] = ()
) -> CallbackList:
    """This process's callbacks: rank 0's reporters (`build_callbacks`), and a Prometheus exporter where
    `logging.prometheus_port` and `logging.prometheus_ranks` ask for one."""
    callbacks = build_callbacks(config, run_dir, extra) if env.is_main else CallbackList([])
    if config.logging.prometheus_port is not None and (env.is_main or config.logging.prometheus_ranks == "all"):
        callbacks.callbacks.append(prometheus_exporter(config.logging, env))
    return callbacks


def build_checkpointer(config: RunConfig, run_dir: Path) -> Checkpointer:
    """The writer of the run's checkpoints, as `checkpoint` configures it."""
    return Checkpointer(
        run_dir / "checkpoints",
        keep=config.checkpoint.keep,
        use_async=config.checkpoint.async_,
        timeout_s=config.parallel.timeout_s,
        signing_key=run_signing_key(config),
    )


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
    parallel.sum_tied_gradients()
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
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
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
    # the loss summed on the device, the count on the host: nothing is read back until the end
    loss_sum: torch.Tensor | float = 0.0
    count = 0
    for inputs, targets in batches:
        with autocast():
            outputs = parallel.forward(inputs, targets)
            if outputs is None or not parallel.holds_outputs:
                continue
            batch_loss = objective.loss(outputs, targets).float() * targets.numel()
        loss_sum, count = batch_loss if count == 0 else loss_sum + batch_loss, count + targets.numel()
        for metric in objective.metrics:
            metric.update(outputs, targets, batch_loss)
    module.train(was_training)
    if parallel.dims.world_size > 1:  # as check_metrics_combine requires
        device = parallel.device
        totals = torch.stack(
            [torch.as_tensor(loss_sum, dtype=torch.float32, device=device), torch.tensor(float(count), device=device)]
        )
        loss_sum, count = parallel.all_reduce_sum(totals).tolist()
        for metric in objective.metrics:
            metric.sync(parallel.all_reduce_sum)  # type: ignore[attr-defined]
    result = {"val_loss": float(loss_sum) / max(1, count)}
    for metric in objective.metrics:
        result.update({f"val_{name}": value for name, value in metric.compute().items()})
    return result


STOP_CHECK_S = 1.0  # several processes agree on a signal at least this often, or at every step if steps are longer


def stop_check_steps(step_s: float, log_every: int) -> int:
    """How many steps apart several processes agree on a signal (a collective and a host sync, `any_processes`):
    about `STOP_CHECK_S` worth of steps, so that a stop comes within about a second of a signal (well inside a
    launcher's 30 s before it kills its workers), but no more often than every step, and no less often than every
    log line, where they agree anyway. A small model's steps are far shorter than a second: it agrees at its log
    lines alone, and the steps between them hold no collective beyond the strategy's own."""
    return max(1, min(log_every, int(STOP_CHECK_S / max(step_s, 1e-9))))


@contextlib.contextmanager
def setup_frozen() -> Iterator[None]:
    """Leave what exists now (torch, the model, the callbacks' libraries: some 200,000 objects once TensorBoard and
    its kin are imported) out of the cyclic garbage collector's full passes for the block, and hand it back after
    it. A full pass over them stops a step for about 100 ms, which lands in some step windows and not others; with
    them frozen it takes well under a millisecond. Given back at the end, so that what setup left for the collector
    is collected, in a process that trains again (a search, a test session)."""
    if gc.get_freeze_count():  # the caller froze some already: theirs to keep frozen, and this adds nothing
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train(
    config: RunConfig, run_dir: Path | None = None, *, callbacks: Sequence[Callback] = (), resume: str = "auto"
) -> dict[str, Any]:
    """Train the model the config describes on this process's share, write the run directory (rank 0) and
    return the summary (with `run_dir`, which rank 0 chose when none was given).

    `resume`: `auto` continues from the newest good checkpoint in the run directory (if there is one), `never`
    starts afresh, a path starts from that checkpoint. Workers restarted by the launcher always resume `auto`.
    """
    env = DistEnv.from_environ()
    dims = ParallelDims.resolve(config.parallel, env.world_size, env.local_world_size)
    device, precision = setup_runtime(config, env)
    init_distributed(env, device, timeout_s=config.parallel.timeout_s, required=dims.strategy != "single")
    store = job_store() if env.distributed else None  # several nodes: the job's rendezvous store
    restarted = env.restart_count > 0 or started_before(store, env)
    watch = PeerWatch.start_for(env, store)  # a process of another node that goes is noticed in seconds
    try:
        run_dir, checkpoint = agree_on_start(run_dir, config, env, resume, restarted=restarted)
        with status_reported(run_dir, env, dims):
            # the trainer, and the model and optimizer with it, is gone before `train` leaves the process group
            summary = Trainer.setup(config, run_dir, env, dims, device, precision, callbacks, checkpoint).run()
        if watch is not None:  # on a failure it watches on, to name a peer that has gone (cli.main)
            watch.stop()
    finally:
        teardown_distributed()
    return {**summary, "run_dir": str(run_dir)}


def agree_on_start(
    run_dir: Path | None, config: RunConfig, env: DistEnv, resume: str, *, restarted: bool = False
) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to start from, the same on every process (workers the launcher
    `restarted`, after a failure or as nodes joined, resume `auto`; `restarted` counts on rank 0); every process
    has checked them before rank 0 starts writing."""
    run_dir = agree_on_run_dir(run_dir, config, env)
    restarted = restarted or env.restart_count > 0
    checkpoint = agree_on_checkpoint(run_dir, "auto" if restarted else resume, env, config, restarted=restarted)
    if env.is_main and restarted:
        where = f"resuming from {checkpoint}" if checkpoint else "no checkpoint yet: training starts over"
        if env.restart_count:
            print(f"restart {env.restart_count}: the workers failed and were started again; {where}")
        else:
            print(f"the job's nodes changed and the workers were started again; {where}")
    if env.distributed:
        dist.barrier()
    return run_dir, checkpoint


@contextlib.contextmanager
def status_reported(run_dir: Path, env: DistEnv, dims: ParallelDims) -> Iterator[None]:
    """status.json (rank 0): `finished` when the block completes; `stopped` or `failed`, with the error, when it
    raises after the run had started."""
    try:
        yield
    except BaseException as error:
        if env.is_main and (run_dir / STATUS).is_file():  # a run that had started, not one refused before
            state = "stopped" if isinstance(error, Interrupted | KeyboardInterrupt) else "failed"
            write_status(run_dir, state, error=" ".join(str(error).split())[:500] or type(error).__name__)
        raise
    if env.is_main:
        write_status(run_dir, "finished", strategy=dims.strategy, processes=dims.world_size)


def agree_on_checkpoint(
    run_dir: Path, resume: str, env: DistEnv, config: RunConfig, *, restarted: bool = False
) -> Path | None:
    """The checkpoint to start from (rank 0 finds and verifies it; every process gets its answer), after
    checking that `run_dir` may be used: a finished run is never trained again, and a run is never overwritten."""
    found: list[Any] = [None]
    if env.is_main:
        try:
            found = [resume_point(run_dir, resume, run_signing_key(config), restarted=restarted)]
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


@dataclass
class LogWindow:
    """The steps since the last log line: their losses (still on the device) and where the window opened."""

    step: int = 0
    time: float = 0.0  # perf_counter()
    data_wait: float = 0.0  # the data clock's seconds
    losses: list[torch.Tensor] = field(default_factory=list)
    lr: float = 0.0  # the rate the latest step used


@dataclass(eq=False, repr=False)
class Trainer:
    """One run on this process: its parts and its progress, the one object its phases share.

    `setup` builds the parts, resumes and announces the run; `run` starts it, runs `loop` (each `step`, then
    `log`, `validate` and `save_checkpoint` when they are due) and `finish`es it. Callbacks observe every phase;
    none of them owns one.
    """

    config: RunConfig
    run_dir: Path
    env: DistEnv
    dims: ParallelDims
    device: torch.device
    precision: str
    data: DatasetSplits
    objective: Objective
    num_parameters: int
    parallel: ParallelModel
    batches: TrainBatches
    eval_batches: EvalBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    autocast: Autocast
    callbacks: CallbackList
    state: RunState  # step, epoch, history and should_stop: what the callbacks see
    started: float  # perf_counter() as setup began
    energy: EnergyMeter  # this process's share of the run's energy, from the start of its setup
    checkpoint: Path | None = None  # the one the run resumed from
    start_step: int = 0  # the step within the first epoch the loop runs, where a resumed run continues
    steps_before: int = 0  # the steps a resumed run had made before this process's loop
    stop_every: int = 1  # several processes: steps between their agreements on a signal (`stop_check_steps`)
    checkpointer: Checkpointer = field(init=False)  # built once the run is announced
    stop_request: StopRequest = field(default_factory=lambda: StopRequest(patient=is_launched_worker()))
    monitor: SystemMonitor | None = None  # `logging.system_metrics`
    flops: StepFlops = field(default_factory=StepFlops)  # this process's FLOPs a step (`training.flops`)
    data_wait: DataWaitClock = field(default_factory=DataWaitClock)
    window: LogWindow = field(default_factory=LogWindow)
    last_eval: dict[str, Any] = field(default_factory=dict)
    skipped_before: int = 0  # training samples skipped as unreadable before the checkpoint the run resumed from
    setup_j: float = 0.0  # this process's energy before training started, added at the end
    train_loss: nn.Module | None = None  # the loss training minimises, where it is not the objective's (`ewc`)
    earlier_ewc: dict[str, torch.Tensor] | None = None  # the earlier tasks' EWC state (`training.continual`)

    # ------------------------------------------------------------------------------------------------ setup

    @classmethod
    def setup(
        cls,
        config: RunConfig,
        run_dir: Path,
        env: DistEnv,
        dims: ParallelDims,
        device: torch.device,
        precision: str,
        callbacks: Sequence[Callback] = (),
        checkpoint: Path | None = None,
    ) -> Trainer:
        """Build every part on this process, resume from `checkpoint` and announce the run."""
        started = time.perf_counter()
        energy = energy_meter(device, local_rank=env.local_rank, cpu_watts=config.hardware.cpu_watts)
        training = config.training
        seed_everything(config.seed)  # the same on every process: every replica starts from the same weights
        with errors_agreed(env):  # a user error here, on any process, stops them all with one message
            data = with_earlier_tasks(build_data(config.data), config, dims)
            model = build_model(config.model, data.info).to(device)
            model = prepare_model(model, training, PreparationContext(data.info, dims))
            num_parameters = count_parameters(model)
            flops = step_flops(model, config, data.train, data.info, dims, device, precision)  # before it is split
            objective = build_checked_objective(continual_training(training), data.info, dims, device)
            earlier_ewc, train_loss = ewc_penalty(config, model, objective.loss)  # before wrappers rename parameters
            plan, layout = plan_training(config, model, dims, device, precision)
            check_validation_share(data, dims)
            hooks = build_process_callbacks(config, run_dir, env, callbacks)
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
        eval_batches = EvalBatches(  # its workers start now, before the optimizer's state and training grow the process
            data.val, eval_batch_size(training, data.info), device, config.data.num_workers, parallel.eval_shard()
        )
        total_steps = training.max_steps or training.epochs * batches.steps_per_epoch
        optimizer = build_optimizer(training, parallel.module)
        prepare_optimizer(parallel.module, optimizer, training)
        trainer = cls(
            config=config,
            run_dir=run_dir,
            env=env,
            dims=dims,
            device=device,
            precision=precision,
            data=data,
            objective=objective,
            num_parameters=num_parameters,
            parallel=parallel,
            batches=batches,
            eval_batches=eval_batches,
            optimizer=optimizer,
            scheduler=build_scheduler(training.scheduler, optimizer, total_steps, batches.steps_per_epoch),
            scaler=torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None,
            autocast=make_autocast(precision, device),
            callbacks=hooks,
            state=RunState(run_dir, total_steps, batches.steps_per_epoch, training.batch_size),
            started=started,
            energy=energy,
            checkpoint=checkpoint,
            flops=flops,
            train_loss=train_loss,
            earlier_ewc=earlier_ewc,
        )
        trainer.resume()
        trainer.announce()
        trainer.checkpointer = build_checkpointer(config, run_dir)
        return trainer

    def resume(self) -> None:
        """Continue from `self.checkpoint`, if any: the weights, the optimizer, the position in the data, the
        schedule, the loss scale and (rank 0) the metrics logged up to it."""
        if self.checkpoint is None:
            return
        state = self.state
        progress = load_checkpoint(
            self.checkpoint,
            model=self.parallel.module,
            optimizer=self.optimizer,
            own=self.parallel.grad_sync,
            tied=[tie.names for tie in self.parallel.ties],
        )
        order = getattr(self.data.train, "order_digest", None)
        if progress.get("data_order", order) != order:
            raise ConfigError(
                f"data: the shards are now read in another order ({order}) than in checkpoint {self.checkpoint} "
                f"({progress['data_order']}), which fixes the order of the data it continues; keep data.path's "
                "dataset and data.shuffle_window as they were"
            )
        position = resume_position(progress, self.config, state.steps_per_epoch, self.checkpoint)
        self.skipped_before = int(progress.get("skipped_samples", 0))
        self.state.energy_j = float(progress.get("energy_j", 0.0))
        state.step, state.epoch, self.start_step = position
        if self.parallel.grad_sync is not None:
            self.parallel.grad_sync.resumed_at(state.step)
        if self.scheduler is not None and progress.get("scheduler") is not None:
            self.scheduler.load_state_dict(progress["scheduler"])
        if self.scaler is not None and progress.get("scaler") is not None:
            self.scaler.load_state_dict(progress["scaler"])
        if self.env.is_main:
            state.history.extend(keep_metrics_until(self.run_dir / "metrics.jsonl", state.step))

    def announce(self) -> None:
        """Rank 0 writes config.yaml and status.json, which names every process (a new run into this directory
        waits for or refuses them), and prints the run's first line."""
        ranks: list[Any] = [this_process()]
        if self.env.distributed:
            ranks = [None] * self.env.world_size
            dist.all_gather_object(ranks, this_process())
        if not self.env.is_main:
            return
        config, run_dir, dims = self.config, self.run_dir, self.dims
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(config))
        write_status(run_dir, "running", strategy=dims.strategy, processes=dims.world_size, ranks=ranks)
        checkpoint = self.checkpoint
        resumed = f" | resumed at step {self.state.step} from {checkpoint.name}" if checkpoint is not None else ""
        afresh = self.parallel.grad_sync.afresh if self.parallel.grad_sync is not None else None
        resumed += f" ({afresh})" if checkpoint is not None and afresh else ""
        print(
            f"run {run_dir} | {config.model.architecture} ({self.num_parameters:,} parameters) on "
            f"{config.data.dataset} | device {self.device} | precision {self.precision} | "
            f"{self.state.total_steps} steps | {describe(dims)}{describe_pipeline(self.parallel)}{resumed}"
        )

    # ------------------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Train to the last step (or until stopped), evaluate, and write final/ and summary.json (rank 0); returns
        the summary. Files are closed and the progress bar stopped, even on failure; SIGTERM and SIGINT stop at a
        step boundary; a collective that times out names the process that hung."""
        state = self.state
        with (
            hangs_named(self.env, self.config.parallel.timeout_s, lambda: state.step),
            contextlib.closing(self.callbacks),
            self.checkpointer.open(),
            self.stop_request.installed(),
        ):
            self.start()
            with setup_frozen():
                loop_time = self.loop()
            return self.finish(loop_time)

    def start(self) -> None:
        """Tell the callbacks, which may already ask to stop, and open the first log window."""
        state, info = self.state, self.data.info
        self.callbacks.on_train_start(state)
        state.should_stop = self.parallel.any_process(state.should_stop)  # callbacks run on rank 0 alone
        if self.config.logging.system_metrics:
            self.monitor = SystemMonitor(self.device, info.seq_len if info.vocab_size is not None else None)
        self.setup_j = self.energy.take()  # counted apart: the log lines' power is the training loop's
        self.window = LogWindow(state.step, time.perf_counter())
        self.steps_before = state.step
        self.parallel.module.train()

    def loop(self) -> float:
        """The epochs from where the run stands to the last step, or to a stop a callback asked for, with an
        evaluation after each epoch unless `training.eval_every_steps`; returns the loop's time in seconds."""
        training, state = self.config.training, self.state
        loop_started = self.window.time
        for epoch in range(state.epoch, math.ceil(state.total_steps / state.steps_per_epoch)):
            if state.step >= state.total_steps:  # resumed from the checkpoint of the last step
                break
            state.epoch = epoch
            first_step, self.start_step = self.start_step, 0
            for micro_batches in self.data_wait.wrap(self.batches.epoch(epoch, first_step)):
                self.step(micro_batches)
                self.after_step()
                if state.should_stop or state.step >= state.total_steps:
                    break
            if not training.eval_every_steps and self.last_eval.get("step") != state.step:
                self.validate()
            if state.should_stop or state.step >= state.total_steps:
                break
        if self.window.losses:  # stopped early between log lines
            self.log()  # a signal now is the end of the run: it stops here anyway
        loop_time = time.perf_counter() - loop_started
        if self.last_eval.get("step") != state.step:
            self.validate()
        return loop_time

    def step(self, micro_batches: MicroBatches) -> None:
        """One optimizer step, then the schedule's; the loss stays on the device until the next log line."""
        loss = train_step(
            self.parallel,
            micro_batches,
            self.train_loss or self.objective.loss,
            self.optimizer,
            autocast=self.autocast,
            scaler=self.scaler,
            clip_grad_norm=self.config.training.clip_grad_norm,
        )
        self.window.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used, before the scheduler moves it
        if self.scheduler is not None:
            self.scheduler.step()
        self.window.losses.append(loss)  # no kernel, no sync: summed once per log line
        self.state.step += 1

    def after_step(self) -> None:
        """Log, evaluate and checkpoint when they are due; stop, checkpointed, when a signal asked to: one process
        at the step it notices the signal; several at the first step, every `stop_every` steps, where they agree
        on it (see `log`)."""
        config, step, state = self.config, self.state.step, self.state
        signalled = False
        if step % config.logging.every_steps == 0 or step == state.total_steps:
            signalled = self.log()
        elif self.parallel.mesh is None:  # one process: its own flag, read for nothing at every step
            signalled = self.stop_request.signum is not None
        elif step % self.stop_every == 0:  # slow steps: agree more often than at log lines (`log`)
            signalled = self.agree_to_stop()
        if config.training.eval_every_steps and step % config.training.eval_every_steps == 0:
            self.validate()
        saved = config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0
        if saved:
            self.save_checkpoint()
        if signalled and step < self.state.total_steps:
            self.stop(self.save_checkpoint() if not saved else self.run_dir / "checkpoints" / checkpoint_name(step))

    # ---------------------------------------------------------------------- logging, evaluation, checkpoints

    def log(self) -> bool:
        """A log line: the mean loss over the window's steps and every replica, the rate, the throughput and the
        share of time spent waiting for data (and the system's figures); whether any process has been asked to
        stop by a signal (agreed on here by every process, in one collective with the callbacks' request)."""
        state, window = self.state, self.window
        steps = state.step - window.step
        # The mean over data-parallel replicas: the processes that hold a loss (the last pipeline stage, once
        # per tensor-parallel group) each add their share.
        loss_weight = 1 / self.dims.dp if self.parallel.holds_outputs else 0.0
        step_sum = torch.stack(window.losses).float().sum() * loss_weight
        now = time.perf_counter()
        elapsed = max(now - window.time, 1e-9)
        # the one host sync per log line: the loss, the window's time (the same mean on every process) and the
        # job's energy in the window and, once, in the setup (each process's share, see energy.py)
        own = [elapsed / self.dims.world_size, self.energy.take(), self.setup_j]
        shares = torch.cat([step_sum.reshape(1), torch.tensor(own, device=step_sum.device)])
        loss_sum, mean_elapsed, energy, setup = self.parallel.all_reduce_sum(shares).tolist()
        state.energy_j += energy + setup  # the setup's energy once, in the first line, so checkpoints hold it
        self.setup_j = 0.0
        mean_loss = loss_sum / steps
        self.stop_every = stop_check_steps(mean_elapsed / steps, self.config.logging.every_steps)
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "time": time.time(),
            "loss": mean_loss,
            "lr": window.lr,
            "samples_per_s": steps * self.config.training.batch_size / elapsed,
            "data_wait_share": (self.data_wait.seconds - window.data_wait) / elapsed,
            "power_w": energy / mean_elapsed,
            "energy_j": round(state.energy_j, 3),  # to the mJ: the shares are summed in float32
        }
        record.update(self.skipped_samples())
        if self.parallel.grad_sync is not None:  # what each step's gradient reduction sent from this process
            record["grad_sync_bytes"] = self.parallel.grad_sync.take_bytes(steps) // steps
        mfu = self.flops.utilisation(steps / elapsed)
        if mfu is not None:
            record["mfu"] = mfu
        if self.monitor is not None:
            record.update(self.monitor.sample(record["samples_per_s"]))
        self.window = LogWindow(state.step, now, self.data_wait.seconds)
        state.history.append(record)
        self.callbacks.on_log(state, record)
        return self.agree_to_stop()

    def agree_to_stop(self) -> bool:
        """Whether any process got a signal, and (in `should_stop`) whether any callback asked to stop: a signal
        reaches the processes at different moments, so they agree here on the step they stop after, in one
        collective for both."""
        state = self.state
        state.should_stop, signalled = self.parallel.any_processes(
            state.should_stop, self.stop_request.signum is not None
        )
        return signalled

    def validate(self) -> None:
        """Evaluate on this process's share of the validation split; every process records the combined figures."""
        state = self.state
        record = {"step": state.step, "epoch": state.epoch, "time": time.time()}
        record.update(evaluate(self.parallel, self.eval_batches, self.objective, self.autocast))
        if getattr(self.data.val, "on_error", "raise") == "skip":
            record["val_skipped_samples"] = self.replicas_total(self.eval_batches.skipped)
        state.history.append(record)
        self.callbacks.on_eval(state, record)
        state.should_stop = self.parallel.any_process(state.should_stop)
        self.last_eval = record

    def save_checkpoint(self) -> Path:
        """Checkpoint the run after this step; returns the folder it is (or will be) committed to."""
        progress = _progress(self.state, self.config, self.scheduler, self.scaler)
        order = getattr(self.data.train, "order_digest", None)  # a sharded dataset's order, besides the seed
        if order is not None:
            progress["data_order"] = order
        progress.update(self.skipped_samples())  # the count goes on from there in a resumed run
        sync = self.parallel.grad_sync
        path = self.checkpointer.save(
            model=self.parallel.module,
            optimizer=self.optimizer,
            progress=progress,
            own=sync.state_dict() if sync is not None else None,
        )
        self.callbacks.on_checkpoint(self.state, path)
        self.state.should_stop = self.parallel.any_process(self.state.should_stop)
        return path

    def stop(self, checkpoint: Path) -> NoReturn:
        """Leave after a signal, once `checkpoint` is committed: `Interrupted`, which says how to resume."""
        self.checkpointer.wait()
        signum = self.stop_request.signum or signal.SIGTERM  # the processes that did not receive it heard of it
        message = f"stopped by {signal.Signals(signum).name} after step {self.state.step}; checkpoint {checkpoint} "
        raise Interrupted(signum, message + "holds the run: the same command resumes it")

    # ------------------------------------------------------------------------------------------------ finish

    def finish(self, loop_time: float) -> dict[str, Any]:
        """Gather the whole model, then (rank 0) write final/ and summary.json and tell the callbacks; returns the
        summary."""
        memory = self.parallel.gather(process_memory(self.optimizer, self.device))
        own = self.energy.take() + self.setup_j  # since the last log line (and the setup, if no line came)
        self.state.energy_j += float(self.parallel.all_reduce_sum(torch.tensor(own, dtype=torch.float64)))
        full_state = self.parallel.full_state_dict()  # every process takes part in gathering the shards
        summary = self.summary(loop_time, memory)
        if self.env.is_main:
            assert full_state is not None
            extra = self.continual_files(full_state)
            save_final(
                self.run_dir / "final", full_state, self.config, self.data.info, self.data.tokenizer, extra=extra
            )
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.callbacks.on_train_end(self.state, summary)
        return summary

    def continual_files(self, full_state: dict[str, torch.Tensor]) -> dict[str, bytes]:
        """What `training.continual` keeps in final/ for the next task: `replay`'s buffer of this task's and the
        earlier ones' samples, `ewc`'s Fisher of every task so far with these weights (estimated on a copy of
        the model on the CPU)."""
        from safetensors.torch import save

        continual, seed = self.config.training.continual, self.config.seed
        if continual.strategy == "replay":
            return {REPLAY_FILE: save(select_buffer(self.data.train, continual, seed))}
        if continual.strategy == "ewc":
            model = build_model(self.config.model, self.data.info)
            model.load_state_dict(full_state)
            loss = copy.deepcopy(self.objective.loss).cpu()
            return {EWC_FILE: save(ewc_state(model, self.data.train, loss, continual, seed, self.earlier_ewc))}
        return {}

    def skipped_samples(self) -> dict[str, int]:
        """`skipped_samples`, the training samples left out so far as unreadable (`data.on_error: skip`), over every
        data-parallel replica; nothing for a dataset that stops at the first one. Every process takes part."""
        if getattr(self.data.train, "on_error", "raise") != "skip":
            return {}
        return {"skipped_samples": self.skipped_before + self.replicas_total(self.batches.skipped)}

    def replicas_total(self, count: int) -> int:
        """The sum of a per-process `count` over the data-parallel replicas (the processes of one replica read the
        same samples). Every process takes part."""
        total = self.parallel.all_reduce_sum(torch.tensor(float(count)))
        return round(float(total) * self.dims.dp / self.dims.world_size)

    def summary(self, loop_time: float, memory: Any) -> dict[str, Any]:
        """The run's figures: steps, the last evaluation, times and throughput, where it ran, its memory."""
        state, dims = self.state, self.dims
        return {
            "num_parameters": self.num_parameters,
            "steps": state.step,
            "epochs": state.epoch + 1,
            **{k: v for k, v in self.last_eval.items() if k.startswith("val_")},
            "wall_time_s": time.perf_counter() - self.started,
            "loop_time_s": loop_time,
            "samples_per_s": state.step * self.config.training.batch_size / max(loop_time, 1e-9),
            "data_wait_s": self.data_wait.seconds,
            "data_wait_share": self.data_wait.seconds / max(loop_time, 1e-9),
            **self.flops.summary((state.step - self.steps_before) / max(loop_time, 1e-9)),
            **self.skipped_samples(),
            "device": str(self.device),
            "precision": self.precision,
            "strategy": dims.strategy,
            "processes": dims.world_size,
            **self.parallel.pipeline_summary(),
            "stopped_early": state.should_stop,
            **self.energy_summary(),
            "memory_per_process": memory,
        }

    def energy_summary(self) -> dict[str, Any]:
        """The run's energy (every process's, earlier attempts' through their last checkpoint), what it is per
        sample (and token), its source, and the CO2 the grid emitted for it."""
        state, hardware, seq_len = self.state, self.config.hardware, self.data.info.seq_len
        joules = max(state.energy_j, 1e-9)
        figures: dict[str, Any] = {"energy_j": round(state.energy_j, 3), "energy_source": self.energy.source}
        if self.energy.note:
            figures["energy_note"] = self.energy.note
        figures["samples_per_j"] = state.step * self.config.training.batch_size / joules
        if seq_len and self.data.info.vocab_size is not None:
            figures["tokens_per_j"] = figures["samples_per_j"] * seq_len
        figures["co2_g"] = state.energy_j / 3.6e6 * hardware.carbon_intensity
        figures["carbon_intensity_g_per_kwh"] = hardware.carbon_intensity
        return figures


def step_flops(
    model: nn.Module,
    config: RunConfig,
    train: Any,
    info: DataInfo,
    dims: ParallelDims,
    device: torch.device,
    precision: str,
) -> StepFlops:
    """This process's FLOPs a step: the whole `model`'s over the global batch, shared out over the processes, from
    the transformer formula or counted on a few training samples (see `flops`); with the device's peak."""
    flops = StepFlops(peak=peak_flops(device, precision))
    per_token = transformer_flops_per_token(model, info.seq_len) if info.seq_len else None
    if per_token is not None:
        assert info.seq_len is not None
        per_sample: float | None = per_token * info.seq_len
        flops.method = "6N + 12LHQT a token (PaLM, appendix B)"
    else:
        samples = first_samples(train, min(8, config.training.batch_size))
        per_sample = flops_per_sample(model, samples.to(device)) if samples is not None else None
        flops.method = "FlopCounterMode over a forward and backward pass"
    if per_sample is not None:
        flops.per_step = per_sample * config.training.batch_size / dims.world_size
    return flops


def first_samples(dataset: Any, count: int) -> torch.Tensor | None:
    """The inputs of a dataset's first `count` samples as one batch (for counting FLOPs); None if they cannot be
    read so (a sample that is not a pair of tensors, or unreadable)."""
    try:
        if isinstance(dataset, InMemoryDataset):
            return dataset.inputs[:count]
        from torch.utils.data import default_collate

        samples = [dataset[index] for index in range(min(count, len(dataset)))]
        inputs, _ = default_collate([sample for sample in samples if sample is not None])
    except Exception:  # noqa: BLE001 - no FLOP figure, and the run trains all the same
        return None
    return inputs if isinstance(inputs, torch.Tensor) else None


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
    dp = f"dp={dims.dp}"
    if dims.dp_replicate > 1:
        dp = f"dp={dims.dp_replicate} replicas x {dims.dp_shard} shard{'s' * (dims.dp_shard > 1)}"
    return f"{dims.strategy} on {processes} ({dp} x tp={dims.tp} x pp={dims.pp})"


def describe_pipeline(parallel: ParallelModel) -> str:
    """` | 1f1b schedule, 2 stages of 1 a process, 4 micro-batches, bubble 20%` ('' without pipelining)."""
    pipeline = parallel.pipeline_summary()
    if not pipeline:
        return ""
    return (
        f" | {pipeline['pipeline_schedule']} schedule, {pipeline['pipeline_stages']} stages "
        f"({parallel.stages_per_process} a process), {pipeline['pipeline_microbatches']} micro-batches, "
        f"bubble {pipeline['pipeline_bubble']:.0%}"
    )


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
    if takes_inputs(objective.loss) and dims.pp > 1:
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
        "energy_j": state.energy_j,
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
