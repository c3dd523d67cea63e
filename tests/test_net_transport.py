"""The replication transport between real processes on loopback.

Each node is `net_node.py` in its own process (a `Transport` driven by JSON
lines); attackers are `net_intruder.py`, a bare py-libp2p host. Every process
is stopped by its PID at teardown, and no listening socket may remain.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

HERE = Path(__file__).parent
GUARD = 60.0  # seconds: a hang guard, never an expectation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening_ports() -> set[int]:
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # LISTEN
            ports.add(int(local.split(":")[1], 16))
    return ports


def wait_until(what: str, check: Callable[[], Any], guard: float = GUARD) -> Any:
    end = time.monotonic() + guard
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {guard} s: {what}")


class Member:
    """A node's identity and address (it may or may not be running)."""

    def __init__(self) -> None:
        self.seed = os.urandom(32)
        self.node_id = bytes(SigningKey(self.seed).verify_key).hex()
        self.port = free_port()
        self.address = f"/ip4/127.0.0.1/tcp/{self.port}"


class NodeProcess:
    def __init__(self, member: Member, psk: bytes, members: dict[str, str | None]) -> None:
        self.member = member
        config = {
            "seed": member.seed.hex(),
            "psk": psk.hex(),
            "listen": member.address,
            "members": members,
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "net_node.py"), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._buffer = b""
        ready = self._line()
        self.addresses: list[str] = ready["ready"]

    def _line(self) -> Any:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            end = time.monotonic() + GUARD
            while b"\n" not in self._buffer:
                if not selector.select(max(0.0, end - time.monotonic())):
                    raise AssertionError(f"node {self.member.port} did not answer in {GUARD} s")
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise AssertionError(f"node {self.member.port} exited: {self.proc.wait()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, op: str, **fields: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        return self._line()["result"]

    def peer(self, other: Member) -> dict[str, Any]:
        states: list[dict[str, Any]] = [
            p for p in self.call("peers") if p["node_id"] == other.node_id
        ]
        assert len(states) == 1
        return states[0]

    def received(self) -> list[list[Any]]:
        return list(self.call("received"))

    def stop(self) -> None:
        """Stop the transport; the process must exit on its own, cleanly."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"op": "stop"}\n')
        assert self._line() == {"stopped": True}
        assert self.proc.wait(timeout=GUARD) == 0

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=GUARD)


class Cluster:
    def __init__(self) -> None:
        self.psk = os.urandom(32)
        self.processes: list[NodeProcess] = []
        self.ports: set[int] = set()

    def start(self, member: Member, members: dict[str, str | None]) -> NodeProcess:
        node = NodeProcess(member, self.psk, members)
        self.processes.append(node)
        self.ports.add(member.port)
        return node

    def intrude(self, **config: Any) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, str(HERE / "net_intruder.py"), json.dumps(config)],
            capture_output=True,
            timeout=GUARD,
            check=True,
        )
        result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return result

    def close(self) -> None:
        for node in self.processes:
            if node.proc.poll() is None:
                node.proc.kill()  # by its PID
                node.proc.wait(timeout=GUARD)
            for pipe in (node.proc.stdin, node.proc.stdout):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.close()
    assert not cluster.ports & listening_ports(), "a node left a listening socket"


def pair(cluster: Cluster) -> tuple[Member, Member, NodeProcess, NodeProcess]:
    a, b = Member(), Member()
    members: dict[str, str | None] = {a.node_id: a.address, b.node_id: b.address}
    node_a, node_b = cluster.start(a, members), cluster.start(b, members)
    wait_until("a and b see each other up", lambda: node_a.peer(b)["up"] and node_b.peer(a)["up"])
    return a, b, node_a, node_b


def test_two_processes_exchange_batches_requests_and_pings(cluster: Cluster) -> None:
    a, b, node_a, node_b = pair(cluster)
    to_b = [[f"{n:04x}" * 8 for n in range(batch * 10, batch * 10 + 10)] for batch in range(5)]
    for frames in to_b:
        assert node_a.call("send", peer=b.node_id, purpose="meta", frames=frames) is True
    body = os.urandom(16384).hex()
    assert node_b.call("send", peer=a.node_id, purpose="bodies", frames=[body, "00"]) is True

    flat = [frame for frames in to_b for frame in frames]
    got_b = wait_until("b got 50 frames", lambda: len(r := node_b.received()) == 50 and r)
    assert [(peer, purpose, frame) for peer, purpose, frame, _ in got_b] == [
        (a.node_id, "meta", frame) for frame in flat
    ]
    assert len({batch for *_, batch in got_b}) <= 5  # batches arrive whole (or merged)
    got_a = wait_until("a got 2 frames", lambda: len(r := node_a.received()) == 2 and r)
    assert [(peer, purpose, frame) for peer, purpose, frame, _ in got_a] == [
        (b.node_id, "bodies", body),
        (b.node_id, "bodies", "00"),
    ]

    answer = node_a.call("request", peer=b.node_id, purpose="meta", frame=b"ask".hex())
    assert bytes.fromhex(answer) == b"echo:ask"
    answer = node_b.call("request", peer=a.node_id, purpose="bodies", frame=b"fail".hex())
    assert answer == {"error": "RemoteFailure", "message": "asked to fail"}

    state = wait_until("a measured b", lambda: (p := node_a.peer(b))["rtt"] is not None and p)
    assert 0 < state["rtt"] < GUARD
    assert abs(state["clock_offset"]) < 1.0  # same host, same clock
    assert state["address"] == b.address
    assert state["dials"] >= 1
    assert state["frames_sent"] >= 51
    assert state["frames_received"] >= 2
    stats = node_b.call("stats")
    assert stats["members"] == 1
    assert stats["up"] == 1
    assert stats["refused_connections"] == stats["refused_streams"] == 0
    node_a.stop()
    node_b.stop()


def test_plaintext_impersonation_of_a_member_is_refused(cluster: Cluster) -> None:
    a, victim = Member(), Member()
    node = cluster.start(victim, {a.node_id: None, victim.node_id: victim.address})
    target = node.addresses[0]
    psk = cluster.psk.hex()

    # The genuine member, with this very program, gets its frame through...
    genuine = cluster.intrude(mode="member", target=target, psk=psk, seed=a.seed.hex(), frame="01")
    assert genuine["wrote"], genuine
    wait_until("the genuine frame", lambda: node.received())
    # ...one who knows its public key (and even the PSK) but speaks plaintext does not.
    forged = cluster.intrude(mode="plaintext", target=target, psk=psk, claim=a.node_id, frame="02")
    assert not forged["connected"], forged
    assert not forged["wrote"], forged
    assert node.received() == [[a.node_id, "meta", "01", 1]]
    node.stop()


def test_non_member_is_refused_at_connection(cluster: Cluster) -> None:
    victim = Member()
    node = cluster.start(victim, {victim.node_id: victim.address})
    target, psk = node.addresses[0], cluster.psk.hex()
    stranger = cluster.intrude(mode="stranger", target=target, psk=psk, frame="03")
    assert stranger["error"] is not None, stranger
    wait_until("a refused connection", lambda: node.call("stats")["refused_connections"] >= 1)
    assert node.received() == []
    node.stop()


def test_node_without_the_psk_cannot_connect(cluster: Cluster) -> None:
    a, victim = Member(), Member()
    node = cluster.start(victim, {a.node_id: None, victim.node_id: victim.address})
    outsider = cluster.intrude(
        mode="no-psk", target=node.addresses[0], psk=None, seed=a.seed.hex(), frame="04"
    )
    assert not outsider["wrote"], outsider
    assert outsider["error"] is not None, outsider
    assert node.received() == []
    assert node.peer(a)["up"] is False
    node.stop()


@pytest.mark.slow
def test_killed_peer_goes_down_and_is_redialled_when_back(cluster: Cluster) -> None:
    a, b, node_a, node_b = pair(cluster)
    node_b.kill()
    wait_until("a sees b down", lambda: not node_a.peer(b)["up"])
    # a's dials fail while b is away: the library now blocks b for 60 s...
    wait_until("a failed to dial b", lambda: node_a.peer(b)["dial_failures"] >= 1)
    # b comes back with the same key and port; it does not dial a (no address for a),
    # so a's own redial must get through, well before those 60 s are over.
    node_b = cluster.start(b, {a.node_id: None, b.node_id: b.address})
    wait_until("a sees b up again", lambda: node_a.peer(b)["up"], guard=30.0)
    answer = node_a.call("request", peer=b.node_id, purpose="meta", frame=b"back".hex())
    assert bytes.fromhex(answer) == b"echo:back"
    node_a.stop()
    node_b.stop()


@pytest.mark.slow
def test_frozen_peer_is_down_by_missed_pings_and_back_after(cluster: Cluster) -> None:
    a, b, node_a, node_b = pair(cluster)
    os.kill(node_b.proc.pid, signal.SIGSTOP)  # TCP stays up: only the pings can tell
    try:
        wait_until("a sees frozen b down", lambda: not node_a.peer(b)["up"])
    finally:
        os.kill(node_b.proc.pid, signal.SIGCONT)
    wait_until("a sees b up again", lambda: node_a.peer(b)["up"], guard=30.0)
    answer = node_a.call("request", peer=b.node_id, purpose="bodies", frame=b"thawed".hex())
    assert bytes.fromhex(answer) == b"echo:thawed"
    node_a.stop()
    node_b.stop()
