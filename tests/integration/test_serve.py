"""`scaleforge serve` as a user runs it: a real server process on 127.0.0.1, driven over HTTP.

Two trained runs serve here: the MLP on digits, and a user's model (`imports:`) that sleeps in every forward
pass, so that queues fill and deadlines pass when a test wants them to.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from scaleforge import load_config
from scaleforge.runs import write_manifest
from scaleforge.serve.app import INLINE_BODY_BYTES
from scaleforge.training.trainer import train
from tests.conftest import REPO, gone, until

pytestmark = pytest.mark.timeout(300)

DIGITS_RUN = ["training.epochs=1", "logging.progress=none", "logging.tensorboard=false", "logging.plot=false"]
SLOW_MODEL = """
import time
from torch import nn
from scaleforge import register_model

@register_model("slow_net")
class SlowNet(nn.Module):
    def __init__(self, input_shape, num_classes: int, delay_s: float = 0.5):
        super().__init__()
        self.delay_s = delay_s
        self.blocks = nn.ModuleList([nn.Flatten()])
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        if not self.training:
            time.sleep(self.delay_s)
        return self.head(self.blocks[0](x))
"""
HELD_MODEL = """
import os
import time
from torch import nn
from scaleforge import register_model

@register_model("held_net")
class HeldNet(nn.Module):
    def __init__(self, input_shape, num_classes: int, hold_file: str = "none"):
        super().__init__()
        self.hold_file = hold_file
        self.blocks = nn.ModuleList([nn.Flatten()])
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        if not self.training and os.path.exists(self.hold_file):
            open(self.hold_file + ".reached", "w").close()  # a batch is held: for the test to see
        while not self.training and os.path.exists(self.hold_file):
            time.sleep(0.01)
        return self.head(self.blocks[0](x))
