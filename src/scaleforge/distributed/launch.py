"""Start worker processes through torch's elastic launcher (the machinery behind `torchrun`), called from Python.

Each worker runs `python -m scaleforge train ...` with RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address
in its environment, exactly as under `torchrun`, so the two ways of starting a run share one code path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from scaleforge.distributed.env import PEER_FAILED_EXIT, PEER_HUNG_EXIT
from scaleforge.distributed.peer_watch import ENDPOINT_VAR, JOB_VAR
from scaleforge.errors import UsageError
from scaleforge.processes import parent_environment

# torch's elastic modules name their loggers under these; the launcher reports failures itself.
ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
# An elastic job's rendezvous, once it has its fewest nodes, waits this long for more before the round starts.
ELASTIC_LAST_CALL_S = 3.0
# Set for the workers this launcher starts: they leave user errors to it rather than printing them.
LAUNCHED = "SCALEFORGE_LAUNCHED"


@dataclass(frozen=True)
class LaunchOptions:
    """torchrun's flags, with the same meaning: processes per node, nodes, this node's rank, rendezvous."""

    nproc: int = field(default=1, metadata={"help": "processes on this node", "range": "positive"})
    nnodes: str = field(
        default="1",
        metadata={
            "help": "nodes taking part: N, or MIN:MAX for an elastic job that goes on as nodes leave and join (with "
            "--max-restarts)",
            "metavar": "N|MIN:MAX",
        },
    )
    node_rank: int = field(default=0, metadata={"help": "this node's index", "range": "non-negative"})
    rdzv_endpoint: str | None = field(
        default=None, metadata={"help": "where the nodes meet (needed for --nnodes > 1)", "metavar": "HOST:PORT"}
    )
    rdzv_id: str | None = field(
        default=None,
        metadata={"help": "a name shared by the nodes of one job (names the default run directory)", "metavar": "ID"},
    )
    max_restarts: int = field(
        default=0,
        metadata={"help": "restart the workers up to K times after a failure", "range": "non-negative", "metavar": "K"},
    )

    @property
    def node_range(self) -> tuple[int, int]:
        """(fewest, most) nodes: `--nnodes N` is (N, N), `--nnodes MIN:MAX` elastic."""
        text = str(self.nnodes)
        low, _, high = text.partition(":")
        try:
            fewest, most = int(low), int(high or low)
        except ValueError:
            raise UsageError(f"--nnodes: expected N or MIN:MAX (positive integers), got {text!r}") from None
        if not 1 <= fewest <= most:
            raise UsageError(f"--nnodes: expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
        return fewest, most

    @property
    def max_nodes(self) -> int:
        return self.node_range[1]

    @property
    def elastic(self) -> bool:
        """Whether nodes may leave and join (`--nnodes MIN:MAX`)."""
        fewest, most = self.node_range
        return fewest < most

    @property
    def world_size(self) -> int:
        """Processes over all nodes (the most, for an elastic job)."""
        return self.nproc * self.max_nodes

    @property
    def needs_launcher(self) -> bool:
        """Whether workers must be started (more than one, or restarts to supervise)."""
        return self.world_size > 1 or self.max_restarts > 0

    def check(self) -> None:
        """Refuse flags that cannot describe a job."""
        most = self.max_nodes
        if most > 1 and self.rdzv_endpoint is None:
            raise UsageError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT, the address of node 0")
        if not 0 <= self.node_rank < most:
            raise UsageError(f"--node-rank {self.node_rank} is not a node of --nnodes {self.nnodes} (0..{most - 1})")


def threads_per_process(nproc: int) -> int:
    """This node's usable cores shared fairly among its processes (the elastic launcher leaves OMP_NUM_THREADS
    unset)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc)


