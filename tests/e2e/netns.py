"""Two isolated network nodes on this machine: Linux network namespaces joined by a veth pair.

`NodePair()` creates namespaces A and B (addresses 10.77.0.1/24 and 10.77.0.2/24 by default, `lo` up in each),
`cmd(node, ...)` prefixes a command with `ip netns exec`, and `close()` kills every process left in either namespace and
deletes both (deleting a namespace deletes its end of the veth pair, and with it the other end). Needs root.

NOTE: run processes with `ip netns exec`, not setns(2) from Python: `ip netns exec` also remounts /sys for the
namespace, and UCX finds its network devices in /sys/class/net. A process that only called setns saw the root
namespace's devices, and UCX's TCP endpoint failed ("Destination is unreachable").
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    name: str  # the network namespace (`ip netns` name)
    ip: str  # its address on the veth link
    dev: str  # its end of the veth pair (for UCX_NET_DEVICES)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class NodePair:
    def __init__(self, tag: str | None = None, subnet: str = "10.77.0") -> None:
        tag = tag or str(os.getpid())
        # NOTE: interface names are at most 15 characters; the pid keeps concurrent runs apart.
        # NOTE: both ends of the veth pair have the same name (each in its own namespace), so that one
        # UCX_NET_DEVICES setting fits every node, as one NIC name usually does on a real cluster.
        dev = f"pdv{tag}"[:15]
        self.a = Node(f"pdserve-{tag}-a", f"{subnet}.1", dev)
        self.b = Node(f"pdserve-{tag}-b", f"{subnet}.2", dev)
        self.created: list[str] = []
        try:
            for node in (self.a, self.b):
                _ip("netns", "add", node.name)
                self.created.append(node.name)
                _ip("-n", node.name, "link", "set", "lo", "up")
            _ip("link", "add", self.a.dev, "netns", self.a.name, "type", "veth", "peer", "name", self.b.dev,
                "netns", self.b.name)
            for node in (self.a, self.b):
                _ip("-n", node.name, "addr", "add", f"{node.ip}/24", "dev", node.dev)
                _ip("-n", node.name, "link", "set", node.dev, "up")
                # NOTE: a default route, as a real host has: Ray finds a process's own address by routing a UDP
                # socket towards a public address, and without a route it would settle on 127.0.0.1.
                _ip("-n", node.name, "route", "add", "default", "dev", node.dev)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NodePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def cmd(node: Node, *argv: str) -> list[str]:
        """`argv` run inside `node`'s network namespace."""
        return ["ip", "netns", "exec", node.name, *argv]

    @staticmethod
    def pids(node: Node) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", node.name], capture_output=True, text=True, timeout=10).stdout
        return [int(p) for p in out.split()]

    def close(self, grace_s: float = 5.0) -> None:
        """Kill what still runs in the namespaces (TERM, then KILL after `grace_s`) and delete them."""
        nodes = [n for n in (self.a, self.b) if n.name in self.created]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for n in nodes for p in self.pids(n) if p != os.getpid()]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while pids and time.monotonic() < deadline and any(self.pids(n) for n in nodes):
                time.sleep(0.1)
        for node in nodes:
            subprocess.run(["ip", "netns", "del", node.name], capture_output=True, timeout=10)
        self.created = []
