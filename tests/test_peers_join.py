"""Joining a cluster over the real transport: an inviter in its own process
(`join_node.py`), the joiner here, on loopback; intruders are `net_intruder.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from conftest import WEAK_KDF, run_cli_process
from fsutil import Mounted
from test_net_transport import GUARD, HERE, NodeProcess, free_port, listening_ports

from slurpfs.crypto.keystore import Keystore
from slurpfs.net import members as m
from slurpfs.net.join import InviterUnreachable, join
from slurpfs.net.members import Cluster, InviteRefused
from slurpfs.service import control

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


@contextmanager
def running(inviter: Inviter) -> Iterator[Inviter]:
    """The inviter until the block ends; then killed by its PID if still running."""
    try:
        yield inviter
    finally:
        stop(inviter.proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()  # by its PID
        proc.wait(timeout=GUARD)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


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
        if self.inviter is not None:
            stop(self.inviter.proc)


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


# ---- the command line --------------------------------------------------------------


def cli(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return run_cli_process(*args)


def init(root: Path, name: str, roles: str = "architect,developer") -> Path:
    data = root / name
    done = cli("init", "--data", data, "--roles", roles)
    assert done.returncode == 0, done.stderr
    return data


def members_of(data: Path) -> list[str]:
    """The members `slurpfs peers --json` lists (the removed ones left out)."""
    listed = json.loads(cli("peers", "--data", data, "--json").stdout)["peers"]
    return [p["node_id"] for p in listed if p["state"] != "removed"]


def test_peers_invite_join_grant_and_remove_on_the_command_line(tmp_path: Path) -> None:
    a, b, c = (init(tmp_path, n) for n in "abc")
    port = free_port()
    invite = cli("peers", "invite", "--data", a, "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert invite.returncode == 0, invite.stderr
    assert b"founded a cluster" in invite.stderr
    assert b"no mount runs" in invite.stderr
    (token,) = invite.stdout.decode().split()
    second = cli("peers", "invite", "--data", a, "--json")
    assert json.loads(second.stdout)["founded"] is False
    with running(Inviter(a, port)) as inviter:
        joined = cli("peers", "join", token, "--data", b, "--listen", "/ip4/127.0.0.1/tcp/7402")
        assert joined.returncode == 0, joined.stderr
        again = cli("peers", "join", json.loads(second.stdout)["token"], "--data", b)
        assert again.returncode == 1
        assert b"already belongs to a cluster" in again.stderr
        third = cli("peers", "invite", "--data", a)
        joined_c = cli("peers", "join", third.stdout.decode().strip(), "--data", c)
        assert joined_c.returncode == 0, joined_c.stderr
        inviter.stop()
    assert b"joined the cluster" in joined.stderr
    assert b"Failed" not in joined.stderr  # no library noise
    assert len(members_of(a)) == 3
    assert len(members_of(b)) == 2  # b has not heard of c yet
    b_keys = json.loads(cli("keys", "list", "--data", b, "--json").stdout)
    a_keys = json.loads(cli("keys", "list", "--data", a, "--json").stdout)
    assert [r["role"] for r in b_keys["roles"]] == [r["role"] for r in a_keys["roles"]]
    assert not any(r["held"] for r in b_keys["roles"])  # public keys only, until granted

    b_id = b_keys["node_id"]
    granted = cli("keys", "grant", "developer", "--to", b_id[:12], "--data", a)
    assert granted.returncode == 0, granted.stderr
    log = Cluster.load(a, Keystore(a, None, WEAK_KDF))
    assert log is not None
    for data in (b, c):  # what the replication worker does with a peer's log
        other = Cluster.load(data, Keystore(data, None, WEAK_KDF))
        assert other is not None
        assert other.merge(log.entries())
    b_after = json.loads(cli("keys", "list", "--data", b, "--json").stdout)
    c_after = json.loads(cli("keys", "list", "--data", c, "--json").stdout)
    assert [r["role"] for r in b_after["roles"] if r["held"]] == ["developer"]
    assert not any(r["held"] for r in c_after["roles"])  # the grant is useless to c

    removed = cli("peers", "remove", b_id[:12], "--data", a, "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["held"] == ["developer"]  # granted above
    assert json.loads(removed.stdout)["rotated"] == ["developer"]  # so a rotated it
    assert json.loads(cli("peers", "--data", a, "--json").stdout)["removed"] == [b_id]
    assert cli("peers", "remove", b_id[:12], "--data", a).returncode == 3  # not a member now


def test_a_node_holding_contexts_refuses_to_join(tmp_path: Path) -> None:
    a, b = init(tmp_path, "a"), init(tmp_path, "b")
    token = cli("peers", "invite", "--data", a).stdout.decode().strip()
    put = run_cli_process(
        "put", "ucxl://x:developer@p:t/f", "--role", "developer", "--data", b, input=b"x\n"
    )
    assert put.returncode == 0, put.stderr
    done = cli("peers", "join", token, "--data", b)
    assert done.returncode == 1
    assert b"already holds contexts" in done.stderr
    assert not (b / "cluster").exists()


def test_joining_a_stopped_inviter_or_with_a_bad_token_says_why(tmp_path: Path) -> None:
    a, b = init(tmp_path, "a"), init(tmp_path, "b")
    port = free_port()
    token = cli("peers", "invite", "--data", a, "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    done = cli("peers", "join", token.stdout.decode().strip(), "--data", b)
    assert done.returncode == 1
    assert b"is its mount running?" in done.stderr
    bad = cli("peers", "join", "slurpfs1-nonsense", "--data", b)
    assert bad.returncode == 7
    assert b"not a slurpfs invite token" in bad.stderr
    assert not (b / "cluster").exists()
    assert cli("peers", "--data", b).returncode == 7  # no cluster
    assert cli("keys", "grant", "developer", "--to", "a", "--data", b).returncode == 7


@pytest.mark.mount
def test_a_running_mount_is_told_of_cluster_changes(tmp_path: Path) -> None:
    data = init(tmp_path, "a")
    m = Mounted(data, tmp_path / "mnt")
    m.mount()
    try:
        done = cli("peers", "invite", "--data", data)
        assert done.returncode == 0, done.stderr
        assert b"no mount runs" not in done.stderr  # the daemon answered `cluster`
        assert control.request(data, "cluster", timeout=10.0) == "ok"
    finally:
        m.unmount()


def test_a_new_role_or_generation_joins_the_member_log(tmp_path: Path) -> None:
    a, b = init(tmp_path, "a"), init(tmp_path, "b")
    assert cli("peers", "invite", "--data", a).returncode == 0
    assert cli("keys", "add", "qa", "--data", a).returncode == 0
    rotated = cli("keys", "rotate", "developer", "--data", a)
    assert rotated.returncode == 0, rotated.stderr
    log = Cluster.load(a, Keystore(a, None, WEAK_KDF))
    assert log is not None
    assert set(log.role_keys()["qa"]) == {1}
    assert set(log.role_keys()["developer"]) == {1, 2}
    a_keys = json.loads(cli("keys", "list", "--data", a, "--json").stdout)
    assert {r["role"]: r["generation"] for r in a_keys["roles"]}["developer"] == 2
    assert Keystore(a, None, WEAK_KDF).load().generations("developer") == (2,)  # 1 destroyed
    fsck = cli("fsck", "--data", a)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    keys = Keystore(b, None, WEAK_KDF)
    node = keys.load().node
    token = log.invite()
    answer = log.admit(m.join_request(node, token, m.Member(node.node_id, (), "b")))
    Cluster.adopt(b, keys, token.psk, m.decode_entries(answer))  # what `peers join` stores
    ring = keys.load()
    assert ring.current_public("qa").generation == 1
    assert ring.current_public("developer").generation == 2
    assert ring.held_roles() == frozenset()
