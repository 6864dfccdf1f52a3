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
from scaleforge.models import gpt as gpt_module
from scaleforge.models.gpt import GPT
from scaleforge.models.lstm import LSTMModel
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


def test_gpt_decoding_through_its_cache_gives_the_logits_of_the_whole_sequence() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, seq_len=24, n_layers=2, n_heads=4, d_model=32).eval()
    tokens = torch.randint(0, 64, (3, 20))
    with torch.no_grad():
        whole = model(tokens)
        cache = model.new_cache(slots=3)
        prefill = model.decode(tokens[:, :12], cache)
        steps = [model.decode(tokens[:, index : index + 1], cache) for index in range(12, 20)]
    assert torch.allclose(torch.cat([prefill, *steps], dim=1), whole, atol=1e-5)
    assert cache.lengths.tolist() == [20, 20, 20]


def test_one_gpt_cache_holds_sequences_at_different_positions_in_any_slots() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, seq_len=24, n_layers=2, n_heads=4, d_model=32).eval()
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        whole = model(tokens)
        cache = model.new_cache(slots=4)
        model.decode(tokens[0:1, :5], cache, slots=torch.tensor([2]))  # prompts of 5 and 9 tokens, prefilled apart
        model.decode(tokens[1:2, :9], cache, slots=torch.tensor([0]))
        batch = torch.stack([tokens[0, 5:6], tokens[1, 9:10]])  # then one step for both, as one batch
        stepped = model.decode(batch, cache, slots=torch.tensor([2, 0]))
        assert cache.lengths.tolist() == [10, 0, 6, 0]
        cache.reset(torch.tensor([2]))
        assert torch.allclose(model.decode(tokens[0:1, :3], cache, slots=torch.tensor([2])), whole[0:1, :3], atol=1e-5)
        with pytest.raises(ValueError, match="holds 24 positions"):
            model.decode(torch.zeros(2, 15, dtype=torch.long), cache, slots=torch.tensor([0, 1]))  # slot 0: 10 + 15
    assert torch.allclose(stepped[:, 0], torch.stack([whole[0, 5], whole[1, 9]]), atol=1e-5)


def test_the_first_slots_decode_through_the_caches_views_at_different_positions() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, seq_len=24, n_layers=2, n_heads=4, d_model=32).eval()
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        whole = model(tokens)
        cache = model.new_cache(slots=2)
        model.decode(tokens[0:1, :5], cache, slots=torch.tensor([0]))
        model.decode(tokens[1:2, :9], cache, slots=torch.tensor([1]))
        stepped = model.decode(torch.stack([tokens[0, 5:6], tokens[1, 9:10]]), cache)  # slots 0, 1: a slice
        again = model.decode(torch.stack([tokens[0, 6:7], tokens[1, 10:11]]), cache)
    assert cache.lengths.tolist() == [7, 11]
    assert torch.allclose(stepped[:, 0], torch.stack([whole[0, 5], whole[1, 9]]), atol=1e-5)
    assert torch.allclose(again[:, 0], torch.stack([whole[0, 6], whole[1, 10]]), atol=1e-5)


def test_long_and_short_sequences_in_a_run_of_slots_read_apart_as_far_as_each_needs() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, seq_len=24, n_layers=2, n_heads=4, d_model=32).eval()
    tokens = torch.randint(0, 64, (4, 22))
    lengths = [20, 18, 3, 2]  # the longer first, as the engine keeps them
    with torch.no_grad():
        whole = model(tokens)
        cache = model.new_cache(slots=4)
        for slot, length in enumerate(lengths):
            model.decode(tokens[slot : slot + 1, :length], cache, slots=torch.tensor([slot]))
        positions = cache.positions(slice(0, 4), 1)
        reads = gpt_module._reads(slice(0, 4), positions, 21, torch.ones(4, 1, 1, 21, dtype=torch.bool))
        stepped = model.decode(
            torch.stack([tokens[slot, length : length + 1] for slot, length in enumerate(lengths)]), cache
        )
    assert [(read.rows, read.slots, read.span) for read in reads] == [
        (slice(0, 2), slice(0, 2), 21),
        (slice(2, 4), slice(2, 4), 4),
    ]
    assert torch.allclose(
        stepped[:, 0], torch.stack([whole[slot, length] for slot, length in enumerate(lengths)]), atol=1e-5
    )
    alike = cache.positions(slice(0, 2), 1)  # lengths 21 and 19: one read is as good
    assert len(gpt_module._reads(slice(0, 2), alike, 22, torch.ones(2, 1, 1, 22, dtype=torch.bool))) == 1


def test_a_gpt_carrying_its_keys_and_values_as_tensors_gives_the_logits_of_the_whole_sequence() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, seq_len=24, n_layers=2, n_heads=4, d_model=32).eval()
    tokens = torch.randint(0, 64, (3, 20))
    with torch.no_grad():
        whole = model(tokens)
        logits, keys, values = model.forward_with_past(tokens[:, :10])  # a prompt
        pieces = [logits]
        logits, keys, values = model.forward_with_past(tokens[:, 10:13], keys, values)  # several more at once
        pieces.append(logits)
        for index in range(13, 20):  # then one at a time
            logits, keys, values = model.forward_with_past(tokens[:, index : index + 1], keys, values)
            pieces.append(logits)
    assert keys.shape == values.shape == (2, 3, 4, 20, 8)  # layers, batch, heads, positions, head_dim
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-5)


def test_an_lstm_language_model_carries_its_state_between_steps() -> None:
    torch.manual_seed(0)
    model = LSTMModel(input_shape=(16,), vocab_size=64, embedding_dim=8, hidden_size=16).eval()
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        first, state = model.step(tokens[:, :6])
        rest, _ = model.step(tokens[:, 6:], state)
        assert torch.allclose(torch.cat([first, rest], dim=1), model(tokens), atol=1e-6)
    with pytest.raises(ValueError, match="only an lstm language model"):
        LSTMModel(input_shape=(8, 8), num_classes=10).step(tokens)
