"""Global magnitude pruning and the width plans of structured pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scaleforge.compress.prune import prune_structured, prune_unstructured
from scaleforge.errors import UsageError
from scaleforge.models.cnn import CNN
from scaleforge.models.mlp import MLP


def test_global_magnitude_pruning_removes_the_smallest_weights_across_layers() -> None:
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden_layers=(64, 32))
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    threshold = magnitudes.kthvalue(int(0.6 * magnitudes.numel())).values
    assert prune_unstructured(model, 0.6) == pytest.approx(0.6, abs=1e-3)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            kept = module.weight[module.weight != 0].abs()
            assert kept.numel() == 0 or kept.min() >= threshold  # ranked together, not layer by layer


def _silence(layer: nn.Linear | nn.BatchNorm2d, units: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight[units] = 0
        layer.bias[units] = 0


def test_narrowing_an_mlp_removes_the_units_that_contribute_least() -> None:
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden_layers=(16, 8), dropout_rate=0.0).eval()
    for block in model.blocks:  # half the units of every hidden layer dead: removing them changes nothing
        _silence(block.linear, torch.arange(0, block.linear.out_features, 2))
    narrowed = prune_structured(model, 0.5)
    assert narrowed.params == {"hidden_layers": [8, 4]}
    smaller = MLP((1, 8, 8), 10, hidden_layers=(8, 4), dropout_rate=0.0).eval()
    smaller.load_state_dict(narrowed.state)
    x = torch.randn(7, 1, 8, 8)
    torch.testing.assert_close(smaller(x), model(x))


def test_narrowing_a_cnn_removes_the_channels_that_contribute_least() -> None:
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 10, channels=(8, 16)).eval()
    for block in model.blocks:
        _silence(block.norm, torch.arange(1, block.norm.num_features, 2))  # BatchNorm gain and shift 0: channel off
    narrowed = prune_structured(model, 0.5)
    assert narrowed.params == {"channels": [4, 8]}
    smaller = CNN((1, 8, 8), 10, channels=(4, 8)).eval()
    smaller.load_state_dict(narrowed.state)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(smaller(x), model(x))


def test_narrowing_a_model_without_a_plan_is_refused_with_the_alternative() -> None:
    with pytest.raises(UsageError, match="no width plan.*without --structured"):
        prune_structured(nn.Sequential(nn.Linear(4, 4)), 0.5)
    with pytest.raises(UsageError, match="blocks.1 is a SpatialSelfAttention"):
        prune_structured(CNN((1, 8, 8), 10, channels=(8,), attention_heads=2), 0.5)
