"""The launcher around the workers: failures and hangs on one rank, restarts, several nodes, strategies on one
process.

Each test starts `scaleforge train` in a subprocess as a user would; a user's own dataset or model file
(`imports:`) makes one rank fail or hang on purpose.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scaleforge.network import free_port
from scaleforge.training.checkpoint import newest_good_checkpoint
from tests.conftest import REPO
from tests.integration.distributed_runs import (
    GPT,
    TOLERANCE,
    launch,
    max_difference,
    read_weights,
    single_process_run,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # multi-process runs, each several seconds

# Rank 1 fails while building the dataset: with a user error (exit 2), a crash or killed outright, on the first attempt
# only when FAIL_ONCE is set, so that a restarted worker gets through.
FLAKY_DATA = """
import os, signal
from scaleforge.data.synthetic import synthetic
from scaleforge.registry import register_dataset

@register_dataset("flaky_tokens")
def flaky_tokens(how="kill", kind="tokens", seq_len=16, vocab_size=64, num_samples=512):
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "crash":
            raise RuntimeError("rank 1 crashed")
        raise ValueError("rank 1 cannot read its shard")
    return synthetic(kind=kind, seq_len=seq_len, vocab_size=vocab_size, num_samples=num_samples)
"""


# One rank's forward pass never returns, on the first attempt only: a process stuck beyond the reach of Python's
# signal handlers (so the launcher's SIGTERM ends it at once rather than after its grace period).
STALLING_MODEL = """
import os, signal, time
from scaleforge.models.gpt import GPT
from scaleforge.registry import register_model

@register_model("stalling_gpt")
class StallingGPT(GPT):
    calls = 0

    def forward(self, tokens):
        StallingGPT.calls += 1
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        stalls = os.environ["RANK"] == os.environ["STALL_RANK"] and self.calls == int(os.environ["STALL_AT"])
        if first_attempt and stalls:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(600)
        return super().forward(tokens)
"""


# Slow while its process is the job's only one (1 s a forward pass), so that a node joins while it trains.
LONELY_MODEL = """
import os, time
from scaleforge.models.gpt import GPT
from scaleforge.registry import register_model