"""
IMAGE = [[[0.5] * 8 for _ in range(8)]]  # one digits instance, (1, 8, 8)
SLOW = ("--threads", "1", "--model-process", "--trust-code")  # as for a compute-bound model, its batches untimed


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    train(load_config(None, DIGITS_RUN), run_dir)
    return run_dir


def make_user_run(folder: Path, module: str, architecture: str, trained: list[str], served: dict[str, str]) -> Path:
    """A run of the model `architecture` that `module` (written to `folder`) registers, trained for two steps
    with the overrides `trained`, whose config is then changed by `served` (text replaced) for serving, its
    manifest written again."""
    name = architecture.removesuffix("_net") + "_model"
    (folder / f"{name}.py").write_text(module)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        overrides = [*DIGITS_RUN, f"imports=[{name}]", f"model.architecture={architecture}", *trained]
        overrides += ["training.max_steps=2", "checkpoint.every_steps=0"]
        train(load_config(None, overrides), folder / "run")
    config = folder / "run" / "final" / "config.yaml"
    text = config.read_text()
    for old, new in served.items():
        text = text.replace(old, new)
    config.write_text(text)
    write_manifest(config.parent)
    return folder / "run"


def make_slow_run(folder: Path, delay_s: float) -> Path:
    """A run of `SLOW_MODEL` (its module in `folder`) that sleeps `delay_s` a batch when it answers."""
    # trained without the delay, which its evaluation would wait through
    return make_user_run(folder, SLOW_MODEL, "slow_net", ["model.delay_s=0.0"], {"delay_s: 0.0": f"delay_s: {delay_s}"})


def make_held_run(folder: Path, hold_file: Path) -> Path:
    """A run of `HELD_MODEL` (its module in `folder`) whose forward pass, when it answers, waits while `hold_file`
    exists."""
    return make_user_run(folder, HELD_MODEL, "held_net", [], {"hold_file: none": f"hold_file: {hold_file}"})


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slow_run(tmp_path_factory.mktemp("slow"), 0.5)


@contextlib.contextmanager
def server(run_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`scaleforge serve RUN_DIR --port 0 FLAGS`; yields its base URL and the process."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(run_dir.parent), environment.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "scaleforge", "serve", str(run_dir), "--port", "0", *flags]
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        found = re.search(r"(https?)://127\.0\.0\.1:(\d+)", banner)
        assert found, banner + process.stdout.read()
        yield f"{found.group(1)}://127.0.0.1:{found.group(2)}", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


@pytest.fixture(scope="module")
def digits_url(digits_run: Path) -> Iterator[str]:
    """One server of the digits run with the default options, for the tests that only send requests."""
    with server(digits_run) as (url, _):
        yield url


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send every body at once, on its own connection."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json=body) for body in bodies))


def test_batched_answers_equal_single_ones_and_batches_keep_their_bound(digits_run: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    bodies = [{"inputs": torch.rand(1 + i % 3, 1, 8, 8, generator=generator).tolist()} for i in range(40)]
    with server(digits_run, "--max-batch-size", "8", "--max-delay-ms", "50") as (url, _):
        together = asyncio.run(post_all(url, bodies))
        with httpx.Client(base_url=url) as client:
            alone = [client.post("/v1/predict", json=body) for body in bodies]
            text = client.get("/metrics").text
    assert {r.status_code for r in together + alone} == {200}
    for batched, single in zip(together, alone, strict=True):
        for a, b in zip(batched.json()["outputs"], single.json()["outputs"], strict=True):
            assert a["top_class"] == b["top_class"]
            assert torch.allclose(torch.tensor(a["probabilities"]), torch.tensor(b["probabilities"]), atol=1e-5)
    batches = metric(text, "scaleforge_batch_size_count")
    assert metric(text, "scaleforge_batch_size_bucket", le="8.0") == batches  # none above the bound
    assert metric(text, "scaleforge_batch_size_sum") == 2 * sum(len(body["inputs"]) for body in bodies)
    assert batches - len(bodies) <= len(bodies) / 2  # sent alone: a batch each; sent together: merged


def test_onnx_runtime_serves_the_export_with_the_same_answers_batching_and_metrics(digits_run: Path, tmp_path):  # noqa: ANN001
    from scaleforge.cli import main

    exported = tmp_path / "digits.onnx"
    assert main(["export", str(digits_run), "--format", "onnx", "--dynamic-batch", "--out", str(exported)]) == 0
    generator = torch.Generator().manual_seed(1)
    bodies = [{"inputs": torch.rand(1 + i % 3, 1, 8, 8, generator=generator).tolist()} for i in range(24)]
    with server(digits_run) as (url, _):
        expected = asyncio.run(post_all(url, bodies))
    with server(digits_run, "--backend", "onnxruntime", "--onnx", str(exported), "--max-delay-ms", "50") as (url, _):
        got = asyncio.run(post_all(url, bodies))
        with httpx.Client(base_url=url) as client:
            text = client.get("/metrics").text
            invalid = client.post("/v1/predict", json={"inputs": [[1, 2]]})
    assert {r.status_code for r in expected + got} == {200} and invalid.status_code == 422
    for onnx_answer, torch_answer in zip(got, expected, strict=True):
        for a, b in zip(onnx_answer.json()["outputs"], torch_answer.json()["outputs"], strict=True):
            assert a["top_class"] == b["top_class"]
            assert torch.allclose(torch.tensor(a["probabilities"]), torch.tensor(b["probabilities"]), atol=1e-5)
    assert metric(text, "scaleforge_batch_size_count") < len(bodies)  # sent together: merged into batches
    assert metric(text, "scaleforge_requests_total", endpoint="/v1/predict", status="200") == len(bodies)


def test_a_language_model_answers_sequences_of_any_length_batched_as_alone(tmp_path: Path) -> None:
    overrides = ["model.architecture=gpt", "model.n_layers=1", "model.d_model=32", "model.n_heads=2"]
    overrides += ["data.dataset=synthetic", "data.kind=tokens", "data.seq_len=16", "data.vocab_size=50"]
    overrides += [*DIGITS_RUN, "training.max_steps=3", "checkpoint.every_steps=0"]
    train(load_config(None, overrides), tmp_path / "gpt")
    generator = torch.Generator().manual_seed(1)
    bodies = [{"inputs": [torch.randint(0, 50, (1 + (5 * i) % 16,), generator=generator).tolist()]} for i in range(24)]
    with server(tmp_path / "gpt", "--max-delay-ms", "50") as (url, _):
        together = asyncio.run(post_all(url, bodies))
        alone = [httpx.post(f"{url}/v1/predict", json=body) for body in bodies]
        too_long = httpx.post(f"{url}/v1/predict", json={"inputs": [[1] * 17]})
        not_a_token = httpx.post(f"{url}/v1/predict", json={"inputs": [[1, 50]]})
        image = httpx.post(f"{url}/v1/predict/image", files={"file": ("x.png", b"", "image/png")})
    for batched, single in zip(together, alone, strict=True):
        a, b = batched.json()["outputs"][0], single.json()["outputs"][0]
        assert a["next_token"] == b["next_token"]  # padded beside longer sequences, answered as alone
        assert torch.allclose(torch.tensor(a["probabilities"]), torch.tensor(b["probabilities"]), atol=1e-5)
    assert too_long.status_code == 422 and "1 to 16 token ids" in too_long.json()["detail"]
    assert not_a_token.status_code == 422 and "inputs[0][1]: 50 is not a token id in [0, 50)" in not_a_token.text
    assert image.status_code == 404  # served for image models only


async def post_in_turn(url: str, pause_s: float, count: int) -> list[httpx.Response]:
    """`count` requests, the first alone, the others `pause_s` later (while the first runs), in that order."""
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=count)) as client:
        first = asyncio.ensure_future(client.post("/v1/predict", json={"inputs": [IMAGE]}))
        await asyncio.sleep(pause_s)
        rest = []
        for _ in range(count - 1):
            rest.append(asyncio.ensure_future(client.post("/v1/predict", json={"inputs": [IMAGE]})))
            await asyncio.sleep(0.01)
        return await asyncio.gather(first, *rest)


def test_a_full_queue_is_refused_at_once(slow_run: Path) -> None:
    with server(slow_run, *SLOW, "--max-batch-size", "1", "--max-queue", "2", "--timeout-ms", "20000") as (url, _):
        responses = asyncio.run(post_in_turn(url, 0.25, 6))  # one runs (0.5 s), two queue, three find it full
        text = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200, 200, 200, 503, 503, 503]
    full = responses[3:]
    assert all(r.headers["retry-after"] == "1" and "queued already" in r.json()["detail"] for r in full)
    assert metric(text, "scaleforge_rejections_total", reason="queue_full") == 3


async def sent_then_gone(url: str, after_s: float, stay_s: float) -> None:
    """A request sent after `after_s` whose client closes the connection `stay_s` later, before an answer."""
    await asyncio.sleep(after_s)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"inputs": [IMAGE]}).encode()
    head = f"POST /v1/predict HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await asyncio.sleep(stay_s)
    writer.close()
    await writer.wait_closed()


def test_a_request_queued_past_its_deadline_gets_504_and_one_whose_client_left_is_dropped(slow_run: Path) -> None:
    async def scenario(url: str) -> list[httpx.Response]:
        # the second waits behind the first's 0.5 s batch until its deadline; the third's client leaves first
        responses, _ = await asyncio.gather(post_in_turn(url, 0.15, 2), sent_then_gone(url, 0.2, 0.1))
        await asyncio.sleep(0.6)  # the first batch is over: a dropped request would have run by now
        return responses

    with server(slow_run, *SLOW, "--max-batch-size", "1", "--timeout-ms", "200") as (url, _):
        responses = asyncio.run(scenario(url))
        text = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200, 504]
    assert "queued for more than 200 ms" in responses[1].json()["detail"]
    assert metric(text, "scaleforge_batch_size_count") == 1  # neither the late one nor the abandoned one ran
    assert metric(text, "scaleforge_rejections_total", reason="deadline") == 1
    assert metric(text, "scaleforge_requests_total", endpoint="/v1/predict", status="499") == 1


@pytest.mark.slow
def test_a_latency_target_refuses_at_once_what_it_could_not_answer_in_time(tmp_path: Path) -> None:
    # every batch takes 2 s (timed at start-up): a request alone is answered within the target; one that comes
    # while a batch runs would wait for it, more than the 0.6 s left, so it is refused, whenever in the first
    # 1.4 s of that batch it comes: sent 0.5 s after the first, they leave a busy machine's delays close to a second
    slower_run = make_slow_run(tmp_path, 2.0)
    with server(slower_run, *SLOW, "--latency-target-ms", "2600", "--max-delay-ms", "0") as (url, _):
        responses = asyncio.run(post_in_turn(url, 0.5, 3))
    assert sorted(r.status_code for r in responses) == [200, 503, 503]  # whichever came first is answered
    refused = [r for r in responses if r.status_code == 503]
    assert all("more than --latency-target-ms 2600" in r.json()["detail"] for r in refused)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"inputs": [[[1, 2, 3, 4, 5, 6, 7, 8]]]}', "inputs[0][0][0]: expected a list of 8, got int"),
        ('{"inputs": []}', "body.inputs: List should have at least 1 item"),
        ('{"input": [1]}', "body.inputs: Field required"),
        (json.dumps({"inputs": [[[[float("nan")] * 8] * 8]]}), "inputs[0][0][0][0]: nan is not a finite number"),
        (json.dumps({"inputs": [[[[True] * 8] * 8]]}), "inputs[0][0][0][0]: expected a number, got bool"),
        (json.dumps({"inputs": [[[["1"] * 8] * 8]]}), "inputs[0][0][0][0]: expected a number, got str"),
        (
            json.dumps({"inputs": [[[[0.5] * 7 + [True]] + [[0.5] * 8] * 7]]}),
            "[0][0][0][7]: expected a number, got bool",
        ),
        (
            json.dumps({"inputs": [[[[0.5] * 8] * 7 + [[0.5] * 7]]]}),
            "inputs[0][0][7]: expected a list of 8, got a list of 7",
        ),
        (json.dumps({"inputs": [IMAGE, [[[1e39] * 8] * 8]]}), "inputs[1][0][0][0]: 1e+39 is too large for a float32"),
        (json.dumps({"inputs": [[[[None] * 8] * 8]]}), "inputs[0][0][0][0]: expected a number, got NoneType"),
        ("{not json", "JSON decode error"),
        ('{"inputs": ' + "[" * 50_000 + "]" * 50_000 + "}", "cannot be read as JSON"),  # decoded on a thread
        ('[{"inputs": [1]}]', "valid dictionary"),
    ],
    ids=[
        *("shape", "empty", "no-inputs", "nan", "bool", "string", "bool-among-numbers", "ragged", "float32-overflow"),
        *("null", "not-json", "too-deep", "not-an-object"),
    ],
)
def test_malformed_bodies_get_422_saying_what_is_wrong(digits_url: str, body: str, message: str) -> None:
    response = httpx.post(f"{digits_url}/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def png(pixels: list[list[int]] | list[list[list[int]]], mode: str) -> bytes:
    """An image file of `pixels` (rows of grey values, or of RGB triples)."""
    from PIL import Image

    flat = bytes(value for row in pixels for pixel in row for value in ([pixel] if mode == "L" else pixel))
    buffer = io.BytesIO()
    Image.frombytes(mode, (len(pixels[0]), len(pixels)), flat).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_uploaded_image_is_answered_as_its_pixels_sent_as_numbers(digits_url: str) -> None:
    from sklearn.datasets import load_digits

    ink = load_digits().images[:3]  # 0..16, white on black
    grey = [[[round(v * 255 / 16) for v in row] for row in image] for image in ink]
    numbers = {"inputs": [[[[v / 255 for v in row] for row in image]] for image in grey]}
    by_numbers = httpx.post(f"{digits_url}/v1/predict", json=numbers).json()["outputs"]
    for image, expected in zip(grey, by_numbers, strict=True):
        # the same digit as an 8x8 grey PNG, and 4x larger in RGB (resized and converted by the server)
        large = [[(v, v, v) for v in row for _ in range(4)] for row in image for _ in range(4)]
        for file in (png(image, "L"), png(large, "RGB")):
            response = httpx.post(f"{digits_url}/v1/predict/image", files={"file": ("digit.png", file, "image/png")})
            assert response.status_code == 200, response.text
            output = response.json()["outputs"][0]
            assert output["label"] == str(output["top_class"])
            if len(file) == len(png(image, "L")):  # exactly the same pixels
                assert output["top_class"] == expected["top_class"]
                assert torch.allclose(torch.tensor(output["probabilities"]), torch.tensor(expected["probabilities"]))
    card = httpx.get(f"{digits_url}/v1/models").json()["data"][0]["input_schema"]
    assert card["image"] == {"endpoint": "/v1/predict/image", "mode": "grey", "size": 8}
    assert card["classes"] == [str(digit) for digit in range(10)]


NOISE = png([[(i * 7919 + j * 104729) % 251 for j in range(64)] for i in range(64)], "L")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"file": ("x.png", b"not an image", "image/png")}, "file: not a readable image (UnidentifiedImageError"),
        ({"file": ("x.png", b"", "image/png")}, "file: the upload is empty"),
        ({"file": ("x.png", NOISE[: len(NOISE) // 2], "image/png")}, "file: not a readable image"),
        ({"image": ("x.png", png([[0] * 8] * 8, "L"), "image/png")}, "body.file: Field required"),
        (None, "body.file: Field required"),
    ],
    ids=["not-an-image", "empty", "truncated", "wrong-field", "no-file"],
)
def test_an_unreadable_upload_gets_422_saying_what_is_wrong(digits_url: str, files: dict | None, message: str) -> None:
    if files is None:
        response = httpx.post(f"{digits_url}/v1/predict/image", json={"inputs": [IMAGE]})
    else:
        response = httpx.post(f"{digits_url}/v1/predict/image", files=files)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_too_many_instances_and_too_large_bodies_are_refused(digits_run: Path) -> None:
    with server(digits_run, "--max-batch-size", "4", "--max-body-mb", "0.01") as (url, _):
        many = httpx.post(f"{url}/v1/predict", json={"inputs": [IMAGE] * 5})
        large = httpx.post(f"{url}/v1/predict", json={"inputs": [IMAGE] * 40})  # about 15 KB

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds as the body streams in
            yield b'{"inputs": ['
            for _ in range(40):
                yield json.dumps(IMAGE).encode() + b","
            yield json.dumps(IMAGE).encode() + b"]}"

        streamed = httpx.post(f"{url}/v1/predict", content=chunks(), headers={"content-type": "application/json"})
        fine = httpx.post(f"{url}/v1/predict", json={"inputs": [IMAGE] * 4})
    assert many.status_code == 422 and "more than --max-batch-size 4" in many.json()["detail"]
    assert large.status_code == 413 and streamed.status_code == 413
    assert fine.status_code == 200 and len(fine.json()["outputs"]) == 4


def test_an_api_key_guards_everything_but_health(digits_run: Path) -> None:
    with server(digits_run, "--api-key-env", "SERVE_KEY", env={"SERVE_KEY": "s3cret"}) as (url, _):
        body = {"inputs": [IMAGE]}
        missing = httpx.post(f"{url}/v1/predict", json=body)
        wrong = httpx.post(f"{url}/v1/predict", json=body, headers={"authorization": "Bearer nope"})
        bearer = httpx.post(f"{url}/v1/predict", json=body, headers={"authorization": "Bearer s3cret"})
        header = httpx.get(f"{url}/v1/models", headers={"x-api-key": "s3cret"})
        metrics = httpx.get(f"{url}/metrics")
        health = httpx.get(f"{url}/health/ready")
    assert [missing.status_code, wrong.status_code, metrics.status_code] == [401, 401, 401]
    assert [bearer.status_code, header.status_code, health.status_code] == [200, 200, 200]


def test_sigterm_answers_every_admitted_request_before_exiting(slow_run: Path) -> None:
    async def scenario(url: str, process: subprocess.Popen) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=10)) as client:
            sent = [asyncio.create_task(client.post("/v1/predict", json={"inputs": [IMAGE]})) for _ in range(8)]
            for _ in range(100):  # until all 8 are admitted: one batch of 2 runs (0.5 s), 6 wait
                text = (await client.get("/metrics")).text
                if metric(text, "scaleforge_in_flight") == 9:  # the 8, and this request
                    break
                await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*sent)

    # a deadline far past the 2 s the four batches take: only the shutdown is under test, not a loaded machine
    with server(slow_run, *SLOW, "--max-batch-size", "2", "--timeout-ms", "20000") as (url, process):
        responses = asyncio.run(scenario(url, process))
        assert process.wait(timeout=30) == 0
    assert [r.status_code for r in responses] == [200] * 8


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
    return found


def model_processes(server_pid: int) -> set[int]:
    """The server's model processes: children started by multiprocessing's spawn (one that ends meanwhile is not)."""
    found = set()
    for pid in children(server_pid):
        with contextlib.suppress(OSError):
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text():
                found.add(pid)
    return found


def model_process(server_pid: int) -> int:
    (worker,) = model_processes(server_pid)
    return worker


@pytest.mark.slow
def test_the_model_process_is_restarted_when_it_dies_and_ends_with_the_server(slow_run: Path) -> None:
    body = {"inputs": [IMAGE]}

    async def killed_mid_batch(url: str, worker: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            pending = asyncio.ensure_future(client.post("/v1/predict", json=body))
            await asyncio.sleep(0.25)  # its batch runs for 0.5 s
            os.kill(worker, signal.SIGKILL)
            return await pending

    with server(slow_run, *SLOW) as (url, process):
        first = model_process(process.pid)
        died = asyncio.run(killed_mid_batch(url, first))
        after = httpx.post(f"{url}/v1/predict", json=body, timeout=30)  # a new process answers
        second = model_process(process.pid)
        os.kill(second, signal.SIGKILL)  # between batches: the next one starts a process before it runs
        assert gone(second)
        between = httpx.post(f"{url}/v1/predict", json=body, timeout=30)
        third = model_process(process.pid)
        started = children(process.pid)  # the model's process, and multiprocessing's resource tracker
        process.send_signal(signal.SIGTERM)  # to the server alone
        assert process.wait(timeout=60) == 0
    assert died.status_code == 503 and "exited (code -9) running this batch" in died.json()["detail"], died.text
    assert after.status_code == 200, after.text
    assert between.status_code == 200, between.text
    assert len({first, second, third}) == 3
    assert third in started and all(gone(pid) for pid in started)  # SIGTERM to the server ended them all


def test_two_workers_run_two_batches_at_once_and_end_with_the_server(slow_run: Path) -> None:
    flags = ("--threads", "1", "--workers", "2", "--trust-code", "--max-batch-size", "1")

    async def four(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json={"inputs": [IMAGE]}) for _ in range(4)))

    with server(slow_run, *flags) as (url, process):
        workers = model_processes(process.pid)
        answers = asyncio.run(four(url))  # each batch takes 0.5 s: the second starts while the first runs
        text = httpx.get(f"{url}/metrics").text
        process.kill()
        process.wait(timeout=30)
        assert [pid for pid in workers if not gone(pid, within_s=10)] == []
    assert len(workers) == 2 and [answer.status_code for answer in answers] == [200] * 4
    assert len({json.dumps(answer.json()["outputs"]) for answer in answers}) == 1  # the same weights in both
    batches = [metric(text, "scaleforge_model_process_batches_total", process=str(index)) for index in (0, 1)]
    assert sum(batches) == 4 and min(batches) >= 1, batches


def test_a_model_process_that_hangs_is_restarted_and_its_batch_refused(slow_run: Path) -> None:
    # every batch sleeps 0.5 s: past a 0.2 s batch timeout, it is taken for hung
    with server(slow_run, *SLOW, "--batch-timeout-s", "0.2") as (url, process):
        first = model_process(process.pid)
        hung = httpx.post(f"{url}/v1/predict", json={"inputs": [IMAGE]}, timeout=30)
        second = model_process(process.pid)
        ready = httpx.get(f"{url}/health/ready").status_code
    assert hung.status_code == 503 and "did not answer this batch within --batch-timeout-s 0.2" in hung.text
    assert first != second and gone(first) and ready == 200  # a fresh process, and the server serves on


def test_a_small_model_runs_on_a_thread_and_a_killed_server_leaves_no_model_process_behind(digits_run: Path) -> None:
    with server(digits_run) as (url, process):  # the MLP's requests cost more than its compute: no process
        assert httpx.post(f"{url}/v1/predict", json={"inputs": [IMAGE]}).status_code == 200
        assert not model_processes(process.pid)
    with server(digits_run, "--model-process") as (url, process):
        worker = model_process(process.pid)
        assert httpx.post(f"{url}/v1/predict", json={"inputs": [IMAGE]}).status_code == 200
        process.kill()
        process.wait(timeout=30)
        assert gone(worker)  # its pipe closed: it exits on its own


def test_a_killed_server_takes_its_model_process_with_it_even_mid_batch(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    run_dir = make_held_run(tmp_path, hold)  # a batch held for as long as the file is there: past the test
    with server(run_dir, *SLOW, "--batch-timeout-s", "900") as (url, process):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"inputs": [IMAGE]}).encode()
        head = f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        hold.touch()
        with socket.create_connection((host, int(port))) as client:  # its answer is never read
            client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 60
            while not hold.with_name("hold.reached").exists():  # the batch is in the model's process
                assert time.monotonic() < deadline, "the batch never reached the model"
                time.sleep(0.05)
            started = children(process.pid)  # the model's process, and multiprocessing's resource tracker
            assert model_process(process.pid) in started
            process.kill()
            process.wait(timeout=30)
            assert [pid for pid in started if not gone(pid, within_s=10)] == []


def test_a_killed_server_takes_its_decoding_process_with_it(digits_run: Path) -> None:
    body = {"inputs": [IMAGE] * 32, "padding": "x" * 2 * INLINE_BODY_BYTES}  # decoded away from the event loop
    with server(digits_run) as (url, process):
        assert httpx.post(f"{url}/v1/predict", json=body, timeout=30).status_code == 200
        decoding = children(process.pid)
        assert len(decoding) == 1  # the decoding process; the model runs on a thread
        process.kill()
        process.wait(timeout=30)
        assert [pid for pid in decoding if not gone(pid, within_s=10)] == []


def test_metrics_count_what_the_client_saw(digits_run: Path) -> None:
    seen: dict[int, int] = {}
    with server(digits_run, "--cache-size", "16") as (url, _), httpx.Client(base_url=url) as client:
        for body in [{"inputs": [IMAGE]}] * 5 + [{"inputs": []}] * 3 + [{"inputs": [[1]]}] * 2:
            status = client.post("/v1/predict", json=body).status_code
            seen[status] = seen.get(status, 0) + 1
        models = client.get("/v1/models")
        text = client.get("/metrics").text
    assert seen == {200: 5, 422: 5}
    for status, count in seen.items():
        assert metric(text, "scaleforge_requests_total", endpoint="/v1/predict", status=str(status)) == count
    assert metric(text, "scaleforge_requests_total", endpoint="/v1/models", status="200") == 1
    assert metric(text, "scaleforge_request_seconds_count", endpoint="/v1/predict") == 10
    assert metric(text, "scaleforge_cache_total", outcome="hit") == 4  # the same instance five times
    assert metric(text, "scaleforge_cache_total", outcome="miss") == 1
    assert metric(text, "scaleforge_rejections_total", reason="invalid") == 5
    assert metric(text, "process_resident_memory_bytes") > 0 and metric(text, "scaleforge_model_load_seconds") > 0
    listed = models.json()
    assert listed["object"] == "list" and len(listed["data"]) == 1
    card = listed["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "scaleforge" and isinstance(card["created"], int)
    assert card["task"] == "classification" and card["input_schema"]["shape"] == [1, 8, 8]
    assert "completions" not in card


def no_server_error(url: str, folder: Path, *flags: str) -> None:
    """schemathesis over the server's OpenAPI schema (with `flags`, seeded) finds no 5xx."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    command = [str(schemathesis), "run", f"{url}/openapi.json", "--checks", "not_a_server_error"]
    command += ["--seed", "1", "--no-color", *flags]
    # run where its cache folder (.schemathesis/) does no harm
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "passed" in result.stdout and "failed" not in result.stdout.split("SUMMARY")[-1]


