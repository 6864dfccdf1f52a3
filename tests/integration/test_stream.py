"""`scaleforge stream` end to end on a small digits classifier: synthetic, video-file and image-folder sources,
the block and drop-oldest policies, the JSONL and video sinks, the result cache, corrupt frames, SIGTERM and
bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import psutil
import pytest

from scaleforge import load_config
from scaleforge.training.trainer import train
from tests.conftest import REPO, gone, run_subprocess
from tests.integration.test_serve import make_slow_run

pytestmark = pytest.mark.timeout(300)

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    train(load_config(None, [*QUICK, "training.epochs=1"]), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits classifier that takes 50 ms a batch: slower than the frames come."""
    return make_slow_run(tmp_path_factory.mktemp("slow"), 0.05)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stream(cli, run_dir: Path, tmp_path: Path, *flags: str) -> dict:  # noqa: ANN001 - the cli fixture
    """`scaleforge stream RUN_DIR FLAGS`, in this process; its summary."""
    summary = tmp_path / "summary.json"
    result = cli("stream", str(run_dir), *flags, "--progress", "none", "--summary-json", str(summary))
    assert result.code == 0, result.err
    assert "frames processed" in result.out
    return json.loads(summary.read_text())


def test_block_processes_every_synthetic_frame_in_order_and_the_cache_answers_repeats(cli, digits_run, tmp_path):  # noqa: ANN001
    out = tmp_path / "frames.jsonl"
    summary = stream(cli, digits_run, tmp_path, "--source", "synthetic:32x32", "--fps", "300", "--policy", "block",
                     "--duration", "1", "--cache-size", "64", "--sink", f"jsonl:{out}")  # fmt: skip
    lines = read_jsonl(out)
    assert [line["seq"] for line in lines] == list(range(summary["frames_captured"]))  # every frame, in order
    assert summary["frames_dropped"] == 0 and summary["frames_processed"] == len(lines) > 50
    assert set(lines[0]) == {"seq", "captured_at", "latency_ms", "top_class", "probability", "label"}
    assert all(0 <= line["top_class"] < 10 and 0 < line["probability"] <= 1 for line in lines)
    # the square's path repeats every 24 frames (32 - 32 // 4): the repeats are answered from the cache
    assert summary["cache_hits"] > 0 and summary["cache_hits"] + summary["cache_misses"] == len(lines)
    for first, repeat in zip(lines, lines[24:], strict=False):  # (one still in flight is computed again)
        assert first["top_class"] == repeat["top_class"]
        assert first["probability"] == pytest.approx(repeat["probability"], abs=1e-5)


def test_drop_oldest_under_overload_drops_and_counts_frames_and_latency_stays_bounded(cli, slow_run, tmp_path):  # noqa: ANN001
    sys.path.insert(0, str(slow_run.parent))  # the run's model, for this process to load
    try:
        # 50 ms a batch of at most 2: 40 frames/s at most, and 200 come
        out = tmp_path / "frames.jsonl"
        summary = stream(cli, slow_run, tmp_path, "--source", "synthetic:32x32", "--fps", "200", "--duration", "3",
                         "--max-batch-size", "2", "--sink", f"jsonl:{out}", "--trust-code")  # fmt: skip
    finally:
        sys.path.remove(str(slow_run.parent))
    assert summary["policy"] == "drop-oldest"  # a live source's default
    lines = read_jsonl(out)
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # in order, with gaps where frames were dropped
    assert summary["frames_dropped"] > summary["frames_processed"]
    assert summary["frames_dropped"] == summary["frames_captured"] - summary["frames_processed"]
    assert summary["dropped_by_queue"]["batcher"] > 0  # the oldest frames waiting for a batch made room too
    # waiting for the batch running and its own (2 x 50 ms) and a queue of recent frames; not the seconds a queue
    # of every frame would have grown to by the end
    latencies = [line["latency_ms"] for line in lines]
    assert max(latencies) < 1000 and summary["latency_ms"]["p99"] < 500
    halves = len(latencies) // 2
    assert np.median(latencies[halves:]) < 2 * np.median(latencies[:halves]) + 50  # flat, not growing