@register_model("lonely_gpt")
class LonelyGPT(GPT):
    def forward(self, tokens):
        if os.environ.get("WORLD_SIZE") == "1":
            time.sleep(1)
        return super().forward(tokens)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return single_process_run(tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture
def flaky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Overrides that train on the flaky dataset, importable by every worker."""
    (tmp_path / "flaky_data.py").write_text(FLAKY_DATA)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return ["imports=[flaky_data]", "data.dataset=flaky_tokens"]


@pytest.fixture
def stalling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[str]]:
    """Overrides that train the stalling model, whose rank `rank` hangs in the forward pass of step 8."""
    (tmp_path / "stalling_model.py").write_text(STALLING_MODEL)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("STALL_AT", "8")

    def overrides(rank: int) -> list[str]:
        monkeypatch.setenv("STALL_RANK", str(rank))
        return ["imports=[stalling_model]", "model.architecture=stalling_gpt", "parallel.timeout_s=3"]

    return overrides


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_a_strategy_on_one_process_trains_like_single(reference: Path, tmp_path: Path, strategy: str) -> None:
    result = launch(tmp_path / "run", f"parallel.strategy={strategy}", nproc=1)
    assert f"{strategy} on 1 process" in result.out
    assert max_difference(read_weights(reference), read_weights(tmp_path / "run")) <= TOLERANCE


def test_a_user_error_on_one_rank_is_reported_once_with_its_rank(tmp_path: Path, flaky: list[str]) -> None:
    result = launch(tmp_path / "run", *flaky, "data.how=raise", expect=2)
    errors = [line for line in result.err.splitlines() if line.strip()]
    assert errors == [errors[0]] and errors[0].startswith("rank 1: "), result.err
    assert "rank 1 cannot read its shard" in errors[0]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("kill", "training failed: rank 1 was killed by SIGKILL"),
        ("crash", "training failed: rank 1 exited with code 1"),
    ],
)
def test_a_failed_worker_fails_the_run_naming_it(tmp_path: Path, flaky: list[str], how: str, message: str) -> None:
    result = launch(tmp_path / "run", *flaky, f"data.how={how}", expect=1)
    assert result.err.strip().splitlines()[-1].startswith(message), result.err
    assert "[rank0]" not in result.err  # rank 0 stopped because its peer had gone: nothing of its own to say


def test_workers_are_restarted_after_a_crash_and_finish(reference: Path, tmp_path: Path, flaky: list[str]) -> None:
    result = launch(tmp_path / "run", *flaky, "--max-restarts", "1")
    assert "restart 1:" in result.out
    assert result.out.count("done:") == 1
    # the restarted run starts over in the same directory and ends where an uninterrupted run ends
    assert max_difference(read_weights(reference), read_weights(tmp_path / "run")) <= TOLERANCE


def test_a_hung_rank_fails_the_job_naming_it_and_the_step(tmp_path: Path, stalling: Callable[[int], list[str]]) -> None:
    result = launch(tmp_path / "run", *stalling(1), expect=1)
    last = result.err.strip().splitlines()[-1]
    assert last == "training hung after step 7: rank 1 stopped responding; rank 0 waited 3 s in a collective " + (
        "(parallel.timeout_s) for it"
    ), result.err
    assert "Traceback" not in result.err


def test_a_restart_takes_over_from_a_hung_rank(
    reference: Path, tmp_path: Path, stalling: Callable[[int], list[str]]
) -> None:
    run_dir = tmp_path / "run"
    result = launch(run_dir, *stalling(0), "checkpoint.every_steps=3", "--max-restarts", "1")
    assert "training hung after step 7: rank 0 stopped responding; rank 1 waited" in result.err
    assert "restart 1: the workers failed and were started again; resuming from" in result.out
    assert max_difference(read_weights(reference), read_weights(run_dir)) <= TOLERANCE


def start_nodes(
    stack: contextlib.ExitStack,
    tmp_path: Path,
    run_dir: Path,
    *args: str,
    nnodes: str = "2",
    ranks: tuple[int, ...] = (0, 1),
) -> tuple[list[subprocess.Popen], list[Path]]:
    """Launchers as nodes of one job (`scaleforge train GPT ARGS`), each in a session of its own (a node is killed
    with its workers), meeting at node 0's rendezvous store; their outputs go to node0.log, node1.log."""
    port = free_port()  # for node 0's rendezvous store
    nodes, logs = [], [tmp_path / f"node{rank}.log" for rank in ranks]
    for rank, log in zip(ranks, logs, strict=True):
        nodes.append(start_node(stack, rank, log, port, run_dir, *args, nnodes=nnodes))
    return nodes, logs


def start_node(
    stack: contextlib.ExitStack, rank: int, log: Path, port: int, run_dir: Path, *args: str, nnodes: str
) -> subprocess.Popen:
    """Node `rank` of a job meeting at 127.0.0.1:`port`, killed (with its workers) when `stack` closes."""
    output = stack.enter_context(log.open("w"))
    command = [sys.executable, "-m", "scaleforge", "train", *GPT, *args, "--run-dir", str(run_dir)]
    command += ["--nnodes", nnodes, "--node-rank", str(rank), "--nproc", "1"]
    command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job"]
    node = subprocess.Popen(
        command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    stack.callback(_kill_group, node)  # a node left running after a failed wait
    return node


def test_two_nodes_meet_at_a_rendezvous_endpoint(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        nodes, logs = start_nodes(stack, tmp_path, run_dir)
        codes = [node.wait(timeout=300) for node in nodes]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    assert "ddp on 2 processes" in outputs[0] and "done:" not in outputs[1]  # node 0 holds rank 0
    assert max_difference(read_weights(reference), read_weights(run_dir)) <= TOLERANCE


def test_an_elastic_job_goes_on_alone_when_the_node_without_the_store_is_killed(tmp_path: Path) -> None:
    longer = ["training.max_steps=60", "checkpoint.every_steps=5", "logging.every_steps=5"]
    reference = single_process_run(tmp_path / "reference", *longer)  # the same global batch, never interrupted
    run_dir = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        nodes, logs = start_nodes(stack, tmp_path, run_dir, *longer, "--max-restarts", "1", nnodes="1:2")
        deadline = time.monotonic() + 180
        while newest_good_checkpoint(run_dir / "checkpoints") is None:  # both nodes trained 5 steps: node 1 goes
            assert time.monotonic() < deadline and nodes[0].poll() is None, logs[0].read_text()
            time.sleep(0.1)
        _kill_group(nodes[1])
        assert nodes[0].wait(timeout=300) == 0, logs[0].read_text()
    out = logs[0].read_text()
    assert "ddp on 2 processes" in out  # before: both nodes
    assert re.search(r"rank \d on node \d \(.+\) stopped: no heartbeat for 5 s", out), out
    assert "restart 1: the workers failed and were started again; resuming from" in out
    assert "60 steps | 1 process | resumed at step" in out  # after: node 0 alone
    assert max_difference(read_weights(reference), read_weights(run_dir)) <= TOLERANCE


def test_a_node_that_joins_an_elastic_job_restarts_it_on_both_from_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lonely_model.py").write_text(LONELY_MODEL)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(tmp_path)  # the reference trains in this process
    longer = ["imports=[lonely_model]", "model.architecture=lonely_gpt", "training.max_steps=60"]
    longer += ["checkpoint.every_steps=5", "logging.every_steps=5"]
    reference = single_process_run(tmp_path / "reference", *longer)  # the same global batch, never interrupted
    run_dir, elastic = tmp_path / "run", [*longer, "--max-restarts", "1"]
    with contextlib.ExitStack() as stack:
        (first,), (log,) = start_nodes(stack, tmp_path, run_dir, *elastic, nnodes="1:2", ranks=(0,))
        deadline = time.monotonic() + 180
        while newest_good_checkpoint(run_dir / "checkpoints") is None:  # node 0 trained 5 steps alone: node 1 comes
            assert time.monotonic() < deadline and first.poll() is None, log.read_text()
            time.sleep(0.1)
        port = int(re.findall(r"127\.0\.0\.1:(\d+)", " ".join(first.args))[0])
        second = start_node(stack, 1, tmp_path / "node1.log", port, run_dir, *elastic, nnodes="1:2")
        assert first.wait(timeout=300) == 0, log.read_text()
        assert second.wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()
    out = log.read_text()
    assert "60 steps | 1 process" in out  # before: node 0 alone
    assert re.search(r"60 steps \| ddp on 2 processes .*\| resumed at step \d+ from step-", out), out  # then both
    assert max_difference(read_weights(reference), read_weights(run_dir)) <= TOLERANCE


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a node: its launcher and the workers it started (a session of their own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
