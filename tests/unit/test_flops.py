"""FLOPs a step, the device's peak and MFU: the transformer formula against torch's own count, the peak table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from scaleforge import load_config
from scaleforge.models.gpt import GPT
from scaleforge.training import flops
from scaleforge.training.flops import Peak, StepFlops, counted_flops, peak_flops, transformer_flops_per_token
from scaleforge.training.trainer import train


def test_the_transformer_formula_matches_what_torch_counts_for_a_step() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, seq_len=32, n_layers=2, n_heads=4, d_model=64)
    tokens = torch.randint(0, 64, (8, 32))

    def step() -> None:
        logits = model(tokens)
        F.cross_entropy(logits.reshape(-1, 64), tokens.reshape(-1)).backward()

    counted = counted_flops(step)
    per_token = transformer_flops_per_token(model, 32)
    assert per_token is not None
    # both leave out what is not a matrix product (softmax, norms) and count the tied head's product; torch's
    # count has no formula for the CPU's fused attention kernel, whose products the formula's 12LHQT term holds
    attention = 12 * 2 * 4 * 16 * 32 * tokens.numel()
    assert per_token * tokens.numel() - counted in (pytest.approx(0, abs=1e3), pytest.approx(attention, rel=1e-6))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert per_token == 6 * weights + 12 * 2 * 4 * 16 * 32
    assert transformer_flops_per_token(torch.nn.Linear(4, 4), 32) is None  # not a transformer: counted instead


def test_the_peak_is_the_datasheets_for_the_device_and_the_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = peak_flops(cuda, "bf16-mixed")
    assert peak == Peak(989.4e12, "NVIDIA H100 80GB HBM3, dense BF16 (NVIDIA datasheet)")
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(cuda, "fp16-mixed") == Peak(756e12, "NVIDIA H100 PCIe, dense FP16 (NVIDIA datasheet)")
    monkeypatch.setattr(flops.torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops(cuda, "32").flops == 378e12  # type: ignore[union-attr]  # float32 products in tf32
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(cuda, "bf16-mixed") is None  # not listed: no MFU, only FLOP/s
    assert peak_flops(torch.device("cpu"), "32") is None


def test_mfu_is_the_achieved_share_of_the_peak() -> None:
    step = StepFlops(per_step=2e12, method="counted", peak=Peak(100e12, "a GPU"))
    assert step.utilisation(steps_per_s=10) == pytest.approx(0.2)
    summary = step.summary(steps_per_s=10)
    assert summary == {
        "flops_per_step": 2e12,
        "flops_method": "counted",
        "tflops_per_s": pytest.approx(20.0),
        "peak_tflops": pytest.approx(100.0),
        "peak_source": "a GPU",
        "mfu": pytest.approx(0.2),
    }
    assert StepFlops(per_step=2e12, method="counted").summary(10).keys() == {
        "flops_per_step",
        "flops_method",
        "tflops_per_s",
    }


def test_counting_leaves_the_model_and_the_random_streams_as_they_were() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(16))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    inputs = torch.randn(4, 8)
    state = torch.random.get_rng_state()
    assert flops.flops_per_sample(model, inputs) == 3 * 2 * 8 * 16 - 2 * 8 * 16  # no input gradient
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # no BN update
    assert torch.equal(torch.random.get_rng_state(), state)
    assert flops.flops_per_sample(model, torch.randn(4, 3)) is None  # a model it cannot run: no figure, no error


def test_several_processes_agree_on_a_signal_about_every_second_and_at_every_log_line() -> None:
    from scaleforge.training.trainer import stop_check_steps

    assert stop_check_steps(0.001, 50) == 50  # fast steps: at log lines only
    assert stop_check_steps(0.1, 50) == 10
    assert stop_check_steps(2.0, 50) == 1  # a step longer than a second: at every step
    assert stop_check_steps(0.0, 10) == 10


def test_a_run_counts_its_flops_and_writes_the_figures_in_its_summary(tmp_path: Path) -> None:
    quick = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]
    overrides = [*quick, "training.max_steps=3", "model.hidden_layers=[32]", "training.batch_size=16"]
    train(load_config(None, overrides), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # digits' MLP 64-32-10: forward 2 x 16 x (64 x 32 + 32 x 10); backward twice that, less the input's gradient
    forward = 2 * 16 * (64 * 32 + 32 * 10)
    assert summary["flops_per_step"] == 3 * forward - 2 * 16 * 64 * 32
    assert summary["flops_method"] == "FlopCounterMode over a forward and backward pass" and summary["tflops_per_s"] > 0
    assert "mfu" not in summary  # a CPU has no peak in the table
