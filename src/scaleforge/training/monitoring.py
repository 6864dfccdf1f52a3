"""System figures of a training process, logged with every log line, and the same live figures for Prometheus.

`SystemMonitor.sample()` gives this process's CPU use since the last sample (percent of one core, as `top`), its
resident memory, tokens/s for token data, and on a GPU the memory torch has allocated, reserved and at most
allocated, and, where NVML works (`pip install scaleforge[gpu]`), the GPU's utilisation and power. NVML absent or
failing is not an error: those figures are then left out.

`PrometheusExporter` (`logging.prometheus_port`) serves the latest log line's figures and validation metrics at
`http://HOST:PORT/metrics` while the run trains: from rank 0, or with `logging.prometheus_ranks: all` from every
process (rank r on PORT + local rank r), each labelled with its rank.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

import torch

from scaleforge.training.callbacks import Callback, RunState

log = logging.getLogger(__name__)


_statm: tuple[int, int] | None = None  # (pid, descriptor of /proc/self/statm) once opened by that process


def resident_bytes() -> int:
    """This process's resident memory. On Linux, /proc/self/statm held open and read again from its start: within a
    training loop, between steps that have just used the caches, psutil's `memory_info` took 94 us a log line and
    opening the file afresh 51 us. A process forked after the file was opened opens its own."""
    global _statm
    if sys.platform != "linux":
        import psutil

        return int(psutil.Process().memory_info().rss)
    if _statm is None or _statm[0] != os.getpid():
        _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
    return int(os.pread(_statm[1], 128, 0).split()[1]) * PAGE_SIZE


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class SystemMonitor:
    """This process's CPU, memory and (on a GPU) device figures, for a log line."""

    def __init__(self, device: torch.device, tokens_per_sample: int | None) -> None:
        self._cpu = self._cpu_seconds()  # the first sample's CPU use counts from here
        self.device = device
        self.tokens_per_sample = tokens_per_sample
        self.nvml = device.type == "cuda"  # until NVML fails once

    def sample(self, samples_per_s: float) -> dict[str, float]:
        """The figures since the last sample, under the names metrics.jsonl and TensorBoard use."""
        (cpu, wall), (last_cpu, last_wall) = self._cpu_seconds(), self._cpu
        self._cpu = (cpu, wall)
        figures = {
            "cpu_percent": 100 * (cpu - last_cpu) / max(wall - last_wall, 1e-9),
            "rss_mib": resident_bytes() / 2**20,
        }
        if self.tokens_per_sample:
            figures["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.device.type == "cuda":
            figures["gpu_memory_allocated_mib"] = torch.cuda.memory_allocated(self.device) / 2**20
            figures["gpu_memory_reserved_mib"] = torch.cuda.memory_reserved(self.device) / 2**20
            figures["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            figures.update(self._nvml_figures())
        return figures

    @staticmethod
    def _cpu_seconds() -> tuple[float, float]:
        """This process's CPU seconds (user and system, its threads' too) and the wall clock: from the kernel's
        counters in one call, where psutil's `cpu_percent` reads and parses /proc (about 25 us a log line)."""
        times = os.times()
        return times.user + times.system, time.monotonic()

    def _nvml_figures(self) -> dict[str, float]:
        """Utilisation and power through torch's NVML calls, which map this process's device (after
        CUDA_VISIBLE_DEVICES) to the physical GPU; nothing once NVML has failed (not installed, no driver)."""
        if not self.nvml:
            return {}
        try:
            return {
                "gpu_utilization_percent": float(torch.cuda.utilization(self.device)),
                "gpu_power_w": torch.cuda.power_draw(self.device) / 1000,
            }
        except Exception as error:  # noqa: BLE001 - NVML absent or failing is not an error: the figures are left out
            log.debug("NVML unavailable: %s", error)
            self.nvml = False
            return {}


class PrometheusExporter(Callback):
    """The run's live figures as Prometheus gauges, served from this process while it trains: one gauge per
    figure of the log line (`scaleforge_train_loss`, `scaleforge_train_samples_per_s`, ...), the step, and the
    latest validation metrics (`scaleforge_train_val{metric="accuracy"}`), each labelled with the rank."""

    def __init__(self, port: int, host: str, rank: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.port, self.host, self.rank = port, host, str(rank)
        self.registry = CollectorRegistry()
        self.figures: dict[str, Any] = {}
        self.val = Gauge(
            "scaleforge_train_val", "The latest validation metrics", ["rank", "metric"], registry=self.registry
        )
        self.step = Gauge("scaleforge_train_step", "Optimizer steps taken", ["rank"], registry=self.registry)
        self.server: Any = None
        self.thread: Any = None
        self._listen()

    def _listen(self) -> None:
        """Serve from now on: built while the run is set up, a port that is taken fails every process alike."""
        from prometheus_client import start_http_server

        from scaleforge.errors import ConfigError

        try:
            self.server, self.thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except (OSError, OverflowError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ConfigError(
                f"logging.prometheus_port: {self.port} cannot be listened on at {self.host} ({reason})"
            ) from None
        print(f"metrics: http://{self.host}:{self.server.server_port}/metrics", file=sys.stderr, flush=True)

    def on_train_start(self, state: RunState) -> None:
        self.step.labels(self.rank).set(state.step)

    def on_log(self, state: RunState, record: dict[str, Any]) -> None:
        from prometheus_client import Gauge

        self.step.labels(self.rank).set(record["step"])
        for name, value in record.items():
            if name in ("step", "time") or not isinstance(value, int | float):
                continue
            if name not in self.figures:
                metric = "scaleforge_train_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
                self.figures[name] = Gauge(metric, f"{name} of the latest log line", ["rank"], registry=self.registry)
            self.figures[name].labels(self.rank).set(value)

    def on_eval(self, state: RunState, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if name.startswith("val_") and isinstance(value, int | float):
                self.val.labels(self.rank, name.removeprefix("val_")).set(value)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None
