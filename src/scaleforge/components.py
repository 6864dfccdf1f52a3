"""Components built from config sections: a factory resolved from the registry and called with checked
parameters. Light to import (no torch.distributed), so that loading a trained model for serving is quick."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from scaleforge import registry
from scaleforge.config import DATA_PROVIDED, ModelSection, signature_of
from scaleforge.errors import ConfigError, DataError

if TYPE_CHECKING:  # scaleforge.data imports this module: a name for annotations only, or neither could come first
    from scaleforge.data.base import DataInfo


def construct(factory: Callable[..., Any], key: str, **kwargs: Any) -> Any:
    """Call a component factory; a ValueError (its way of rejecting a parameter) becomes a config error naming `key`.

    Other exceptions are bugs, in scaleforge or in the component, and propagate with their traceback.
    """
    try:
        return factory(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        name = getattr(factory, "__name__", repr(factory))
        raise ConfigError(f"{key}: {name} rejected its parameters: {error}") from error


def factory_of(
    factory: Callable[..., Any] | None, component_registry: registry.Registry, name: str
) -> Callable[..., Any]:
    """The factory the config loader resolved; configs built by hand are resolved here."""
    return factory if factory is not None else component_registry.get(name)


def build_model(section: ModelSection, info: DataInfo) -> nn.Module:
    """The model the config names; it receives the dataset's fields (`num_classes`, ...) its signature names."""
    factory = factory_of(section.factory, registry.MODELS, section.architecture)
    kwargs = dict(section.params)
    signature = signature_of(factory).parameters
    for name in DATA_PROVIDED:
        provided = getattr(info, name)
        if name not in signature or provided is None:
            continue
        given = kwargs.get(name)
        if name == "vocab_size" and info.tokenizer_source is not None and isinstance(given, int) and given < provided:
            raise DataError(
                f"the tokenizer {info.tokenizer_source} has {provided} tokens, more than the model's vocabulary "
                f"(model.vocab_size={given}); leave model.vocab_size out to take the tokenizer's size"
            )
        if given is not None and _normalise(given) != _normalise(provided):
            raise ConfigError(f"model.{name}: {given} does not match the dataset, which has {name}={provided}")
        kwargs[name] = provided
    model = construct(factory, "model", **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.architecture: '{section.architecture}' built {type(model).__name__}, not nn.Module")
    return model


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value
