"""Registries of named components, and the three ways a user's own component gets in.

A registry is a plain dict behind a decorator. Names are resolved once, at the user boundary (the config
loader); the rest of the package passes objects. A name may also be a `"module:Attr"` path, and installed
packages may add components through the `scaleforge.plugins` entry-point group.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from scaleforge.errors import ConfigError, did_you_mean, one_of

T = TypeVar("T", bound=Callable[..., Any])

PLUGIN_GROUP = "scaleforge.plugins"

# Modules whose import registers the built-in components.
_BUILTIN_MODULES = (
    "scaleforge.models",
    "scaleforge.data",
    "scaleforge.training.optim",
    "scaleforge.training.objectives",
    "scaleforge.training.callbacks",
    "scaleforge.training.preparations",
    "scaleforge.compress.distill",
    "scaleforge.compress.quantize",
)
_loaded = False
# Set while a file that may not run code is read (a run directory from elsewhere): what it came from, and how the
# user says they trust it.
_untrusted: ContextVar[tuple[str, str] | None] = ContextVar("scaleforge_untrusted", default=None)


@contextlib.contextmanager
def untrusted(source: str, trust_flag: str) -> Iterator[None]:
    """Within this block, names resolve only to registered components (scaleforge's and installed plugins'):
    importing a module and a `module:Attr` path are refused as code from `source`, naming `trust_flag`."""
    token = _untrusted.set((source, trust_flag))
    try:
        yield
    finally:
        _untrusted.reset(token)


def _refuse_code(what: str, key: str) -> None:
    refusal = _untrusted.get()
    if refusal is not None:
        source, trust_flag = refusal
        where = f"{key}: " if key else ""
        raise ConfigError(f"{where}{source} names code to run ({what}), which is not run unless trusted: {trust_flag}")


class Registry:
    """A named collection of component factories (classes or functions)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | T | None = None) -> Callable[[T], T] | T:
        """Decorator that registers a class or function under `name` (default: its own name, lower-cased).

        Works with and without arguments: `@register_model("tiny")`, `@register_model()`, `@register_model`.
        """
        if callable(name):
            decorate: Callable[[T], T] = self.register(None)  # type: ignore[assignment]
            return decorate(name)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"a {self.kind} name must be a string, got {name!r}")

        def decorator(obj: T) -> T:
            key = name or obj.__name__.lower()
            existing = self._entries.get(key)
            # The same definition imported again (a reloaded module, a notebook cell run twice) replaces itself.
            if existing is not None and _qualname(existing) != _qualname(obj):
                raise ValueError(f"{self.kind} '{key}' is already registered by {_qualname(self._entries[key])}")
            self._entries[key] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        """The registered names, sorted."""
        load_components()
        return sorted(self._entries)

    def get(self, name: str, *, key: str = "") -> Callable[..., Any]:
        """Resolve a registered name or a `module:Attr` path; `key` is the config key named in errors."""
        load_components()
        where = f"{key}: " if key else ""
        if ":" in name:
            return import_attr(name, key=key)
        if name not in self._entries:
            raise ConfigError(
                f"{where}unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"{one_of(self._entries)}, or a 'module:Attr' path"
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        load_components()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def import_attr(path: str, *, key: str = "") -> Callable[..., Any]:
    """Import `module:Attr` (Attr may be dotted) and return the attribute."""
    where = f"{key}: " if key else ""
    _refuse_code(f"'{path}'", key)
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"{where}'{path}' is not a 'module:Attr' path")
    module = import_module(module_name, key=key)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}'{path}' is not a class or function")
    found: Callable[..., Any] = obj
    return found


def import_module(name: str, *, key: str = "") -> Any:
    """Import a user module (from the working directory too), turning any failure into a config error naming it."""
    where = f"{key}: " if key else ""
    _refuse_code(f"import '{name}'", key)
    if "" not in sys.path:  # console scripts leave the working directory off the path; `python -m` puts it on
        sys.path.insert(0, "")
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ConfigError(f"{where}cannot import '{name}': {error}") from error
    except Exception as error:  # the user's module failed while running (a SyntaxError, a duplicate name, ...)
        raise ConfigError(f"{where}importing '{name}' failed: {type(error).__name__}: {error}") from error


def load_components() -> None:
    """Import the built-in components and the installed plugins (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry_point.load()
        except Exception as error:  # a broken plugin must name itself, not surface as an unrelated failure
            raise ConfigError(f"plugin '{entry_point.name}' ({entry_point.value}) failed to load: {error}") from error


MODELS = Registry("model")
DATASETS = Registry("dataset")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
LOSSES = Registry("loss")
METRICS = Registry("metric")
CALLBACKS = Registry("callback")
# Per-sample data augmentations, named in a dataset's list parameter (`data.augment: [random_crop, hflip]`).
TRANSFORMS = Registry("transform")
# How a compressed run's `final/model.safetensors` loads, by the format its `compression.json` names: a function
# (freshly built float model, weights file, DataInfo) -> the model holding those weights.
FORMATS = Registry("compressed format")
# Hooks a training field turns on, registered under the field's name (`training.init_from`, ...): a model
# preparation takes (model, the field's value, a `PreparationContext`) before parallelization and returns the model
# to train; an optimizer preparation takes (parallelized module, optimizer, the field's value) once the optimizer is
# built. The trainer applies them in the order of the fields, without naming the packages that provide them.
PREPARATIONS = Registry("model preparation")
OPTIMIZER_PREPARATIONS = Registry("optimizer preparation")

REGISTRIES: dict[str, Registry] = {
    "models": MODELS,
    "datasets": DATASETS,
    "optimizers": OPTIMIZERS,
    "schedulers": SCHEDULERS,
    "losses": LOSSES,
    "metrics": METRICS,
    "callbacks": CALLBACKS,
    "transforms": TRANSFORMS,
}

register_model = MODELS.register
register_dataset = DATASETS.register
register_optimizer = OPTIMIZERS.register
register_scheduler = SCHEDULERS.register
register_loss = LOSSES.register
register_metric = METRICS.register
register_callback = CALLBACKS.register
register_transform = TRANSFORMS.register
register_preparation = PREPARATIONS.register
register_optimizer_preparation = OPTIMIZER_PREPARATIONS.register