def test_schemathesis_finds_no_server_error(digits_url: str, tmp_path: Path) -> None:
    no_server_error(digits_url, tmp_path, "--max-examples", "50")


@pytest.mark.slow
def test_bench_serve_prints_its_table_and_plot(digits_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "scaleforge", "bench", "serve", str(digits_run), "--concurrency", "1,4"]
    command += ["--requests", "40", "--seconds", "5", "--overload", "2", "--repeats", "2", "--no-litserve"]
    command += ["--beside-large", "2", "--workers", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "serve.json").read_text())
    loads = [(level["target"], level["load"]) for level in report["levels"]]
    assert loads[:3] == [
        ("scaleforge, batching", "1 in flight"),
        ("scaleforge, batching", "4 in flight"),
        ("scaleforge, batching", loads[2][1]),
    ] and loads[2][1].startswith("2x capacity")
    bounded, load = loads[-1]  # the same overload, on a server told to keep twice the unloaded p99
    assert bounded.startswith("scaleforge, batching, --latency-target-ms ") and load.startswith("2x capacity")
    servers = {"scaleforge, batching", "scaleforge, batch 1", "bare FastAPI, constant", bounded}
    servers |= {"scaleforge, batching, 2 workers", "2 servers, one port (SO_REUSEPORT)"}
    assert {target for target, _ in loads} == servers
    closed = [level for level in report["levels"] if level["load"].endswith("in flight")]
    assert all(level["statuses"] == {"200": 40} and level["p99_ms"] > 0 for level in closed)
    assert all(
        len(level["throughput_runs"]) == 2 and level["throughput"] in level["throughput_runs"] for level in closed
    )
    assert (out / "serve.png").stat().st_size > 10_000
    assert "answered/s" in result.stdout and "bare FastAPI, constant" in result.stdout
    beside = report["beside_large"]  # the small requests alone, then beside large bodies sent one after another
    assert beside["alone"]["statuses"] == beside["beside"]["statuses"] == {"200": 40}
    assert beside["beside"]["load"] == f"2 in flight + large bodies ({beside['large_body_bytes']:,} bytes)"
    assert beside["large_body_bytes"] > 32 * 64 * 15 and list(beside["large_statuses"]) == ["200"]
    assert beside["p99_ratio"] == beside["beside"]["p99_ms"] / beside["alone"]["p99_ms"]
    assert "small requests' p99 beside large bodies" in result.stdout


