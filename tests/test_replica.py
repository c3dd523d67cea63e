"""Replication between real mounts on loopback: each node a `slurpfs mount`
process with its own data directory, its replication worker talking to the
others' over libp2p."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Nodes
from fsutil import Mounted
from replica_nodes import make_cluster, role_file, wait_connected, wait_content, write

pytestmark = pytest.mark.mount


@pytest.fixture
def pair(nodes: Nodes, tmp_path: Path) -> Iterator[list[Mounted]]:
    mounts = make_cluster(nodes, tmp_path, 2)
    try:
        for m in mounts:
            m.mount()
        yield mounts
        for m in mounts:
            m.unmount()
    finally:
        for m in mounts:
            m.sweep()


def test_a_save_through_one_mount_reads_through_the_other(pair: list[Mounted]) -> None:
    a, b = pair
    wait_connected(pair)
    write(role_file(a, "src", "one.go"), b"package one\n")
    wait_content(role_file(b, "src", "one.go"), b"package one\n")
    write(role_file(b, "src", "one.go"), b"package one // edited on b\n")
    wait_content(role_file(a, "src", "one.go"), b"package one // edited on b\n")
