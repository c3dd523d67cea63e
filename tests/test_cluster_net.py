"""The cluster harness itself, with transport nodes in network namespaces.

Each node is `net_node.py` (a `Transport` driven by JSON lines) in its own
namespace, listening on its own address of the harness's bridge. A partition
(packets dropped between groups, or a host's port unplugged) must make the nodes
on either side see each other down by their missed pings while each side stays
up within itself, and healing must bring every link back without a restart.
Teardown must leave nothing behind, even after a failure.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cluster import NOT_ROOT, Host, Network, ip, running, wait_until
from nacl.signing import SigningKey

HERE = Path(__file__).parent
GUARD = 60.0  # seconds: a hang guard, never an expectation

pytestmark = pytest.mark.skipif(NOT_ROOT, reason="network namespaces need root")


class TransportNode:
    """`net_node.py` in a host's namespace."""

    def __init__(self, network: Network, host: Host, seed: bytes, psk: bytes, members: Any) -> None:
        self.host = host
        self.node_id = bytes(SigningKey(seed).verify_key).hex()
        config = {"seed": seed.hex(), "psk": psk.hex(), "listen": host.multiaddr(),
                  "members": members}  # fmt: skip
        self.proc = network.spawn(
            host,
            [sys.executable, HERE / "net_node.py", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._buffer = b""
        self.addresses: list[str] = self._line()["ready"]

    def _line(self) -> Any:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            end = time.monotonic() + GUARD
            while b"\n" not in self._buffer:
                if not selector.select(max(0.0, end - time.monotonic())):
                    raise AssertionError(f"{self.host.netns}: no answer in {GUARD} s")
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise AssertionError(f"{self.host.netns}: exited {self.proc.wait()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, op: str, **fields: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        return self._line()["result"]

    def up(self) -> set[str]:
        """The node ids of the peers this node sees up."""
        return {p["node_id"] for p in self.call("peers") if p["up"]}

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"op": "stop"}\n')
        assert self._line() == {"stopped": True}
        assert self.proc.wait(timeout=GUARD) == 0


@pytest.fixture
def trio_of_nodes() -> Iterator[tuple[Network, list[TransportNode]]]:
    with Network(3) as net:
        seeds = [os.urandom(32) for _ in net.hosts]
        ids = [bytes(SigningKey(s).verify_key).hex() for s in seeds]
        members = {i: h.multiaddr() for i, h in zip(ids, net.hosts, strict=True)}
        psk = os.urandom(32)
        nodes = [
            TransportNode(net, h, s, psk, members) for h, s in zip(net.hosts, seeds, strict=True)
        ]
        yield net, nodes
        for node in nodes:
            node.stop()
    assert not net.leftovers(), net.leftovers()


def sees(node: TransportNode, up: list[TransportNode]) -> bool:
    return node.up() == {n.node_id for n in up}


def mesh(nodes: list[TransportNode], what: str) -> None:
    """Wait until each of `nodes` sees all the others up."""
    for node in nodes:
        others = [n for n in nodes if n is not node]
        wait_until(f"{node.host.netns}: {what}", partial(sees, node, others), GUARD)


def test_nodes_in_namespaces_connect_across_the_bridge(
    trio_of_nodes: tuple[Network, list[TransportNode]],
) -> None:
    net, (a, b, c) = trio_of_nodes
    mesh([a, b, c], "sees the others up")
    # Each listens on its own namespace's address, reached over the bridge.
    assert a.addresses[0].startswith(f"/ip4/{a.host.ip}/tcp/")
    answer = a.call("request", peer=c.node_id, purpose="meta", frame=b"across".hex())
    assert bytes.fromhex(answer) == b"echo:across"
    state = next(p for p in a.call("peers") if p["node_id"] == c.node_id)
    assert state["address"] == c.host.multiaddr()


@pytest.mark.slow
def test_partition_and_heal(trio_of_nodes: tuple[Network, list[TransportNode]]) -> None:
    net, (a, b, c) = trio_of_nodes
    mesh([a, b, c], "all up")

    net.partition([a.host], [b.host, c.host])  # silent: packets dropped, TCP not told
    wait_until("a sees nobody up", lambda: sees(a, []), GUARD)
    wait_until("b sees only c", lambda: sees(b, [c]), GUARD)
    wait_until("c sees only b", lambda: sees(c, [b]), GUARD)
    answer = b.call("request", peer=c.node_id, purpose="meta", frame=b"inside".hex())
    assert bytes.fromhex(answer) == b"echo:inside"  # the majority side still talks

    net.heal()
    mesh([a, b, c], "all up after healing")
    answer = a.call("request", peer=b.node_id, purpose="bodies", frame=b"healed".hex())
    assert bytes.fromhex(answer) == b"echo:healed"


@pytest.mark.slow
def test_unplugged_host_is_down_everywhere_and_back_when_plugged(
    trio_of_nodes: tuple[Network, list[TransportNode]],
) -> None:
    net, (a, b, c) = trio_of_nodes
    mesh([a, b, c], "all up")
    net.unplug(c.host)
    wait_until("c sees nobody", lambda: sees(c, []), GUARD)
    wait_until("a sees only b", lambda: sees(a, [b]), GUARD)
    wait_until("b sees only a", lambda: sees(b, [a]), GUARD)
    net.plug(c.host)
    mesh([a, b, c], "all up after plugging")


def test_teardown_removes_everything_after_a_failure(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    net = Network(2)
    started: list[subprocess.Popen[bytes]] = []
    with pytest.raises(RuntimeError, match="a test failed"):
        fail_inside(net, mnt, started)
    assert started, "the failing test ran"
    assert not any(running(p.pid) for p in started)
    assert net.prefix not in ip("netns", "list").stdout
    assert not any(net.prefix in line for line in ip("-o", "link").stdout.splitlines())
    assert net.leftovers() == []
    assert not os.path.ismount(mnt)


def fail_inside(net: Network, mnt: Path, started: list[subprocess.Popen[bytes]]) -> None:
    """A test that starts processes (one paused), mounts, partitions, then fails."""
    with net:
        started.append(net.spawn(net.hosts[0], ["sleep", "600"]))
        started.append(net.spawn(net.hosts[1], ["sleep", "600"]))
        os.kill(started[1].pid, signal.SIGSTOP)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], check=True)
        net.mounts.append(mnt)
        net.partition([net.hosts[0]], [net.hosts[1]])
        assert net.pids(net.hosts[0]) == [started[0].pid]
        raise RuntimeError("a test failed")


CRASHING_RUN = """
import subprocess, sys, time
from cluster import Network
net = Network(2)
sleeper = net.spawn(net.hosts[1], ["sleep", "600"])
print(net.prefix, sleeper.pid, flush=True)
time.sleep(600)
"""


def test_sweep_removes_what_a_killed_run_left_and_nothing_else(tmp_path: Path) -> None:
    # A test run killed outright (no teardown): its namespaces and processes stay...
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(HERE)}
    run = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RUN], stdout=subprocess.PIPE, env=env, text=True
    )
    assert run.stdout is not None
    prefix, sleeper = run.stdout.readline().split()
    run.kill()
    run.wait(timeout=GUARD)
    run.stdout.close()
    assert running(int(sleeper))
    assert prefix in ip("netns", "list").stdout
    # ...beside a namespace that is not the harness's (made here, by hand).
    other = f"slurpfs-other-{os.getpid()}"
    ip("netns", "add", other)
    try:
        swept = subprocess.run(
            [HERE.parent / "scripts" / "sweep-netns", tmp_path], capture_output=True, text=True
        )
        assert swept.returncode == 0, swept.stderr
        assert not running(int(sleeper))
        listed = ip("netns", "list").stdout
        assert prefix not in listed
        assert other in listed  # not noted by the harness: untouched
        assert not list((tmp_path / "slurpfs-netns").iterdir())
    finally:
        ip("netns", "del", other)
