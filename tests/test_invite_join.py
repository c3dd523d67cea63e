"""``slurpfs peers invite`` on a mounted node, then ``slurpfs peers join`` at once:
the token printed is usable as soon as ``invite`` returns (it waits until the
mount's replication worker listens)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import Nodes
from replica_nodes import address, free_port, unclustered

pytestmark = pytest.mark.mount


def test_a_node_joins_the_moment_invite_returns(nodes: Nodes, tmp_path: Path) -> None:
    a, b = unclustered(nodes, tmp_path, "a", "b")
    try:
        a.mount()  # no cluster yet: `invite` founds it and the mount starts its worker
        port = free_port()
        invite = a.cli("peers", "invite", "--listen", address(port))
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # the worker listens already: one attempt, no retry
        join = b.cli(
            "peers", "join", invite.stdout.decode().strip(), "--listen", address(free_port()),
            "--json", check=False,
        )  # fmt: skip
        assert join.returncode == 0, join.stderr
        assert b"joined the cluster" in join.stderr
        listed = json.loads(join.stdout)
        assert len(listed["members"]) == 2
        a.unmount()
    finally:
        a.sweep()
        b.sweep()
