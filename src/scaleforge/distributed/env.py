"""The process's place in a distributed run (rank, local rank, world size, from the launcher's environment), the
check that each process gets a device of its own, and what the processes do together: join the group, agree on
errors, name a peer that hung."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from scaleforge.errors import AgreedError, ConfigError, ScaleforgeError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits, as torch's elastic launcher (or `torchrun`) describes it in the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    restart_count: int = 0  # how many times the launcher has restarted the workers after a failure
    local_world_size: int = 1  # processes on this node

    @classmethod
    def from_environ(cls) -> DistEnv:
        """Read RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and TORCHELASTIC_RESTART_COUNT; a process started
        without a launcher is rank 0 of 1."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=world_size,
            restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        )

    @property
    def distributed(self) -> bool:
        """Whether other processes take part in this run."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics and final files."""
        return self.rank == 0


def check_device_per_process(name: str, env: DistEnv) -> None:
    """Processes of one node each need their own device: a single named GPU (or MPS) cannot serve several."""
    if env.distributed and (name.startswith("cuda:") or name == "mps"):
        raise ConfigError(
            f"hardware.device: '{name}' is one device, but each of the {env.world_size} processes needs its own; "
            "use auto or cuda (each process takes cuda:LOCAL_RANK)"
        )


def init_distributed(env: DistEnv, device: torch.device, *, timeout_s: float, required: bool = False) -> None:
    """Join the process group: nccl on CUDA, gloo otherwise; each process pins its own GPU first. Collectives
    wait `timeout_s` for a peer before failing, so a dead or hung peer ends the run instead of stalling it.

    A single process started without a launcher joins a group of its own when `required` (a parallel strategy
    on one process), through an in-memory store instead of the launcher's rendezvous.
    """
    if dist.is_initialized() or not (env.distributed or required):
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict = {"timeout": timedelta(seconds=timeout_s), "device_id": device if backend == "nccl" else None}
    if "MASTER_ADDR" not in os.environ:
        options.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend, **options)


def teardown_distributed() -> None:
    """Leave the process group. The caller drops its model and optimizer first: gloo can abort at exit otherwise."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


class PeerFailed(Exception):
    """Another process of the run failed, so this one cannot go on; the launcher reports the other's failure."""


# Set by a worker that stopped only because a peer failed (PeerFailed, or a collective that lost its peer),
# after waiting PEER_FAILED_GRACE_S: the launcher stops every worker when it sees the first one end, and the
# failed peer should be that one, so that its failure is what gets reported.
PEER_FAILED_EXIT = 3
PEER_FAILED_GRACE_S = 3.0
# How gloo words a collective whose peer has gone.
_LOST_PEER_MESSAGES = ("closed by peer", "reset by peer", "Broken pipe")
# How gloo and nccl word a collective that waited past the process group's timeout.
_TIMEOUT_MESSAGES = ("Timed out waiting", "collective operation timeout")
# Set by a worker whose collective timed out: a peer hung. Its message names the peer (see `PeerHung`).
PEER_HUNG_EXIT = 4


def lost_peer(error: BaseException) -> bool:
    """Whether `error` only says that another process of the run has gone."""
    if isinstance(error, PeerFailed | dist.DistNetworkError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _LOST_PEER_MESSAGES)


def timed_out(error: BaseException) -> bool:
    """Whether `error` says that a collective waited for a peer past the process group's timeout."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _TIMEOUT_MESSAGES)


class PeerHung(Exception):
    """A collective of this process waited `parallel.timeout_s` for another that never came: the run fails
    (exit code `PEER_HUNG_EXIT`) with a message that names the process that stopped responding and the step."""

    exit_code = PEER_HUNG_EXIT


@contextlib.contextmanager
def hangs_named(env: DistEnv, timeout_s: float, steps_done: Callable[[], int]) -> Iterator[None]:
    """Turn a collective's timeout into `PeerHung`, naming the processes that did not time out too.

    Every process whose collective timed out says so in the job's store (the rendezvous store, served apart
    from the collectives, so it still answers) and waits a moment for the others to say the same: a process
    that stays silent is the one the others waited for, stuck in its own work or in a different collective.
    When every process timed out, they were waiting in different collectives (a deadlock).
    """
    try:
        yield
    except RuntimeError as error:
        if not (env.distributed and timed_out(error)):
            raise
        step = steps_done()
        silent = _silent_ranks(env, grace_s=min(10.0, max(2.0, timeout_s / 2)))
        waited = f"{timeout_s:g} s in a collective (parallel.timeout_s)"
        if silent is None:
            message = f"rank {env.rank} waited {waited}; the job's store cannot be reached to tell which process hung"
        elif len(silent) == 1:
            message = f"rank {silent[0]} stopped responding; rank {env.rank} waited {waited} for it"
        elif silent:
            ranks = ", ".join(map(str, silent))
            message = f"ranks {ranks} stopped responding; rank {env.rank} waited {waited} for them"
        else:
            message = f"every process waited {waited}, each for another (a deadlock)"
        message = f"training hung after step {step}: {message}"
        raise PeerHung(message) from error


def _silent_ranks(env: DistEnv, grace_s: float) -> list[int] | None:
    """The ranks that have not said, within `grace_s`, that their collective timed out (None: no store)."""
    prefix = f"scaleforge/timed-out/{env.restart_count}/"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{prefix}{env.rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            silent = [r for r in range(env.world_size) if r != env.rank and not store.check([f"{prefix}{r}"])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)
    except (RuntimeError, ValueError):  # the store went with its host, or there is no process group
        return None


@contextlib.contextmanager
def errors_agreed(env: DistEnv) -> Iterator[None]:
    """Run a stretch of setup with no collectives in it, which may fail on some processes only (a rank's own data
    file, rank 0's callbacks), and leave it together.

    A user error on any process is raised on every process with one message, which names the rank unless every
    process met it. A crash is re-raised where it happened and stops the others with `PeerFailed`. Without
    this, the processes that got through would wait in their next collective for a peer that has gone and fail
    there with a traceback of their own.
    """
    if not (env.distributed and dist.is_initialized()):
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Exception as error:  # noqa: BLE001 - every failure is shared, then re-raised below
        failure = error
    if isinstance(failure, ScaleforgeError):
        outcome: tuple[str, str, int] | None = ("user", failure.one_line(), failure.exit_code)
    else:
        outcome = None if failure is None else ("crash", type(failure).__name__, 1)
    outcomes: list[tuple[str, str, int] | None] = [None] * env.world_size
    dist.all_gather_object(outcomes, outcome)
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return
    if any(kind == "crash" for _, (kind, _, _) in failed):
        if failure is not None and not isinstance(failure, ScaleforgeError):
            raise failure
        raise PeerFailed("another process crashed during setup")
    rank, (_, line, exit_code) = failed[0]
    if len(failed) < env.world_size or len({outcome for _, outcome in failed}) > 1:
        line = f"rank {rank}: {line}"
    raise AgreedError(line, exit_code) from failure


def record_error(message: str) -> None:
    """A worker's one-line error, left where the elastic launcher collects a failed worker's message."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as file:
            json.dump({"message": message, "timestamp": int(time.time())}, file)
