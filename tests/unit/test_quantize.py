"""The int8 layer of `dynamic-int8`."""

from __future__ import annotations

import copy

import torch
from torch import nn

from scaleforge.compress.quantize import Int8DynamicLinear, dynamic_int8
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
