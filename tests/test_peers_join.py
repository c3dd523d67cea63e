"""Joining a cluster over the real transport: an inviter in its own process
(`join_node.py`), the joiner here, on loopback; intruders are `net_intruder.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from conftest import WEAK_KDF
from test_net_transport import GUARD, HERE, NodeProcess, free_port, listening_ports

from slurpfs.crypto.keystore import Keystore
from slurpfs.net import members as m
from slurpfs.net.join import InviterUnreachable, join
from slurpfs.net.members import Cluster, InviteRefused

ROLES = ("architect", "developer")


class Inviter(NodeProcess):
    """`join_node.py` over a data directory (reuses the transport tests' line protocol)."""

    def __init__(self, data: Path, port: int) -> None:
        # Not NodeProcess.__init__: another program; its messages name `member.port`.
        self.member = SimpleNamespace(port=port)  # type: ignore[assignment]
        config = {"data": str(data), "listen": f"/ip4/127.0.0.1/tcp/{port}"}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "join_node.py"), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._buffer = b""
        self.addresses = self._line()["ready"]


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"/ip4/127.0.0.1/tcp/{self.port}"
        self.keys = self.keystore("a")
        self.cluster = Cluster.found(root / "a", self.keys, [self.address], name="a")
        self.inviter: Inviter | None = None

    def keystore(self, name: str) -> Keystore:
        keys = Keystore(self.root / name, None, WEAK_KDF)
        keys.create(ROLES)
        return keys

    def start(self) -> Inviter:
        self.inviter = Inviter(self.root / "a", self.port)
        return self.inviter

    def join(self, name: str, token: m.Token) -> Cluster:
        keys = Keystore(self.root / name, None, WEAK_KDF)
        if not keys.exists():
            keys.create(ROLES)
        return trio.run(
            lambda: join(self.root / name, keys, token, [f"/ip4/127.0.0.1/tcp/{free_port()}"], name)
        )

    def stats(self) -> dict[str, Any]:
        assert self.inviter is not None
        result: dict[str, Any] = self.inviter.call("stats")
        return result

    def close(self) -> None:
        proc = self.inviter.proc if self.inviter else None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # by its PID
                proc.wait(timeout=GUARD)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    try:
        yield world
    finally:
        world.close()
    assert world.port not in listening_ports(), "the inviter left a listening socket"


def test_a_node_joins_through_a_running_inviter(world: World) -> None:
    token = m.Token.decode(world.cluster.invite().encode())
    world.start()
    b = world.join("b", token)
    a = Cluster.load(world.root / "a", Keystore(world.root / "a", None, WEAK_KDF))
    assert a is not None
    assert b.digest() == a.digest()
    assert {x.name for x in b.members()} == {"a", "b"}
    assert b.psk == a.psk
    assert not a.inviting()
    assert world.stats()["refused_connections"] == 0
    with pytest.raises(InviterUnreachable):  # used up: the inviter lets no one in now
        world.join("c", token)
    assert world.stats()["refused_connections"] >= 1
    assert not (world.root / "c" / "cluster").exists()
    assert world.inviter is not None
    world.inviter.stop()


def test_a_wrong_secret_is_refused_with_the_reason(world: World) -> None:
    token = world.cluster.invite()
    world.start()
    wrong = m.Token(token.psk, token.inviter, os.urandom(32), token.expires, token.addrs)
    with pytest.raises(InviteRefused, match="no such invite"):
        world.join("b", wrong)
    assert not (world.root / "b" / "cluster").exists()
    assert world.cluster.inviting()  # the real invite is still there
    assert world.join("b", token).me().name == "b"


def test_a_guest_reaches_only_the_join_stream(world: World) -> None:
    world.cluster.invite()
    world.start()
    target = f"{world.address}/p2p/{_peer_id(world.cluster.me().node_id)}"
    outcome = subprocess.run(
        [
            sys.executable,
            str(HERE / "net_intruder.py"),
            json.dumps(
                {
                    "mode": "stranger",
                    "target": target,
                    "psk": world.cluster.psk.hex(),
                    "frame": b"hello".hex(),
                }
            ),
        ],
        capture_output=True,
        timeout=GUARD,
        check=True,
    )
    result = json.loads(outcome.stdout.splitlines()[-1])
    assert result["connected"]  # let in while an invite is pending ...
    stats = world.stats()
    assert stats["refused_streams"] >= 1  # ... but its meta stream was refused and counted
    assert stats["frames_received"] == 0
    assert world.cluster.inviting()


def test_an_inviter_that_is_not_running_is_a_clear_error(world: World) -> None:
    token = world.cluster.invite()
    with pytest.raises(InviterUnreachable, match="is its mount running"):
        world.join("b", token)
    assert not (world.root / "b" / "cluster").exists()


def _peer_id(node_id: bytes) -> str:
    from slurpfs.net.transport import peer_id_of

    return str(peer_id_of(node_id))
