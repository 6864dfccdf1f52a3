"""scaleforge: one config from a laptop CPU to a GPU cluster.

The public API: `fit` trains the run a config describes and returns it, `load_run` reopens a finished run's model,
`evaluate` measures one on its validation split, `generate` continues a prompt with a trained language model;
decorators register a user's own components. See docs/python-api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaleforge.config import RunConfig, load_config
from scaleforge.registry import (
    register_callback,
    register_dataset,
    register_loss,
    register_metric,
    register_model,
    register_optimizer,
    register_scheduler,
    register_transform,
)

if TYPE_CHECKING:
    from scaleforge.api import Run, evaluate, fit
    from scaleforge.generation.language_model import generate, generate_stream
    from scaleforge.runs import LoadedRun, load_run

__version__ = "0.1.0"

__all__ = [
    "LoadedRun",
    "Run",
    "RunConfig",
    "__version__",
    "evaluate",
    "fit",
    "generate",
    "generate_stream",
    "load_config",
    "load_run",
    "register_callback",
    "register_dataset",
    "register_loss",
    "register_metric",
    "register_model",
    "register_optimizer",
    "register_scheduler",
    "register_transform",
]

# imported on first use: torch and the trainer's imports would slow every command's start (`scaleforge --help`)
_LAZY = {
    "Run": "api",
    "evaluate": "api",
    "fit": "api",
    "LoadedRun": "runs",
    "load_run": "runs",
    "generate": "generation.language_model",
    "generate_stream": "generation.language_model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"scaleforge.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'scaleforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