def launch(worker_args: Sequence[str], options: LaunchOptions) -> int:
    """Run `python -m scaleforge *worker_args` on `options.nproc` processes of this node; returns the exit code.

    One node alone meets through a local c10d rendezvous (torchrun's `--standalone`). Several nodes use a static
    rendezvous at `--rdzv-endpoint`, where `--node-rank` orders the nodes, so node 0 holds global rank 0 (which
    writes the run directory), as with torchrun.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    fewest, most = options.node_range
    single_node = most == 1
    if single_node:
        rendezvous: dict[str, Any] = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0", "rdzv_configs": {}}
    elif options.elastic:  # a dynamic rendezvous that node 0 hosts: nodes join, leave, and the job goes on
        rendezvous = {
            "rdzv_backend": "c10d",
            "rdzv_endpoint": options.rdzv_endpoint,
            "rdzv_configs": {
                "is_host": options.node_rank == 0,
                "last_call_timeout": ELASTIC_LAST_CALL_S,
                # a node that stops beating is dropped from the next round after 3 s, not torch's 15
                "keep_alive_interval": 1,
                "keep_alive_max_attempt": 3,
            },
        }
    else:
        rendezvous = {"rdzv_backend": "static", "rdzv_endpoint": options.rdzv_endpoint}
        rendezvous["rdzv_configs"] = {"rank": options.node_rank}
    config = LaunchConfig(
        min_nodes=fewest,
        max_nodes=most,
        nproc_per_node=options.nproc,
        # nodes meet under one job id: torchrun's default when none is given
        run_id=options.rdzv_id or (uuid.uuid4().hex if single_node else "none"),
        max_restarts=options.max_restarts,
        monitor_interval=0.1,
        **rendezvous,
    )
    try:
        with _worker_environment(options):
            elastic_launch(config, sys.executable)("-m", "scaleforge", *worker_args)
    except SignalException as interrupt:  # Ctrl-C or SIGTERM: the launcher has already stopped the workers
        print("interrupted", file=sys.stderr)
        return 128 + int(interrupt.sigval)
    except ChildFailedError as error:
        return report_failure(error)
    return 0


@contextlib.contextmanager
def _worker_environment(options: LaunchOptions) -> Iterator[None]:
    """The variables the workers inherit, and quiet elastic loggers, only while the workers run: the caller may
    be a long-lived process. The signal handlers the launcher installs to stop its workers are put back too."""
    saved = os.environ.copy()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    names = {*ELASTIC_LOGGERS, *logging.root.manager.loggerDict}  # the parents cover loggers made later
    loggers = [logging.getLogger(name) for name in names]
    levels = {logger: logger.level for logger in loggers if logger.name.startswith(ELASTIC_LOGGERS)}
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(options.nproc)))
    os.environ[LAUNCHED] = "1"
    if options.max_nodes > 1:  # the workers' peer watch beats in the rendezvous store (see distributed/peer_watch.py)
        os.environ[ENDPOINT_VAR] = str(options.rdzv_endpoint)
        os.environ[JOB_VAR] = options.rdzv_id or "none"
    # Workers watch the launcher (`guard_from_environment`): torch's elastic agent, which starts them in sessions
    # of their own, runs inside the launcher, so a launcher killed outright would leave them to no one. SIGKILL,
    # not SIGTERM, the signal a live launcher stops its workers with: that stop writes a checkpoint at the next
    # step boundary, in collectives with peers that may be dying too (a wait of up to `parallel.timeout_s`), into
    # a run directory that the same command, run again at once, resumes. With the launcher gone nobody reports,
    # restarts or waits for a worker, and the last committed checkpoint already holds the run (a checkpoint counts
    # only once renamed into place, `final/` likewise).
    os.environ.update(parent_environment(signal.SIGKILL))
    # Without this, workers restarted after a failure hang in the next rendezvous (torch 2.13).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    for logger in levels:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for logger, level in levels.items():
            logger.setLevel(level)


def report_failure(error: object) -> int:
    """Say why the workers failed; returns the launcher's exit code (2 for a user error, else 1).

    A user error is the cause whenever there is one (the other processes may have failed only because a peer
    left): its one line, as the worker left it in the launcher's error file (see `env.record_error`), already
    naming its rank unless every process met it. Then a hang, as a worker whose collective timed out named it.
    Otherwise the first worker that crashed is named.
    """
    failures = error.failures  # type: ignore[attr-defined]
    user_errors = {rank: failure for rank, failure in failures.items() if failure.exitcode == 2}
    if user_errors:
        print(user_errors[min(user_errors)].message, file=sys.stderr)
        return 2
    hangs = {rank: failure for rank, failure in failures.items() if failure.exitcode == PEER_HUNG_EXIT}
    if hangs:  # a worker whose collective timed out names the process it waited for
        print(hangs[min(hangs)].message, file=sys.stderr)
        return 1
    # The cause: not a worker that stopped because a peer had gone, nor one the launcher stopped (SIGTERM).
    causes = {
        rank: failure
        for rank, failure in failures.items()
        if failure.exitcode not in (PEER_FAILED_EXIT, -signal.SIGTERM)
    } or failures
    rank = min(causes, key=lambda r: (causes[r].timestamp, r))
    failure = causes[rank]
    if failure.exitcode < 0:
        how = f"was killed by {signal.Signals(-failure.exitcode).name}"
    elif failure.exitcode - 128 in (signal.SIGTERM, signal.SIGINT):  # stopped at a step boundary, checkpointed
        print(f"stopped: rank {rank} received {signal.Signals(failure.exitcode - 128).name}", file=sys.stderr)
        return failure.exitcode
    elif failure.exitcode == PEER_FAILED_EXIT:  # the process that failed first did not end in time to be seen
        how = "lost contact with another process, which stopped without a report"
    else:
        how = f"exited with code {failure.exitcode} (its traceback is above)"
    print(f"training failed: rank {rank} {how}", file=sys.stderr)
    return 1


def is_launched_worker() -> bool:
    """Whether this process is a worker that `launch` started."""
    return os.environ.get(LAUNCHED) == "1"


def restarts_left() -> bool:
    """Whether the launcher will start this worker again after it fails."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    return restarts < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
