"""The int8 layers of `dynamic-int8`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scaleforge.compress.quantize import Int8DynamicLinear, Int8DynamicLSTM, dynamic_int8, float_twin, quantized_layers
from scaleforge.models.lstm import LSTMModel
from scaleforge.models.mlp import MLP


def test_int8_linear_is_close_to_the_float_layer_and_its_state_is_plain_int8() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    quantized = Int8DynamicLinear.from_float(linear)
    x = torch.randn(32, 256)
    expected = linear(x).detach()
    error = (quantized(x) - expected).abs().max() / expected.abs().max()
    assert error < 0.02
    assert quantized.state_dict()["weight_int8"].dtype == torch.int8
    assert (quantized.dequantized_weight() - linear.weight).abs().max() <= quantized.weight_scale.max() / 2 + 1e-7


def test_an_int8_model_loads_back_exactly_from_its_state() -> None:
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden_layers=(64, 32))
    quantized = dynamic_int8(copy.deepcopy(model))
    fresh = dynamic_int8(MLP((1, 8, 8), 10, hidden_layers=(64, 32)))  # other weights, same structure
    fresh.load_state_dict(quantized.state_dict())
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(fresh(x), quantized(x))
    assert not any(isinstance(module, nn.Linear) for module in quantized.modules())


@pytest.mark.parametrize("batch_first", [True, False])
def test_int8_lstm_follows_the_float_lstm_and_stands_for_its_dequantized_twin(batch_first: bool) -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 32, num_layers=2, batch_first=batch_first).eval()
    quantized = Int8DynamicLSTM.from_float(lstm)
    x = torch.randn(5, 7, 8)
    with torch.no_grad():
        expected, (expected_h, expected_c) = lstm(x)
        output, (h, c) = quantized(x)
        twin_output, _ = quantized.dequantized()(x)
    assert output.shape == expected.shape and h.shape == expected_h.shape == (2, 7 if not batch_first else 5, 32)
    assert (output - expected).abs().max() < 0.01 and (c - expected_c).abs().max() < 0.02
    assert (output - twin_output).abs().max() < 0.005  # only the inputs' rounding apart
    start = (torch.randn_like(expected_h), torch.randn_like(expected_c))
    with torch.no_grad():
        assert (quantized(x, start)[0] - lstm(x, start)[0]).abs().max() < 0.01


def test_dynamic_int8_turns_an_lstm_model_into_int8_layers_that_load_back() -> None:
    torch.manual_seed(0)
    model = LSTMModel((8, 8), num_classes=10, hidden_size=32)
    quantized = dynamic_int8(copy.deepcopy(model))
    assert quantized_layers(quantized) == ["blocks.0.lstm", "blocks.1.lstm", "head"]
    fresh = dynamic_int8(LSTMModel((8, 8), num_classes=10, hidden_size=32))
    fresh.load_state_dict(quantized.state_dict())
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh(x), quantized(x))
    assert (float_twin(quantized)(x) - model(x)).abs().max() < 0.02
    bidirectional = nn.Sequential(nn.LSTM(8, 16, bidirectional=True))
    assert isinstance(dynamic_int8(bidirectional)[0], nn.LSTM)  # not what the int8 LSTM computes: left float
