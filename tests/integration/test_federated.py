"""`scaleforge federate`: clients on Flower's simulation runtime (Ray) train their parts of digits with the normal
trainer, the server aggregates with Flower's strategies; the run directory, its rounds' checkpoints and an exact
resume; no process outlives the command; bad arguments exit 2 with one line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from scaleforge import load_config
from scaleforge.runs import check_manifest
from scaleforge.training.curves import describe_run
from scaleforge.training.trainer import train
from tests.conftest import REPO, gone, run_subprocess

pytest.importorskip("flwr")

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_four_clients_on_a_dirichlet_split_come_within_three_points_of_centralized_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "federated"
    args = ["--clients", "4", "--rounds", "10", "--local-epochs", "5", "--partition", "dirichlet:0.5"]
    result = run_subprocess("federate", *args, "--run-dir", str(run_dir), timeout=400)
    assert result.code == 0, result.err[-3000:]
    rounds = lines(run_dir)
    assert [line["round"] for line in rounds] == list(range(11))  # round 0: the initial model
    assert all(line["clients"] == 4 and line["failed"] == 0 and line["parts"] == [0, 1, 2, 3] for line in rounds[1:])
    assert all(line["bytes_sent"] == line["bytes_received"] > 50_000 * 4 * 4 for line in rounds[1:])  # 4 B a weight
    check_manifest(run_dir / "final")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0009", "round-0010"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_accuracy"] == rounds[-1]["val_accuracy"]
    # centralized: the same data, and as many steps as the clients took in all (each round the same for a part)
    per_round = [
        json.loads((run_dir / "clients" / str(i) / "run" / "summary.json").read_text())["steps"] for i in range(4)
    ]
    steps = summary["steps"]
    assert steps == 10 * sum(per_round)
    listed = describe_run(run_dir)  # `scaleforge runs` shows it beside trained runs
    assert (listed["strategy"], listed["processes"], listed["status"]) == ("fedavg", 4, "finished")
    central = train(load_config(None, [*QUICK, f"training.max_steps={steps}", "training.epochs=1000"]), tmp_path / "c")
    print(f"federated {summary['val_accuracy']:.4f} | centralized {central['val_accuracy']:.4f} | {steps} steps")
    assert summary["val_accuracy"] > central["val_accuracy"] - 0.03


def _descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


CLIENT_CALLBACKS = """
import os, signal, time
from pathlib import Path

from scaleforge import register_callback
from scaleforge.training.callbacks import Callback


@register_callback("die_once")
class DieOnce(Callback):
    \"\"\"Kills its own process (SIGKILL) as training starts, in client `part`'s first round only.\"\"\"

    def __init__(self, part: int, marker: str) -> None:
        self.part, self.marker = part, Path(marker)

    def on_train_start(self, state) -> None:
        if state.run_dir.parent.name == str(self.part) and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


@register_callback("pause")
class Pause(Callback):
    \"\"\"Sleeps PAUSE_S seconds (an environment variable, unset: none) as a client's round starts.\"\"\"

    def on_train_start(self, state) -> None:
        time.sleep(float(os.environ.get("PAUSE_S", "0")))
