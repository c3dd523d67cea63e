"""Replication by outcome: slurpfs nodes as real processes in network namespaces.

Each node is a data directory mounted with ``slurpfs mount`` inside its own
network namespace (tests/cluster.py); clients write and read through the mounts
with os calls. `History` records every acknowledged write and checks, after the
faults are healed, that every node shows the same state and every acknowledged
write (in its address's history, or as a conflict). How long each write took to
be visible everywhere is printed, never asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import History, Network, SlurpNode, have_tools, wait_until
from conftest import FAILED

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(bool(have_tools()), reason=f"needs {', '.join(have_tools())}"),
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

    def close(self) -> None:
        """Unmount each running node cleanly and check its log (a passing test)."""
        for node in self.all:
            if node.pid:
                node.unmount()
            node.check_log(self.expected_warnings)


@pytest.fixture
def three(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Nodes]:
    with Network(3) as network:
        nodes = Nodes(network, tmp_path)
        yield nodes
        if not request.node.stash.get(FAILED, False):
            nodes.close()
    assert not network.leftovers(), network.leftovers()


def test_checker_finds_a_write_that_a_node_lacks(three: Nodes) -> None:
    # Two nodes that are not a cluster: what one stores, the other never shows.
    a, b = three.add(), three.add()
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
