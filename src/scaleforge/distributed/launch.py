"""Start worker processes through torch's elastic launcher (the machinery behind `torchrun`), called from Python.

Each worker runs `python -m scaleforge train ...` with RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address
in its environment, exactly as under `torchrun`, so the two ways of starting a run share one code path.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from scaleforge.errors import UsageError


@dataclass(frozen=True)
class LaunchOptions:
    """torchrun's flags, with the same meaning: processes per node, nodes, this node's rank, rendezvous."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def check(self) -> None:
        """Refuse flags that cannot describe a job."""
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise UsageError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT, the address every node meets at")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(
                f"--node-rank {self.node_rank} is not a node of --nnodes {self.nnodes} (0..{self.nnodes - 1})"
            )


def threads_per_process(nproc: int) -> int:
    """The node's cores shared fairly among its processes (the elastic launcher does not set OMP_NUM_THREADS)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def launch(worker_args: Sequence[str], options: LaunchOptions) -> int:
    """Run `python -m scaleforge *worker_args` on `options.nproc` processes of this node; returns the exit code.

    A worker that fails with a user error (exit 2) has printed its one-line message; the launcher then exits 2
    too. Other failures end the job with the failing rank named.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    options.check()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(options.nproc)))
    # Without this, workers restarted after a failure hang in the next rendezvous (torch 2.13).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # failures are reported below
    standalone = options.rdzv_endpoint is None
    config = LaunchConfig(
        min_nodes=options.nnodes,
        max_nodes=options.nnodes,
        nproc_per_node=options.nproc,
        run_id=options.rdzv_id or (uuid.uuid4().hex if standalone else "scaleforge"),
        rdzv_backend="c10d",
        rdzv_endpoint=options.rdzv_endpoint or "localhost:0",
        rdzv_configs={"is_host": options.node_rank == 0} if not standalone else {},
        max_restarts=options.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "scaleforge", *worker_args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode == 2:
            return 2
        print(f"training failed: rank {rank} exited with code {failure.exitcode} (its error is above)", file=sys.stderr)
        return 1
    return 0
