"""`scaleforge bench scaling`: the training throughput of one config at several process counts.

Strong scaling keeps the global batch (`training.batch_size`), so each process gets a smaller share as processes
are added; weak scaling keeps each process's share (`training.batch_size` x processes is the global batch).
Every process of every size gets the same threads, `cores // largest size`: one process of a 1-process run then
has the resources of one process of a 2-process run, so the comparison measures the strategy, not extra cores
(with all cores, a 1-process run would already use the whole machine and leave nothing to scale into). A size
of 1 runs as `single`: one process has nothing to split, and against it the efficiency includes everything the
strategy costs.

Throughput is the steady state: the median samples/s over log intervals of LOG_INTERVAL steps, leaving out the
first (warm-up: allocator, first communication) and any interval that contains an evaluation (an epoch end).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scaleforge.bench.harness import (
    ENERGY_NOTE,
    TrainingRun,
    check_strategy,
    config_arguments,
    energy_cell,
    machine,
    report,
    train_in_child,
    train_on_two_nodes,
)
from scaleforge.bench.link import Link, check_rate, check_tools, throttled_link
from scaleforge.config import load_config
from scaleforge.console import counted
from scaleforge.data.loading import BatchPlan
from scaleforge.distributed.launch import threads_per_process
from scaleforge.distributed.parallel_dims import ParallelDims
from scaleforge.errors import ConfigError, UsageError

Mode = Literal["strong", "weak"]
LOG_INTERVAL = 10  # steps per throughput sample: several samples in a short run, one loss read-back each
MIN_STEPS = 3 * LOG_INTERVAL  # a warm-up interval and at least two measured ones


@dataclass(frozen=True)
class SizePlan:
    """One run of the benchmark: the config at one process count, already checked."""

    processes: int
    strategy: str
    global_batch_size: int
    per_process_batch_size: int  # samples in each process's forward and backward per step: global / dp
    config_args: list[str]


def global_batch_size(mode: Mode, base_batch_size: int, processes: int) -> int:
    """Strong scaling keeps the config's global batch; weak scaling gives each process the config's batch."""
    return base_batch_size * processes if mode == "weak" else base_batch_size


def scaling_efficiency(throughput: float, base_throughput: float, processes: int, base_processes: int) -> float:
    """Throughput against linear scaling from the smallest size (1.0 is ideal).

    Strong: speed-up / (n / n0); weak: throughput_n / (throughput_n0 x n / n0). In samples/s the two are one
    formula; the modes differ in what stays fixed, the global batch or each process's share of it.
    """
    return throughput / (base_throughput * processes / base_processes)


def steady_intervals(records: Iterable[dict[str, Any]]) -> list[float]:
    """The samples/s of each log interval in `records` (metrics.jsonl, in order), except the first and those
    that contain an evaluation (the interval after an evaluation record)."""
    measured: list[float] = []
    seen_warmup = after_evaluation = False
    for record in records:
        if "val_loss" in record:
            after_evaluation = True
        elif "samples_per_s" in record:
            if seen_warmup and not after_evaluation:
                measured.append(record["samples_per_s"])
            seen_warmup, after_evaluation = True, False
    return measured


def plan_sizes(
    config_path: str | None,
    overrides: Sequence[str],
    *,
    base_batch_size: int,
    sizes: Sequence[int],
    mode: Mode,
    strategy: str,
    steps: int,
) -> list[SizePlan]:
    """Check the config at every size (the strategy's arithmetic, the batch split) before any run starts."""
    plans = []
    for processes in sizes:
        size_strategy = strategy if processes > 1 else "single"
        batch = global_batch_size(mode, base_batch_size, processes)
        run_overrides = [
            f"parallel.strategy={size_strategy}",
            f"training.batch_size={batch}",
            f"training.max_steps={steps}",
            f"logging.every_steps={LOG_INTERVAL}",
        ]
        config = load_config(config_path, [*overrides, *run_overrides])
        dims = ParallelDims.resolve(config.parallel, processes)
        BatchPlan(batch, config.training.grad_accum_steps, world_size=dims.dp)
        config_args = [*config_arguments(config_path, overrides), *run_overrides]
        plans.append(SizePlan(processes, size_strategy, batch, batch // dims.dp, config_args))
    return plans


def run_scaling_benchmark(
    config_path: str | None,
    overrides: Sequence[str],
    *,
    process_counts: Sequence[int],
    mode: Mode,
    strategy: str,
    steps: int,
    out: Path,
    as_json: bool = False,
) -> dict[str, Any]:
    """Train the config at each process count, then print (table or JSON) and write `OUT/scaling-MODE.json`
    and `OUT/scaling-MODE.png`; returns the result. Runs go to `OUT/MODE-N`."""
    check_strategy(strategy, "--strategy")
    if steps < MIN_STEPS:
        raise UsageError(
            f"--steps: {steps} steps give fewer than 3 log intervals of {LOG_INTERVAL} (one warm-up and two "
            f"measured); use at least {MIN_STEPS}"
        )
    sizes = sorted(set(process_counts))
    config = load_config(config_path, overrides)
    plans = plan_sizes(
        config_path,
        overrides,
        base_batch_size=config.training.batch_size,
        sizes=sizes,
        mode=mode,
        strategy=strategy,
        steps=steps,
    )
    threads = threads_per_process(sizes[-1])
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    num_parameters = 0
    for plan in plans:
        run = train_size(plan, out / f"{mode}-{plan.processes}", threads=threads, steps=steps, quiet=as_json)
        rows.append(size_row(plan, run, threads))
        num_parameters = run.summary["num_parameters"]
    add_speedups(rows)
    result = {
        "benchmark": "scaling",
        "mode": mode,
        "strategy": strategy,
        "config": config_path,
        "overrides": list(overrides),
        "model": config.model.architecture,
        "num_parameters": num_parameters,
        "dataset": config.data.dataset,
        "steps": steps,
        "log_every_steps": LOG_INTERVAL,
        "throughput": "median samples/s of the log intervals after the first, leaving out those with an evaluation",
        "threads_per_process": threads,
        **machine(),
        "results": rows,
    }
    plot_scaling(result, out / f"scaling-{mode}.png")
    _report(result, out, as_json=as_json)
    return result


def train_size(plan: SizePlan, run_dir: Path, *, threads: int, steps: int, quiet: bool) -> TrainingRun:
    """Train the config at one size in `run_dir` (announced on stdout unless `quiet`); raises if the run failed."""
    if not quiet:
        print(
            f"{run_dir.name}: {plan.strategy} on {plan.processes} x {counted(threads, 'thread')}, global batch "
            f"{plan.global_batch_size}, {steps} steps",
            flush=True,
        )
    run = train_in_child(plan.config_args, nproc=plan.processes, threads=threads, run_dir=run_dir)
    run.check()
    return run


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Give each size's row its speed-up and scaling efficiency against the first (smallest) size."""
    base = rows[0]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base["samples_per_s"]
        row["efficiency"] = scaling_efficiency(
            row["samples_per_s"], base["samples_per_s"], row["processes"], base["processes"]
        )


def size_row(plan: SizePlan, run: TrainingRun, threads: int) -> dict[str, Any]:
    """What one finished run measured: steady-state throughput and the highest peak memory of its processes."""
    intervals = steady_intervals(run.metrics)
    if not intervals:
        raise ConfigError(
            f"{run.run_dir}: every log interval after the first contains an evaluation; use more training data "
            f"or a larger training.eval_every_steps, so that evaluations are more than {LOG_INTERVAL} steps apart"
        )
    peak_mib, peak_kind = run.peak_memory()
    return {
        "processes": plan.processes,
        "strategy": plan.strategy,
        "threads_per_process": threads,
        "global_batch_size": plan.global_batch_size,
        "per_process_batch_size": plan.per_process_batch_size,
        "samples_per_s": statistics.median(intervals),
        "interval_samples_per_s": intervals,
        "peak_mib": peak_mib,
        "peak_kind": peak_kind,
        **run.energy(),
        "run_dir": str(run.run_dir),
    }


def _report(result: dict[str, Any], out: Path, *, as_json: bool) -> None:
    """Print the table (or JSON) and write `OUT/scaling-MODE.json`."""
    threads = counted(result["threads_per_process"], "thread")
    title = (
        f"{result['mode'].capitalize()} scaling of {result['model']} ({result['num_parameters']:,} parameters) on "
        f"{result['dataset']} with {result['strategy']}: {result['steps']} steps, {threads} per process of "
        f"{result['cores']} cores"
    )
    note = (
        f"samples/s: median over the {LOG_INTERVAL}-step log intervals after the first (warm-up), leaving out any "
        f"with an evaluation; torch {result['torch']}; runs and logs in {out}/"
    )
    columns = ["processes", "strategy", "threads/process", "global batch", "batch/process", "samples/s"]
    columns += ["speed-up", "efficiency", "peak MiB/process", "samples/J"]
    table = [
        [
            str(row["processes"]),
            row["strategy"],
            str(row["threads_per_process"]),
            str(row["global_batch_size"]),
            str(row["per_process_batch_size"]),
            f"{row['samples_per_s']:,.1f}",
            f"{row['speedup']:.2f}",
            f"{row['efficiency']:.2f}",
            f"{row['peak_mib']:,.0f} {row['peak_kind']}",
            energy_cell(row),
        ]
        for row in result["results"]
    ]
    path = out / f"scaling-{result['mode']}.json"
    report(result, path, as_json=as_json, title=title, columns=columns, rows=table, notes=[note, ENERGY_NOTE])


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    """Throughput and efficiency against processes, each beside its ideal (linear scaling)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = result["results"]
    processes = [row["processes"] for row in rows]
    base = rows[0]
    ideal = [base["samples_per_s"] * n / base["processes"] for n in processes]
    efficiency = [row["efficiency"] for row in rows]
    figure, (throughput_axis, efficiency_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    throughput_axis.plot(processes, [row["samples_per_s"] for row in rows], "o-", label="measured")
    throughput_axis.plot(processes, ideal, "--", color="grey", label="ideal (linear)")
    throughput_axis.set_ylabel("samples/s")
    throughput_axis.set_ylim(bottom=0)
    efficiency_axis.plot(processes, efficiency, "o-", label="measured")
    efficiency_axis.axhline(1.0, linestyle="--", color="grey", label="ideal")
    efficiency_axis.set_ylabel("scaling efficiency")
    efficiency_axis.set_ylim(0, max(1.1, *efficiency))
    for axis in (throughput_axis, efficiency_axis):
        axis.set_xlabel("processes")
        axis.set_xticks(processes)
        axis.legend(loc="lower right")
    figure.suptitle(
        f"{result['mode']} scaling, {result['strategy']}: {result['model']} on {result['dataset']}, "
        f"{counted(result['threads_per_process'], 'thread')} per process"
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ------------------------------------------------------------------------------ gradient compression


def run_compression_benchmark(
    config_path: str | None,
    overrides: Sequence[str],
    *,
    processes: int,
    settings: Sequence[str],
    steps: int,
    powersgd_rank: int,
    powersgd_start_step: int,
    out: Path,
    link: str | None = None,
    as_json: bool = False,
) -> dict[str, Any]:
    """Train the config under ddp on `processes` processes once per `parallel.grad_compression` setting, with the
    same global batch, and compare the gradient bytes each process all-reduced per step, the throughput and the
    validation loss at the end with those of `none`; print (table or JSON) and write
    `OUT/grad-compression.json` and `.png`. Runs go to `OUT/compression-SETTING`.

    With `link` (a rate, such as 100mbit), each setting runs a second time as two nodes of `processes / 2`
    processes joined by a link of that speed (`bench/link.py`), in `OUT/compression-SETTING-LINK`, and its
    throughput there is reported beside the first."""
    check_comparison("--grad-compression compares ddp's all-reduce", processes, steps)
    if "powersgd" in settings and steps - LOG_INTERVAL < powersgd_start_step:
        raise UsageError(
            f"--powersgd-start-step: {powersgd_start_step} leaves no {LOG_INTERVAL}-step log interval of PowerSGD "
            f"in {steps} steps; use at most {steps - LOG_INTERVAL}"
        )
    if link is not None:
        link = check_link(link, processes)
        # gloo over the link: each node's processes would pick cuda:LOCAL_RANK (the same GPUs on one machine),
        # and NCCL would reach the other node by shared memory rather than the throttled link
        overrides = [*overrides, "hardware.device=cpu"]
    config = load_config(config_path, overrides)
    threads = threads_per_process(processes)
    plans = plan_compression(config_path, overrides, settings, steps, powersgd_rank, powersgd_start_step)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with throttled_link(link) if link is not None else contextlib.nullcontext() as wire:
        for setting, config_args in plans:
            if not as_json:
                print(
                    f"compression-{setting}: ddp on {processes} x {counted(threads, 'thread')}, {steps} steps",
                    flush=True,
                )
            run = train_in_child(config_args, nproc=processes, threads=threads, run_dir=out / f"compression-{setting}")
            run.check()
            rows.append(compression_row(setting, run, powersgd_start_step if setting == "powersgd" else 0))
            if wire is not None:
                run_dir = out / f"compression-{setting}-{wire.rate}"
                run = _over_link(wire, config_args, processes, threads, run_dir, as_json)
                rows[-1]["link_samples_per_s"] = statistics.median(steady_intervals(run.metrics))
    add_compression_ratios(rows)
    result = comparison_result(
        "grad-compression",
        config_path,
        overrides,
        config,
        rows,
        processes=processes,
        threads=threads,
        steps=steps,
        powersgd_rank=powersgd_rank,
        powersgd_start_step=powersgd_start_step,
        link=link,
    )
    plot_compression(result, out / "grad-compression.png")
    _report_compression(result, out, as_json=as_json)
    return result


def check_link(rate: str, processes: int) -> str:
    """`--link`'s rate, checked with what it needs before any run starts (two nodes of the same size, root)."""
    if processes % 2:
        raise UsageError(f"--link splits the processes over two nodes: --nproc {processes} is odd")
    rate = check_rate(rate)
    check_tools()
    return rate


def _over_link(
    wire: Link, config_args: list[str], processes: int, threads: int, run_dir: Path, quiet: bool
) -> TrainingRun:
    """One setting's run as two nodes over `wire` (announced unless `quiet`); raises if it failed."""
    if not quiet:
        print(f"{run_dir.name}: ddp on 2 nodes x {processes // 2} over a {wire.rate} link", flush=True)
    run = train_on_two_nodes(config_args, wire, nproc_per_node=processes // 2, threads=threads, run_dir=run_dir)
    run.check()
    return run


def add_compression_ratios(rows: list[dict[str, Any]]) -> None:
    """Each setting's bytes, throughput (on each link) and loss against those of the first row (`none`)."""
    base = rows[0]
    for row in rows:
        row["bytes_vs_none"] = row["grad_sync_bytes_per_step"] / base["grad_sync_bytes_per_step"]
        row["samples_per_s_vs_none"] = row["samples_per_s"] / base["samples_per_s"]
        row["val_loss_vs_none"] = row["val_loss"] / base["val_loss"] - 1
        if "link_samples_per_s" in row:
            row["link_samples_per_s_vs_none"] = row["link_samples_per_s"] / base["link_samples_per_s"]


def check_comparison(what: str, processes: int, steps: int) -> None:
    """A usage error unless a comparison of settings (`what`) has several processes and enough steps to measure."""
    if processes < 2:
        raise UsageError(f"{what}, which needs --nproc of at least 2")
    if steps < MIN_STEPS:
        raise UsageError(f"--steps: {steps} is fewer than {MIN_STEPS} (one warm-up and two measured log intervals)")


def comparison_result(
    benchmark: str,
    config_path: str | None,
    overrides: Sequence[str],
    config: Any,
    rows: list[dict[str, Any]],
    *,
    processes: int,
    threads: int,
    steps: int,
    **settings: Any,
) -> dict[str, Any]:
    """What a comparison of settings writes: the config, the processes and the machine, and a row per setting."""
    return {
        "benchmark": benchmark,
        "config": config_path,
        "overrides": list(overrides),
        "model": config.model.architecture,
        "num_parameters": rows[0]["num_parameters"],
        "processes": processes,
        "threads_per_process": threads,
        "global_batch_size": config.training.batch_size,
        "steps": steps,
        **settings,
        **machine(),
        "results": rows,
    }


def plan_compression(
    config_path: str | None,
    overrides: Sequence[str],
    settings: Sequence[str],
    steps: int,
    powersgd_rank: int,
    powersgd_start_step: int,
) -> list[tuple[str, list[str]]]:
    """Each setting (`none` first, the reference) and the config arguments of its run, every one checked before
    any run starts."""
    plans = []
    for setting in ["none", *[setting for setting in dict.fromkeys(settings) if setting != "none"]]:
        run_overrides = [
            "parallel.strategy=ddp",
            f"parallel.grad_compression={setting}",
            f"training.max_steps={steps}",
            f"logging.every_steps={LOG_INTERVAL}",
        ]
        if setting == "powersgd":
            run_overrides += [
                f"parallel.powersgd_rank={powersgd_rank}",
                f"parallel.powersgd_start_step={powersgd_start_step}",
            ]
        load_config(config_path, [*overrides, *run_overrides])
        plans.append((setting, [*config_arguments(config_path, overrides), *run_overrides]))
    return plans


def _report_compression(result: dict[str, Any], out: Path, *, as_json: bool) -> None:
    """Print the table (or JSON) and write `OUT/grad-compression.json`."""
    processes, steps, rows = result["processes"], result["steps"], result["results"]
    threads = result["threads_per_process"]
    title = (
        f"Gradient compression: {result['model']} ({result['num_parameters']:,} parameters), ddp on {processes} "
        f"processes x {counted(threads, 'thread')}, global batch {result['global_batch_size']}, {steps} steps"
    )
    notes = [
        "bytes/step: the gradient bytes each process all-reduced a step (after PowerSGD's plain-all-reduce start, "
        f"{result['powersgd_start_step']} steps; rank {result['powersgd_rank']}); a ring all-reduce sends 2(n-1)/n "
        "times that",
        f"samples/s: median over the {LOG_INTERVAL}-step log intervals after the first; val loss: at the last step",
    ]
    columns = ["setting", "bytes/step", "vs none", "samples/s", "vs none", "val loss", "vs none", "samples/J"]
    notes.append(ENERGY_NOTE)
    table = [
        [
            row["setting"],
            f"{row['grad_sync_bytes_per_step']:,}",
            f"{row['bytes_vs_none']:.3f}x",
            f"{row['samples_per_s']:,.1f}",
            f"{row['samples_per_s_vs_none']:.2f}x",
            f"{row['val_loss']:.4f}",
            f"{row['val_loss_vs_none']:+.2%}",
            energy_cell(row),
        ]
        for row in rows
    ]
    link = result.get("link")
    if link is not None:  # the throughput over the slow link, beside that of one machine's loopback
        columns[3:5] = ["samples/s (loopback)", "vs none", f"samples/s ({link})", "vs none"]
        for cells, row in zip(table, rows, strict=True):
            cells[5:5] = [f"{row['link_samples_per_s']:,.1f}", f"{row['link_samples_per_s_vs_none']:.2f}x"]
        notes.append(
            f"({link}): the same run as 2 nodes of {processes // 2} joined by a {link} link (network namespaces, "
            "tc's token-bucket filter); (loopback): one node"
        )
    report(
        result, out / "grad-compression.json", as_json=as_json, title=title, columns=columns, rows=table, notes=notes
    )


def compression_row(setting: str, run: TrainingRun, start_step: int) -> dict[str, Any]:
    """One setting's figures: bytes a step once compression runs, steady throughput, the final validation loss."""
    metrics = run.metrics
    steady = [
        r["grad_sync_bytes"] for r in metrics if "grad_sync_bytes" in r and r["step"] - LOG_INTERVAL >= start_step
    ]
    intervals = steady_intervals(metrics)
    return {
        "setting": setting,
        "grad_sync_bytes_per_step": int(statistics.median(steady)),
        "samples_per_s": statistics.median(intervals),
        "val_loss": run.summary["val_loss"],
        "num_parameters": run.summary["num_parameters"],
        **run.energy(),
        "losses": [(r["step"], r["loss"]) for r in metrics if "loss" in r],
        "run_dir": str(run.run_dir),
    }


def plot_compression(result: dict[str, Any], path: Path) -> None:
    """Bytes per step and throughput against `none`, and the training loss of each setting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = result["results"]
    names = [row["setting"] for row in rows]
    figure, (bytes_axis, speed_axis, loss_axis) = plt.subplots(1, 3, figsize=(14, 4), dpi=120)
    bytes_axis.bar(names, [row["bytes_vs_none"] for row in rows])
    bytes_axis.set_ylabel("gradient bytes a step, vs none")
    link = result.get("link")
    if link is None:
        speed_axis.bar(names, [row["samples_per_s_vs_none"] for row in rows])
    else:  # side by side: one machine's loopback, the slow link
        places = range(len(rows))
        loopback = [row["samples_per_s_vs_none"] for row in rows]
        speed_axis.bar([x - 0.2 for x in places], loopback, width=0.4, label="loopback")
        slow = [row["link_samples_per_s_vs_none"] for row in rows]
        speed_axis.bar([x + 0.2 for x in places], slow, width=0.4, label=f"{link} link")
        speed_axis.set_xticks(list(places), names)
        speed_axis.legend()
    speed_axis.set_ylabel("samples/s, vs none")
    for row in rows:
        steps, losses = zip(*row["losses"], strict=True)
        loss_axis.plot(steps, losses, label=row["setting"])
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    loss_axis.legend()
    figure.suptitle(
        f"gradient compression: {result['model']}, ddp on {result['processes']} processes, "
        f"PowerSGD rank {result['powersgd_rank']} from step {result['powersgd_start_step']}"
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_schedule_benchmark(
    config_path: str | None,
    overrides: Sequence[str],
    *,
    processes: int,
    schedules: Sequence[str],
    steps: int,
    out: Path,
    as_json: bool = False,
) -> dict[str, Any]:
    """Train the config under pp on `processes` processes once per `parallel.schedule`, with the same global batch
    and micro-batches, and compare the throughput, the schedule's bubble and the final validation loss with the
    first schedule's; print (table or JSON) and write `OUT/schedules.json` and `.png`. Runs go to
    `OUT/schedule-NAME`."""
    check_comparison("--schedules compares pipeline schedules", processes, steps)
    config = load_config(config_path, [*overrides, "parallel.strategy=pp"])  # pipeline options may be given
    threads = threads_per_process(processes)
    plans = []
    for schedule in dict.fromkeys(schedules):
        run_overrides = ["parallel.strategy=pp", f"parallel.schedule={schedule}", f"training.max_steps={steps}"]
        run_overrides.append(f"logging.every_steps={LOG_INTERVAL}")
        load_config(config_path, [*overrides, *run_overrides])  # every run's config checked before any starts
        plans.append((schedule, [*config_arguments(config_path, overrides), *run_overrides]))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for schedule, config_args in plans:
        if not as_json:
            print(f"schedule-{schedule}: pp on {processes} x {counted(threads, 'thread')}, {steps} steps", flush=True)
        run = train_in_child(config_args, nproc=processes, threads=threads, run_dir=out / f"schedule-{schedule}")
        run.check()
        summary = run.summary
        rows.append(
            {
                "schedule": schedule,
                "stages": summary["pipeline_stages"],
                "microbatches": summary["pipeline_microbatches"],
                "bubble": summary["pipeline_bubble"],
                "samples_per_s": statistics.median(steady_intervals(run.metrics)),
                "val_loss": summary["val_loss"],
                "num_parameters": summary["num_parameters"],
                **run.energy(),
                "run_dir": str(run.run_dir),
            }
        )
    for row in rows:
        row["samples_per_s_vs_first"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    result = comparison_result(
        "pipeline-schedules", config_path, overrides, config, rows, processes=processes, threads=threads, steps=steps
    )
    plot_schedules(result, out / "schedules.png")
    title = (
        f"Pipeline schedules: {result['model']} ({result['num_parameters']:,} parameters), pp on {processes} "
        f"processes x {counted(threads, 'thread')}, global batch {result['global_batch_size']}, {steps} steps"
    )
    notes = [
        "bubble: the schedule's idle share of a step (docs/distributed.md#pipeline-schedules)",
        f"samples/s: median over the {LOG_INTERVAL}-step log intervals after the first; val loss: at the last step",
    ]
    columns = ["schedule", "stages", "micro-batches", "bubble", "samples/s", f"vs {rows[0]['schedule']}", "val loss"]
    columns.append("samples/J")
    notes.append(ENERGY_NOTE)
    table = [
        [
            row["schedule"],
            str(row["stages"]),
            str(row["microbatches"]),
            f"{row['bubble']:.1%}",
            f"{row['samples_per_s']:,.1f}",
            f"{row['samples_per_s_vs_first']:.2f}x",
            f"{row['val_loss']:.4f}",
            energy_cell(row),
        ]
        for row in rows
    ]
    report(result, out / "schedules.json", as_json=as_json, title=title, columns=columns, rows=table, notes=notes)
    return result


def plot_schedules(result: dict[str, Any], path: Path) -> None:
    """Throughput and bubble of each schedule."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = result["results"]
    names = [row["schedule"] for row in rows]
    figure, (speed_axis, bubble_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    speed_axis.bar(names, [row["samples_per_s"] for row in rows])
    speed_axis.set_ylabel("samples/s")
    bubble_axis.bar(names, [100 * row["bubble"] for row in rows])
    bubble_axis.set_ylabel("bubble, % of a step")
    figure.suptitle(f"pipeline schedules: {result['model']}, pp on {result['processes']} processes")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
