"""The arithmetic of `scaleforge bench scaling`, without starting a process: sizes, batches, efficiency and the
steady-state throughput read from metrics.jsonl."""

from __future__ import annotations

import pytest

from scaleforge.bench.scaling import global_batch_size, plan_sizes, scaling_efficiency, steady_intervals
from scaleforge.cli import build_parser, parse_args
from scaleforge.errors import ConfigError, UsageError

TINY = ["model.hidden_layers=[8]", "data.dataset=synthetic", "data.num_samples=512"]


def test_the_process_counts_are_a_comma_separated_list() -> None:
    args = parse_args(build_parser(), ["bench", "scaling", "--nproc", "1, 2,4", "--mode", "weak"])
    assert args.nproc == [1, 2, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [("1,x", "got 'x'"), ("2,0", "got 0"), ("", "got ''"), ("1,,2", "got ''"), ("-1", "got -1")],
)
def test_a_bad_process_count_is_a_usage_error(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=f"argument --nproc: expected a positive integer, {message}"):
        parse_args(build_parser(), ["bench", "scaling", f"--nproc={text}", "--mode", "weak"])


@pytest.mark.parametrize(("mode", "expected"), [("strong", [32, 32, 32]), ("weak", [32, 64, 128])])
def test_strong_scaling_keeps_the_global_batch_and_weak_the_share_of_each_process(
    mode: str, expected: list[int]
) -> None:
    assert [global_batch_size(mode, 32, n) for n in (1, 2, 4)] == expected


@pytest.mark.parametrize(
    ("throughput", "base_throughput", "processes", "base_processes", "expected"),
    [
        (180.0, 100.0, 2, 1, 0.9),  # strong: speed-up 1.8 on twice the processes
        (100.0, 100.0, 1, 1, 1.0),
        (190.0, 100.0, 4, 2, 0.95),  # from a base of 2 processes, 4 is twice the base
        (400.0, 100.0, 4, 1, 1.0),
    ],
)
def test_efficiency_is_throughput_against_linear_scaling_from_the_smallest_size(
    throughput: float, base_throughput: float, processes: int, base_processes: int, expected: float
) -> None:
    assert scaling_efficiency(throughput, base_throughput, processes, base_processes) == pytest.approx(expected)


def test_steady_state_leaves_out_the_warm_up_interval_and_intervals_with_an_evaluation() -> None:
    records = [
        {"step": 10, "samples_per_s": 50.0},  # warm-up
        {"step": 20, "samples_per_s": 100.0},
        {"step": 20, "val_loss": 1.0},  # an epoch ended here: the next interval includes the evaluation
        {"step": 30, "samples_per_s": 60.0},
        {"step": 40, "samples_per_s": 102.0},
        {"step": 50, "samples_per_s": 98.0},
        {"step": 50, "val_loss": 0.9},  # the final evaluation, after the loop
    ]
    assert steady_intervals(records) == [100.0, 102.0, 98.0]
    assert steady_intervals(records[:1]) == []


@pytest.mark.parametrize(
    ("mode", "strategy", "expected"),
    [
        ("strong", "ddp", [(1, "single", 32, 32), (2, "ddp", 32, 16), (4, "ddp", 32, 8)]),
        ("weak", "fsdp", [(1, "single", 32, 32), (2, "fsdp", 64, 32), (4, "fsdp", 128, 32)]),
        ("weak", "tp", [(1, "single", 32, 32), (2, "tp", 64, 64), (4, "tp", 128, 128)]),  # tp: one batch, split layers
    ],
)
def test_each_size_is_planned_with_its_strategy_and_batches(
    mode: str, strategy: str, expected: list[tuple[int, str, int, int]]
) -> None:
    plans = plan_sizes(
        None,
        [*TINY, "training.batch_size=32"],
        base_batch_size=32,
        sizes=[1, 2, 4],
        mode=mode,
        strategy=strategy,
        steps=30,
    )
    assert [(p.processes, p.strategy, p.global_batch_size, p.per_process_batch_size) for p in plans] == expected
    assert plans[1].config_args[: len(TINY)] == TINY  # the user's overrides first: the benchmark's win
    assert f"parallel.strategy={strategy}" in plans[1].config_args
    assert "training.max_steps=30" in plans[1].config_args


def test_a_size_the_batch_does_not_split_over_is_refused_before_any_run() -> None:
    with pytest.raises(ConfigError, match="training.batch_size: 32 does not split into 3 processes"):
        plan_sizes(None, TINY, base_batch_size=32, sizes=[1, 3], mode="strong", strategy="ddp", steps=30)
