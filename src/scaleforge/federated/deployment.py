"""`scaleforge federate server` and `scaleforge federate client`: a federation across machines, on Flower's
deployment runtime.

The server starts Flower's SuperLink (`flower-superlink`, with TLS when certificates are given) and drives the
rounds itself: it registers a run, takes the run's ServerApp task from the SuperLink and runs `Federation.main`
with a grid connected to it, as `flwr-serverapp` would. Each client starts a SuperNode (`flower-supernode`)
connected to the server's SuperLink, told its part in its node config, and runs scaleforge's own client app on
each task the SuperNode has, in this process, as `flwr-clientapp` would. Both run the SuperLink and SuperNode
with process isolation, so neither loads the app from the run's Flower app bundle (FAB): the bundle the server
registers is a stub naming scaleforge's apps, and a client never runs code a server sends, only trains on the
arrays and settings of its messages. A client stops when the server says the federation is over (a last message
with `stop`), or when its SuperNode gives up reaching the SuperLink.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_to_proto, run_from_proto
from flwr.proto.control_pb2 import StartRunRequest
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest, PushTaskOutputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid

from scaleforge.errors import AgreedError, UsageError
from scaleforge.federated import quiet_flower
from scaleforge.federated.host import keep_in_group, stop_group
from scaleforge.federated.server import Federation, FederationFailed
from scaleforge.network import free_port

STOP = "stop"  # the key of the server's last message: the federation is over
TRAINED = "trained"
START_TIMEOUT_S = 60.0
POLL_S = 0.5
APP = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "scaleforge-federation"
version = "1.0.0"
description = "scaleforge's federation: a stub, never loaded; its server and client commands run scaleforge's apps"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "scaleforge"

[tool.flwr.app.components]
serverapp = "scaleforge.federated.deployment:server_app"
clientapp = "scaleforge.federated.deployment:client_app"

[tool.flwr.app.config]
"""


@dataclass(frozen=True)
class Tls:
    """The server's certificate, its key and the certificate authority that signed it (PEM files); a client
    needs the authority's only."""

    ca: Path
    certificate: Path | None = None
    key: Path | None = None

    def link_flags(self) -> list[str]:
        return [
            "--ssl-ca-certfile",
            str(self.ca),
            "--ssl-certfile",
            str(self.certificate),
            "--ssl-keyfile",
            str(self.key),
        ]

    def node_flags(self) -> list[str]:
        return ["--root-certificates", str(self.ca)]


def flower_environment(home: Path) -> dict[str, str]:
    """The environment of Flower's processes: their own FLWR_HOME, no telemetry, no dependency installation, and
    this interpreter's scripts first on the PATH (the SuperLink and SuperNode start Flower's by name)."""
    quiet_flower()
    os.environ["FLWR_HOME"] = str(home)  # this process's Flower clients keep their files there too, not in ~/.flwr
    scripts = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": scripts + os.pathsep + os.environ.get("PATH", ""),
    }


