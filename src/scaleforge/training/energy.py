"""The energy a run uses, read from the counters the hardware keeps, and where each figure comes from.

Sources, each named with the figure (`energy_source`):
- `rapl`: the processors' energy counters in Linux's powercap interface (Intel's RAPL; AMD's processors report
  through the same driver): each package's `energy_uj`, and each DRAM domain's, under /sys/class/powercap. They
  count the whole machine, so one process a node reads them (local rank 0). Most kernels let only root read them
  (since 2020), so elsewhere they are skipped.
- `nvml`: each GPU's total-energy counter (NVML's `nvmlDeviceGetTotalEnergyConsumption`, millijoules since the
  driver loaded, Volta and later): every process reads its own device (`cuda:LOCAL_RANK`), so summed over the
  processes each device counts once.
- `estimate`, where neither is readable: the processor's rated power times this process's share of the machine's
  cores (its CPU seconds, its data workers' included, over the cores), as CodeCarbon estimates without counters.
  The rated power is `hardware.cpu_watts` (the whole processor, every package); unset, DEFAULT_WATTS_PER_CORE a
  logical core, which the summary says (`energy_note`).

Every counter wraps (RAPL's at `max_energy_range_uj`, every minute or so under load on a big server): a reading
below the last is the counter having gone round once, and what it counted since is added.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")
DEFAULT_WATTS_PER_CORE = 10.0  # between a server core's share of its package (4-7 W) and a desktop's (15 W)
NVML_WRAP = 2**64  # an unsigned 64-bit millijoule count


@dataclass
class Counter:
    """A cumulative hardware counter in units of `joules_per_unit` that goes back to 0 after `wrap - 1`."""

    read: Callable[[], int]
    wrap: int
    joules_per_unit: float
    last: int = field(init=False)
    joules: float = field(default=0.0, init=False)  # counted since made

    def __post_init__(self) -> None:
        self.last = self.read()

    def total(self) -> float:
        """The joules counted since this counter was made."""
        now = self.read()
        delta = now - self.last
        if delta < 0:  # gone round once since the last reading
            delta += self.wrap
        self.last = now
        self.joules += delta * self.joules_per_unit
        return self.joules


def rapl_counters(root: Path = POWERCAP) -> list[Counter]:
    """A counter per processor package and DRAM domain that this process can read (none where the interface is
    absent or root-only). Core and uncore domains lie inside their package and are left out, as is `psys` (the
    whole platform, which would count the packages again)."""
    counters = []
    for zone in sorted(root.glob("intel-rapl:*")):
        try:
            name = (zone / "name").read_text().strip()
            if not (name.startswith("package") or name == "dram"):
                continue
            wrap = int((zone / "max_energy_range_uj").read_text()) + 1
            energy = zone / "energy_uj"
            counters.append(Counter(lambda path=energy: int(path.read_text()), wrap, 1e-6))
        except (OSError, ValueError) as error:  # root-only since 2020 on most kernels
            log.debug("RAPL zone %s unreadable: %s", zone, error)
    return counters


def nvml_counter(device: torch.device, nvml: Any = None) -> Counter | None:
    """The total-energy counter of `device` (a CUDA device of this process), None where NVML or the counter is
    missing (no driver, `nvidia-ml-py` not installed, a GPU older than Volta). `nvml`: the `pynvml` module."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        handle = nvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))  # CUDA_VISIBLE_DEVICES
        return Counter(lambda: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)), NVML_WRAP, 1e-3)
    except Exception as error:  # noqa: BLE001 - no counter: another source or the estimate stands in
        log.debug("NVML energy counter unavailable: %s", error)
        return None


def cpu_seconds() -> float:
    """This process's CPU seconds (every thread, user and system) with those of its children: the living ones
    (data workers) through psutil, the ended ones as the kernel counts them once waited for."""
    import psutil

    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.Error:  # ended since listed
            continue
        total += child_times.user + child_times.system
    return total


@dataclass
class EnergyMeter:
    """This process's share of a run's energy: the counters it reads, or the estimate."""

    counters: list[Counter]
    source: str  # rapl, nvml, rapl+nvml, estimate, or none (a process whose share another counts)
    watts_per_core: float | None = None  # the estimate's
    note: str = ""
    _cpu: Callable[[], float] = cpu_seconds
    _cpu_start: float = 0.0
    _cpu_joules: float = 0.0
    _taken: float = 0.0  # the joules at the last `take`

    def __post_init__(self) -> None:
        if self.watts_per_core is not None:
            self._cpu_start = self._cpu()

    def joules(self) -> float:
        """The joules this process accounts for since the meter was made."""
        total = sum(counter.total() for counter in self.counters)
        if self.watts_per_core is not None:
            # never backwards: a child that ended is counted nowhere until it has been waited for
            self._cpu_joules = max(self._cpu_joules, (self._cpu() - self._cpu_start) * self.watts_per_core)
            total += self._cpu_joules
        return total

    def take(self) -> float:
        """The joules this process accounts for since the last call (since the meter was made, the first time)."""
        now = self.joules()
        taken, self._taken = now - self._taken, now
        return taken


def energy_meter(
    device: torch.device, *, local_rank: int, cpu_watts: float | None, root: Path = POWERCAP, nvml: Any = None
) -> EnergyMeter:
    """The meter of this process: RAPL on local rank 0 where readable, this process's GPU where NVML counts it,
    else the estimate from `cpu_watts` (the processor's rated power, None: DEFAULT_WATTS_PER_CORE a core)."""
    counters, sources = [], []
    rapl = rapl_counters(root)
    if rapl:
        sources.append("rapl")
        if local_rank == 0:  # the machine's counters: one process a node reads them
            counters += rapl
    if device.type == "cuda":
        gpu = nvml_counter(device, nvml)
        if gpu is not None:
            sources.append("nvml")
            counters.append(gpu)
    if rapl:
        return EnergyMeter(counters, "+".join(sources))
    cores = os.cpu_count() or 1
    if cpu_watts is not None:
        note = f"rated power {cpu_watts:g} W (hardware.cpu_watts) over {cores} cores"
        watts_per_core = cpu_watts / cores
    else:
        note = f"{DEFAULT_WATTS_PER_CORE:g} W a core assumed (set hardware.cpu_watts to the processor's rated power)"
        watts_per_core = DEFAULT_WATTS_PER_CORE
    return EnergyMeter(counters, "+".join([*sources, "estimate"]), watts_per_core, note)