"""


@pytest.fixture
def with_callbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module of client callbacks importable by the command, its host and Ray's actors; returns its folder."""
    (tmp_path / "client_callbacks.py").write_text(CLIENT_CALLBACKS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_a_federation_killed_and_run_again_resumes_from_its_last_round_exactly(
    tmp_path: Path, with_callbacks: Path
) -> None:
    config = tmp_path / "paused.yaml"  # its clients pause where PAUSE_S says: the killed run's, so it is killed mid-way
    config.write_text("imports: [client_callbacks]\ntraining:\n  callbacks: [{name: pause}]\n")
    args = [str(config), "--clients", "2", "--rounds", "4", "--strategy", "fedadam", "--partition", "by-class:6"]
    whole = run_subprocess("federate", *args, "--run-dir", str(tmp_path / "whole"), timeout=300)
    assert whole.code == 0, whole.err[-3000:]
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "scaleforge", "federate", *args, "--run-dir", str(run_dir)]
    log = (tmp_path / "killed.log").open("w")
    env = {**os.environ, "PAUSE_S": "2"}
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline, started = time.monotonic() + 240, []
    while not (run_dir / "checkpoints" / "round-0002").is_dir() and time.monotonic() < deadline:
        started = _descendants(process.pid) or started  # the host, Ray's processes and the clients
        time.sleep(0.2)
    started = _descendants(process.pid) or started
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(started) >= 5  # the host, Ray's GCS server and raylet, its agents and actors
    assert all(gone(pid) for pid in started), [psutil.Process(p).name() for p in started if not gone(p, 0)]
    again = run_subprocess("federate", *args, "--run-dir", str(run_dir), timeout=300)
    assert again.code == 0, again.err[-3000:]
    assert "from round 2" in again.out  # the newest checkpoint when it was killed (round 3's clients were pausing)
    expected, got = (
        load_file(tmp_path / "whole" / "final" / "model.safetensors"),
        load_file(run_dir / "final" / "model.safetensors"),
    )
    assert all((expected[k] == got[k]).all() for k in expected)  # FedAdam's moments and the sampling carried exactly
    assert [line["round"] for line in lines(run_dir)] == [0, 1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_round"] == 2
    other = run_subprocess("federate", *args[:-2], "--partition", "iid", "--run-dir", str(run_dir))  # same config
    assert other.code == 2 and other.err.count("\n") == 1
    assert "holds a federation with partition by-class:6, not iid" in other.err
    changed = run_subprocess("federate", *args, "training.learning_rate=0.01", "--run-dir", str(run_dir))
    assert changed.code == 2 and "holds a federation of another config" in changed.err


@pytest.mark.slow
def test_a_client_killed_mid_round_leaves_the_round_to_the_others_when_min_clients_allows(
    tmp_path: Path, with_callbacks: Path
) -> None:
    config = tmp_path / "dying.yaml"
    dying = f"{{name: die_once, part: 1, marker: {tmp_path / 'died'}}}"
    config.write_text(f"imports: [client_callbacks]\ntraining:\n  callbacks: [{dying}]\n")
    run_dir = tmp_path / "tolerant"
    result = run_subprocess("federate", str(config), "--clients", "3", "--rounds", "2", "--min-clients", "2",
                            "--run-dir", str(run_dir), timeout=300)  # fmt: skip
    assert result.code == 0, result.err[-3000:]
    rounds = lines(run_dir)
    assert (rounds[1]["clients"], rounds[1]["failed"], rounds[1]["parts"]) == (2, 1, [0, 2])  # client 1 died
    assert (rounds[2]["clients"], rounds[2]["failed"]) == (3, 0)  # and its place was taken by a new actor
    (tmp_path / "died").unlink()
    strict = run_subprocess(
        "federate", str(config), "--clients", "3", "--rounds", "2", "--run-dir", str(tmp_path / "strict")
    )
    assert strict.code == 1
    last = strict.err.strip().splitlines()[-1]
    assert last.startswith("round 1: 2 of 3 clients replied, 3 needed; ") and "died" in last
    assert not (tmp_path / "strict" / "final").exists()


class InMemoryGrid:
    """A grid whose nodes run the client app in this process, one message after the other: the server's loop
    without Ray or Flower's runtime."""

    def __init__(self, app, parts: int) -> None:  # noqa: ANN001 - a ClientApp
        self.app, self.part_of = app, {101 + part: part for part in range(parts)}

    def get_node_ids(self) -> list[int]:
        return list(self.part_of)

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN201 - Flower's signature
        from flwr.app import Context, RecordDict

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            context = Context(1, node, {"partition-id": self.part_of[node]}, RecordDict(), {})
            replies.append(self.app(message=message, context=context))
        return replies


def federate_in_process(options, run_dir: Path):  # noqa: ANN001, ANN201 - FederationOptions, Federation
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from scaleforge.federated.client import client_app
    from scaleforge.federated.server import Federation

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as a server's task sets them
    federation = Federation(options, run_dir)
    grid = InMemoryGrid(client_app(federation.raw, lambda part: run_dir / "clients" / str(part)), options.clients)
    federation.main(grid, Context(1, 1, {}, RecordDict(), {}))  # type: ignore[arg-type]
    assert federation.error is None, federation.error
    federation.finish()
    return federation


@pytest.mark.slow
def test_a_private_fedprox_federation_stopped_and_continued_ends_as_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scaleforge.federated.options import FederationOptions

    # the noise's secret seed: the same for the run to three and the first two rounds, another for the one that
    # continues them, which must take the first's from its checkpoint
    secrets = [7, 7, 99, 5]
    monkeypatch.setattr("scaleforge.federated.server.secret_seed", lambda: secrets.pop(0))

    def options(rounds: int) -> FederationOptions:
        private = {"dp_noise": 0.01, "dp_clip": 10.0}
        return FederationOptions(None, (*QUICK, "training.batch_size=32"), clients=3, rounds=rounds,
                                 partition="dirichlet:1", strategy="fedprox", proximal_mu=0.1, **private)  # fmt: skip

    whole = federate_in_process(options(3), tmp_path / "whole")
    federate_in_process(options(2), tmp_path / "split")
    continued = federate_in_process(options(3), tmp_path / "split")  # more rounds than before: it goes on
    assert continued.resumed_from == 2
    expected, got = (
        load_file(tmp_path / "whole" / "final" / "model.safetensors"),
        load_file(tmp_path / "split" / "final" / "model.safetensors"),
    )
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # the noise, seeded with the round, included
    assert [line["round"] for line in lines(tmp_path / "split")] == [0, 1, 2, 3]
    epsilons = [line["dp_epsilon"] for line in whole.history[1:]]
    assert epsilons == sorted(epsilons) and epsilons == [line["dp_epsilon"] for line in lines(tmp_path / "split")[1:]]
    noiseless = federate_in_process(dataclasses.replace(options(3), dp_noise=None, dp_clip=None), tmp_path / "plain")
    plain = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    assert not all(torch.equal(plain[k], got[k]) for k in plain)  # the noise and the clipping changed the model
    assert noiseless.history[-1]["val_accuracy"] > 0.5


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--clients", "0", "--rounds", "1"], "--clients: expected a positive integer, got 0"),
        (["--clients", "4", "--rounds", "1", "--partition", "dirichlet:-1"], "--partition: 'dirichlet:-1' is not one"),
        (["--clients", "4", "--rounds", "1", "--min-clients", "5"], "--min-clients 5 is more than the 4 clients"),
        (["--clients", "4", "--rounds", "1", "--fraction-fit", "0.1"], "--fraction-fit 0.1 of 4 clients samples none"),
        (["--clients", "4", "--rounds", "1", "training.batchsize=3"], "training.batchsize: unknown key"),
        (["--clients", "2", "--rounds", "1", "--partition", "by-class:11"], "more classes than the dataset's 10"),
        (["--clients", "20", "--rounds", "1", "--partition", "dirichlet:0.1"], "fewer than training.batch_size 64"),
        (["--clients", "4", "--rounds", "1", "--dp-noise", "1"], "needs --dp-noise and --dp-clip together"),
        (
            ["--clients", "4", "--rounds", "1", "--dp-noise", "1", "--dp-clip", "1", "--strategy", "fedadam"],
            "fedavg or",
        ),
        (["--clients", "4", "--rounds", "1", "--dp-noise", "1", "--dp-clip", "1", "--min-clients", "3"], "must reply"),
        (["server", "--clients", "2", "--rounds", "1", "--listen", "nowhere"], "--listen: 'nowhere' is not HOST:PORT"),
        (
            ["server", "--clients", "2", "--rounds", "1", "--ssl-certfile", "x.pem"],
            "TLS needs --ssl-ca-certfile, --ssl",
        ),
        (["client", "--server", "nowhere", "--partition", "0"], "--server: 'nowhere' is not HOST:PORT"),
        (["client", "--server", "127.0.0.1:9", "--partition", "0", "--root-certificates", "none.pem"], "TLS file not"),
        (["--clients", "2", "--rounds", "1", "--strategy", "fedprox", "parallel.strategy=fsdp"], "proximal term reads"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(cli, tmp_path: Path, args: list[str], expected: str) -> None:
    result = cli("federate", *args, "--run-dir", str(tmp_path / "run"))
    assert result.code == 2, result.err
    assert expected in result.err and result.err.count("\n") == 1


@pytest.mark.slow
def test_a_server_and_two_clients_as_processes_federate_over_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"  # self-signed: its own authority
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    from scaleforge.network import free_port

    address = f"127.0.0.1:{free_port()}"
    tls = ["--ssl-ca-certfile", str(cert), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    server_dir = tmp_path / "server"
    scaleforge = [sys.executable, "-m", "scaleforge", "federate"]
    commands = [[*scaleforge, "server", "--clients", "2", "--rounds", "2", "--listen", address, *tls,
                 "--run-dir", str(server_dir)]]  # fmt: skip
    commands += [[*scaleforge, "client", "--server", address, "--partition", str(part), "--root-certificates",
                  str(cert), "--run-dir", str(tmp_path / f"client{part}")] for part in (0, 1)]  # fmt: skip
    logs = [(tmp_path / f"{i}.log").open("w+") for i in range(3)]
    processes = [
        subprocess.Popen(c, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        for c, log in zip(commands, logs, strict=True)
    ]
    started: set[int] = set()
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        started.update(pid for p in processes for pid in _descendants(p.pid))  # the SuperLink, SuperNodes, hosts
        time.sleep(0.5)
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
    outputs = [log.seek(0) or log.read() for log in logs]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    assert "(TLS)" in outputs[0] and all("trained 2 round(s); the federation is over" in out for out in outputs[1:])
    rounds = lines(server_dir)
    assert [(line["round"], line["clients"]) for line in rounds] == [(0, 0), (1, 2), (2, 2)]
    assert rounds[2]["val_accuracy"] > rounds[0]["val_accuracy"] + 0.2
    check_manifest(server_dir / "final")
    assert len(started) >= 6 and all(gone(pid) for pid in started)  # nothing of Flower's is left
