"""scaleforge: one config from a laptop CPU to a GPU cluster.

The public API: decorators that register a user's own components, and `load_run` for a trained model.
"""

from scaleforge.config import RunConfig, load_config
from scaleforge.registry import (
    register_callback,
    register_dataset,
    register_loss,
    register_metric,
    register_model,
    register_optimizer,
    register_scheduler,
)
from scaleforge.runs import LoadedRun, load_run

__version__ = "0.1.0"

__all__ = [
    "LoadedRun",
    "RunConfig",
    "__version__",
    "load_config",
    "load_run",
    "register_callback",
    "register_dataset",
    "register_loss",
    "register_metric",
    "register_model",
    "register_optimizer",
    "register_scheduler",
]
