"""Cutting a model into pipeline stages, without processes: balance, explicit cuts, tied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scaleforge.distributed.pipeline_parallel import (
    StageTie,
    balanced_starts,
    check_pipelinable,
    keep_stage,
    stage_bounds,
    stage_ties,
    stage_view,
)
from scaleforge.errors import ConfigError
from scaleforge.models.gpt import GPT
from scaleforge.models.lstm import LSTMModel
from scaleforge.models.mlp import MLP


@pytest.mark.parametrize(
    ("weights", "parts", "starts"),
    [
        ([1, 1, 1, 1], 2, [2]),
        ([10, 1, 1, 1, 1], 2, [1]),  # a heavy first block is a stage by itself
        ([1, 1, 1, 10], 2, [3]),
        ([3, 3, 3, 3, 3, 3], 3, [2, 4]),
        ([5, 1, 1, 1, 1, 1, 5], 3, [1, 6]),
        ([1, 2], 2, [1]),
    ],
)
def test_balanced_starts_minimise_the_heaviest_stage(weights: list[int], parts: int, starts: list[int]) -> None:
    assert balanced_starts(weights, parts) == starts


def test_balanced_starts_are_optimal_against_every_cut() -> None:
    import itertools

    weights = [4, 9, 2, 7, 7, 1, 3, 8]
    starts = balanced_starts(weights, 3)

    def heaviest(cuts: tuple[int, ...]) -> int:
        edges = [0, *cuts, len(weights)]
        return max(sum(weights[a:b]) for a, b in zip(edges, edges[1:], strict=False))

    best = min(heaviest(cuts) for cuts in itertools.combinations(range(1, len(weights)), 2))
    assert heaviest(tuple(starts)) == best


def gpt(n_layers: int = 4, tie: bool = False) -> GPT:
    return GPT(vocab_size=32, seq_len=8, n_layers=n_layers, n_heads=2, d_model=16, tie_embeddings=tie)


def test_stage_bounds_follow_parallel_stages_or_balance() -> None:
    model = gpt()
    assert stage_bounds(model, 2, [1]) == [range(0, 1), range(1, 4)]
    assert stage_bounds(model, 4, None) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    with pytest.raises(ConfigError, match="parallel.pp: 5 pipeline stages need at least 5 blocks; the model has 4"):
        stage_bounds(model, 5, None)
    with pytest.raises(ConfigError, match="parallel.stages: 3 stages need 2 start indices"):
        stage_bounds(model, 3, [2])
    with pytest.raises(ConfigError, match="parallel.stages: 4 is past the model's last block"):
        stage_bounds(model, 2, [4])


def test_stages_together_compute_the_whole_model_under_its_own_names() -> None:
    torch.manual_seed(0)
    whole = gpt()
    tokens = torch.randint(0, 32, (3, 8))
    expected = whole(tokens)
    bounds = stage_bounds(whole, 2, [3])
    stages = []
    for index in range(2):
        stage = gpt()
        stage.load_state_dict(whole.state_dict())
        keep_stage(stage, bounds, index)
        stages.append(stage)
    hidden = stages[0](tokens)  # the first stage embeds and runs blocks 0-2
    assert hidden.shape == (3, 8, 16)
    assert torch.allclose(stages[1](hidden), expected)
    names = set(stages[0].state_dict()) | set(stages[1].state_dict())
    assert names == set(whole.state_dict()) and not set(stages[0].state_dict()) & set(stages[1].state_dict())


def test_a_weight_tied_across_stages_is_found_with_the_stages_holding_it() -> None:
    assert stage_ties(gpt(tie=True), [range(0, 2), range(2, 4)]) == [
        StageTie(("embed.token.weight", "head.proj.weight"), (0, 1))
    ]
    assert stage_ties(gpt(tie=True), [range(0, 4)]) == []  # one stage holds both ends
    assert stage_ties(gpt(tie=False), [range(0, 2), range(2, 4)]) == []


def test_only_embed_blocks_head_models_can_be_pipelined() -> None:
    check_pipelinable(MLP(input_shape=(4,), num_classes=3), "mlp")
    with pytest.raises(ConfigError, match="model 'lstm' cannot be pipelined: it needs submodules embed, blocks"):
        check_pipelinable(LSTMModel(input_shape=(8,), vocab_size=16), "lstm")


def test_parameter_free_placeholders_stand_in_for_other_stages() -> None:
    model = MLP(input_shape=(4,), num_classes=3, hidden_layers=(8, 8, 8))
    keep_stage(model, [range(0, 2), range(2, 3)], 1)
    assert isinstance(model.embed, nn.Identity) and isinstance(model.blocks[0], nn.Identity)
    assert not isinstance(model.head, nn.Identity) and not isinstance(model.blocks[2], nn.Identity)


def test_a_stage_view_leaves_the_model_whole() -> None:
    model = MLP(input_shape=(4,), num_classes=3, hidden_layers=(8, 8, 8))
    view = stage_view(model, [range(0, 1), range(1, 3)], 1)
    assert isinstance(view.embed, nn.Identity) and isinstance(view.blocks[0], nn.Identity)
    assert view.blocks[1] is model.blocks[1] and view.head is model.head  # weights shared, not copied
    assert not any(isinstance(module, nn.Identity) for module in [model.embed, *model.blocks, model.head])
