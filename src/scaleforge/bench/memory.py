"""`scaleforge bench memory`: what each parallel strategy keeps on one process, for one config.

Each strategy trains the config for a few steps on the same number of processes; the trainer then reports, per
process, its share of the parameters, gradients and optimizer state (together the "states": what sharding
divides) and its peak memory. The table shows the process with the most states and the highest peak. On a GPU
the peak is allocated CUDA memory, and peak minus states is what a step needs beyond them (activations,
communication buffers, parameters FSDP gathers for a block); on a CPU the peak is the resident set of the
whole process (Python and torch included), so activations cannot be told apart. A strategy the model cannot
take (tp without a plan, pp with too few blocks) is shown as refused, with the trainer's one-line reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaleforge.bench.harness import check_strategy, config_arguments, machine, report, train_in_child
from scaleforge.config import load_config
from scaleforge.console import counted
from scaleforge.distributed.launch import threads_per_process
from scaleforge.errors import UsageError

STATES = ("parameters_mib", "gradients_mib", "optimizer_mib")
REFERENCE = "ddp"  # every process holds everything: what sharding is measured against


def states_mib(process: dict[str, Any]) -> float:
    """One process's parameters, gradients and optimizer state (MiB)."""
    return sum(process[name] for name in STATES)


def memory_row(strategy: str, processes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A strategy's row from its `memory_per_process`: the states of the process with the most, the highest
    peak, and (on a GPU) the most any process needed beyond its states."""
    fullest = max(processes, key=states_mib)
    highest = max(processes, key=lambda process: process["peak_mib"])
    measurable = highest["peak_kind"] == "cuda_allocated"  # an RSS peak includes the runtime, not just tensors
    return {
        "strategy": strategy,
        "refused": None,
        **{name: fullest[name] for name in STATES},
        "states_mib": states_mib(fullest),
        "peak_mib": highest["peak_mib"],
        "peak_kind": highest["peak_kind"],
        "activations_mib": max(p["peak_mib"] - states_mib(p) for p in processes) if measurable else None,
    }


def add_reference_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's states against ddp's (None when ddp was not measured)."""
    reference = next((row for row in rows if row["strategy"] == REFERENCE and not row["refused"]), None)
    for row in rows:
        measured = reference is not None and not row["refused"]
        row["states_vs_ddp"] = row["states_mib"] / reference["states_mib"] if measured else None


def run_memory_benchmark(
    config_path: str | None,
    overrides: Sequence[str],
    *,
    nproc: int,
    strategies: Sequence[str],
    steps: int,
    out: Path,
    as_json: bool = False,
) -> dict[str, Any]:
    """Train the config under each strategy on `nproc` processes, then print (table or JSON) and write
    `OUT/memory.json` and `OUT/memory.png`; returns the result. Runs go to `OUT/STRATEGY`."""
    if nproc < 2:
        raise UsageError(f"--nproc: strategies differ only across processes; use at least 2, got {nproc}")
    for strategy in strategies:
        check_strategy(strategy, "--strategies")
    config = load_config(config_path, overrides)  # a bad config fails here, before any run
    threads = threads_per_process(nproc)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    num_parameters = 0
    for strategy in dict.fromkeys(strategies):  # in the order given, each once
        if not as_json:
            print(f"{strategy}: {nproc} processes x {counted(threads, 'thread')}, {steps} steps", flush=True)
        config_args = [*config_arguments(config_path, overrides), f"parallel.strategy={strategy}"]
        config_args.append(f"training.max_steps={steps}")
        run = train_in_child(config_args, nproc=nproc, threads=threads, run_dir=out / strategy)
        if run.refused:
            rows.append({"strategy": strategy, "refused": run.last_error_line})
            continue
        run.check()
        num_parameters = run.summary["num_parameters"]
        rows.append({**memory_row(strategy, run.summary["memory_per_process"]), "run_dir": str(run.run_dir)})
    add_reference_ratios(rows)
    result = {
        "benchmark": "memory",
        "config": config_path,
        "overrides": list(overrides),
        "model": config.model.architecture,
        "num_parameters": num_parameters,
        "dataset": config.data.dataset,
        "optimizer": config.training.optimizer.name,
        "processes": nproc,
        "steps": steps,
        "threads_per_process": threads,
        **machine(),
        "results": rows,
    }
    plot_memory(result, out / "memory.png")
    _report(result, out, as_json=as_json)
    return result


def _report(result: dict[str, Any], out: Path, *, as_json: bool) -> None:
    """Print the table (or JSON), then what the columns mean and why strategies were refused; write memory.json."""
    title = (
        f"Memory per process (MiB) of {result['model']} ({result['num_parameters']:,} parameters), "
        f"{result['optimizer']}, on {result['processes']} processes after {result['steps']} steps"
    )
    legend = (
        "states = parameters + gradients + optimizer state, of the process with the most; peak: the highest "
        f"process; runs and logs in {out}/"
    )
    columns = ["strategy", "parameters", "gradients", "optimizer", "states", "states vs ddp", "peak/process"]
    columns.append("activations (peak - states)")
    rows = result["results"]
    refusals = [f"{row['strategy']} refused: {row['refused']}" for row in rows if row["refused"]]
    table = _table_rows(rows)
    report(
        result,
        out / "memory.json",
        as_json=as_json,
        title=title,
        columns=columns,
        rows=table,
        notes=[legend, *refusals],
    )


def _table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The printed cells: MiB with two decimals, refused strategies named (their reasons follow the table)."""
    table = []
    for row in rows:
        if row["refused"]:
            table.append([row["strategy"], "refused (below)", *[""] * 6])
            continue
        ratio = row["states_vs_ddp"]
        activations = row["activations_mib"]
        table.append(
            [
                row["strategy"],
                *(f"{row[name]:,.2f}" for name in (*STATES, "states_mib")),
                "n/a" if ratio is None else f"{ratio:.2f}",
                f"{row['peak_mib']:,.0f} {row['peak_kind']}",
                "n/a (RSS)" if activations is None else f"{activations:,.1f}",
            ]
        )
    return table


def plot_memory(result: dict[str, Any], path: Path) -> None:
    """Stacked states (parameters, gradients, optimizer) and the peak, per strategy; refused ones marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = result["results"]
    names = [row["strategy"] for row in rows]
    figure, (states_axis, peak_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    bottoms = [0.0] * len(rows)
    for name, label in zip(STATES, ("parameters", "gradients", "optimizer state"), strict=True):
        heights = [0.0 if row["refused"] else row[name] for row in rows]
        states_axis.bar(names, heights, bottom=bottoms, label=label)
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights, strict=True)]
    peak_kind = next((row["peak_kind"] for row in rows if not row["refused"]), "")
    peak_axis.bar(names, [0.0 if row["refused"] else row["peak_mib"] for row in rows], color="tab:grey")
    for index, row in enumerate(rows):
        if row["refused"]:
            for axis in (states_axis, peak_axis):
                axis.annotate("refused", (index, 0), ha="center", va="bottom", rotation=90)
    states_axis.set_ylabel("MiB per process")
    states_axis.set_title("states (the process with the most)")
    states_axis.legend()
    peak_axis.set_ylabel("MiB per process")
    peak_axis.set_title(f"peak ({peak_kind}; highest process)")
    figure.suptitle(f"{result['model']} on {result['processes']} processes, {result['optimizer']}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