def test_bad_serve_arguments_are_one_line_and_exit_2(digits_run: Path, tmp_path: Path, cli) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        cases = [
            ((str(tmp_path),), "is not a finished run"),
            ((str(digits_run), "--port", port), f"--port {port}: cannot listen there (Address already in use"),
            ((str(digits_run), "--max-delay-ms", "-1"), "--max-delay-ms: expected a non-negative number, got -1"),
            ((str(digits_run), "--timeout-ms", "0"), "--timeout-ms: expected a positive number, got 0"),
            ((str(digits_run), "--api-key-env", "SCALEFORGE_NO_SUCH_KEY"), "that environment variable is unset"),
            ((str(digits_run), "--device", "tpu"), "--device: 'tpu' is not a device"),
            ((str(digits_run), "--backend", "onnxruntime", "--onnx", str(tmp_path / "x.onnx")), "--format onnx"),
            ((str(digits_run), "--onnx", str(tmp_path / "x.onnx")), "--onnx applies to --backend onnxruntime"),
            ((str(digits_run), "--workers", "2", "--no-model-process"), "--no-model-process runs it beside HTTP"),
            ((str(digits_run), "--workers", "0"), "--workers: expected a positive"),
            (
                (str(digits_run), "--backend", "onnxruntime", "--signing-key-env", "KEY"),
                "--signing-key-env checks final/, not the exported ONNX file",
            ),
            ((str(digits_run), "--signing-key-env", "SCALEFORGE_NO_SUCH_KEY"), "that environment variable is unset"),
            ((str(digits_run), "--tls-cert", str(tmp_path / "c.pem")), "--tls-cert needs --tls-key: HTTPS takes"),
            ((str(digits_run), "--tls-key", str(tmp_path / "k.pem")), "--tls-key needs --tls-cert"),
            (
                (str(digits_run), "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")),
                f"--tls-cert {tmp_path / 'c.pem'}: cannot read it (No such file or directory)",
            ),
        ]
        for args, message in cases:
            result = cli("serve", *args)
            assert result.code == 2 and message in result.err, (args, result.err)
            assert result.err.count("\n") == 1 and result.err.startswith("usage error: ")


