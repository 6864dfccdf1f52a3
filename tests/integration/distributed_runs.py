"""Shared by the multi-process tests: the small GPT every strategy can train, launching it, comparing weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from scaleforge import load_config
from scaleforge.training.trainer import train
from tests.conftest import CliResult, run_subprocess

# A small GPT (every strategy applies to it: heads split for tp, blocks cut for pp, untied so stages own their
# weights), trained with plain SGD and no dropout, so any difference comes from how the work was split.
MODEL = ["model.architecture=gpt", "model.n_layers=2", "model.d_model=32", "model.n_heads=4"]
MODEL += ["model.tie_embeddings=false"]
RUN = [
    "data.dataset=synthetic",
    "data.kind=tokens",
    "data.seq_len=16",
    "data.vocab_size=64",
    "data.num_samples=512",
    "training.batch_size=16",
    "training.max_steps=25",
    "training.optimizer=sgd",
    "training.optimizer.momentum=0.9",
    "training.learning_rate=0.05",
    "training.clip_grad_norm=1.0",
    "logging.every_steps=5",
    "logging.progress=plain",
    "logging.tensorboard=false",
    "logging.plot=false",
    "checkpoint.every_steps=0",
    # one torch thread in every process, whoever runs it: a run trained in the test's own process (whose thread
    # count the test session sets) and one in a subprocess then sum in the same order, bit for bit
    "hardware.threads=1",
]
GPT = MODEL + RUN
TOLERANCE = 1e-4
# HSDP on 4 processes: two groups of two, each sharding the model, replicating it across the groups
HSDP = ["parallel.strategy=hsdp", "parallel.dp_replicate=2"]


def read_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), f"tensor names differ: {sorted(a.keys() ^ b.keys())}"
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


def logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def launch(run_dir: Path, *overrides: str, nproc: int = 2, expect: int = 0) -> CliResult:
    """`scaleforge train GPT OVERRIDES --nproc N` in a subprocess, as a user runs it."""
    launch_flags = ["--nproc", str(nproc)] if nproc > 1 else []
    result = run_subprocess("train", *GPT, *overrides, *launch_flags, "--run-dir", str(run_dir), timeout=540)
    assert result.code == expect, result.out + result.err
    return result


def single_process_run(run_dir: Path, *overrides: str) -> Path:
    """The same config on one process, in this process: what multi-process runs are compared with."""
    train(load_config(None, [*GPT, *overrides]), run_dir)
    return run_dir
