"""What the benchmarks that train share: `scaleforge train` started in a child process, as a user's shell
would, its run directory read back, and the report (a table or JSON on stdout, a JSON file beside the runs).

A child run is quiet (plain progress lines, no TensorBoard, plot or checkpoints: work outside the loop being
measured); its console output goes to `<run dir>/output.log`. A run that refuses its config exits 2 after one
line on stderr; that line is kept, so a benchmark can show the refusal instead of stopping.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from scaleforge.bench.link import Link
from scaleforge.config import ParallelSection
from scaleforge.console import print_table
from scaleforge.errors import UsageError, did_you_mean, one_of
from scaleforge.processes import ParentDeathGuard

QUIET_RUN = ("logging.progress=plain", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0")
# The values of `parallel.strategy` that split a run over processes (`single` is one process; `auto`, a choice).
MULTI_PROCESS_STRATEGIES = tuple(
    name
    for name in typing.get_args(typing.get_type_hints(ParallelSection)["strategy"])
    if name not in ("auto", "single")
)
NODE_GRACE_S = 10  # a node left running this long after the other failed is killed
# `bench scaling --grad-compression`: the settings of `parallel.grad_compression`
GRAD_COMPRESSIONS: tuple[str, ...] = typing.get_args(typing.get_type_hints(ParallelSection)["grad_compression"])
# `bench scaling --schedules`: the settings of `parallel.schedule`
PIPELINE_SCHEDULES: tuple[str, ...] = typing.get_args(typing.get_type_hints(ParallelSection)["schedule"])


@dataclass(frozen=True)
class TrainingRun:
    """A finished `scaleforge train` child process and its run directory."""

    run_dir: Path
    exit_code: int
    last_error_line: str  # the last line the child wrote on stderr: its one-line message when it refused

    @property
    def refused(self) -> bool:
        """Whether the run stopped at a user error (exit 2), such as a strategy the model cannot take."""
        return self.exit_code == 2

    def check(self) -> None:
        """Raise unless the run finished; the message names the log with the child's whole output."""
        if self.exit_code != 0:
            raise RuntimeError(
                f"training run {self.run_dir} failed with exit code {self.exit_code}: {self.last_error_line} "
                f"(its output is in {self.run_dir / 'output.log'})"
            )

    @cached_property
    def summary(self) -> dict[str, Any]:
        """The run's `summary.json`."""
        return json.loads((self.run_dir / "summary.json").read_text())

    @cached_property
    def metrics(self) -> list[dict[str, Any]]:
        """The run's `metrics.jsonl`: log-interval and evaluation records, in order."""
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def energy(self) -> dict[str, Any]:
        """The run's energy figures from its summary (a run that wrote none: zeros, source `none`)."""
        summary = self.summary
        return {
            "energy_j": summary.get("energy_j", 0.0),
            "samples_per_j": summary.get("samples_per_j", 0.0),
            "energy_source": summary.get("energy_source", "none"),
        }

    def peak_memory(self) -> tuple[float, str]:
        """The highest peak over the run's processes (MiB) and what it counts (`rss` or `cuda_allocated`)."""
        worst = max(self.summary["memory_per_process"], key=lambda process: process["peak_mib"])
        return worst["peak_mib"], worst["peak_kind"]


ENERGY_NOTE = (
    "samples/J: the samples trained per joule the whole run used, every process's (setup included); ~: estimated "
    "from CPU time and the processor's rated power, where no energy counter is readable (docs/energy.md)"
)


def energy_cell(row: dict[str, Any]) -> str:
    """A row's samples per joule, `~` in front when estimated."""
    return f"{'~' if 'estimate' in row['energy_source'] else ''}{row['samples_per_j']:,.1f}"


def config_arguments(config_path: str | None, overrides: Sequence[str]) -> list[str]:
    """The `[CONFIG] [KEY=VALUE ...]` part of a `scaleforge train` command line."""
    return [*([config_path] if config_path else []), *overrides]


