"""Tests for scaleforge.training.optim (optimizers, schedules) and the objectives and early stopping they serve."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from scaleforge.config import ComponentSpec, load_config
from scaleforge.errors import ConfigError
from scaleforge.registry import OPTIMIZERS, SCHEDULERS
from scaleforge.training.callbacks import EarlyStopping, RunState
from scaleforge.training.objectives import Accuracy, CrossEntropy, Perplexity
from scaleforge.training.trainer import build_optimizer, build_scheduler

BASE_LR = 0.1


# ------------------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_builds_and_steps(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    training = load_config(None, [f"training.optimizer={name}", "training.learning_rate=0.01"]).training
    optimizer = build_optimizer(training, model)
    assert optimizer.param_groups[0]["lr"] == 0.01
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    for old, new in zip(before, model.parameters(), strict=True):
        assert not torch.equal(old, new)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_weight_decay_reaches_the_optimizer(name: str) -> None:
    training = load_config(None, [f"training.optimizer={name}", "training.weight_decay=0.05"]).training
    assert build_optimizer(training, nn.Linear(2, 2)).param_groups[0]["weight_decay"] == 0.05


def test_optimizer_options_reach_the_optimizer() -> None:
    training = load_config(None, ["training.optimizer={name: sgd, momentum: 0.5, nesterov: true}"]).training
    group = build_optimizer(training, nn.Linear(2, 2)).param_groups[0]
    assert group["momentum"] == 0.5
    assert group["nesterov"] is True


# ------------------------------------------------------------------------------------------- schedulers


def _learning_rates(spec: ComponentSpec, *, total_steps: int, steps_per_epoch: int = 1) -> list[float]:
    """The learning rate used at steps 0..total_steps (one more than the run, to see where it ends)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = build_scheduler(spec, optimizer, total_steps, steps_per_epoch)
    rates = []
    for _ in range(total_steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler_builds_from_its_defaults(name: str) -> None:
    spec = load_config(None, [f"training.scheduler={name}"]).training.scheduler
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = build_scheduler(spec, optimizer, total_steps=20, steps_per_epoch=4)
    if scheduler is not None:
        optimizer.step()
        scheduler.step()
        assert 0 <= optimizer.param_groups[0]["lr"] <= BASE_LR


def test_none_scheduler_is_none() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    assert build_scheduler(ComponentSpec("none"), optimizer, total_steps=10, steps_per_epoch=2) is None
    assert optimizer.param_groups[0]["lr"] == BASE_LR


def test_step_multiplies_by_gamma_every_step_size_epochs() -> None:
    spec = ComponentSpec("step", {"step_size": 2, "gamma": 0.5})
    rates = _learning_rates(spec, total_steps=25, steps_per_epoch=5)  # decays after 2 * 5 = 10 steps
    assert rates[:10] == pytest.approx([BASE_LR] * 10, rel=1e-12)
    assert rates[10:20] == pytest.approx([BASE_LR * 0.5] * 10, rel=1e-12)
    assert rates[20:] == pytest.approx([BASE_LR * 0.25] * 6, rel=1e-12)


def test_cosine_decays_to_min_lr_ratio() -> None:
    rates = _learning_rates(ComponentSpec("cosine", {"min_lr_ratio": 0.1}), total_steps=50)
    assert rates[0] == BASE_LR
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates, rates[1:], strict=False))
    assert rates[25] == pytest.approx(BASE_LR * 0.55, rel=1e-6)  # half-way: the mean of the two ends
    assert rates[50] == pytest.approx(BASE_LR * 0.1, rel=1e-6)


def test_warmup_cosine_rises_then_decays() -> None:
    spec = ComponentSpec("warmup_cosine", {"warmup_steps": 10, "min_lr_ratio": 0.0})
    rates = _learning_rates(spec, total_steps=100)
    warmup, decay = rates[:11], rates[10:]
    assert all(later > earlier for earlier, later in zip(warmup, warmup[1:], strict=False))
    assert rates[0] == pytest.approx(BASE_LR / 11)
    assert max(rates) == pytest.approx(BASE_LR)
    assert rates[10] == pytest.approx(BASE_LR)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(decay, decay[1:], strict=False))
    assert rates[55] == pytest.approx(BASE_LR / 2)
    assert rates[100] == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_default_warmup_is_a_fraction_of_the_run() -> None:
    rates = _learning_rates(ComponentSpec("warmup_cosine", {"warmup_fraction": 0.1}), total_steps=50)
    assert rates.index(max(rates)) == 5


