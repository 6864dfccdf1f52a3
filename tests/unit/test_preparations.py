"""Tests for scaleforge.training.preparations: the hooks a training field turns on, found through the registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from scaleforge import registry
from scaleforge.config import TrainingSection
from scaleforge.data.base import DataInfo
from scaleforge.distributed.parallel_dims import ParallelDims
from scaleforge.training.preparations import PreparationContext, prepare_model, prepare_optimizer, switched_on


@dataclass(frozen=True)
class UserSection:
    """A section with fields of its own, as a user's hooks would be keyed."""

    scale_by: float | None = None
    frozen_bias: bool = False
    label: str = "unrelated"  # a field no hook is registered under


@pytest.fixture
def user_hooks() -> Iterator[list[tuple[str, Any]]]:
    """A model preparation (`scale_by`) and an optimizer preparation (`frozen_bias`) registered as a user would;
    yields the calls they received."""
    calls: list[tuple[str, Any]] = []

    @registry.register_preparation("scale_by")
    def scale_by(model: nn.Module, factor: float, context: PreparationContext) -> nn.Module:
        calls.append(("scale_by", (factor, context.info.num_classes)))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(factor)
        return nn.Sequential(model)

    @registry.register_optimizer_preparation("frozen_bias")
    def frozen_bias(module: nn.Module, optimizer: torch.optim.Optimizer, enabled: bool) -> None:
        calls.append(("frozen_bias", (type(module).__name__, type(optimizer).__name__, enabled)))

    yield calls
    registry.PREPARATIONS._entries.pop("scale_by")
    registry.OPTIMIZER_PREPARATIONS._entries.pop("frozen_bias")


def _context() -> PreparationContext:
    return PreparationContext(
        DataInfo(task="classification", input_shape=(4,), num_classes=3), ParallelDims("single", 1, 1, 1)
    )


def test_a_hook_registered_by_a_user_runs_when_its_field_is_set(user_hooks: list[tuple[str, Any]]) -> None:
    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    prepared = prepare_model(model, UserSection(scale_by=2.0), _context())
    assert isinstance(prepared, nn.Sequential) and prepared[0] is model  # the hook's model is the one trained
    assert torch.equal(model.weight, before * 2)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    prepare_optimizer(prepared, optimizer, UserSection(frozen_bias=True))
    assert user_hooks == [("scale_by", (2.0, 3)), ("frozen_bias", ("Sequential", "SGD", True))]


def test_a_hook_whose_field_is_unset_or_false_does_not_run(user_hooks: list[tuple[str, Any]]) -> None:
    model = nn.Linear(4, 3)
    assert prepare_model(model, UserSection(), _context()) is model
    prepare_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), UserSection())
    assert user_hooks == []


def test_hooks_are_found_in_the_order_of_the_fields(user_hooks: list[tuple[str, Any]]) -> None:
    found = switched_on(UserSection(scale_by=0.5, frozen_bias=True), registry.PREPARATIONS)
    assert [(hook.__name__, value) for hook, value in found] == [("scale_by", 0.5)]  # frozen_bias is the other kind
    assert [value for _, value in switched_on(UserSection(scale_by=0.0), registry.PREPARATIONS)] == [0.0]


def test_the_built_in_hooks_are_keyed_by_training_fields() -> None:
    fields = {field.name for field in dataclasses.fields(TrainingSection)}
    assert {"init_from", "quantization_aware"} <= set(registry.PREPARATIONS.names()) <= fields
    assert {"keep_zeros"} <= set(registry.OPTIMIZER_PREPARATIONS.names()) <= fields
    assert registry.PREPARATIONS.get("quantization_aware").__module__ == "scaleforge.compress.quantize"


def test_a_duplicate_hook_for_a_field_is_refused() -> None:
    def another(model: nn.Module, source: str, context: PreparationContext) -> nn.Module:
        return model

    with pytest.raises(ValueError, match="model preparation 'init_from' is already registered"):
        registry.register_preparation("init_from")(another)


def test_the_weights_a_run_starts_from_are_loaded_before_the_model_is_prepared_for_int8() -> None:
    """`init_from` fills the float model, which `quantization_aware` then exports: the order of the fields is the
    order the hooks run in."""
    names = [field.name for field in dataclasses.fields(TrainingSection)]
    assert names.index("init_from") < names.index("quantization_aware")
    registry.load_components()
    assert "init_from" in registry.PREPARATIONS and "quantization_aware" in registry.PREPARATIONS
