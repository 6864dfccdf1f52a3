"""The process that hosts a federation's simulation, in a process group of its own, so that nothing Ray starts
outlives the command.

Ray's GCS server, raylet and actors end with the process that started Ray, but the agents the raylet starts
(the dashboard agent, the runtime-env agent) are orphaned and run on when that process is killed. Every process Ray
starts stays in the process group of the one that started it, so the simulation runs in a child of the command
that leads a group of its own, and kills that whole group when the command dies, however it dies: its standard
input is a pipe from the command, which reaches its end when the command's last copy of it closes (a thread
waits for that), and the kernel's parent-death signal says the same (though `ray.init` replaces the SIGTERM
handler, the pipe does not depend on one). When the host ends or is killed otherwise, the command kills the
group. The command keeps its own group, so a terminal's Ctrl-C still reaches it.

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
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from scaleforge.errors import AgreedError
from scaleforge.federated import quiet_flower
from scaleforge.federated.options import FederationOptions
from scaleforge.processes import ParentDeathGuard

if TYPE_CHECKING:
    from scaleforge.federated.server import Federation

ERROR_MARK = "scaleforge-federation-error: "
STOP_GRACE_S = 5.0


def start_host(arguments: list[str], **popen: Any) -> subprocess.Popen[str]:
    """`python -m scaleforge.federated.host ARGUMENTS` leading a process group of its own, stopped with this
    process however it ends (`stop_group` stops it otherwise). `popen`: `subprocess.Popen`'s output arguments."""
    return subprocess.Popen(
        [sys.executable, "-m", "scaleforge.federated.host", *arguments],
        stdin=subprocess.PIPE,  # never written: its end, when this process dies, is the host's signal to stop
        text=True,
        start_new_session=True,
        preexec_fn=ParentDeathGuard(signal.SIGTERM),
        **popen,
    )


def keep_in_group(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Run `command` (Flower's SuperLink or SuperNode) in a host's process group, output to `log`: it and
    whatever it starts end with this process."""
    with log.open("a") as file:
        return start_host(["--command", *command], stdout=file, stderr=subprocess.STDOUT, env=env)


def run_hosted(options: FederationOptions, run_dir: Path) -> None:
    """Run the federation's rounds in a host process; `AgreedError` (exit 1) when a round fails."""
    host = start_host([json.dumps(dataclasses.asdict(options)), str(run_dir)], stderr=subprocess.PIPE)
    failure: list[str] = []
    relay = threading.Thread(target=_relay, args=(host.stderr, failure), daemon=True)
    relay.start()
    try:
        code = host.wait()
    finally:
        stop_group(host)
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


def stop_group(host: subprocess.Popen[str]) -> None:
    """Whatever is left of the host's group: asked to stop, given `STOP_GRACE_S`, then killed."""
    if not _signal_group(host.pid, signal.SIGTERM):
        return
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        if host.poll() is not None and not _signal_group(host.pid, 0):  # 0: whether any process of it is left
            return
        time.sleep(0.1)
    _signal_group(host.pid, signal.SIGKILL)
    host.wait()


def _signal_group(group: int, sig: int) -> bool:
    """Send `sig` to process group `group`; whether the group still had a process."""
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def replace_dead_actors() -> None:
    """Have Flower's actor pool replace an actor whose process died (a client killed mid-round) with a new one.

    Flower 1.42's Ray backend puts the actor of a failed job back in its pool whatever the failure, so a dead
    actor stays there and every later job sent to it fails as well: one killed client would fail some client in
    every later round. The job's failure still reaches the round (which goes on if `--min-clients` allows); only
    the actor it ran on is new. Done once in the host process, where the simulation's pool lives."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    fetch = BasicActorPool.fetch_result_and_return_actor_to_pool
    if getattr(fetch, "replaces_dead_actors", False):
        return

    def fetch_replacing(self: BasicActorPool, future: Any) -> Any:
        try:
            return fetch(self, future)
        except ray.exceptions.RayActorError:
            # the backend's error path puts this future's actor back in the pool: make it a live one
            self._future_to_actor[future] = self.create_actor_fn()
            raise

    fetch_replacing.replaces_dead_actors = True  # type: ignore[attr-defined]
    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_replacing  # type: ignore[method-assign]


def simulate(federation: Federation) -> None:
    """The rounds left, each client a task on a Ray actor of one CPU; `AgreedError` (exit 1) when one fails."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from scaleforge.federated.client import client_app
    from scaleforge.federated.server import FederationFailed

    replace_dead_actors()
    server = ServerApp()
    server.main()(federation.main)
    options = federation.options
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": min(cores, options.clients), "include_dashboard": False, "log_to_driver": True},
    }
    run_dir = federation.run_dir
    clients = run_dir.resolve() / "clients"
    client = client_app(federation.raw, lambda part: clients / str(part))
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


def _kill_group_at_end_of_input() -> None:
    while os.read(0, 4096):  # b"" once the command's end of the pipe closes: it died (unbuffered: sys.stdin's
        pass  # lock, held by a daemon thread, would stop the interpreter's shutdown)
    _kill_group()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _kill_group)  # the command's death (the parent-death signal) or its stop
    threading.Thread(target=_kill_group_at_end_of_input, daemon=True).start()
    if argv[:1] == ["--command"]:  # keep a command in this group, ending with it
        return subprocess.run(argv[1:], stdin=subprocess.DEVNULL, check=False).returncode
    quiet_flower()
    from scaleforge.federated.server import Federation

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
