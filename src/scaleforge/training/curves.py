"""What `scaleforge plot` and `scaleforge runs` show of run directories, from what training wrote into them
(`metrics.jsonl`, `summary.json`, `config.yaml`, `status.json`).

`plot_runs` draws loss, validation metrics, learning rate and throughput against step, and again against wall
time, one PNG each, overlaying several runs for comparison. `describe_runs` gives a row per run directory under
a folder: name, model, strategy, processes, steps, best validation metric, wall time and status.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from scaleforge.errors import UsageError
from scaleforge.training.status import read_status, run_state


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's log lines and evaluations from `metrics.jsonl` (a line cut short by a crash is passed over)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no metrics.jsonl; is it a run directory?")
    train, val = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            train.append(record)
        elif any(name.startswith("val_") for name in record):
            val.append(record)
    return train, val


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    """Draw the runs' curves into `out/curves-step.png` and `out/curves-time.png`; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = {_label(run_dir, run_dirs): read_metrics(run_dir) for run_dir in run_dirs}
    panels = _panels(runs.values())
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for axis_name in ("step", "time"):
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), dpi=110, squeeze=False)
        for axis, panel in zip(axes.flat, panels, strict=False):
            for index, (label, (train, val)) in enumerate(runs.items()):
                colour = f"C{index % 10}"
                start = min((r["time"] for r in [*train, *val] if "time" in r), default=0.0)

                def x(record: dict[str, Any], start: float = start, by_step: bool = axis_name == "step") -> float:
                    return record["step"] if by_step else record.get("time", start) - start

                if panel == "loss":
                    marker = "." if len(train) < 30 else None  # a short run's few points stay visible
                    axis.plot([x(r) for r in train], [r["loss"] for r in train], color=colour, marker=marker,
                              label=f"{label} train")  # fmt: skip
                    points = [r for r in val if "val_loss" in r]
                    axis.plot([x(r) for r in points], [r["val_loss"] for r in points], "o--", color=colour,
                              markersize=3, label=f"{label} val")  # fmt: skip
                else:
                    source = val if panel.startswith("val_") else train
                    points = [r for r in source if panel in r]
                    style = "o-" if panel.startswith("val_") or len(points) < 30 else "-"
                    axis.plot([x(r) for r in points], [r[panel] for r in points], style, color=colour, markersize=3,
                              label=label)  # fmt: skip
            axis.set_title({"lr": "learning rate", "samples_per_s": "throughput (samples/s)"}.get(panel, panel))
            axis.set_xlabel("step" if axis_name == "step" else "wall time (s)")
            axis.grid(alpha=0.3)
            if panel == "loss":
                axis.legend(fontsize=7)
        for axis in list(axes.flat)[len(panels) :]:
            axis.set_visible(False)
        figure.tight_layout()
        path = out / f"curves-{axis_name}.png"
        figure.savefig(path)
        plt.close(figure)
        files.append(path)
    return files


def curve_panels(run_dirs: list[Path]) -> list[str]:
    """The figures `plot_runs` draws a panel for, in order: loss (train and validation), each other validation
    metric, learning rate, throughput."""
    return _panels([read_metrics(run_dir) for run_dir in run_dirs])


def _panels(runs: Any) -> list[str]:
    names = {name for _, val in runs for record in val for name in record}
    return ["loss", *sorted(name for name in names if name.startswith("val_") and name != "val_loss"), "lr",
            "samples_per_s"]  # fmt: skip


def _label(run_dir: Path, run_dirs: list[Path]) -> str:
    """A run's name in a legend: its folder's name, or its path when two runs share a name."""
    names = [path.name for path in run_dirs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def describe_runs(folder: Path) -> list[dict[str, Any]]:
    """A row per run directory directly under `folder` (one holding a config.yaml), newest first."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    rows = []
    for run_dir in sorted(folder.iterdir(), key=lambda path: path.stat().st_mtime, reverse=True):
        if run_dir.is_dir() and (run_dir / "config.yaml").is_file():
            rows.append(describe_run(run_dir))
    return rows


def describe_run(run_dir: Path) -> dict[str, Any]:
    """What `scaleforge runs` shows of one run directory."""
    config = _read_yaml(run_dir / "config.yaml")
    summary = _read_json(run_dir / "summary.json")
    status = read_status(run_dir)
    try:
        train, val = read_metrics(run_dir)
    except UsageError:
        train, val = [], []
    records = [*train, *val]
    steps = summary.get("steps", max((r.get("step", 0) for r in records), default=0))
    times = [r["time"] for r in records if "time" in r]
    wall = summary.get("wall_time_s", (max(times) - min(times)) if times else None)
    return {
        "name": run_dir.name,
        "path": str(run_dir),
        "model": (config.get("model") or {}).get("architecture", "?"),
        "strategy": summary.get("strategy", status.get("strategy", (config.get("parallel") or {}).get("strategy"))),
        "processes": summary.get("processes", status.get("processes")),
        "steps": steps,
        "best": _best(val or [(_read_json(run_dir / "final" / "compression.json").get("after") or {})]),
        "wall_time_s": wall,
        # the finished run's, else the job's through its last log line (a run still training, or stopped)
        "energy_j": summary.get("energy_j", next((r["energy_j"] for r in reversed(train) if "energy_j" in r), None)),
        "energy_source": summary.get("energy_source"),
        "status": run_state(run_dir),
    }


def _best(val: list[dict[str, Any]]) -> tuple[str, float] | None:
    """The best validation figure: the highest accuracy, else the lowest loss."""
    for name, best in (("val_accuracy", max), ("val_loss", min)):
        values = [r[name] for r in val if isinstance(r.get(name), int | float)]
        if values:
            return name, best(values)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}
