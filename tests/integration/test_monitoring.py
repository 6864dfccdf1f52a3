"""Watching training runs: system figures in every log line, a Prometheus endpoint while a run trains, the
curves `scaleforge plot` draws and the table `scaleforge runs` prints."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from scaleforge import load_config
from scaleforge.training.energy import Counter, EnergyMeter
from scaleforge.training.status import write_status
from scaleforge.training.trainer import train
from tests.conftest import REPO
from tests.integration.distributed_runs import GPT

pytestmark = pytest.mark.timeout(300)

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    train(load_config(None, [*QUICK, "training.max_steps=30", "logging.every_steps=5", "training.eval_every_steps=10",
                             "logging.tensorboard=true"]), run_dir)  # fmt: skip
    return run_dir


def test_every_log_line_holds_the_processs_cpu_memory_and_token_rate(digits_run: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = [record for record in records(digits_run) if "loss" in record]
    assert len(lines) == 6
    assert all(line["cpu_percent"] >= 0 and 50 < line["rss_mib"] < 10_000 for line in lines)
    assert not any("tokens_per_s" in line or "gpu_memory_allocated_mib" in line for line in lines)  # no tokens, no GPU
    events = EventAccumulator(str(digits_run / "tensorboard"))
    events.Reload()
    shown = [event.value for event in events.Scalars("train/rss_mib")]
    assert shown == [pytest.approx(line["rss_mib"]) for line in lines]  # and in TensorBoard
    tokens = tmp_path / "tokens"
    train(load_config(None, [*GPT, *QUICK, "training.max_steps=4", "logging.every_steps=2"]), tokens)
    lines = [record for record in records(tokens) if "loss" in record]
    assert all(line["tokens_per_s"] == pytest.approx(16 * line["samples_per_s"]) for line in lines)  # seq_len 16
    quiet = tmp_path / "quiet"
    train(load_config(None, [*QUICK, "training.max_steps=2", "logging.system_metrics=false"]), quiet)
    assert "cpu_percent" not in records(quiet)[0]


def test_a_run_records_the_energy_it_used_and_where_the_figure_comes_from(digits_run: Path) -> None:
    summary = json.loads((digits_run / "summary.json").read_text())
    lines = [record for record in records(digits_run) if "loss" in record]
    assert all(line["power_w"] > 0 for line in lines)
    totals = [line["energy_j"] for line in lines]
    assert totals == sorted(totals) and 0 < totals[-1] <= summary["energy_j"]  # the job's, through each log line
    # (equal where the CPU clock, at 10 ms a tick, did not move between the last line and the end)
    assert summary["energy_source"] in ("estimate", "rapl")  # this machine's processor, estimated or counted
    if summary["energy_source"] == "estimate":
        assert "set hardware.cpu_watts" in summary["energy_note"]  # the default power a core, said
    assert summary["samples_per_j"] == pytest.approx(30 * 64 / summary["energy_j"])
    assert summary["co2_g"] == pytest.approx(summary["energy_j"] / 3.6e6 * 475)
    assert "tokens_per_j" not in summary  # images, not tokens


def test_a_resumed_run_adds_its_energy_to_that_of_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scaleforge.training import trainer

    def meter(joules_per_read: int) -> Callable[..., EnergyMeter]:
        readings = itertools.count(0, joules_per_read)
        return lambda *args, **kwargs: EnergyMeter([Counter(lambda: next(readings), 2**64, 1.0)], "rapl")

    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setattr(trainer, "energy_meter", meter(1_000))  # every reading 1 kJ more
    overrides = [*QUICK, "training.max_steps=10", "checkpoint.every_steps=5", "logging.every_steps=5"]
    train(load_config(None, overrides), first)
    progress = json.loads((first / "checkpoints" / "step-00000005" / "progress.json").read_text())
    assert progress["energy_j"] >= 1_000  # the job's energy through step 5
    monkeypatch.setattr(trainer, "energy_meter", meter(0))  # the resumed run uses none
    summary = train(load_config(None, overrides), second, resume=str(first / "checkpoints" / "step-00000005"))
    assert summary["energy_j"] == progress["energy_j"] and summary["energy_source"] == "rapl"


def test_the_prometheus_endpoint_answers_while_the_run_trains_and_runs_shows_where_it_stands(cli, tmp_path: Path):  # noqa: ANN001
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "scaleforge", "train", "training.epochs=500", "logging.every_steps=5",
               "logging.prometheus_port=0", "logging.progress=none", "checkpoint.every_steps=0",
               "--run-dir", str(run_dir)]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = process.stderr.readline()
        assert line.startswith("metrics: http://127.0.0.1:"), line
        url = line.split()[1]
        step, deadline = 0.0, time.monotonic() + 60
        while step < 10 and time.monotonic() < deadline:
            text = httpx.get(url).text
            found = [row for row in text.splitlines() if row.startswith('scaleforge_train_step{rank="0"}')]
            step = float(found[0].split()[-1]) if found else 0.0
            time.sleep(0.2)
        assert step >= 10, text  # it answers while the run trains, and the figures move
        assert 'scaleforge_train_loss{rank="0"}' in text and 'scaleforge_train_rss_mib{rank="0"}' in text
        assert 'scaleforge_train_power_w{rank="0"}' in text and 'scaleforge_train_energy_j{rank="0"}' in text
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "running" and status["pid"] == process.pid
        result = subprocess.run([sys.executable, "-m", "scaleforge", "runs", str(tmp_path), "--json"], cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        assert json.loads(result.stdout)[0]["status"] == "running"
        second = cli("train", *QUICK, "--run-dir", str(run_dir))  # a second run into the same directory
        assert second.code == 2 and f"{run_dir} is being trained now (process {process.pid}" in second.err
        process.send_signal(signal.SIGTERM)  # checkpoints at the next step and stops
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"


def test_runs_lists_each_run_with_its_model_steps_best_metric_and_status(cli, digits_run: Path, tmp_path: Path):  # noqa: ANN001
    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copytree(digits_run, folder / "finished")
    killed = folder / "killed"  # its process is gone without a word, and it left no checkpoint
    shutil.copytree(digits_run, killed)
    shutil.rmtree(killed / "final")
    (killed / "summary.json").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_status(killed, "running")
    (killed / "status.json").write_text((killed / "status.json").read_text().replace(str(os.getpid()), str(dead.pid)))
    resumable = folder / "resumable"
    shutil.copytree(killed, resumable)
    (resumable / "checkpoints" / "step-00000020").mkdir(parents=True)
    live = folder / "live"
    shutil.copytree(killed, live)
    write_status(live, "running")  # this process: alive
    result = cli("runs", str(folder), "--json")
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in json.loads(result.out)}
    assert {name: row["status"] for name, row in rows.items()} == {
        "finished": "finished", "killed": "failed", "resumable": "resumable", "live": "running"
    }  # fmt: skip
    best = max(record["val_accuracy"] for record in records(digits_run) if "val_accuracy" in record)
    assert rows["finished"]["best"] == ["val_accuracy", best] and rows["finished"]["steps"] == 30
    assert rows["finished"]["model"] == "mlp" and rows["finished"]["strategy"] == "single"
    assert rows["killed"]["steps"] == 30  # from its metrics.jsonl
    assert rows["finished"]["energy_j"] == json.loads((digits_run / "summary.json").read_text())["energy_j"]
    last_line = [record for record in records(digits_run) if "energy_j" in record][-1]
    assert rows["killed"]["energy_j"] == last_line["energy_j"]  # through its last log line
    table = cli("runs", str(folder))
    assert "finished" in table.out and "resumable" in table.out and "accuracy" in table.out
    assert re.search(r"~?\d+\.\d (k|M)?J", table.out), table.out


def test_plot_draws_the_curves_of_a_run_and_overlays_several(cli, digits_run: Path, tmp_path: Path) -> None:  # noqa: ANN001
    result = cli("plot", str(digits_run))
    assert result.code == 0, result.err
    files = [digits_run / "curves" / "curves-step.png", digits_run / "curves" / "curves-time.png"]
    assert result.out.split() == [word for file in files for word in ("wrote", str(file))]
    for file in files:
        with Image.open(file) as image:
            assert image.format == "PNG" and image.width > image.height  # loss, val accuracy, lr, throughput: 3x2
    from scaleforge.training.curves import curve_panels

    assert curve_panels([digits_run]) == ["loss", "val_accuracy", "lr", "samples_per_s"]
    other = tmp_path / "other"
    shutil.copytree(digits_run, other)
    result = cli("plot", str(digits_run), str(other), "--out", str(tmp_path / "both"))
    assert result.code == 0 and (tmp_path / "both" / "curves-step.png").is_file()
    missing = cli("plot", str(tmp_path / "nothing"))
    assert missing.code == 2 and "no metrics.jsonl" in missing.err


def test_the_shipped_grafana_dashboard_queries_metrics_that_exist() -> None:
    import re

    from prometheus_client import generate_latest

    from scaleforge.serve.app import ServerMetrics
    from scaleforge.stream.pipeline import StreamMetrics
    from scaleforge.training.callbacks import RunState
    from scaleforge.training.monitoring import PrometheusExporter

    trainer = PrometheusExporter(0, "127.0.0.1", 0)  # listening on a free port from here
    trainer.close()
    figures = {"loss": 1.0, "lr": 0.1, "samples_per_s": 1.0, "tokens_per_s": 1.0, "data_wait_share": 0.0}
    figures.update(cpu_percent=1.0, rss_mib=1.0, gpu_memory_allocated_mib=1.0)  # a GPU run's figures too
    trainer.on_log(RunState(Path("."), 1, 1, 1), {"step": 1, **figures})
    trainer.on_eval(RunState(Path("."), 1, 1, 1), {"step": 1, "val_loss": 1.0})
    stream = StreamMetrics()
    stream.frames.labels("processed").inc()
    stream.stages.labels("inference").observe(0.01)
    served = ServerMetrics(8)
    served.requests.labels("/v1/predict", "200").inc()
    served.latency.labels("/v1/predict").observe(0.01)
    exposed = "\n".join(generate_latest(registry).decode() for registry in (trainer.registry, stream.registry,
                                                                            served.registry))  # fmt: skip
    names = set(re.findall(r"^(scaleforge_\w+)", exposed, flags=re.MULTILINE))
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"scaleforge_\w+", target["expr"])}  # fmt: skip
    assert queried and queried <= names, sorted(queried - names)
