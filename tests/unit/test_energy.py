"""The energy readers: RAPL counters from a recorded powercap tree, NVML's counter through a fake NVML, the
estimate from CPU time, and each counter going round."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scaleforge.training import energy
from scaleforge.training.energy import DEFAULT_WATTS_PER_CORE, Counter, EnergyMeter, energy_meter, rapl_counters


def zone(root: Path, name: str, label: str, uj: int, max_uj: int = 262_143_328_850) -> Path:
    """A powercap zone as the kernel lays it out: its name, counter and range."""
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label + "\n")
    (path / "energy_uj").write_text(f"{uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages with their core and DRAM domains, and the platform's: a two-socket Intel server's tree."""
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", 1_000_000, max_uj=10_000_000)
    zone(root, "intel-rapl:0:0", "core", 500_000)  # inside package 0: not counted again
    zone(root, "intel-rapl:0:1", "dram", 200_000)
    zone(root, "intel-rapl:1", "package-1", 3_000_000)
    zone(root, "intel-rapl:2", "psys", 9_000_000)  # the whole platform: would count the packages twice
    unreadable = zone(root, "intel-rapl:3", "package-3", 0)
    (unreadable / "energy_uj").unlink()
    (unreadable / "energy_uj").mkdir()  # stands in for a root-only file (this test may run as root)
    return root


def advance(root: Path, name: str, uj: int) -> None:
    (root / name / "energy_uj").write_text(f"{uj}\n")


def test_rapl_counts_packages_and_dram_once_and_goes_round(powercap: Path) -> None:
    counters = rapl_counters(powercap)
    assert len(counters) == 3  # package 0, its DRAM, package 1
    advance(powercap, "intel-rapl:0", 4_000_000)  # +3 J
    advance(powercap, "intel-rapl:0:0", 2_000_000)  # core: not counted
    advance(powercap, "intel-rapl:0:1", 700_000)  # +0.5 J
    advance(powercap, "intel-rapl:1", 5_000_000)  # +2 J
    assert sum(counter.total() for counter in counters) == pytest.approx(5.5)
    advance(powercap, "intel-rapl:0", 1_000_000)  # went past 10 J (the range) and round: +7,000,001 uJ
    assert counters[0].total() == pytest.approx(3 + 7.000001)
    assert rapl_counters(powercap / "absent") == []


def test_a_node_reads_the_machines_counters_once(powercap: Path) -> None:
    first = energy_meter(torch.device("cpu"), local_rank=0, cpu_watts=None, root=powercap)
    second = energy_meter(torch.device("cpu"), local_rank=1, cpu_watts=None, root=powercap)
    assert first.source == second.source == "rapl" and first.watts_per_core is None
    advance(powercap, "intel-rapl:1", 4_000_000)
    assert first.take() == pytest.approx(1.0) and second.take() == 0.0  # local rank 1's share is counted by 0
    assert first.take() == 0.0  # nothing since the last take


class FakeNVML:
    """NVML's calls that the counter makes, counting millijoules of the device it was asked for."""

    def __init__(self, start_mj: int) -> None:
        self.mj = {3: start_mj}
        self.initialised = False

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        self.initialised = True

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(index=index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimpleNamespace) -> int:  # noqa: N802
        assert self.initialised
        return self.mj[handle.index]


def test_nvml_reads_its_own_devices_counter_and_goes_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda device: device.index + 2)  # visible devices 2,3
    nvml = FakeNVML(start_mj=2**64 - 500)
    meter = energy_meter(torch.device("cuda", 1), local_rank=1, cpu_watts=100, root=Path("/absent"), nvml=nvml)
    assert meter.source == "nvml+estimate"  # the GPU counted, the processor estimated
    nvml.mj[3] = 1_500  # 2,000 mJ later, past the 64-bit range
    (gpu,) = meter.counters
    assert gpu.total() == pytest.approx(2.0)

    class Broken:
        def nvmlInit(self) -> None:  # noqa: N802
            raise RuntimeError("NVML Shared Library Not Found")

    meter = energy_meter(torch.device("cuda", 0), local_rank=0, cpu_watts=None, root=Path("/absent"), nvml=Broken())
    assert meter.source == "estimate" and meter.counters == []


def test_the_estimate_is_the_rated_power_times_the_share_of_cores_used() -> None:
    clock = iter([100.0, 104.0, 103.5, 110.0])  # CPU seconds; once lower (a child ended, not yet waited for)
    meter = EnergyMeter([], "estimate", watts_per_core=5.0, _cpu=lambda: next(clock))
    assert meter.take() == pytest.approx(20.0)  # 4 CPU seconds at 5 W a core
    assert meter.take() == 0.0  # never backwards
    assert meter.take() == pytest.approx(30.0)  # 110 - 104 seconds
    cores = os.cpu_count() or 1
    rated = energy_meter(torch.device("cpu"), local_rank=0, cpu_watts=200.0, root=Path("/absent"))
    assert rated.watts_per_core == pytest.approx(200.0 / cores) and "hardware.cpu_watts" in rated.note
    default = energy_meter(torch.device("cpu"), local_rank=0, cpu_watts=None, root=Path("/absent"))
    assert default.watts_per_core == DEFAULT_WATTS_PER_CORE and "set hardware.cpu_watts" in default.note


def test_cpu_seconds_count_the_data_workers_that_are_alive() -> None:
    import multiprocessing
    import time

    def children() -> float:  # what cpu_seconds counts besides this process's own time
        own = os.times()
        return energy.cpu_seconds() - own.user - own.system

    before = children()
    worker = multiprocessing.get_context("fork").Process(target=_spin_then_wait, args=(0.3,))
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while children() - before < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children() - before >= 0.25 and worker.is_alive()  # counted while it runs, not once it ended
    finally:
        worker.kill()
        worker.join()


def _spin_then_wait(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    time.sleep(60)


def test_a_counter_takes_what_it_read_since_it_was_made() -> None:
    readings = itertools.chain([5, 9], itertools.repeat(9))
    counter = Counter(lambda: next(readings), wrap=10, joules_per_unit=2.0)
    assert counter.total() == 8.0 and counter.total() == 8.0