def wait_for_port(host: str, port: int, process: Any, what: str, log: Path) -> None:
    """Until `host:port` accepts connections; `AgreedError` when `process` ends or `START_TIMEOUT_S` passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AgreedError(f"{what} stopped as it started (exit {process.returncode}); see {log}", exit_code=1)
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(POLL_S)
    raise AgreedError(f"{what} did not listen on {host}:{port} within {START_TIMEOUT_S:g} s; see {log}", exit_code=1)


def _root(tls: Tls | None) -> bytes | None:
    return tls.ca.read_bytes() if tls is not None else None


# ------------------------------------------------------------------------------------------------- server


def serve(federation: Federation, listen: str, tls: Tls | None) -> None:
    """The rounds left of `federation`, with clients joining a SuperLink on `listen` (HOST:PORT)."""
    host, port = _split_address(listen, "--listen")
    flower = federation.run_dir / "flower"
    flower.mkdir(parents=True, exist_ok=True)
    security = tls.link_flags() if tls is not None else ["--insecure"]
    command = ["flower-superlink", *security, "--isolation", "process", "--disable-runtime-dependency-installation",
               "--host", host, "--port", str(port)]  # fmt: skip
    log = federation.run_dir / "superlink.log"
    link = keep_in_group(command, log, env=flower_environment(flower))
    try:
        wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, link, "Flower's SuperLink", log)
        address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        print(f"serving the federation on {listen} ({'TLS' if tls else 'no TLS'}); clients: scaleforge federate "
              f"client CONFIG --server {listen} --partition I", flush=True)  # fmt: skip
        with _server_task(address, tls) as (grid, context, outcome):
            federation.main(grid, context)
            outcome["completed"] = federation.error is None
            _tell_clients_to_stop(grid)  # failed or not: they need not wait for rounds that will not come
    finally:
        stop_group(link)
    if isinstance(federation.error, FederationFailed):
        raise AgreedError(str(federation.error), exit_code=1) from federation.error
    if federation.error is not None:
        raise federation.error


def _split_address(address: str, flag: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag}: {address!r} is not HOST:PORT")
    return host, int(port)


@contextmanager
def _server_task(address: str, tls: Tls | None) -> Iterator[tuple[HttpGrid, Context, dict[str, bool]]]:
    """A run registered on the SuperLink at `address`, its ServerApp task taken: a grid to its SuperNodes."""
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    fab = build_fab_from_files({"pyproject.toml": APP.encode()})[0]
    connection = SuperLinkConnection(
        name="scaleforge", address=address, insecure=tls is None, root_certificates=str(tls.ca) if tls else None
    )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the connection it makes
        control = init_http_client_from_connection(connection)
    try:
        run_id = control.StartRun(
            StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})))
        ).run_id
    finally:
        control.close()
    token = _acquire(address, tls, TaskType.SERVER_APP, "SuperExec", run_id)
    grid = HttpGrid(runtime_api_address=address, insecure=tls is None, root_certificates=_root(tls), token=token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))
    heartbeat.start()
    task = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
    grid.set_run(run_from_proto(task.run))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        task.task_id,
        task.run.run_id,
        task.context.node_id,
    )
    context = context_from_proto(task.context)
    outcome = {"completed": False}
    try:
        yield grid, context, outcome
    finally:
        _stop(heartbeat)  # first: a beat after the task's end is refused, and Flower then interrupts the process
        status = SubStatus.COMPLETED if outcome["completed"] else SubStatus.FAILED
        with contextlib.suppress(Exception):  # the SuperLink stops next: what it is told now matters little
            request = PushTaskOutputRequest(context=context_to_proto(context), sub_status=status, details="")
            grid._runtime_client.PushTaskOutput(request)
        grid.close()


def _acquire(address: str, tls: Tls | None, kind: str, component: str, run_id: int | None = None) -> str:
    """The token of a task of `kind` from the runtime API at `address` (waits up to `START_TIMEOUT_S`)."""
    client = RuntimeHttpClient.from_server_address(
        address, insecure=tls is None, root_certificates=_root(tls),
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component)],
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[kind]))
            if reply.HasField("task") and reply.token and (run_id is None or reply.task.run_id == run_id):
                return str(reply.token)
            time.sleep(POLL_S)
    finally:
        client.close()
    raise AgreedError(f"the SuperLink at {address} gave no {kind} task within {START_TIMEOUT_S:g} s", exit_code=1)


def _tell_clients_to_stop(grid: HttpGrid) -> None:
    """A last message to every client: the federation is over, their commands may end (a client that misses it
    ends when it cannot reach the server for its --max-wait)."""
    content = RecordDict({"config": ConfigRecord({STOP: 1})})
    try:
        nodes = list(grid.get_node_ids())
        grid.send_and_receive(
            [Message(content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes], timeout=30
        )
    except Exception as error:  # noqa: BLE001 - the federation's result is written whatever the clients hear
        print(f"warning: the clients could not be told the federation is over ({type(error).__name__})", flush=True)


def _stop(heartbeat: HeartbeatSender) -> None:
    with contextlib.suppress(RuntimeError):  # its thread ended already
        if heartbeat.is_running:
            heartbeat.stop()


# ------------------------------------------------------------------------------------------------- client


def join(raw: dict[str, Any], server: str, part: int, run_dir: Path, tls: Tls | None, max_wait_s: float) -> int:
    """Train part `part` in the federation served at `server` until the server says it is over; returns the
    rounds this client trained."""
    from scaleforge.federated.client import client_app

    _split_address(server, "--server")
    flower = run_dir / "flower"
    flower.mkdir(parents=True, exist_ok=True)
    port = free_port()
    security = tls.node_flags() if tls is not None else ["--insecure"]
    command = ["flower-supernode", *security, "--superlink", server, "--node-config", f"partition-id={part}",
               "--isolation", "process", "--host", "127.0.0.1", "--port", str(port),
               "--max-wait-time", f"{max_wait_s:g}"]  # fmt: skip
    log = run_dir / "supernode.log"
    node = keep_in_group(command, log, env=flower_environment(flower))
    app = client_app(raw, lambda _: run_dir / "round")
    rounds, runs = 0, set()
    try:
        wait_for_port("127.0.0.1", port, node, "Flower's SuperNode", log)
        print(f"client {part}: joined {server} ({'TLS' if tls else 'no TLS'}); waiting for rounds", flush=True)
        while node.poll() is None:
            outcome = _run_one_task(f"127.0.0.1:{port}", app, runs)
            if outcome == STOP:
                return rounds
            rounds += outcome == TRAINED
    finally:
        stop_group(node)
    raise AgreedError(
        f"client {part}: lost the server at {server} after {rounds} round(s), before it ended the federation; see "
        f"{log}",
        exit_code=1,
    )


def _run_one_task(address: str, app: ClientApp, runs: set[int]) -> str | None:
    """Run the SuperNode's next task with `app`, as `flwr-clientapp` does: `TRAINED` for a round trained, `STOP`
    for the server's last message, None otherwise (no task yet, a query, a failed round, the SuperNode gone).
    Only tasks of the first run seen are run: anyone reaching the server can start runs of their own."""
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    try:
        token = _acquire(address, None, TaskType.CLIENT_APP, "SuperExec")
    except (AgreedError, httpx.HTTPError):  # none within the wait, or the SuperNode has gone
        return None
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)]
    client = RuntimeHttpClient.from_server_address(
        address, insecure=True, root_certificates=None, interceptors=interceptors
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message, context, reply, outcome = None, None, None, None
    status, details = SubStatus.FAILED, "failed"
    try:
        message, context, _, _ = pull_task_input(client)  # the run's bundle is not loaded: scaleforge's app runs
        if not runs:
            runs.add(context.run_id)
        if context.run_id not in runs:
            raise PermissionError(f"run {context.run_id} is not the federation this client joined")
        if message.metadata.message_type == MessageType.QUERY and STOP in message.content.get("config", {}):
            reply, outcome = Message(RecordDict(), reply_to=message), STOP
        else:
            reply = app(message=message, context=context)
            outcome = TRAINED if message.metadata.message_type == MessageType.TRAIN else None
        status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # noqa: BLE001 - the server gets the error as the reply, as from flwr-clientapp
        print(f"client: the task failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        reason = f"{type(error).__name__}: {error}"
        reply = (
            Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            if message
            else None
        )
    finally:
        _stop(heartbeat)  # first: a beat after the task's end is refused, and Flower then interrupts the process
        with contextlib.suppress(Exception):  # a SuperNode gone: the loop sees it end
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        client.close()
    return outcome


# ------------------------------------------------------------------------------------------------- commands


def tls_of(ca: str | None, certificate: str | None = None, key: str | None = None, *, server: bool) -> Tls | None:
    """The TLS files given on the command line (None: no TLS), each checked to exist."""
    given = [value for value in (ca, certificate, key) if value]
    if not given:
        return None
    if server and len(given) != 3:
        raise UsageError("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile together")
    for value in given:
        if not Path(value).is_file():
            raise UsageError(f"TLS file not found: {value}")
    return Tls(Path(ca), Path(certificate) if certificate else None, Path(key) if key else None)  # type: ignore[arg-type]


def federate_server(options: Any, listen: str, tls: Tls | None) -> dict[str, Any]:
    """`scaleforge federate server`: the federation `options` describes, its clients joining on `listen`."""
    import json

    from scaleforge.federated.simulation import check_client_config, prepared_run_dir

    quiet_flower()
    _split_address(listen, "--listen")
    federation, run_dir = prepared_run_dir(options)
    check_client_config(federation)
    if federation.round < options.rounds:
        print(f"federate {run_dir} | {options.clients} clients ({options.partition}) | {options.strategy} | "
              f"{options.rounds} rounds | from {f'round {federation.round}' if federation.round else 'the start'}",
              flush=True)  # fmt: skip
        serve(federation, listen, tls)
    summary = federation.finish()
    figures = " | ".join(f"{key} {value:.4f}" for key, value in summary.items() if key.startswith("val_"))
    print(f"done: {summary['rounds']} rounds | {figures} | {run_dir}")
    return {**json.loads((run_dir / "summary.json").read_text()), "run_dir": str(run_dir)}


def federate_client(
    config: str | None, overrides: tuple[str, ...], server: str, part: int, run_dir: str | None, tls: Tls | None,
    max_wait_s: float,
) -> int:  # fmt: skip
    """`scaleforge federate client`: train part `part` of the federation served at `server`; returns the rounds."""
    from datetime import datetime

    from scaleforge.config import config_data, load_config

    quiet_flower()
    _split_address(server, "--server")
    name = load_config(config, overrides).name  # the config checked before anything starts
    raw, _ = config_data(config, overrides)
    folder = Path(run_dir) if run_dir else Path("runs") / f"{name}-client{part}-{datetime.now():%Y%m%d-%H%M%S}"
    folder.mkdir(parents=True, exist_ok=True)
    rounds = join(raw, server, part, folder.resolve(), tls, max_wait_s)
    print(f"client {part}: trained {rounds} round(s); the federation is over | {folder}")
    return rounds
