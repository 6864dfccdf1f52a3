"""Evaluation: the loss and every metric over several batches are those of the whole split at once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from scaleforge.data.base import InMemoryDataset
from scaleforge.data.loading import EvalBatches
from scaleforge.distributed.parallelize import ParallelModel
from scaleforge.training.objectives import Accuracy, CrossEntropy, Objective, Perplexity
from scaleforge.training.trainer import evaluate


@pytest.mark.parametrize("batch_size", [7, 50, 512])
def test_an_evaluation_in_uneven_batches_matches_the_whole_split_at_once(batch_size: int) -> None:
    torch.manual_seed(0)
    inputs, targets = torch.randn(101, 8), torch.randint(0, 5, (101,))
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 5))
    model.train()
    objective = Objective(loss=CrossEntropy(), metrics=[Accuracy(), Accuracy(top_k=2), Perplexity()])
    batches = EvalBatches(InMemoryDataset(inputs, targets), batch_size, torch.device("cpu"))
    for _ in range(2):  # the metrics start again at each evaluation
        result = evaluate(ParallelModel.single(model), batches, objective)
        assert model.training  # put back as it was
        with torch.no_grad():
            logits = model.eval()(inputs)
            model.train()
        loss = F.cross_entropy(logits, targets).item()
        assert result["val_loss"] == pytest.approx(loss, rel=1e-5)
        assert result["val_accuracy"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
        top2 = (logits.topk(2, dim=1).indices == targets[:, None]).any(1).float().mean().item()
        assert result["val_top2_accuracy"] == pytest.approx(top2)
        assert result["val_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
