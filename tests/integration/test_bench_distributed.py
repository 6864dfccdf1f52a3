"""`scaleforge bench scaling` and `scaleforge bench memory` from the CLI: real training runs in child processes
(gloo on CPU, up to 2 processes), read back from the files each benchmark writes. Speed is never asserted (the
figures depend on the machine); what is checked is that the runs were set up as described and the report adds up.
Usage errors exit 2 with one line and start no process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from scaleforge.bench.harness import energy_cell
from scaleforge.bench.link import throttled_link
from scaleforge.bench.memory import add_reference_ratios, memory_row
from scaleforge.config import load_config
from scaleforge.errors import UsageError

# A tiny model, so that start-up dominates and each run takes seconds.
TINY = ["model.architecture=mlp", "model.hidden_layers=[64]", "data.dataset=synthetic", "data.num_samples=2048"]
TINY += ["training.batch_size=16"]
PNG_MAGIC = b"\x89PNG"
PLAN_KEYS = ("processes", "strategy", "threads_per_process", "global_batch_size", "per_process_batch_size")


def table_rows(printed: str) -> list[list[str]]:
    """The body cells of the table in a benchmark's output."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in printed.splitlines() if line.startswith("│")]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_weak_scaling_over_one_and_two_processes(cli, tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    result = cli("bench", "scaling", *TINY, "--nproc", "2,1", "--mode", "weak", "--steps", "30", "--out", str(out))
    assert result.code == 0, result.err
    threads = max(1, (os.cpu_count() or 1) // 2)  # the largest size's share of the cores, at every size
    assert f"Weak scaling of mlp (4,810 parameters) on synthetic with ddp: 30 steps, {threads} thread" in result.out

    saved = json.loads((out / "scaling-weak.json").read_text())
    rows = saved["results"]
    assert [(r["processes"], r["strategy"]) for r in rows] == [(1, "single"), (2, "ddp")]
    assert [(r["global_batch_size"], r["per_process_batch_size"]) for r in rows] == [(16, 16), (32, 16)]
    for row, cells in zip(rows, table_rows(result.out), strict=True):
        assert row["threads_per_process"] == threads
        assert load_config(Path(row["run_dir"]) / "config.yaml").hardware.threads == threads
        assert len(row["interval_samples_per_s"]) == 2  # 3 intervals of 10 steps, the first one warm-up
        assert row["samples_per_s"] > 0 and row["peak_mib"] > 0 and row["peak_kind"] in ("rss", "cuda_allocated")
        assert cells[:5] == [str(row[key]) for key in PLAN_KEYS]
        assert cells[5:8] == [f"{row['samples_per_s']:,.1f}", f"{row['speedup']:.2f}", f"{row['efficiency']:.2f}"]
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert row["samples_per_j"] == summary["samples_per_j"] > 0 and cells[9] == energy_cell(row)
    assert rows[0]["speedup"] == rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["speedup"] / 2)
    assert (out / "scaling-weak.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_gradient_compression_settings_side_by_side(cli, tmp_path: Path) -> None:
    out = tmp_path / "compression"
    result = cli(
        "bench", "scaling", *TINY, "--nproc", "2", "--grad-compression", "bf16,powersgd", "--steps", "30",
        "--out", str(out),
    )  # fmt: skip
    assert result.code == 0, result.err
    saved = json.loads((out / "grad-compression.json").read_text())
    rows = {row["setting"]: row for row in saved["results"]}
    assert list(rows) == ["none", "bf16", "powersgd"]  # none first, as the reference
    assert rows["none"]["grad_sync_bytes_per_step"] == saved["num_parameters"] * 4  # every gradient in fp32
    assert rows["bf16"]["bytes_vs_none"] == 0.5
    assert rows["powersgd"]["bytes_vs_none"] < 0.5
    for row in rows.values():
        assert load_config(Path(row["run_dir"]) / "config.yaml").parallel.grad_compression == row["setting"]
        assert row["samples_per_s"] > 0 and row["val_loss"] > 0
    assert load_config(Path(rows["powersgd"]["run_dir"]) / "config.yaml").parallel.powersgd_start_step == 10
    assert [cells[0] for cells in table_rows(result.out)] == ["none", "bf16", "powersgd"]
    assert (out / "grad-compression.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_gradient_compression_over_a_throttled_link(cli, tmp_path: Path) -> None:
    try:
        with throttled_link("1mbit"):
            pass
    except UsageError as error:  # not root, no iproute2, or no right to make namespaces (a container)
        pytest.skip(f"no throttled link here: {error}")
    out = tmp_path / "compression"
    result = cli(
        "bench", "scaling", *TINY, "--nproc", "2", "--grad-compression", "none", "--steps", "30", "--link", "1mbit",
        "--out", str(out),
    )  # fmt: skip
    assert result.code == 0, result.err
    saved = json.loads((out / "grad-compression.json").read_text())
    (row,) = saved["results"]
    assert saved["link"] == "1mbit" and row["link_samples_per_s_vs_none"] == 1.0
    # 2 nodes of 1 process, node 1's output beside node 0's; the same math as on one node
    over_link = out / "compression-none-1mbit"
    assert "ddp on 2 processes" in (over_link / "output.log").read_text()
    assert (over_link / "node1.log").exists()
    assert json.loads((over_link / "summary.json").read_text())["val_loss"] == pytest.approx(row["val_loss"], 1e-6)
    # 2 x 19,240 gradient bytes a step through 125,000 bytes/s: far slower than loopback (about 20x here)
    assert row["link_samples_per_s"] < row["samples_per_s"] / 2
    assert "samples/s (1mbit)" in result.out
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert "sfbench" not in namespaces  # deleted when the benchmark ended


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_pipeline_schedules_side_by_side(cli, tmp_path: Path) -> None:
    out = tmp_path / "schedules"
    deep = [*TINY, "model.hidden_layers=[32, 32, 32, 32]"]  # 4 blocks: 2 stages on each of 2 processes
    deep += ["parallel.microbatches=4"]  # a pipeline option, given as the user's own
    result = cli(
        "bench", "scaling", *deep, "--nproc", "2", "--schedules", "1f1b,interleaved_1f1b,zero_bubble", "--steps", "30",
        "--out", str(out),
    )  # fmt: skip
    assert result.code == 0, result.err
    saved = json.loads((out / "schedules.json").read_text())
    rows = {row["schedule"]: row for row in saved["results"]}
    assert list(rows) == ["1f1b", "interleaved_1f1b", "zero_bubble"]
    assert [rows[name]["stages"] for name in rows] == [2, 4, 4]
    assert rows["1f1b"]["bubble"] == pytest.approx(1 / 5)  # (p - 1) / (m + p - 1), 4 micro-batches on 2 processes
    assert rows["interleaved_1f1b"]["bubble"] == pytest.approx(1 / 9)  # (p - 1) / (v m + p - 1)
    assert rows["zero_bubble"]["bubble"] < rows["interleaved_1f1b"]["bubble"]
    for row in rows.values():
        assert load_config(Path(row["run_dir"]) / "config.yaml").parallel.schedule == row["schedule"]
        assert row["samples_per_s"] > 0 and row["val_loss"] > 0
    assert rows["1f1b"]["samples_per_s_vs_first"] == 1.0
    assert [cells[0] for cells in table_rows(result.out)] == list(rows)
    assert (out / "schedules.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_fsdp_keeps_about_half_the_state_of_ddp_and_a_strategy_the_model_refuses_is_shown(cli, tmp_path: Path) -> None:
    out = tmp_path / "memory"
    strategies = "ddp,fsdp,pp"  # pp needs 2 blocks, the MLP has 1: its run exits 2 after one line
    result = cli(
        "bench", "memory", *TINY, "--nproc", "2", "--strategies", strategies, "--steps", "3", "--out", str(out)
    )
    assert result.code == 0, result.err

    saved = json.loads((out / "memory.json").read_text())
    rows = {row["strategy"]: row for row in saved["results"]}
    assert list(rows) == ["ddp", "fsdp", "pp"]
    refusal = "config error: parallel.pp: 2 pipeline stages need at least 2 blocks"
    assert rows["pp"]["refused"].startswith(refusal) and rows["pp"]["states_vs_ddp"] is None
    assert f"pp refused: {refusal}" in result.out
    assert table_rows(result.out)[2][:2] == ["pp", "refused (below)"]
    full_mib = saved["num_parameters"] * 4 / 2**20  # fp32: DDP's parameters, gradients and each Adam moment
    assert rows["ddp"]["parameters_mib"] == pytest.approx(full_mib)
    assert rows["ddp"]["states_mib"] == pytest.approx(4 * full_mib, rel=0.01)  # + Adam's step counters
    assert rows["ddp"]["states_vs_ddp"] == 1.0
    assert rows["fsdp"]["states_mib"] < rows["ddp"]["states_mib"]
    assert rows["fsdp"]["states_vs_ddp"] == pytest.approx(0.5, abs=0.05)
    assert all(row["peak_mib"] > row["states_mib"] for row in (rows["ddp"], rows["fsdp"]))
    assert "n/a (RSS)" in result.out and f"{rows['fsdp']['states_vs_ddp']:.2f}" in result.out
    assert (out / "memory.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scaling", "--nproc", "1,x", "--mode", "weak"], "usage error: argument --nproc: expected a positive integer"),
        (["scaling", "--nproc", "0,2", "--mode", "weak"], "expected a positive integer, got 0"),
        (["scaling", "--nproc", "1,2", "--mode", "sideways"], "argument --mode: invalid choice: 'sideways'"),
        (["scaling", "--nproc", "1,2"], "--mode: strong or weak is required (unless --grad-compression or --sch"),
        (["scaling", "--nproc", "2", "--schedules", "1f1b,zb"], "--schedules: zb: expected gpipe, 1f1b,"),
        (["scaling", "--nproc", "1", "--schedules", "1f1b"], "--schedules compares pipeline schedules, which need"),
        (["scaling", "--nproc", "2", "--grad-compression", "bf16,zip"], "--grad-compression: zip: expected none,"),
        (["scaling", "--nproc", "1", "--grad-compression", "bf16"], "needs --nproc of at least 2"),
        (["scaling", "--nproc", "2", "--grad-compression", "bf16", "--link", "fast"], "--link: 'fast' is not a rate"),
        (["scaling", "--nproc", "3", "--grad-compression", "bf16", "--link", "1mbit"], "two nodes: --nproc 3 is odd"),
        (["scaling", "--nproc", "1,2", "--mode", "weak", "--link", "1mbit"], "--link: only with --grad-compression"),
        (
            [
                "scaling",
                "--nproc",
                "2",
                "--grad-compression",
                "powersgd",
                "--steps",
                "30",
                "--powersgd-start-step",
                "25",
            ],
            "--powersgd-start-step: 25 leaves no 10-step log interval of PowerSGD in 30 steps",
        ),
        (["scaling", "--nproc", "1,2", "--mode", "weak", "--strategy", "fdsp"], "did you mean 'fsdp'?"),
        (["scaling", "--nproc", "1,2", "--mode", "weak", "--steps", "20"], "--steps: 20 steps give fewer than 3"),
        (["scaling", "--nproc", "1,3", "--mode", "strong"], "training.batch_size: 16 does not split into 3 processes"),
        (["scaling", "--nproc", "1,2", "--mode", "weak", "training.batchsize=8"], "did you mean 'batch_size'?"),
        (["memory", "--nproc", "1"], "--nproc: strategies differ only across processes; use at least 2, got 1"),
        (["memory", "--nproc", "2", "--strategies", "ddp,single"], "--strategies: unknown strategy 'single'"),
        (["memory", "--nproc", "2", "model.architecture=mlpp"], "unknown model 'mlpp' (did you mean 'mlp'?)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_run(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "run", no_process)
    out = tmp_path / "out"
    command, *options = args
    result = cli("bench", command, *TINY, *options, "--out", str(out))  # the test's overrides before the case's
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not out.exists()


# The report's arithmetic, without processes.

CPU_PROCESS = {"parameters_mib": 4.0, "gradients_mib": 4.0, "optimizer_mib": 8.0, "peak_mib": 700.0, "peak_kind": "rss"}


def test_a_strategy_row_shows_the_fullest_process_and_the_highest_peak() -> None:
    busy = {"parameters_mib": 5.0, "gradients_mib": 5.0, "optimizer_mib": 10.0, "peak_mib": 60.0}
    quiet = {"parameters_mib": 3.0, "gradients_mib": 3.0, "optimizer_mib": 6.0, "peak_mib": 80.0}
    row = memory_row("pp", [{**busy, "peak_kind": "cuda_allocated"}, {**quiet, "peak_kind": "cuda_allocated"}])
    assert (row["parameters_mib"], row["states_mib"], row["peak_mib"]) == (5.0, 20.0, 80.0)
    assert row["activations_mib"] == 68.0  # the most any process needed beyond its own states
    assert memory_row("ddp", [CPU_PROCESS])["activations_mib"] is None  # an RSS peak includes the runtime


@pytest.mark.slow
def test_states_are_compared_with_ddp_when_ddp_was_measured() -> None:
    rows = [memory_row("ddp", [CPU_PROCESS]), memory_row("fsdp", [{**CPU_PROCESS, "optimizer_mib": 0.0}])]
    rows.append({"strategy": "tp", "refused": "config error: no plan"})
    add_reference_ratios(rows)
    assert [row["states_vs_ddp"] for row in rows] == [1.0, 0.5, None]
    without_ddp = rows[1:]
    add_reference_ratios(without_ddp)
    assert [row["states_vs_ddp"] for row in without_ddp] == [None, None]
