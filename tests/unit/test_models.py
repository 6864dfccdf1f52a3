"""Tests for the model zoo, parametrised over every registered model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from scaleforge.config import ModelSection, load_config, signature_of
from scaleforge.data.base import DataInfo
from scaleforge.distributed.tensor_parallel import STYLES, planned_architectures
from scaleforge.errors import ConfigError
from scaleforge.registry import MODELS
from scaleforge.training.trainer import build_model

INFO = DataInfo(task="classification", input_shape=(1, 8, 8), num_classes=10)
TOKENS = DataInfo(task="language_modeling", input_shape=(16,), vocab_size=256, seq_len=16)


def _section(name: str) -> ModelSection:
    """The model's section with every constructor default bound, as the config loader resolves it."""
    return load_config(None, [f"model.architecture={name}"]).model


def _is_classifier(name: str) -> bool:
    return "num_classes" in signature_of(MODELS.get(name)).parameters


def _batch(info: DataInfo, size: int) -> torch.Tensor:
    if info.vocab_size is not None:
        return torch.randint(0, info.vocab_size, (size, *info.input_shape))
    return torch.rand(size, *info.input_shape)


@pytest.fixture(params=MODELS.names())
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def info(name: str) -> DataInfo:
    """Digits-shaped images for classifiers, byte tokens for language models."""
    return INFO if _is_classifier(name) else TOKENS


def _expected_shape(info: DataInfo, size: int) -> tuple[int, ...]:
    return (size, 10) if info is INFO else (size, 16, 256)


def test_forward_gives_the_expected_logits(name: str, info: DataInfo) -> None:
    torch.manual_seed(0)
    model = build_model(_section(name), info)
    model.eval()
    with torch.no_grad():
        logits = model(_batch(info, 4))
    assert logits.shape == _expected_shape(info, 4)
    assert torch.isfinite(logits).all()


def test_backward_reaches_every_parameter(name: str, info: DataInfo) -> None:
    torch.manual_seed(0)
    model = build_model(_section(name), info)
    model(_batch(info, 4)).logsumexp(dim=-1).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name


def test_model_exposes_its_blocks(name: str, info: DataInfo) -> None:
    model = build_model(_section(name), info)
    assert isinstance(model.blocks, nn.ModuleList)
    assert len(model.blocks) >= 1
    block_parameters = {id(p) for p in model.blocks.parameters()}
    assert block_parameters, "the blocks hold no parameters"
    assert block_parameters <= {id(p) for p in model.parameters()}


@pytest.mark.parametrize("planned", planned_architectures())
def test_a_tensor_parallel_plan_names_linear_layers_by_known_styles(planned: str) -> None:
    info = INFO if _is_classifier(planned) else TOKENS
    model = build_model(_section(planned), info)
    plan = model.tp_plan(range(len(model.blocks)))
    assert plan
    for layer, style in plan.items():
        assert isinstance(model.get_submodule(layer), nn.Linear), layer
        assert style in STYLES, (layer, style)


def test_num_classes_that_disagrees_with_the_dataset_raises(name: str) -> None:
    if not _is_classifier(name):
        pytest.skip("a language model takes no num_classes")
    section = _section(name)
    wrong = dataclasses.replace(section, params={**section.params, "num_classes": 5})
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(wrong, INFO)


def test_num_classes_that_agrees_with_the_dataset_is_accepted(name: str) -> None:
    if not _is_classifier(name):
        pytest.skip("a language model takes no num_classes")
    section = _section(name)
    agreeing = dataclasses.replace(section, params={**section.params, "num_classes": 10})
    assert build_model(agreeing, INFO)(torch.rand(2, *INFO.input_shape)).shape == (2, 10)


def test_lstm_is_a_language_model_on_tokens() -> None:
    model = build_model(_section("lstm"), TOKENS)
    assert model(_batch(TOKENS, 3)).shape == (3, 16, 256)


def test_gpt_ties_its_head_to_the_embedding_and_is_causal() -> None:
    torch.manual_seed(0)
    model = build_model(_section("gpt"), TOKENS).eval()
    assert model.head.proj.weight is model.embed.token.weight
    tokens = _batch(TOKENS, 1)
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0, :10], model(changed)[0, :10])  # the future does not leak
        assert not torch.allclose(model(tokens)[0, 10:], model(changed)[0, 10:])


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


def test_mlp_tensor_parallel_plan_pairs_the_blocks_it_is_given() -> None:
    section = load_config(None, ["model.hidden_layers=[64,32,16]"]).model
    model = build_model(section, INFO)
    assert model.tp_plan(range(3)) == {
        "blocks.0.linear": "colwise",
        "blocks.1.linear": "rowwise",
        "blocks.2.linear": "colwise_rep",  # unpaired: gathered for the head
    }
    assert model.tp_plan([1, 2]) == {"blocks.1.linear": "colwise", "blocks.2.linear": "rowwise"}  # a pipeline stage
