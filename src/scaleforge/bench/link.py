"""A slow link between two nodes on one machine, for `scaleforge bench scaling --grad-compression --link RATE`.

Two network namespaces joined by a virtual Ethernet pair stand in for two nodes: each end of the pair sends
through a token-bucket filter (`tc ... tbf`) at RATE, so every byte one node sends the other (the gradients'
all-reduce, the rendezvous) crosses a link of that speed, as between machines, while each node's processes still
talk over their own fast loopback. A launcher runs in each namespace (`ip netns exec`), node 0 hosting the
rendezvous; gloo is told which interface is the link (GLOO_SOCKET_IFNAME), since the host name resolves to the
namespace's loopback.

This needs root (creating namespaces and links is CAP_NET_ADMIN) and iproute2's `ip` and `tc`. The namespaces
are named after the benchmark's process and deleted when it ends, with any left by a benchmark killed outright.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from scaleforge.errors import UsageError

PREFIX = "sfbench"  # the namespaces' names: sfbench<pid>a, sfbench<pid>b
SUBNET = "10.231.0"  # node k is 10.231.0.(k + 1) on its end of the pair
PORT = 29400  # the rendezvous port on node 0: nothing else listens in a fresh namespace
BURST = "64kb"  # the bucket: a few full-sized packets, so that the rate holds at any packet size
LATENCY = "50ms"  # how long a packet may wait for tokens before it is dropped (TCP sends it again)
RATE = re.compile(r"\d+(\.\d+)?(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)", re.IGNORECASE)


@dataclass(frozen=True)
class Node:
    """One end of the link: a network namespace, its interface and address."""

    namespace: str
    interface: str
    address: str

    def prefix(self) -> list[str]:
        """What runs a command in this node: in its namespace, gloo on its interface."""
        return ["ip", "netns", "exec", self.namespace, "env", f"GLOO_SOCKET_IFNAME={self.interface}"]


@dataclass(frozen=True)
class Link:
    """Two nodes joined at `rate` (tc's units: 100mbit, 1gbit, ...)."""

    rate: str
    nodes: tuple[Node, Node]

    @property
    def rendezvous(self) -> str:
        return f"{self.nodes[0].address}:{PORT}"


def check_rate(rate: str) -> str:
    """`rate` when tc understands it as a rate, else a usage error."""
    if not RATE.fullmatch(rate):
        raise UsageError(f"--link: '{rate}' is not a rate; use a number and tc's unit, such as 100mbit or 1gbit")
    return rate.lower()


def check_tools() -> None:
    """A usage error unless this process can make namespaces and links (root, with `ip` and `tc`)."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise UsageError(f"--link needs iproute2's {' and '.join(missing)} (not found on PATH)")
    if os.geteuid() != 0:
        raise UsageError("--link makes network namespaces and a throttled link between them, which needs root")


@contextlib.contextmanager
def throttled_link(rate: str) -> Iterator[Link]:
    """Two namespaces joined at `rate` in each direction while the block runs; deleted after it."""
    check_tools()
    rate = check_rate(rate)
    _delete_stale()
    base = f"{PREFIX}{os.getpid()}"
    nodes = tuple(Node(f"{base}{end}", f"sf{os.getpid()}{end}", f"{SUBNET}.{k + 1}") for k, end in enumerate("ab"))
    try:
        for node in nodes:
            _ip("netns", "add", node.namespace)
        first, second = nodes
        _ip("link", "add", first.interface, "type", "veth", "peer", "name", second.interface)
        for node in nodes:
            _ip("link", "set", node.interface, "netns", node.namespace)
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.interface)
            _ip("-n", node.namespace, "link", "set", node.interface, "up")
            _ip("-n", node.namespace, "link", "set", "lo", "up")
            _run(
                ["tc", "-n", node.namespace, "qdisc", "add", "dev", node.interface, "root", "tbf"]
                + ["rate", rate, "burst", BURST, "latency", LATENCY]
            )
        yield Link(rate, (first, second))
    finally:
        for node in nodes:  # deleting a namespace deletes its end of the pair, and with it the other
            subprocess.run(["ip", "netns", "delete", node.namespace], capture_output=True, check=False)
        # a pair made but not yet moved into the namespaces (a setup step that failed) is still here
        subprocess.run(["ip", "link", "delete", nodes[0].interface], capture_output=True, check=False)


def _delete_stale() -> None:
    """Delete the namespaces of benchmarks whose process is gone (killed before they could clean up)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        found = re.fullmatch(rf"{PREFIX}(\d+)[ab]", name)
        # this process's own names too: left by an earlier process that had this process's number
        if found and (int(found.group(1)) == os.getpid() or not _alive(int(found.group(1)))):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(command: list[str]) -> None:
    """Run a setup command; a usage error with its message when it fails (a rate tc refuses, no permission)."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise UsageError(f"--link: `{' '.join(command)}` failed: {message[0] if message else done.returncode}")