# ------------------------------------------------------------------------------------------- objectives


def test_accuracy_counts_correct_predictions() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.7, 0.2],  # predicts 1, second choice 2
            [0.8, 0.15, 0.05],  # predicts 0, second choice 1
            [0.2, 0.3, 0.5],  # predicts 2, second choice 1
            [0.5, 0.0, 0.4],  # predicts 0, second choice 2
        ]
    )
    targets = torch.tensor([1, 0, 0, 2])
    top1, top2 = Accuracy(), Accuracy(top_k=2)
    for metric in (top1, top2):
        metric.update(logits, targets, loss_sum=torch.tensor(0.0))
    assert top1.compute() == {"accuracy": 0.5}
    assert top2.compute() == {"top2_accuracy": 0.75}

    top1.update(logits[:2], targets[:2], loss_sum=torch.tensor(0.0))
    assert top1.compute() == {"accuracy": pytest.approx(4 / 6)}
    top1.reset()
    assert top1.compute() == {"accuracy": 0.0}


def test_accuracy_flattens_sequence_outputs() -> None:
    logits = torch.zeros(2, 3, 5)  # (B, T, V)
    logits[..., 4] = 1.0
    targets = torch.tensor([[4, 4, 0], [4, 1, 4]])
    metric = Accuracy()
    metric.update(logits, targets, loss_sum=torch.tensor(0.0))
    assert metric.compute() == {"accuracy": pytest.approx(4 / 6)}


def test_perplexity_is_exp_of_mean_token_loss() -> None:
    metric = Perplexity()
    metric.update(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), loss_sum=torch.tensor(4 * math.log(3.0)))
    assert metric.compute()["perplexity"] == pytest.approx(3.0)


def test_cross_entropy_flattens_sequence_logits() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    expected = nn.functional.cross_entropy(logits.reshape(6, 5), targets.reshape(6))
    assert torch.allclose(CrossEntropy()(logits, targets), expected)


def test_cross_entropy_on_class_logits_with_label_smoothing() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 5), torch.randint(0, 5, (4,))
    expected = nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    assert torch.allclose(CrossEntropy(label_smoothing=0.1)(logits, targets), expected)
    assert not torch.allclose(CrossEntropy()(logits, targets), expected)


# ----------------------------------------------------------------------------------------- early stopping


def _state(tmp_path: Path) -> RunState:
    return RunState(run_dir=tmp_path, total_steps=100, steps_per_epoch=10, global_batch_size=8)


def test_early_stopping_waits_patience_evaluations_without_improvement(tmp_path: Path) -> None:
    state = _state(tmp_path)
    callback = EarlyStopping(patience=2)
    for loss, should_stop in [(1.0, False), (0.8, False), (0.9, False), (0.7, False), (0.7, False), (0.75, True)]:
        callback.on_eval(state, {"val_loss": loss})
        assert state.should_stop is should_stop, loss


def test_early_stopping_max_mode_and_min_delta(tmp_path: Path) -> None:
    state = _state(tmp_path)
    callback = EarlyStopping(monitor="val_accuracy", patience=2, mode="max", min_delta=0.05)
    for accuracy, should_stop in [(0.5, False), (0.6, False), (0.62, False), (0.64, True)]:
        callback.on_eval(state, {"val_loss": 1.0, "val_accuracy": accuracy})
        assert state.should_stop is should_stop, accuracy


def test_early_stopping_unknown_monitor_lists_metrics(tmp_path: Path) -> None:
    callback = EarlyStopping(monitor="val_acc")
    with pytest.raises(
        ConfigError, match="monitors 'val_acc', which is not an evaluation metric; available: val_loss, val_accuracy"
    ):
        callback.on_eval(_state(tmp_path), {"step": 3, "val_loss": 1.0, "val_accuracy": 0.5})


def test_early_stopping_patience_must_be_positive() -> None:
    with pytest.raises(ValueError, match="patience must be at least 1, got 0"):
        EarlyStopping(patience=0)
