"""What a search optimises: a validation metric of the run, or a deployment cost of its model, measured on the
trained run directory."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from scaleforge.errors import ConfigError, UsageError, did_you_mean

if TYPE_CHECKING:
    from scaleforge.runs import LoadedRun

Direction = Literal["maximize", "minimize"]

# Validation metrics whose direction is known; any other `val_*` metric takes `:max` or `:min`.
METRIC_DIRECTIONS: dict[str, Direction] = {
    "val_accuracy": "maximize",
    "val_loss": "minimize",
    "val_perplexity": "minimize",
}
# Costs of the trained model, always minimised.
COSTS: dict[str, str] = {
    "params": "parameters of the model",
    "latency_ms": "median time of one forward pass at batch 1 on the device it trained on, in milliseconds",
    "int8_size_kib": "size of its weights file after `compress --method dynamic-int8`, in KiB",
}
_SUFFIXES: dict[str, Direction] = {"max": "maximize", "min": "minimize"}


@dataclass(frozen=True)
class Objective:
    """One value a trial is judged by, and which way is better."""

    name: str
    direction: Direction

    @property
    def is_cost(self) -> bool:
        return self.name in COSTS

    def spec(self) -> str:
        return f"{self.name}:{self.direction[:3]}"


def parse_objective(text: str) -> Objective:
    """`val_accuracy`, `params`, `latency_ms`, `int8_size_kib`, or `val_<metric>:max|min`."""
    name, _, suffix = text.strip().partition(":")
    if suffix and suffix not in _SUFFIXES:
        raise UsageError(f"--objective {text}: the direction after ':' is max or min")
    if name in COSTS:
        if suffix == "max":
            raise UsageError(f"--objective {text}: {name} is a cost, which is always minimised")
        return Objective(name, "minimize")
    if not name.startswith("val_"):
        raise UsageError(
            f"--objective {text}: expected a validation metric (val_accuracy, val_loss, val_<metric>:max|min) or a "
            f"cost ({', '.join(COSTS)}){did_you_mean(name, [*METRIC_DIRECTIONS, *COSTS])}"
        )
    if suffix:
        return Objective(name, _SUFFIXES[suffix])
    if name not in METRIC_DIRECTIONS:
        raise UsageError(f"--objective {text}: say whether higher is better: {name}:max or {name}:min")
    return Objective(name, METRIC_DIRECTIONS[name])


def check_objectives(objectives: Sequence[Objective]) -> None:
    names = [objective.name for objective in objectives]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--objective {repeated[0]} is given twice")


def measure(run_dir: Path, objectives: Sequence[Objective], threads: int) -> dict[str, float]:
    """Each objective's value for the finished run in `run_dir`. A metric the run does not report is a
    `ConfigError`: every other trial would miss it too."""
    summary = json.loads((run_dir / "summary.json").read_text())
    values: dict[str, float] = {}
    for objective in objectives:
        if objective.is_cost:
            continue
        if objective.name not in summary:
            reported = ", ".join(k for k in summary if k.startswith("val_"))
            raise ConfigError(f"--objective {objective.name}: the runs report no such metric; they report {reported}")
        values[objective.name] = float(summary[objective.name])
    costs = [o.name for o in objectives if o.is_cost]
    if "params" in costs:
        values["params"] = float(summary["num_parameters"])
    if "latency_ms" in costs or "int8_size_kib" in costs:
        values.update(_model_costs(run_dir, costs, summary.get("device", "cpu"), threads))
    return values


def _model_costs(run_dir: Path, costs: Sequence[str], device: str, threads: int) -> dict[str, float]:
    import torch

    from scaleforge.compress.convert import median_ms
    from scaleforge.runs import TRUSTED, example_inputs, open_run

    run = open_run(run_dir, TRUSTED)  # a trial this search trained
    values: dict[str, float] = {}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the share of the cores each trial trained with
    try:
        if "latency_ms" in costs:
            target = torch.device(device)
            model = copy.deepcopy(run.model).to(target)
            inputs = example_inputs(run.info, 1).to(target)
            synchronize = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)

            @torch.inference_mode()
            def forward() -> None:
                model(inputs)
                synchronize()

            values["latency_ms"] = median_ms(forward)
        if "int8_size_kib" in costs:
            values["int8_size_kib"] = _int8_size(run) / 1024
    finally:
        torch.set_num_threads(saved_threads)
    return values


def _int8_size(run: LoadedRun) -> int:
    """Bytes of the weights file `compress --method dynamic-int8` writes for the run's model."""
    from scaleforge.compress.quantize import dynamic_int8
    from scaleforge.runs import save_final

    quantized = dynamic_int8(copy.deepcopy(run.model))
    with tempfile.TemporaryDirectory() as scratch:
        final = Path(scratch) / "final"
        save_final(final, quantized.state_dict(), run.config, run.info)
        return (final / "model.safetensors").stat().st_size
