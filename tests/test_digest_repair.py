"""Digest repair between real mounts on loopback: one exchange repairs every
bucket that differs, however many (the ids are listed a page of buckets at a
time)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import Nodes
from replica_nodes import make_cluster, role_file, wait_connected, wait_content, write

from slurpfs.net.replica import CURSORS, REPAIR_BUCKETS, bucket_of

pytestmark = pytest.mark.mount

FILES = 300  # addresses spread over about 290 of the 4096 buckets


def test_one_digest_exchange_repairs_more_than_a_page_of_buckets(
    nodes: Nodes, tmp_path: Path
) -> None:
    """b has never held a's versions but its cursor says it pulled them all (so
    neither a pull nor a push brings them): the digest exchange on connect is the
    only way they come, and the next one is ten minutes away."""
    a, b = make_cluster(nodes, tmp_path, 2)
    node_a, node_b = nodes.created
    files = {f"f{i:03d}": f"content {i}\n".encode() for i in range(FILES)}
    try:
        a.mount()
        for name, data in files.items():
            write(role_file(a, "spread", name), data)
        a.unmount()
        model = node_a.open()
        buckets = {bucket_of(r.address) for r in model.store.iter_records()}
        epoch, seq, a_id = model.store.epoch(), model.store.sequence(), model.keyring.node.node_id
        node_a.close(model)
        assert len(buckets) > 2 * REPAIR_BUCKETS
        assert epoch is not None
        model = node_b.open()
        model.store.aux_write(CURSORS, {a_id: epoch + struct.pack(">Q", seq)})
        node_b.close(model)

        for m in (a, b):
            m.mount()
        wait_connected([a, b])
        for name, data in files.items():
            wait_content(role_file(b, "spread", name), data)
        for m in (a, b):
            m.unmount()
    finally:
        for m in (a, b):
            m.sweep()
