"""`scaleforge serve --repository DIR` as a user runs it: a real server process on 127.0.0.1 serving a model
repository of several models and versions, driven over HTTP while versions are added and removed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from scaleforge import load_config
from scaleforge.data.digits import digits
from scaleforge.runs import write_manifest
from scaleforge.training.trainer import train
from tests.conftest import REPO, until
from tests.integration.test_serve import metric, model_processes, png

pytestmark = pytest.mark.timeout(300)

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]
IMAGE = [[[0.5] * 8 for _ in range(8)]]  # one digits instance, (1, 8, 8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two digits runs of different weights, a small gpt on text, each trained for a few steps."""
    folder = tmp_path_factory.mktemp("runs")
    for name, seed in (("digits-a", 0), ("digits-b", 1)):
        train(load_config(None, [*QUICK, "training.max_steps=20", f"seed={seed}"]), folder / name)
    (folder / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    gpt = ["model.architecture=gpt", "model.n_layers=1", "model.d_model=32", "model.n_heads=2"]
    text = ["data.dataset=text", f"data.path={folder / 'corpus.txt'}", "data.seq_len=32", "training.batch_size=16"]
    train(load_config(None, [*QUICK, *gpt, *text, "training.max_steps=10"]), folder / "gpt")
    train(load_config(None, [*QUICK, "training.max_steps=2", "training.learning_rate=0.0001"]), folder / "weak")
    train(load_config(None, [*QUICK, "training.max_steps=150"]), folder / "strong")
    runs = {"a": folder / "digits-a", "b": folder / "digits-b", "gpt": folder / "gpt"}
    return {**runs, "weak": folder / "weak", "strong": folder / "strong"}


@pytest.fixture
def repository(tmp_path: Path, runs: dict[str, Path]) -> Path:
    """digits (versions 1 and 2, a 50/50 split sticky by X-User), gpt (1), broken (1: its weights unreadable,
    its manifest matching them) and copying (1: no manifest yet)."""
    root = tmp_path / "models"
    shutil.copytree(runs["a"], root / "digits" / "1")
    shutil.copytree(runs["b"] / "final", root / "digits" / "2")  # a version may be a run's final/ itself
    (root / "digits" / "serving.yaml").write_text("traffic: {1: 50, 2: 50}\nsticky_header: X-User\n")
    shutil.copytree(runs["gpt"], root / "gpt" / "1")
    broken = root / "broken" / "1" / "final"
    shutil.copytree(runs["a"] / "final", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    write_manifest(broken)
    copying = root / "copying" / "1" / "final"
    shutil.copytree(runs["a"] / "final", copying)
    (copying / "manifest.json").unlink()
    return root


@pytest.fixture
def served(repository: Path) -> Iterator[str]:
    with repository_server(repository, "--default-model", "digits", "--poll-s", "0.2") as url:
        yield url


class repository_server:
    """`scaleforge serve --repository ROOT --port 0 FLAGS` in a process of its own; its base URL."""

    def __init__(self, root: Path, *flags: str) -> None:
        self.command = [sys.executable, "-m", "scaleforge", "serve", "--repository", str(root), "--port", "0", *flags]

    def __enter__(self) -> str:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()
        found = re.search(r"(https?)://127\.0\.0\.1:(\d+)", banner)
        assert found, banner + self.process.stdout.read()
        return f"{found.group(1)}://127.0.0.1:{found.group(2)}"

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def versions_of(listing: dict, model: str) -> dict[int, dict]:
    entry = next(entry for entry in listing["data"] if entry["id"] == model)
    return {version["version"]: version for version in entry["versions"]}


def test_every_model_and_version_is_listed_with_its_state_and_answered_on_its_routes(served: str) -> None:
    with httpx.Client(base_url=served, timeout=30) as client:
        listing = client.get("/v1/models").json()
        assert listing["object"] == "list"
        assert [entry["id"] for entry in listing["data"]] == ["broken", "copying", "digits", "gpt"]
        digits = versions_of(listing, "digits")
        assert {v: (e["state"], e["traffic"]) for v, e in digits.items()} == {1: ("ready", 0.5), 2: ("ready", 0.5)}, (
            digits
        )
        assert digits[1]["digest"] != digits[2]["digest"] and digits[1]["task"] == "classification"
        assert digits[2]["input_schema"]["image"]["endpoint"] == "/v1/models/digits/predict/image"
        broken = versions_of(listing, "broken")[1]
        assert broken["state"] == "failed" and broken["error"]
        copying = versions_of(listing, "copying")[1]
        assert copying["state"] == "pending" and "manifest.json" in copying["error"]

        pinned = client.post("/v1/models/digits/versions/2/predict", json={"inputs": [IMAGE]})
        assert pinned.status_code == 200 and pinned.headers["X-Model-Version"] == "2"
        answer = pinned.json()
        assert (answer["model"], answer["model_version"], answer["digest"]) == ("digits", 2, digits[2]["digest"])
        assert len(answer["outputs"]) == 1
        default = client.post("/v1/predict", json={"inputs": [IMAGE]})
        assert default.status_code == 200 and default.json()["model"] == "digits"
        grey = [[round(v * 255) for v in row] for row in IMAGE[0]]
        upload = {"file": ("digit.png", png(grey, "L"), "image/png")}
        image = client.post("/v1/models/digits/versions/2/predict/image", files=upload)
        assert image.status_code == 200 and image.json()["model_version"] == 2
        assert image.json()["outputs"][0]["top_class"] == pinned.json()["outputs"][0]["top_class"]
        not_images = client.post("/v1/models/gpt/predict/image", files=upload)
        assert not_images.status_code == 422 and "does not take images" in not_images.json()["detail"]

        assert client.post("/v1/models/broken/predict", json={"inputs": [IMAGE]}).status_code == 503
        assert client.post("/v1/models/copying/versions/1/predict", json={"inputs": [IMAGE]}).status_code == 503
        missing = client.post("/v1/models/nope/predict", json={"inputs": [IMAGE]})
        assert missing.status_code == 404 and "no model 'nope'" in missing.json()["detail"]
        assert client.post("/v1/models/digits/versions/7/predict", json={"inputs": [IMAGE]}).status_code == 404

        body = {"model": "gpt", "prompt": "the quick", "max_tokens": 5, "temperature": 0}
        completion = client.post("/v1/completions", json=body)
        assert completion.status_code == 200 and completion.json()["model"] == "gpt"
        pinned_completion = client.post("/v1/models/gpt/versions/1/completions", json=body)
        assert pinned_completion.json()["choices"][0]["text"] == completion.json()["choices"][0]["text"]
        with client.stream("POST", "/v1/models/gpt/completions", json={**body, "stream": True}) as streamed:
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 2
        unknown = client.post("/v1/completions", json={**body, "model": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["message"]
        assert client.post("/v1/admin/reload").status_code == 403  # no API key: no admin routes

        text = client.get("/metrics").text
    assert metric(text, "scaleforge_version_inference_seconds_count", model="digits", model_version="2") >= 1
    routes = 'scaleforge_requests_total{endpoint="/v1/models/{name}/versions/{version}/predict",status="200"}'
    assert routes in text  # a model's routes counted by their template, not as "other"


def test_the_split_follows_its_weights_and_a_sticky_header_keeps_one_version(served: str) -> None:
    with httpx.Client(base_url=served, timeout=30) as client:
        drawn = Counter(
            client.post("/v1/models/digits/predict", json={"inputs": [IMAGE]}).json()["model_version"]
            for _ in range(300)
        )
        sticky = {
            user: {
                client.post("/v1/models/digits/predict", json={"inputs": [IMAGE]}, headers={"X-User": user}).json()[
                    "model_version"
                ]
                for _ in range(5)
            }
            for user in (f"user-{index}" for index in range(40))
        }
    assert abs(drawn[1] / 300 - 0.5) < 4 * (0.25 / 300) ** 0.5, drawn  # four standard deviations
    assert all(len(versions) == 1 for versions in sticky.values())  # each user keeps one version
    assert {next(iter(versions)) for versions in sticky.values()} == {1, 2}  # and users are split


def test_versions_added_and_removed_under_load_fail_no_request(served: str, repository: Path, runs: dict) -> None:
    statuses: Counter[int] = Counter()
    versions: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=served, timeout=30) as client:
            while not stop.is_set():
                answer = client.post("/v1/models/digits/predict", json={"inputs": [IMAGE]})
                statuses[answer.status_code] += 1
                if answer.status_code == 200:
                    versions[answer.json()["model_version"]] += 1

    async def state_of(version: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=served) as client:
            listing = (await client.get("/v1/models")).json()
            found = versions_of(listing, "digits").get(version, {}).get("state")
            return httpx.Response(200 if found == "ready" else 404 if found in (None, "not served") else 503)

    sender = threading.Thread(target=load)
    sender.start()
    try:
        time.sleep(0.5)
        shutil.copytree(runs["b"], repository / "digits" / "3.partial")  # copied beside, then renamed into place
        (repository / "digits" / "3.partial").rename(repository / "digits" / "3")
        (repository / "digits" / "serving.yaml").write_text("traffic: {2: 50, 3: 50}\n")  # 1 is no longer served
        asyncio.run(until(lambda: state_of(3), 200))
        asyncio.run(until(lambda: state_of(1), 404))  # drained, then unloaded
        shutil.rmtree(repository / "digits" / "2")
        asyncio.run(until(lambda: state_of(2), 404))
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join()
    assert set(statuses) == {200}, statuses
    assert versions[1] and versions[3]  # traffic moved from the old versions to the new one


def test_bad_repository_arguments_are_one_line_and_exit_2(tmp_path: Path, runs: dict[str, Path], cli) -> None:
    cases = [
        ((), "give a RUN_DIR to serve one run, or --repository DIR"),
        ((str(runs["a"]), "--repository", str(tmp_path)), "give a RUN_DIR to serve one run, or --repository DIR"),
        (("--repository", str(tmp_path / "missing")), f"--repository {tmp_path / 'missing'}: not a folder"),
        (("--repository", str(tmp_path), "--model-process"), "--model-process applies to one run"),
        (("--repository", str(tmp_path), "--workers", "2", "--no-model-process"), "--workers 2 serves the model"),
        (("--repository", str(tmp_path), "--backend", "onnxruntime"), "--backend onnxruntime applies to one run"),
        ((str(runs["a"]), "--default-model", "digits"), "--default-model applies to --repository"),
        (("--repository", str(tmp_path), "--poll-s", "-1"), "--poll-s: expected a non-negative number"),
        (("--repository", str(tmp_path), "--default-model", "nope"), "--default-model nope: "),
    ]
    for args, message in cases:
        result = cli("serve", *args)
        assert result.code == 2 and message in result.err, (args, result.err)
        assert result.err.count("\n") == 1


def test_labelled_feedback_makes_the_ab_report_name_the_better_version(
    tmp_path: Path, runs: dict[str, Path], cli
) -> None:
    root = tmp_path / "models"
    shutil.copytree(runs["weak"], root / "ab" / "1")
    shutil.copytree(runs["strong"], root / "ab" / "2")
    shutil.copytree(runs["a"], root / "ab" / "3")
    (root / "ab" / "serving.yaml").write_text("traffic: {1: 50, 2: 50}\nshadow: 3\n")
    images, labels = digits().val.inputs, digits().val.targets
    reports = []
    answered: Counter[int] = Counter()
    log = tmp_path / "feedback.jsonl"
    with (
        repository_server(root, "--poll-s", "0", "--feedback-log", str(log)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for start in range(0, 4 * 120, 4):
            rows = [index % len(labels) for index in range(start, start + 4)]
            answer = client.post("/v1/models/ab/predict", json={"inputs": images[rows].tolist()})
            assert answer.status_code == 200 and answer.headers["X-Request-Id"] == answer.json()["request_id"]
            answered[answer.json()["model_version"]] += 1
            given = client.post(
                "/v1/feedback", json={"request_id": answer.json()["request_id"], "label": labels[rows].tolist()}
            )
            assert given.status_code == 200 and given.json()["model_version"] == answer.json()["model_version"]
            if start % 40 == 0:
                reports.append(client.get("/v1/models/ab/ab", params={"control": 1}).json())
        again = client.post("/v1/feedback", json={"request_id": answer.json()["request_id"], "label": [0, 0, 0, 0]})
        unknown = client.post("/v1/feedback", json={"request_id": "nope", "label": 1})
        wrong_count = client.post("/v1/feedback", json={"request_id": "nope", "label": [1, 2]})
        bad_reward = client.post("/v1/feedback", json={"request_id": "x", "reward": "high"})
        report = client.get("/v1/models/ab/ab", params={"control": 1}).json()
        reversed_report = client.get("/v1/models/ab/ab", params={"control": 2}).json()
        text = client.get("/metrics").text
        from_server = cli("ab", "report", url, "--control", "1")
    from_log = cli("ab", "report", str(log), "--control", "1", "--json")
    assert from_server.code == 0 and "promote" in from_server.out and "ab: accuracy, control 1" in from_server.out
    logged = {row["version"]: row for row in json.loads(from_log.out)["versions"]}
    assert {version: row["requests"] for version, row in logged.items()} == {
        row["version"]: row["requests"] for row in report["versions"]
    }
    assert logged["2"]["verdict"] == "promote"
    assert {version: row["outcomes"] for version, row in logged.items()} == {
        row["version"]: row["outcomes"] for row in report["versions"]
    }
    assert set(answered) == {1, 2}  # the shadow's answers are never returned
    assert (again.status_code, unknown.status_code, bad_reward.status_code) == (409, 404, 422)
    assert wrong_count.status_code == 404  # an unknown id is refused before its labels are read
    verdicts = {row["version"]: row for row in report["versions"]}
    assert report["control"] == "1" and verdicts["2"]["verdict"] == "promote", report["table"]
    assert verdicts["3"]["outcomes"] > 0  # the shadow scored on the same labels, never shown
    assert {row["version"]: row["verdict"] for row in reversed_report["versions"]}["1"] == "keep the control"
    first = next(row for row in reports[0]["versions"] if row["version"] == "2")
    assert first["verdict"] != "promote"  # after 1 request each, not enough data yet
    accuracy = {
        version: metric(text, "scaleforge_version_accuracy", model="ab", model_version=version) for version in "12"
    }
    assert accuracy["2"] > accuracy["1"] + 0.2
    assert metric(text, "scaleforge_version_outcomes_total", kind="label", model="ab", model_version="3") > 0


def test_a_newer_version_takes_over_only_once_it_is_ready_and_a_failing_one_never(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    root = tmp_path / "models"
    shutil.copytree(runs["a"], root / "digits" / "1")  # no serving.yaml: the newest complete version is served
    statuses: Counter[int] = Counter()
    versions: Counter[int] = Counter()
    stop = threading.Event()

    def load(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                answer = client.post("/v1/models/digits/predict", json={"inputs": [IMAGE]})
                statuses[answer.status_code] += 1
                if answer.status_code == 200:
                    versions[answer.json()["model_version"]] += 1

    def listed(url: str) -> dict[int, dict]:
        return versions_of(httpx.get(f"{url}/v1/models").json(), "digits")

    async def state_of(url: str, version: int, state: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url) as client:
            found = versions_of((await client.get("/v1/models")).json(), "digits").get(version, {}).get("state")
            return httpx.Response(200 if found == state else 503)

    with repository_server(root, "--poll-s", "0.2") as url:
        sender = threading.Thread(target=load, args=(url,))
        sender.start()
        try:
            copying = root / "digits" / "2" / "final"
            shutil.copytree(runs["b"] / "final", copying)
            (copying / "manifest.json").unlink()  # still being copied: its manifest comes last
            asyncio.run(until(lambda: state_of(url, 2, "pending"), 200))
            assert listed(url)[1]["state"] == "ready"
            shutil.copy(runs["b"] / "final" / "manifest.json", copying / "manifest.json")
            asyncio.run(until(lambda: state_of(url, 2, "ready"), 200))
            asyncio.run(until(lambda: state_of(url, 1, "not served"), 200))
            broken = root / "digits" / "3" / "final"
            shutil.copytree(runs["a"] / "final", broken)
            (broken / "model.safetensors").write_bytes(b"not safetensors")
            write_manifest(broken)
            asyncio.run(until(lambda: state_of(url, 3, "failed"), 200))
            assert listed(url)[2]["state"] == "ready"  # the failed successor does not take the model down
            before = listed(url)[2].get("digest")
            assert before, listed(url)
            shutil.rmtree(broken.parent)
            replaced = root / "digits" / "2" / "final"
            files = sorted(path.name for path in (runs["a"] / "final").iterdir() if path.name != "manifest.json")
            for name in [*files, "manifest.json"]:  # another run's files in place, the manifest last
                shutil.copy(runs["a"] / "final" / name, replaced / f"{name}.new")
                (replaced / f"{name}.new").rename(replaced / name)
            asyncio.run(until(lambda: state_of(url, 2, "ready"), 200))
            deadline = time.monotonic() + 20
            while listed(url)[2].get("digest") == before and time.monotonic() < deadline:
                time.sleep(0.1)
            listed_after = listed(url)
            after = listed_after[2].get("digest")
        finally:
            stop.set()
            sender.join()
    assert set(statuses) == {200}, statuses
    assert versions[1] and versions[2] and not versions[3]
    assert after != before, listed_after  # the version's new weights serve, loaded beside the old ones first


def test_the_open_inference_protocol_serves_tritons_own_client(served: str) -> None:
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
    images = np.asarray(digits().val.inputs[:5], dtype=np.float32)
    client = http.InferenceServerClient(url=served.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "2")
    assert not client.is_model_ready("copying", "1")
    metadata = client.get_model_metadata("digits", "2")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {output["name"] for output in metadata["outputs"]} == {"top_class", "probability", "probabilities"}

    answers = {}
    for binary in (True, False):  # the raw-bytes extension, Triton's client's default, and plain JSON
        tensor = http.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        wanted = [http.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "top_class")]
        result = client.infer("digits", [tensor], model_version="2", outputs=wanted, request_id="r1")
        answers[binary] = (result.as_numpy("probabilities"), result.as_numpy("top_class"))
        assert result.get_response()["model_version"] == "2" and result.get_response()["id"] == "r1"
    every = client.infer("digits", [tensor], model_version="2")  # no outputs named: every one, as raw bytes
    ours = httpx.post(f"{served}/v1/models/digits/versions/2/predict", json={"inputs": images.tolist()}).json()
    expected = np.asarray([output["probabilities"] for output in ours["outputs"]], dtype=np.float32)
    for probabilities, top in answers.values():
        assert probabilities.shape == (5, 10) and np.allclose(probabilities, expected, atol=1e-6)
        assert top.dtype == np.int64 and top.tolist() == [output["top_class"] for output in ours["outputs"]]
    assert np.allclose(every.as_numpy("probability"), expected.max(axis=1), atol=1e-6)

    bad = http.InferInput("input", [1, 64], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(Exception, match=r"expected numbers shaped \[batch, 1, 8, 8\]"):
        client.infer("digits", [bad])
    with pytest.raises(Exception, match="not ready"):
        client.get_model_metadata("nope")
    client.close()


def test_an_admin_reload_picks_up_a_new_version_at_once_behind_the_api_key(
    tmp_path: Path, runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "models"
    shutil.copytree(runs["a"], root / "digits" / "1")
    monkeypatch.setenv("SCALEFORGE_TEST_ADMIN_KEY", "s3cret")
    with repository_server(root, "--poll-s", "0", "--api-key-env", "SCALEFORGE_TEST_ADMIN_KEY") as url:
        headers = {"X-API-Key": "s3cret"}
        shutil.copytree(runs["b"], root / "digits" / "2")
        assert httpx.post(f"{url}/v1/admin/reload").status_code == 401  # no key
        reloaded = httpx.post(f"{url}/v1/admin/reload", headers=headers, timeout=30)
        assert reloaded.status_code == 200 and reloaded.json()["loading"] == ["digits/2"]
        listing = httpx.get(f"{url}/v1/models", headers=headers).json()
        assert versions_of(listing, "digits")[2]["state"] in ("loading", "ready")


def test_two_workers_keep_one_count_of_requests_and_feedback(tmp_path: Path, runs: dict[str, Path]) -> None:
    root = tmp_path / "models"
    shutil.copytree(runs["weak"], root / "ab" / "1")
    shutil.copytree(runs["strong"], root / "ab" / "2")
    (root / "ab" / "serving.yaml").write_text("traffic: {1: 50, 2: 50}\n")
    shutil.copytree(runs["gpt"], root / "gpt" / "1")  # a language model: decoded in the server's process
    images, labels = digits().val.inputs, digits().val.targets
    answered: Counter[int] = Counter()
    correct: Counter[int] = Counter()
    lock = threading.Lock()

    def client(url: str, offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for start in range(offset, offset + 4 * 40, 4):
                rows = [index % len(labels) for index in range(start, start + 4)]
                answer = http.post("/v1/models/ab/predict", json={"inputs": images[rows].tolist()})
                assert answer.status_code == 200, answer.text
                body = answer.json()
                right = sum(
                    out["top_class"] == int(label) for out, label in zip(body["outputs"], labels[rows], strict=True)
                )
                given = http.post(
                    "/v1/feedback", json={"request_id": body["request_id"], "label": labels[rows].tolist()}
                )
                assert given.status_code == 200, given.text
                with lock:
                    answered[body["model_version"]] += 1
                    correct[body["model_version"]] += right

    async def two_left() -> httpx.Response:
        return httpx.Response(200 if len(model_processes(serving.process.pid)) == 2 else 503)

    serving = repository_server(root, "--poll-s", "0.2", "--workers", "2")
    with serving as url:
        workers = model_processes(serving.process.pid)
        clients = [threading.Thread(target=client, args=(url, 1000 * index)) for index in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        report = httpx.get(f"{url}/v1/models/ab/ab", params={"control": 1}).json()
        text = httpx.get(f"{url}/metrics").text
        completion = httpx.post(f"{url}/v1/completions", json={"model": "gpt", "prompt": "the", "max_tokens": 3})
        (root / "ab" / "serving.yaml").write_text("versions: [2]\n")  # version 1 drains: its processes end
        asyncio.run(until(two_left, 200, within_s=60))
        left = model_processes(serving.process.pid)
        kept = httpx.post(f"{url}/v1/models/ab/predict", json={"inputs": [IMAGE]})
    assert len(workers) == 4  # two model processes for each digits version, none for the language model
    assert left < workers and kept.status_code == 200 and kept.json()["model_version"] == 2
    assert completion.status_code == 200 and completion.json()["model"] == "gpt"
    rows = {int(row["version"]): row for row in report["versions"]}
    assert sum(answered.values()) == 160 and set(answered) == {1, 2}
    for version in (1, 2):  # every request and every outcome counted once, by the one process that keeps them
        assert rows[version]["requests"] == answered[version] and rows[version]["outcomes"] == 4 * answered[version]
        assert rows[version]["value"] == pytest.approx(correct[version] / (4 * answered[version]))
        batches = [
            metric(
                text,
                "scaleforge_version_model_process_batches_total",
                model="ab",
                model_version=str(version),
                process=str(index),
            )
            for index in (0, 1)
        ]
        assert 1 <= sum(batches) <= answered[version]  # batches of one or more requests, over the two processes
