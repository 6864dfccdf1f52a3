"""Sockets: a free port for a server scaleforge starts (a benchmark's object store and targets, a federation's
SuperLink)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on now. Another process may take it before the caller binds it: the
    caller's server fails to start then, and says so."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
