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

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from cluster import (
    NOT_ROOT,
    History,
    Network,
    SlurpNode,
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
DEV = "developer"


class Nodes:
    """The nodes of one test, on one network; `close` checks each daemon's end."""

    def __init__(self, network: Network, root: Path) -> None:
        self.network = network
        self.root = root
        self.all: list[SlurpNode] = []
        self.expected_warnings: list[str] = []

    def add(self) -> SlurpNode:
        node = SlurpNode(self.network, self.network.hosts[len(self.all)], self.root)
        self.all.append(node)
        return node

    def cluster(self, count: int) -> list[SlurpNode]:
        """`count` new nodes made one cluster through the CLI, each granted the
        developer role, mounted, and seeing every other member up."""
        members = [self.add() for _ in range(count)]
        for node in members:
            node.init()
        founder = members[0]
        founder.mount()  # a join dials the inviter's running mount
        for node in members[1:]:
            node.join(founder.invite())
            founder.cli("keys", "grant", DEV, "--to", node.node_id)
        for node in members[1:]:
            node.mount()
        for node in members:
            wait_until(f"{node.name} sees every member up", partial(all_up, node, members))
        return members

    def close(self) -> None:
        """Unmount each running node cleanly and check its log (after a passing test)."""
        for node in self.all:
            if node.pid:
                node.unmount()
            node.check_log(self.expected_warnings)


def all_up(node: SlurpNode, members: list[SlurpNode]) -> bool:
    states = {p["node_id"]: p["state"] for p in node.peers()}
    return all(states.get(m.node_id) == "up" for m in members if m is not node)


@pytest.fixture
def nodes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Nodes]:
    with Network(4) as network:
        made = Nodes(network, tmp_path)
        yield made
        if not request.node.stash.get(FAILED, False):
            made.close()
    assert not network.leftovers(), network.leftovers()


def test_checker_finds_a_write_that_a_node_lacks(nodes: Nodes) -> None:
    # Two nodes that are not a cluster: what one stores, the other never shows.
    a, b = nodes.add(), nodes.add()
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
