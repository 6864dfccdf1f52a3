"""Tests for the model zoo, parametrised over every registered model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from scaleforge.config import ModelSection, load_config
from scaleforge.data.base import DataInfo
from scaleforge.errors import ConfigError
from scaleforge.registry import MODELS
from scaleforge.train.trainer import build_model

INFO = DataInfo(task="classification", input_shape=(1, 8, 8), num_classes=10)


def _section(name: str) -> ModelSection:
    """The model's section with every constructor default bound, as the config loader resolves it."""
    return load_config(None, [f"model.architecture={name}"]).model


@pytest.fixture(params=MODELS.names())
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_forward_gives_one_logit_per_class(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(_section(name), INFO)
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(4, *INFO.input_shape))
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()


def test_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(_section(name), INFO)
    model(torch.rand(4, *INFO.input_shape)).logsumexp(dim=1).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name


def test_model_exposes_its_blocks(name: str) -> None:
    model = build_model(_section(name), INFO)
    assert isinstance(model.blocks, nn.ModuleList)
    assert len(model.blocks) >= 1
    block_parameters = {id(p) for p in model.blocks.parameters()}
    assert block_parameters, "the blocks hold no parameters"
    assert block_parameters <= {id(p) for p in model.parameters()}


def test_num_classes_that_disagrees_with_the_dataset_raises(name: str) -> None:
    section = _section(name)
    wrong = dataclasses.replace(section, params={**section.params, "num_classes": 5})
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(wrong, INFO)


def test_num_classes_that_agrees_with_the_dataset_is_accepted(name: str) -> None:
    section = _section(name)
    agreeing = dataclasses.replace(section, params={**section.params, "num_classes": 10})
    assert build_model(agreeing, INFO)(torch.rand(2, *INFO.input_shape)).shape == (2, 10)


def test_mlp_hidden_layers_become_blocks() -> None:
    section = load_config(None, ["model.hidden_layers=[64,32]", "model.dropout_rate=0.0"]).model
    model = build_model(section, INFO)
    assert [block.linear.out_features for block in model.blocks] == [64, 32]
    assert model.blocks[0].linear.in_features == 64  # 1 * 8 * 8 pixels
    assert model.head.out_features == 10


def test_mlp_rejected_value_becomes_config_error() -> None:
    section = load_config(None, ["model.dropout_rate=1.5"]).model
    with pytest.raises(ConfigError, match="model: MLP rejected its parameters: dropout_rate must be in"):
        build_model(section, INFO)