def write_video(path: Path, frames: int, size: tuple[int, int] = (48, 32)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, size)
    assert writer.isOpened()
    for index in range(frames):
        image = np.full((size[1], size[0], 3), 40, dtype=np.uint8)
        cv2.circle(image, (5 + index, size[1] // 2), 6, (255, 255, 255), -1)
        writer.write(image)
    writer.release()


def test_a_video_file_runs_through_opencv_into_a_jsonl_and_a_video_sink(cli, digits_run, tmp_path) -> None:  # noqa: ANN001
    video = tmp_path / "in.avi"
    write_video(video, 20)
    out = tmp_path / "frames.jsonl"
    summary = stream(cli, digits_run, tmp_path, "--source", str(video), "--sink", f"jsonl:{out}")
    assert summary["policy"] == "block" and summary["stopped_by"] == "end of source"
    assert [line["seq"] for line in read_jsonl(out)] == list(range(20))
    annotated = tmp_path / "out.avi"
    summary = stream(cli, digits_run, tmp_path, "--source", str(video), "--sink", f"video:{annotated}")
    assert summary["frames_processed"] == 20
    capture = cv2.VideoCapture(str(annotated))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    capture.release()
    assert len(frames) == 20 and frames[0].shape == (32, 48, 3)
    assert frames[0][2:8, 2:20].max() > 200  # the caption drawn in the corner, white on black


def test_a_corrupt_frame_is_counted_and_skipped_in_a_folder_and_in_a_video(digits_run, tmp_path, capfd) -> None:  # noqa: ANN001
    from scaleforge.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(5):
        cv2.imwrite(str(folder / f"{index}.png"), np.full((16, 16, 3), 50 * index, dtype=np.uint8))
    (folder / "2-damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    out, summary = tmp_path / "frames.jsonl", tmp_path / "summary.json"
    flags = ["--sink", f"jsonl:{out}", "--progress", "none", "--summary-json", str(summary)]
    capfd.readouterr()
    assert main(["stream", str(digits_run), "--source", str(folder), *flags]) == 0
    assert capfd.readouterr().err == ""  # counted in the summary, not logged by OpenCV's decoder as well
    figures = json.loads(summary.read_text())
    assert figures["frames_corrupt"] == 1 and figures["frames_processed"] == 5
    assert [line["seq"] for line in read_jsonl(out)] == [0, 1, 3, 4, 5]  # "2-damaged.png" sorts third
    video = tmp_path / "damaged.avi"
    write_video(video, 20)
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xd8"]  # each frame's JPEG
    assert len(starts) == 20
    data[starts[10] + 2 : starts[10] + 300] = bytes(298)  # frame 10's image data zeroed
    video.write_bytes(bytes(data))
    # in a process of its own, as users run it: FFmpeg keeps its log level from the first video a process opens
    result = run_subprocess("stream", str(digits_run), "--source", str(video), *flags)
    assert result.code == 0 and result.err == "", result.err  # nor by FFmpeg
    figures = json.loads(summary.read_text())
    assert figures["frames_corrupt"] == 1 and figures["frames_processed"] == 19
    assert [line["seq"] for line in read_jsonl(out)] == [*range(10), *range(11, 20)]
    video.write_bytes(bytes(data[: starts[12]]))  # cut short after frame 11: its end, not 8 corrupt frames
    assert main(["stream", str(digits_run), "--source", str(video), *flags]) == 0
    figures = json.loads(summary.read_text())
    assert figures["frames_corrupt"] == 1 and figures["frames_processed"] == 11


def test_sigterm_finishes_the_frames_in_flight_flushes_the_sink_and_prints_the_summary(digits_run, tmp_path) -> None:  # noqa: ANN001
    out, summary = tmp_path / "frames.jsonl", tmp_path / "summary.json"
    command = [sys.executable, "-m", "scaleforge", "stream", str(digits_run), "--source", "synthetic:32x32",
               "--fps", "100", "--sink", f"jsonl:{out}", "--metrics-port", "0", "--progress", "plain",
               "--summary-json", str(summary)]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = process.stderr.readline()
        assert first.startswith("metrics: http://127.0.0.1:"), first
        url = first.split()[1]
        deadline = time.monotonic() + 60
        while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics = httpx.get(url).text  # answers while the stream runs
        assert 'scaleforge_stream_frames_total{outcome="processed"}' in metrics
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "│ stopped by" in stdout and "SIGTERM │" in stdout and "Traceback" not in stderr
    lines = read_jsonl(out)  # whole lines only: every one parses
    figures = json.loads(summary.read_text())
    assert figures["stopped_by"] == "SIGTERM"
    assert len(lines) == figures["frames_processed"] == figures["frames_captured"] > 32


def test_a_killed_stream_leaves_nothing_it_started_behind(digits_run, tmp_path) -> None:  # noqa: ANN001
    # Its stages are threads of its own process, so SIGKILL ends them all; a stage made a process must be started
    # with the parent-death guard (scaleforge.processes), and this test then says whether it ends with the stream.
    out = tmp_path / "frames.jsonl"
    command = [sys.executable, "-m", "scaleforge", "stream", str(digits_run), "--source", "synthetic:32x32",
               "--fps", "100", "--sink", f"jsonl:{out}", "--progress", "none"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert out.stat().st_size > 0, "no frame was processed"
        stream = psutil.Process(process.pid)
        started = [child.pid for child in stream.children(recursive=True)]
        assert stream.num_threads() > 3  # capture, preprocessing, model and sink run beside the main thread
        process.kill()
        process.wait(timeout=30)
        assert [pid for pid in started if not gone(pid, within_s=10)] == []
    finally:
        process.kill()


def test_bad_sources_and_sinks_exit_2_naming_them(cli, digits_run, tmp_path) -> None:  # noqa: ANN001
    not_video = tmp_path / "clip.mp4"
    not_video.write_text("not a video")
    empty = tmp_path / "empty"
    empty.mkdir()
    rows = tmp_path / "rows"
    train(load_config(None, [*QUICK, "data.dataset=synthetic", "data.num_samples=200", "training.max_steps=1"]), rows)
    cases = {
        ("--source", str(tmp_path / "missing.mp4")): "missing.mp4: no such file, folder or camera",
        ("--source", str(not_video)): f"--source {not_video}: ",
        ("--source", str(empty)): "the folder holds no image",
        ("--source", "synthetic:64"): "expected synthetic:WxH",
        ("--source", "synthetic:8x8", "--sink", "csv:x"): "--sink csv:x: expected jsonl:FILE, video:FILE or none",
        ("--source", "synthetic:8x8", "--sink", "video:x.gif"): "expected a file ending in .avi",
        ("--source", "synthetic:8x8", "--sink", f"jsonl:{tmp_path}/no/such/dir/x.jsonl"): "cannot be written",
    }
    for flags, message in cases.items():
        result = cli("stream", str(digits_run), *flags, "--duration", "1", "--progress", "none")
        assert result.code == 2, (flags, result.err)
        assert message in result.err and len(result.err.strip().splitlines()) == 1, (flags, result.err)
    result = cli("stream", str(rows), "--source", "synthetic:8x8", "--duration", "1")
    assert result.code == 2 and "does not classify images" in result.err


def test_bench_stream_measures_throughput_against_batch_size_and_latency_under_load(cli, slow_run, tmp_path):  # noqa: ANN001
    out = tmp_path / "bench"
    sys.path.insert(0, str(slow_run.parent))  # the model (50 ms a batch, so that it, not the source, limits the rate)
    try:
        result = cli("bench", "stream", str(slow_run), "--batch-sizes", "1,4", "--seconds", "0.6", "--frame-size",
                     "32x32", "--out", str(out), "--json", "--trust-code")  # fmt: skip
    finally:
        sys.path.remove(str(slow_run.parent))
    assert result.code == 0, result.err
    report = json.loads((out / "stream.json").read_text())
    assert [row["batch_size"] for row in report["sustained"]] == [1, 4]
    assert all(row["pipeline_fps"] > 0 and row["inference_fps"] > 0 for row in report["sustained"])
    best = max(report["sustained"], key=lambda row: row["pipeline_fps"])
    assert report["best_batch_size"] == best["batch_size"] and report["sustained_fps"] == best["pipeline_fps"]
    loads = {row["load"]: row for row in report["loads"]}
    assert list(loads) == [0.5, 1.0, 2.0, 4.0]
    assert loads[4.0]["source_fps"] == pytest.approx(4 * report["sustained_fps"])
    assert loads[4.0]["dropped"] > loads[4.0]["captured"] / 2  # four times what it sustains: most are dropped
    assert report["sustained"][1]["pipeline_fps"] > 2 * report["sustained"][0]["pipeline_fps"]  # batches of 4
    assert set(report["targets"]) == {
        "pipeline >= 0.9x the inference stage alone", "p99 at 4x <= 3x the p99 at 1x", "memory flat at 4x"
    }  # fmt: skip
    assert (out / "stream.png").read_bytes().startswith(b"\x89PNG")
