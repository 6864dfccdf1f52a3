"""`POST /v1/completions` as OpenAI's client calls it: a small gpt trained from the CLI on text, served by
`scaleforge serve` on 127.0.0.1 behind an API key; answers against `scaleforge.generate`, streamed and not, and
every request it cannot answer refused with a 4xx in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from openai import AuthenticationError, OpenAI

import scaleforge
from scaleforge.cli import main
from scaleforge.generation.sampling import SamplingOptions
from scaleforge.serve.app import ServeSettings, ServingApp
from scaleforge.serve.model import ServedModel
from tests.integration.test_generate import GPT, QUICK
from tests.integration.test_serve import metric, no_server_error, server

pytestmark = pytest.mark.timeout(300)

KEY = "s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gpt trained for 40 steps on words with accented letters (two-byte characters in UTF-8), bytes tokens."""
    folder = tmp_path_factory.mktemp("completions")
    words = ["the", "quick", "brown", "fox", "jumps", "über", "café", "naïve", "dog"]
    rng = random.Random(0)
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    data = ["data.dataset=text", f"data.path={folder / 'corpus.txt'}", "data.seq_len=32", "name=tiny"]
    assert main(["train", *GPT, *data, *QUICK, "training.max_steps=40", "--run-dir", str(folder / "run")]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def url(run: Path) -> Iterator[str]:
    flags = ["--api-key-env", "SERVE_KEY", "--max-batch-size", "4", "--max-step-tokens", "8"]
    with server(run, *flags, env={"SERVE_KEY": KEY}) as (address, _):
        yield address


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def test_greedy_completions_equal_generate_streamed_or_not(client: OpenAI, run: Path) -> None:
    expected = scaleforge.generate(run, "the quick", temperature=0, max_new_tokens=20)
    whole = client.completions.create(model="tiny", prompt="the quick", max_tokens=20, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.model == "tiny"
    assert [choice.text for choice in whole.choices] == [expected] and whole.choices[0].finish_reason == "length"
    assert whole.choices[0].index == 0 and whole.choices[0].logprobs is None
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (9, 20, 29)

    chunks = list(
        client.completions.create(model="tiny", prompt="the quick", max_tokens=20, temperature=0, stream=True)
    )
    texts = [chunk.choices[0].text for chunk in chunks]
    assert "".join(texts) == expected and chunks[-1].choices[0].finish_reason == "length"
    assert all(text and "\ufffd" not in text for text in texts[:-1])  # a piece per token, characters whole
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


def test_a_list_of_prompts_gets_a_choice_each_in_order(client: OpenAI, run: Path) -> None:
    prompts = ["the quick", "naïve ca", "über"]
    answer = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, answer.choices, strict=True):
        assert choice.text == scaleforge.generate(run, prompt, temperature=0, max_new_tokens=12)
    assert answer.usage is not None and answer.usage.completion_tokens == 36
    assert answer.usage.prompt_tokens == sum(len(prompt.encode()) for prompt in prompts)  # bytes tokens

    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == [choice.text for choice in answer.choices]


def test_a_stop_string_spanning_two_tokens_and_seeds(client: OpenAI) -> None:
    greedy = client.completions.create(model="tiny", prompt="the", max_tokens=24, temperature=0).choices[0].text
    stop = greedy[4:6]  # two characters: two tokens of a bytes model
    stopped = client.completions.create(model="tiny", prompt="the", max_tokens=24, temperature=0, stop=[stop, "zz"])
    assert stopped.choices[0].text == greedy[: greedy.index(stop)] and stopped.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model="tiny", prompt="the", max_tokens=16, seed=seed, top_p=0.9).choices[0].text
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_server_sent_events_end_with_done(url: str) -> None:
    body = {"model": "tiny", "prompt": "café", "max_tokens": 10, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_models_are_listed_in_openais_shape(client: OpenAI, url: str) -> None:
    assert [model.id for model in client.models.list()] == ["tiny"]
    listed = httpx.get(f"{url}/v1/models", headers=AUTH).json()
    assert listed["object"] == "list"
    (entry,) = listed["data"]
    assert entry["object"] == "model" and entry["owned_by"] == "scaleforge" and isinstance(entry["created"], int)
    assert entry["task"] == "language_modeling" and entry["input_schema"]["tokenizer"] == "bytes"
    assert entry["completions"] == {"endpoint": "/v1/completions", "context": 32}


BASE = {"model": "tiny", "prompt": "the"}


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        ({**BASE, "model": "gpt-4"}, 404, "model", "The model 'gpt-4' does not exist"),
        ({**BASE, "n": 2}, 400, "n", "n=2 is not supported"),
        ({**BASE, "best_of": 3}, 400, "best_of", "best_of=3 is not supported"),
        ({**BASE, "logprobs": 1}, 400, "logprobs", "logprobs=1 is not supported"),
        ({**BASE, "echo": True}, 400, "echo", "echo=True is not supported"),
        ({**BASE, "suffix": "end"}, 400, "suffix", "suffix='end' is not supported"),
        ({**BASE, "presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty=0.5 is not supported"),
        ({**BASE, "frequency_penalty": 1}, 400, "frequency_penalty", "frequency_penalty=1.0 is not supported"),
        ({**BASE, "logit_bias": {"1": 2.0}}, 400, "logit_bias", "is not supported"),
        ({**BASE, "colour": "red"}, 400, "colour", "Unrecognized request argument supplied: colour"),
        ({**BASE, "prompt": "x" * 33}, 400, "prompt", "maximum context length is 32 tokens"),
        ({**BASE, "prompt": ""}, 400, "prompt", "prompt is empty"),
        ({**BASE, "prompt": []}, 400, "prompt", "give 1 to 4 prompts"),
        ({**BASE, "prompt": ["a"] * 5}, 400, "prompt", "give 1 to 4 prompts"),
        ({**BASE, "max_tokens": 0}, 400, "max_tokens", "max_tokens must be 1 to 32"),
        ({**BASE, "max_tokens": 33}, 400, "max_tokens", "max_tokens must be 1 to 32"),
        ({**BASE, "temperature": 2.5}, 400, "temperature", "temperature must be 0 to 2"),
        ({**BASE, "top_p": 0}, 400, "top_p", "top_p must be above 0"),
        ({**BASE, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4 non-empty strings"),
        ({**BASE, "stop": [""]}, 400, "stop", "up to 4 non-empty strings"),
        ({**BASE, "seed": -1}, 400, "seed", "seed must be 0"),
        ({**BASE, "max_tokens": "16"}, 422, "max_tokens", "max_tokens: Input should be a valid integer"),
        ({**BASE, "prompt": [1, 2]}, 422, "prompt", "prompt"),
        ({"prompt": "the"}, 422, "model", "model: Field required"),
        ([1, 2], 422, None, "body: Input should be a valid dictionary"),
        ("not json", 400, None, "the body is not valid JSON"),
    ],
)
def test_requests_it_cannot_answer_get_a_4xx_in_openais_shape(
    url: str, body: object, status: int, param: str | None, message: str
) -> None:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    headers = {**AUTH, "content-type": "application/json"}
    response = httpx.post(f"{url}/v1/completions", content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert message in error["message"] and error["param"] == param


def test_chat_an_api_key_and_metrics(client: OpenAI, url: str) -> None:
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=AUTH)
    assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model="tiny", prompt="a")
    refused = httpx.post(f"{url}/v1/completions", json=BASE)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    client.completions.create(model="tiny", prompt="the", max_tokens=5, temperature=0)
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert metric(text, "scaleforge_generated_tokens_total") >= 5
    assert metric(text, "scaleforge_time_to_first_token_seconds_count") >= 1
    assert metric(text, "scaleforge_time_per_output_token_seconds_count") >= 4
    assert metric(text, "scaleforge_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert "scaleforge_running_sequences" in text and "scaleforge_batch_occupancy_ratio" in text


def test_a_full_waiting_queue_and_a_body_past_the_limit_are_refused_in_openais_shape(run: Path) -> None:
    served = ServedModel(run)
    app = ServingApp(served, ServeSettings(max_batch_size=1, max_queue=1, max_body_mb=0.001))
    assert app.completions is not None
    # the engine's thread is not started: what is submitted stays waiting
    app.completions.loop.submit([1, 2, 3], SamplingOptions(), lambda output: None)

    async def post(prompt: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.gate()), base_url="http://test") as http:
            return await http.post("/v1/completions", json={**BASE, "model": served.card.name, "prompt": prompt})

    full = asyncio.run(post("the"))
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    error = full.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "queue_full" and "--max-queue 1" in error["message"]
    large = asyncio.run(post("x" * 2000))
    assert large.status_code == 413 and large.json()["error"]["code"] == "too_large"
    assert "--max-body-mb 0.001" in large.json()["error"]["message"]


def test_a_stream_whose_client_goes_away_stops_being_decoded(run: Path) -> None:
    app = ServingApp(ServedModel(run), ServeSettings(max_batch_size=2))
    assert app.completions is not None
    engine = app.completions.loop.engine
    decode, steps = engine.model.decode, []

    def slow_decode(slots, tokens):  # noqa: ANN001, ANN202 - 20 ms a step: the client leaves mid-stream
        steps.append(len(slots))
        time.sleep(0.02)
        return decode(slots, tokens)

    engine.model.decode = slow_decode  # type: ignore[method-assign]
    served = uvicorn.Server(uvicorn.Config(app.gate(), port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=served.run)
    thread.start()
    try:
        while not served.started:
            time.sleep(0.01)
        port = served.servers[0].sockets[0].getsockname()[1]
        body = {"model": app.model.card.name, "prompt": "t", "max_tokens": 32, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
            assert response.status_code == 200
            for count, _ in enumerate(response.iter_lines()):
                if count == 4:
                    break  # and the connection closes
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.running and len(steps) < 12  # 31 steps had it stayed
    finally:
        served.should_exit = True
        thread.join(timeout=30)


def test_a_language_model_on_text_is_not_served_from_a_model_process(cli, run: Path) -> None:  # noqa: ANN001
    refused = cli("serve", str(run), "--port", "0", "--model-process")
    assert refused.code == 2 and "--model-process: a language model's completions are decoded" in refused.err


def test_schemathesis_finds_no_server_error_in_the_completions(url: str, tmp_path: Path) -> None:
    no_server_error(
        url,
        tmp_path,
        "--include-path-regex",
        "completions",
        "--max-examples",
        "40",
        "-H",
        f"Authorization: Bearer {KEY}",
    )
