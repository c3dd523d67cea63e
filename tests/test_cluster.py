"""Replication by outcome: slurpfs nodes as real processes in network namespaces.

Each node is a data directory mounted with ``slurpfs mount`` inside its own
network namespace (tests/cluster.py); the cluster is made with the CLI
(``peers invite``, ``peers join``, ``keys grant``) and clients write and read
through the mounts with os calls. `History` records every acknowledged write and
checks, after the faults are healed, that every node shows the same state and
every acknowledged write (in its address's history, or as a conflict). How long
each write took to be visible everywhere is printed, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import (
    DEV,
    NOT_ROOT,
    ClusterNodes,
    History,
    Network,
    WriteLoop,
    conflicts,
    shows,
    wait_until,
)
from conftest import FAILED

HERE = Path(__file__).parent

pytestmark = [
    pytest.mark.mount,
    pytest.mark.slow,
    pytest.mark.skipif(NOT_ROOT, reason="network namespaces need root"),
]

AUTH = "claude:architect@bzzz:auth"


@pytest.fixture
def cluster_nodes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClusterNodes]:
    with Network(4) as network:
        made = ClusterNodes(network, tmp_path)
        yield made
        if not request.node.stash.get(FAILED, False):
            made.close()
    assert not network.leftovers(), network.leftovers()


def test_checker_finds_a_write_that_a_node_lacks(cluster_nodes: ClusterNodes) -> None:
    # Two nodes that are not a cluster: what one stores, the other never shows.
    a, b = cluster_nodes.add(), cluster_nodes.add()
    for node in (a, b):
        node.init()
        node.mount()
    address = f"{AUTH}/src/auth.go"
    with History([a, b]) as history:
        written = history.write(a, address, DEV, b"token expiry: 15 min\n")
        assert written.acked is not None, written.error
        wait_until("a shows its own write", lambda: "n1" in written.visible)
    report = history.check(guard=3.0)
    print(report.summary())
    assert report.acknowledged == 1
    assert report.lost == [f"n2: n1 wrote {address}/{DEV} = b'token expiry: 15 min\\n'"]
    assert report.divergent == ["n2"]
    assert not report.ok

    alone = History([a])  # a cluster of one holds what it acknowledged
    alone.writes = history.writes
    verdict = alone.check(guard=3.0)
    assert verdict.ok, verdict.summary()
    assert len(verdict.latencies) == 1


def test_a_write_on_one_node_is_read_on_the_others(cluster_nodes: ClusterNodes) -> None:
    a, b, c = cluster_nodes.cluster(3)
    auth, db = f"{AUTH}/src/auth.go", f"{AUTH}/src/db.go"
    with History([a, b, c]) as history:
        history.write(a, auth, DEV, b"tokens expire after 15 minutes\n")
        history.write(b, db, DEV, b"the pool holds 8 connections\n")
        history.wait_visible()
        history.write(c, auth, DEV, b"tokens expire after 10 minutes\n")  # over a's, seen
        history.wait_visible()
    report = history.check()
    print(report.summary())
    assert report.ok, report
    for node in (a, b, c):  # each mount reads the others' writes, the latest as the head
        assert node.path(auth, DEV).read_bytes() == b"tokens expire after 10 minutes\n"
        assert node.path(db, DEV).read_bytes() == b"the pool holds 8 connections\n"
        assert len(os.listdir(node.ucxl / auth / ".history" / DEV)) == 2
        assert not [n for n in os.listdir(node.ucxl / auth) if ".conflict-" in n]


def test_partition_with_writes_on_both_sides_converges_with_conflicts(
    cluster_nodes: ClusterNodes,
) -> None:
    a, b, c = cluster_nodes.cluster(3)
    shared = f"{AUTH}/src/session.go"
    with History([a, b, c]) as history:
        history.write(a, shared, DEV, b"timeout = 30\nretries = 3\n")
        history.wait_visible()
        cluster_nodes.network.partition([a.host], [b.host, c.host])
        mine = history.write(a, shared, DEV, b"timeout = 60\nretries = 3\n")
        theirs = history.write(b, shared, DEV, b"timeout = 90\nretries = 3\n")
        history.write(a, f"{AUTH}/only/a", DEV, b"written on the minority side\n")
        history.write(c, f"{AUTH}/only/c", DEV, b"written on the majority side\n")
        wait_until("c shows b's write", lambda: shows(c, theirs))
        assert not shows(a, theirs)  # the partition held: neither side saw the other's
        assert not shows(b, mine)
        cluster_nodes.network.heal()
        history.wait_visible()
    report = history.check()
    print(report.summary())
    assert report.ok, report  # nothing lost, every node the same
    states = history.converge()
    # The overlapping edits stay a conflict, named the same on every node, and the
    # losing version is readable as that file on every node.
    names = conflicts(states[0])[shared]
    assert len(names) == 1, names
    for node in (a, b, c):
        head = node.path(shared, DEV).read_bytes()
        loser = (node.ucxl / shared / names[0]).read_bytes()
        assert {head, loser} == {mine.content, theirs.content}


def test_a_node_killed_during_a_write_loop_catches_up_after_restart(
    cluster_nodes: ClusterNodes,
) -> None:
    a, b, c = cluster_nodes.cluster(3)
    with History([a, b, c]) as history:
        addresses = [f"{AUTH}/loop/{i}" for i in range(4)]
        with (
            WriteLoop(history, a, addresses, DEV) as loop_a,
            WriteLoop(history, c, addresses[::-1], DEV) as loop_c,
        ):
            loop_a.wait_for(10)
            b.kill9()  # in the middle of a's and c's pushes to it
            loop_a.wait_for(25)
            loop_c.wait_for(25)
            b.mount()  # the same data directory: it must catch up on what it missed
            loop_a.wait_for(35)
        history.write(b, f"{AUTH}/after/restart", DEV, b"b is back\n")
        history.wait_visible()
    report = history.check()
    print(report.summary())
    assert report.ok, report
    assert report.acknowledged >= 60


def test_outsiders_are_refused(cluster_nodes: ClusterNodes) -> None:
    a, b = cluster_nodes.cluster(2)
    outsider = cluster_nodes.network.hosts[3]
    psk = (a.data / "cluster" / "psk").read_bytes().hex()
    target = f"{a.listen}/p2p/{peer_id(a.node_id)}"

    def intrude(**config: object) -> dict[str, object]:
        argv: list[str | Path] = [sys.executable, HERE / "net_intruder.py", json.dumps(config)]
        done = cluster_nodes.network.run(outsider, argv)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
        return result

    frame = os.urandom(64).hex()
    no_psk = intrude(mode="no-psk", target=target, psk=None, seed=os.urandom(32).hex(), frame=frame)
    assert not no_psk["wrote"], no_psk
    assert no_psk["error"] is not None, no_psk
    stranger = intrude(mode="stranger", target=target, psk=psk, frame=frame)
    assert stranger["error"] is not None, stranger
    forged = intrude(mode="plaintext", target=target, psk=psk, claim=b.node_id, frame=frame)
    assert not forged["connected"], forged
    assert not forged["wrote"], forged

    # The cluster is as it was: the same two members, replicating.
    assert set(a.states()) == {a.node_id, b.node_id}
    with History([a, b]) as history:
        history.write(a, f"{AUTH}/after/intruders", DEV, b"still replicating\n")
        history.wait_visible()
    assert history.check().ok
    cluster_nodes.expected_warnings += [r".*\brefused\b.*"]


def peer_id(node_id: str) -> str:
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    return str(ID.from_pubkey(Ed25519PublicKey.from_bytes(bytes.fromhex(node_id))))


def test_an_emptied_store_is_refilled_from_its_peers(
    cluster_nodes: ClusterNodes, tmp_path: Path
) -> None:
    a, b, c = cluster_nodes.cluster(3)
    c.unmount()
    empty = tmp_path / "empty.mdb"  # c's store as it was before anything was written
    shutil.copyfile(c.data / "store" / "data.mdb", empty)
    c.mount()
    with History([a, b, c]) as history:
        for i in range(6):
            history.write([a, b, c][i % 3], f"{AUTH}/kept/{i}", DEV, f"version {i}\n".encode())
        history.wait_visible()
        c.unmount()
        # c's store loses everything (its cluster directory stays): the operator puts
        # the empty store back and accepts it as it is...
        shutil.copyfile(empty, c.data / "store" / "data.mdb")
        accepted = c.cli("fsck", "--accept-rollback", check=False)  # (its search index
        assert b"accepted" in accepted.stderr, accepted  # still lists what it lost: exit 5)
        assert c.cli("get", f"ucxl://{AUTH}/kept/2", "--role", DEV, check=False).returncode == 3
        for write in history.acknowledged():
            write.visible.pop(c.name, None)  # (c must show each one again)
        c.mount()  # ...and its peers refill it, its own writes included
        history.wait_visible()
    report = history.check()
    print(report.summary())
    assert report.ok, report
    cluster_nodes.expected_warnings += [r"peer n3 was rolled back: .*", r".*rolled back.*"]


def test_a_paused_node_is_down_for_the_others_and_catches_up_when_resumed(
    cluster_nodes: ClusterNodes,
) -> None:
    a, b, c = cluster_nodes.cluster(3)
    with History([a, b, c]) as history:
        history.write(a, f"{AUTH}/pause/0", DEV, b"before the pause\n")
        history.wait_visible()
        c.pause()  # SIGSTOP to its daemon and workers: its connections stay open
        try:
            wait_until("a sees c down", lambda: a.states()[c.node_id] == "down")
            for i in range(1, 7):
                writer = [a, b][i % 2]
                history.write(
                    writer, f"{AUTH}/pause/{i}", DEV, f"while c was frozen {i}\n".encode()
                )
        finally:
            c.resume()
        wait_until("a sees c up again", lambda: a.states()[c.node_id] == "up")
        history.wait_visible()
    report = history.check()
    print(report.summary())
    assert report.ok, report
