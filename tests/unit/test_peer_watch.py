"""The peer watch's decision, on a clock the test moves: a watched rank whose heartbeat stops for SILENT_AFTER_S is
named once, with its node; one that beats, however slowly its beats arrive, never is."""

from __future__ import annotations

import torch.distributed as dist

from scaleforge.distributed.env import DistEnv
from scaleforge.distributed.peer_watch import SILENT_AFTER_S, PeerWatch


def watch_of_rank_2(lines: list[str], now: list[float]) -> PeerWatch:
    store = dist.HashStore()
    store.set("node/3", "node 1 (host-b)")
    env = DistEnv(rank=2, world_size=4)
    return PeerWatch(env, store, node="node 0 (host-a)", clock=lambda: now[0], on_silent=lines.append)


def test_a_rank_whose_beat_stops_is_named_with_its_node() -> None:
    lines: list[str] = []
    now = [100.0]
    watch = watch_of_rank_2(lines, now)
    assert watch.watched == 3  # the next rank, in a ring
    since = watch.check(7, None)
    for _ in range(4):  # the same count for just under SILENT_AFTER_S: not yet
        now[0] += (SILENT_AFTER_S - 0.01) / 4
        since = watch.check(7, since)
    assert lines == []
    now[0] += 0.02
    watch.check(7, since)
    assert lines == [
        "rank 3 on node 1 (host-b) stopped: no heartbeat for 5 s (seen by rank 2); the workers stop, and start "
        "again from the newest good checkpoint if the launcher has restarts left"
    ]


def test_a_rank_that_beats_is_never_named() -> None:
    lines: list[str] = []
    now = [0.0]
    watch = watch_of_rank_2(lines, now)
    since = None
    for beat in range(50):  # a beat every 4 s: slow, but moving
        now[0] += 4.0
        since = watch.check(beat, since)
    assert lines == []


def test_the_last_rank_watches_the_first() -> None:
    watch = PeerWatch(DistEnv(rank=3, world_size=4), dist.HashStore(), node="node 1", on_silent=print)
    assert watch.watched == 0


def test_a_rank_that_finished_or_never_beat_is_not_named() -> None:
    lines: list[str] = []
    now = [0.0]
    watch = watch_of_rank_2(lines, now)
    since = None
    for _ in range(10):  # never beats (it could not reach the store): not watched
        now[0] += 1.0
        since = watch.check(0, since)
    since = watch.check(3, since)
    watch.store.set("done/3", "1")  # rank 3 finished its part (rank 0 may still be saving)
    for _ in range(10):
        now[0] += 1.0
        since = watch.check(3, since)
    assert lines == []
