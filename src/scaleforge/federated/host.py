"""The process that hosts a federation's simulation, in a process group of its own, so that nothing Ray starts
outlives the command.

Ray's GCS server, raylet and actors end with the process that started Ray, but the agents the raylet starts
(the dashboard agent, the runtime-env agent) are orphaned and run on when that process is killed. Every process Ray
starts stays in the process group of the one that started it, so the simulation runs in a child of the command
that leads a group of its own: when the command dies, however it dies, the kernel signals the host
(`ParentDeathGuard`), which kills its whole group; when the host ends or is killed otherwise, the command kills
the group. The command keeps its own group, so a terminal's Ctrl-C still reaches it.

`python -m scaleforge.federated.host OPTIONS RUN_DIR` (OPTIONS: `FederationOptions` as JSON); a round that fails
ends it with exit 1 and one line on stderr after `ERROR_MARK`, which the command reports as its own error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from scaleforge.errors import AgreedError
from scaleforge.federated import quiet_flower
from scaleforge.federated.options import FederationOptions
from scaleforge.federated.server import Federation, FederationFailed
from scaleforge.processes import ParentDeathGuard

ERROR_MARK = "scaleforge-federation-error: "
STOP_GRACE_S = 5.0


def run_hosted(options: FederationOptions, run_dir: Path) -> None:
    """Run the federation's rounds in a host process; `AgreedError` (exit 1) when a round fails."""
    command = [sys.executable, "-m", "scaleforge.federated.host", json.dumps(dataclasses.asdict(options)), str(run_dir)]
    host = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=ParentDeathGuard(signal.SIGTERM)
    )
    failure: list[str] = []
    relay = threading.Thread(target=_relay, args=(host.stderr, failure), daemon=True)
    relay.start()
    try:
        code = host.wait()
    finally:
        _stop_group(host)
    relay.join(timeout=5)
    if failure:
        raise AgreedError(failure[0], exit_code=1)
    if code != 0:
        raise AgreedError(f"the federation's host process failed (exit {code}); its output is above", exit_code=1)


def _relay(stream: IO[str], failure: list[str]) -> None:
    """The host's stderr on this process's, except the failure line, kept for the command to report."""
    for line in stream:
        if line.startswith(ERROR_MARK):
            failure.append(line[len(ERROR_MARK) :].strip())
        else:
            sys.stderr.write(line)


def _stop_group(host: subprocess.Popen[str]) -> None:
    """Whatever is left of the host's group: asked to stop, then killed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(host.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            host.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            continue


def simulate(federation: Federation) -> None:
    """The rounds left, each client a task on a Ray actor of one CPU; `AgreedError` (exit 1) when one fails."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from scaleforge.federated.client import client_app

    server = ServerApp()
    server.main()(federation.main)
    options = federation.options
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": min(cores, options.clients), "include_dashboard": False, "log_to_driver": True},
    }
    run_dir = federation.run_dir
    client = client_app(federation.raw, str(run_dir.resolve()), options.partition)
    try:
        run_simulation(server, client, num_supernodes=options.clients, backend_config=backend)
    finally:
        _stop_ray()
    if federation.error is not None:
        if isinstance(federation.error, FederationFailed):
            raise AgreedError(str(federation.error), exit_code=1) from federation.error  # one line, exit 1
        raise federation.error


def _stop_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


def _kill_group(*_: object) -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _kill_group)  # the command's death (the parent-death signal) or its stop
    quiet_flower()
    fields = json.loads(argv[0])
    options = FederationOptions(**{**fields, "overrides": tuple(fields["overrides"])})
    federation = Federation(options, Path(argv[1]))
    try:
        if federation.round < options.rounds:
            simulate(federation)
    except AgreedError as error:
        print(ERROR_MARK + error.one_line(), file=sys.stderr, flush=True)
        return 1
    federation.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
