"""Noticing, within seconds, a process of another node that has gone: a heartbeat through the rendezvous store.

A process killed on this node is seen by the launcher at once, and one killed on a node whose network still
answers breaks the sockets of the collectives. A node that vanishes (its machine lost, its link cut) breaks
nothing: the others would wait in their next collective for `parallel.timeout_s`. So in a job of several nodes
each worker beats every second in the job's rendezvous store (served by the launcher of node 0, apart from the
collectives and from any worker), and watches the next rank's beat, a ring, two store operations a second per
process whatever the job's size. A rank whose beat has not moved for `SILENT_AFTER_S` has gone: its watcher
says so in one line naming the rank and its node, leaves the line for the launcher, and ends its process at once
(it may be blocked in a collective), so the launcher restarts the workers (an elastic job goes on with the nodes
left, from the newest good checkpoint) or ends the job with that line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from scaleforge.distributed.env import PEER_HUNG_EXIT, DistEnv, record_error

# Set by the launcher of a job of several nodes: the rendezvous store's HOST:PORT, and the job's id.
ENDPOINT_VAR = "SCALEFORGE_RDZV_ENDPOINT"
JOB_VAR = "SCALEFORGE_RDZV_ID"
BEAT_S = 1.0
SILENT_AFTER_S = 5.0


def _exit_now(line: str) -> None:
    """Say `line`, leave it for the launcher, and end this process without waiting for anything."""
    print(line, file=sys.stderr, flush=True)
    record_error(line)
    os._exit(PEER_HUNG_EXIT)


class PeerWatch:
    """This process's heartbeat, and its watch over the next rank's (see the module's docstring). `stop` ends the
    thread; `clock` and `on_silent` are for tests."""

    def __init__(
        self,
        env: DistEnv,
        store: dist.Store,
        *,
        node: str,
        clock: Callable[[], float] = time.monotonic,
        on_silent: Callable[[str], None] = _exit_now,
    ) -> None:
        self.env, self.store, self.clock, self.on_silent = env, store, clock, on_silent
        self.watched = (env.rank + 1) % env.world_size
        store.set(f"node/{env.rank}", node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scaleforge-peer-watch", daemon=True)

    @classmethod
    def start_for(cls, env: DistEnv, store: dist.Store | None) -> PeerWatch | None:
        """The watch of a worker in a job of several nodes, beating in the job's `store` (`job_store`; None: no
        watch). Its keys are this round's: rank 0 draws a token every process receives (a collective)."""
        if store is None:
            return None
        token = [uuid.uuid4().hex if env.is_main else None]
        dist.broadcast_object_list(token, src=0)
        node = f"node {os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})"
        watch = cls(env, dist.PrefixStore(f"peer-watch/{token[0]}/", store), node=node)
        watch._thread.start()
        return watch

    def check(self, beats: int, since: tuple[int, float] | None) -> tuple[int, float] | None:
        """One look at the watched rank: its beat count now, and when it last moved; calls `on_silent` once it
        has not moved for `SILENT_AFTER_S` since its first beat, unless it has finished (`stop`)."""
        now = self.clock()
        if beats == 0:  # not beating yet (or never: a process that could not reach the store is not watched)
            return None
        if since is None or beats != since[0]:
            return beats, now
        if now - since[1] >= SILENT_AFTER_S and not self.store.check([f"done/{self.watched}"]):
            node = self._node_of(self.watched)
            self.on_silent(
                f"rank {self.watched} on {node} stopped: no heartbeat for {SILENT_AFTER_S:g} s (seen by rank "
                f"{self.env.rank}); the workers stop, and start again from the newest good checkpoint if the "
                "launcher has restarts left"
            )
        return since

    def _node_of(self, rank: int) -> str:
        try:
            return self.store.get(f"node/{rank}").decode()
        except (RuntimeError, ValueError):
            return "an unknown node"

    def _run(self) -> None:
        since: tuple[int, float] | None = None
        while not self._stop.wait(BEAT_S):
            try:
                self.store.add(f"beat/{self.env.rank}", 1)
                beats = self.store.add(f"beat/{self.watched}", 0)  # 0 if it has not beaten yet
                since = self.check(beats, since)
            except (RuntimeError, ValueError):  # the store did not answer: try again (it went with node 0 if
                continue  # it never answers again, which ends the job anyway)

    def stop(self) -> None:
        """Stop beating, having said so: this process has finished its part (rank 0 may save on alone)."""
        with contextlib.suppress(RuntimeError, ValueError):
            self.store.set(f"done/{self.env.rank}", "1")
        self._stop.set()


def job_store() -> dist.Store | None:
    """A client of the job's rendezvous store, under this job's prefix, in a job of several nodes (None otherwise,
    or when the store cannot be reached)."""
    endpoint = os.environ.get(ENDPOINT_VAR)
    if not endpoint:
        return None
    host, _, port = endpoint.rpartition(":")
    try:
        client = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False)
    except (RuntimeError, ValueError):
        return None
    return dist.PrefixStore(f"scaleforge/{os.environ.get(JOB_VAR, 'job')}/", client)


def started_before(store: dist.Store | None, env: DistEnv) -> bool:
    """On rank 0: whether this job's workers have started before (a restart after a failure, or after a node
    joined, which torch's restart count does not count); False elsewhere and in a job of one node."""
    if store is None or not env.is_main:
        return False
    try:
        return store.add("starts", 1) > 1
    except (RuntimeError, ValueError):
        return False