def train_in_child(config_args: Sequence[str], *, nproc: int, threads: int, run_dir: Path) -> TrainingRun:
    """Run `python -m scaleforge train CONFIG_ARGS --nproc NPROC --run-dir RUN_DIR`, `threads` threads per process.

    `run_dir` belongs to the benchmark: an earlier run there is replaced. Later overrides win, so the quiet
    settings here override the config's.
    """
    command, env = _train_command(config_args, nproc=nproc, threads=threads, run_dir=run_dir)
    with (run_dir / "output.log").open("w") as log:
        # killed with the benchmark, whose run directory it is: nothing of it is kept (a launcher's workers follow)
        guard = ParentDeathGuard(signal.SIGKILL)
        process = subprocess.run(
            command, stdout=log, stderr=subprocess.PIPE, text=True, env=env, check=False, preexec_fn=guard
        )
        log.write(process.stderr)
    return TrainingRun(run_dir, process.returncode, _last_line(process.stderr))


def train_on_two_nodes(
    config_args: Sequence[str], link: Link, *, nproc_per_node: int, threads: int, run_dir: Path
) -> TrainingRun:
    """`train_in_child` as two nodes joined by `link`, `nproc_per_node` processes each, node 0 (which writes the
    run directory) hosting the rendezvous; node 1's output goes to `<run dir>/node1.log`."""
    command, env = _train_command(config_args, nproc=nproc_per_node, threads=threads, run_dir=run_dir)
    logs = [run_dir / "output.log", run_dir / "node1.log"]
    guard = ParentDeathGuard(signal.SIGKILL)
    with contextlib.ExitStack() as stack:
        nodes = []
        for rank, (node, path) in enumerate(zip(link.nodes, logs, strict=True)):
            log = stack.enter_context(path.open("w"))
            arguments = ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", link.rendezvous]
            nodes.append(
                subprocess.Popen(
                    [*node.prefix(), *command, *arguments, "--rdzv-id", "bench"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                    preexec_fn=guard,
                )
            )
            stack.callback(_stop, nodes[-1])  # one node failing leaves the other waiting for it: not kept
        failed, failed_at = 0, 0.0  # the node that failed first, and when
        while any(node.poll() is None for node in nodes):
            codes = [node.poll() for node in nodes]
            if not failed_at and any(codes):
                failed, failed_at = next(rank for rank, code in enumerate(codes) if code), time.monotonic()
            if failed_at and time.monotonic() - failed_at > NODE_GRACE_S:
                break  # the other node, given a while to fail of itself, is killed
            time.sleep(0.2)
        if not failed_at:  # both ended between two looks
            failed = next((rank for rank, node in enumerate(nodes) if node.poll()), 0)
        code = nodes[failed].poll() or 0
    return TrainingRun(run_dir, code, _last_line(logs[failed].read_text()))


def _train_command(
    config_args: Sequence[str], *, nproc: int, threads: int, run_dir: Path
) -> tuple[list[str], dict[str, str]]:
    """The `scaleforge train` command of a child run and its environment; `run_dir` made empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # The launcher passes OMP_NUM_THREADS on to its workers when it is set; hardware.threads sets torch's own
    # pool, which a single process (started without the launcher) uses too.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "scaleforge", "train", *config_args, *QUIET_RUN, f"hardware.threads={threads}"]
    return [*command, "--nproc", str(nproc), "--run-dir", str(run_dir)], env


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def check_strategy(name: str, option: str) -> None:
    """Refuse a strategy name that does not split a run over processes, with a did-you-mean."""
    if name not in MULTI_PROCESS_STRATEGIES:
        raise UsageError(
            f"{option}: unknown strategy '{name}'{did_you_mean(name, MULTI_PROCESS_STRATEGIES)}; "
            f"{one_of(MULTI_PROCESS_STRATEGIES)}"
        )


def machine() -> dict[str, Any]:
    """What a result was measured on."""
    return {
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits until the work queued on `device` is done (nothing to wait for on a CPU): to call
    before reading a clock, since a GPU runs what it is given after the call that gave it has returned."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def report(
    result: dict[str, Any],
    path: Path,
    *,
    as_json: bool,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    notes: Sequence[str] = (),
) -> None:
    """Write `result` to `path` as JSON, and print it: as JSON, or as a table of `rows` under `columns` followed
    by `notes`, one line each."""
    path.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print_table(title, columns, rows)
    for note in notes:
        print(note)