def test_a_drain_grace_keeps_serving_with_readiness_at_503(digits_run: Path) -> None:
    with server(digits_run, "--drain-grace-s", "2") as (url, process):
        assert httpx.get(f"{url}/health/ready").status_code == 200
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{url}/health/ready")  # a new connection: still accepted
        served = httpx.post(f"{url}/v1/predict", json={"inputs": [IMAGE]})
        assert process.wait(timeout=30) == 0
    assert ready.status_code == 503 and ready.json() == {"detail": "draining"}
    assert served.status_code == 200


@pytest.mark.slow
def test_a_hung_batch_on_the_models_thread_turns_liveness_to_503_until_the_model_answers(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    run_dir = make_held_run(tmp_path, hold)
    flags = ("--threads", "1", "--no-model-process", "--batch-timeout-s", "0.5", "--trust-code")

    async def scenario(url: str) -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            seen = {"live before": await client.get("/health/live")}
            hold.touch()  # the next batch waits for as long as the file is there
            stuck = asyncio.ensure_future(client.post("/v1/predict", json={"inputs": [IMAGE]}))
            seen["live while hung"] = await until(lambda: client.get("/health/live"), 503)
            seen["new request"] = await client.post("/v1/predict", json={"inputs": [IMAGE]})
            seen["hung request"] = await stuck
            hold.unlink()
            seen["live after"] = await until(lambda: client.get("/health/live"), 200)
            seen["served after"] = await client.post("/v1/predict", json={"inputs": [IMAGE]})
            return seen

    with server(run_dir, *flags) as (url, process):
        seen = asyncio.run(scenario(url))
        assert not model_processes(process.pid)
    assert seen["live before"].status_code == 200
    assert "not answered its batch within 0.5 s (--batch-timeout-s)" in seen["live while hung"].json()["detail"]
    assert seen["new request"].status_code == 503 and "refused until it does" in seen["new request"].text
    assert seen["hung request"].status_code == 503
    assert seen["served after"].status_code == 200


@pytest.mark.slow
def test_https_with_a_self_signed_certificate(digits_run: Path, tmp_path: Path) -> None:
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    trusted = ssl.create_default_context(cafile=str(cert))  # this certificate, and nothing else
    with server(digits_run, "--tls-cert", str(cert), "--tls-key", str(key)) as (url, _):
        assert url.startswith("https://")
        with httpx.Client(base_url=url, verify=trusted) as client:
            answered = client.post("/v1/predict", json={"inputs": [IMAGE]})
            live = client.get("/health/live")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/health/live", verify=ssl.create_default_context())  # the system's authorities only
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/health/live")  # plain HTTP is not served
    assert answered.status_code == 200 and live.status_code == 200
