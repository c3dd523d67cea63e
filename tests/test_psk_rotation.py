"""The cluster key (pnet PSK) rotates when a member is removed: real mounts on
loopback, each node a ``slurpfs mount`` process whose replication worker talks
libp2p; the removed node keeps its node key and the old cluster key, and tries
to connect with both (``net_intruder.py``, a genuine py-libp2p host)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import WEAK_KDF, Nodes
from fsutil import Mounted, wait_for
from replica_nodes import (
    SYNC_TIMEOUT,
    make_cluster,
    peers_json,
    read,
    role_file,
    wait_connected,
    wait_content,
    write,
)

from slurpfs.crypto.keystore import Keystore
from slurpfs.net.members import Cluster
from slurpfs.net.transport import peer_id_of

pytestmark = pytest.mark.mount

HERE = Path(__file__).parent


def transport(m: Mounted) -> dict[str, Any]:
    stats = peers_json(m).get("transport")
    assert isinstance(stats, dict)
    return stats


def refused_more(m: Mounted, than: int) -> bool:
    return int(transport(m)["refused_keys"]) > than


def keys_accepted(m: Mounted, count: int) -> bool:
    return transport(m).get("keys_accepted") == count


def node_of(m: Mounted) -> tuple[bytes, bytes, str]:
    """The node's seed, its cluster key now, and its first address with its peer id."""
    keystore = Keystore(m.data, None, WEAK_KDF)
    cluster = Cluster.load(m.data, keystore)
    assert cluster is not None
    node = keystore.load().node
    address = cluster.me().addrs[0]
    return bytes(node.signing_key), cluster.psk, f"{address}/p2p/{peer_id_of(node.node_id)}"


def intrude(seed: bytes, psk: bytes, target: str) -> dict[str, Any]:
    """A member's genuine handshake (its key, Noise, the PSK given) to ``target``."""
    config = {"mode": "member", "target": target, "psk": psk.hex(), "seed": seed.hex()}
    done = subprocess.run(
        [sys.executable, str(HERE / "net_intruder.py"), json.dumps(config)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_a_removed_node_cannot_connect_once_the_cluster_key_rotated(
    nodes: Nodes, tmp_path: Path
) -> None:
    """a removes c while b is down; a goes on writing; b comes back knowing only
    the old key, is let in on it, learns the new key from the member log and
    reconnects on it; then a and b accept only the new key, and c, with its own
    node key and the old cluster key, opens no connection to either."""
    a, b, c = mounts = make_cluster(nodes, tmp_path, 3)
    for m in (a, b):  # c keeps dialling: on the old key, let in and refused by the member list
        m.expect_warnings = (r"refused a connection from non-member \S+ at \S+",)
    try:
        for m in mounts:
            m.mount()
        wait_connected(mounts)
        write(role_file(a, "psk", "before"), b"before the removal\n")
        for m in (b, c):
            wait_content(role_file(m, "psk", "before"), b"before the removal\n")
        c_seed, old_psk, _ = node_of(c)
        c_id = json.loads(c.cli("status", "--json").stdout)["node_id"]
        b.unmount()

        removed = json.loads(a.cli("peers", "remove", c_id[:16], "--json").stdout)

        assert removed["removed"] == c_id
        _, new_psk, a_target = node_of(a)
        assert new_psk != old_psk
        write(role_file(a, "psk", "during"), b"written while b was down\n")
        b.mount()  # b knows only the old key: a lets it in on it during the transition
        wait_content(role_file(b, "psk", "during"), b"written while b was down\n")
        _, b_psk, b_target = node_of(b)
        assert b_psk == new_psk  # sealed to b in the member log
        for m in (a, b):  # each saw the other on the new key: the old one is retired
            wait_for(functools.partial(keys_accepted, m, 1), SYNC_TIMEOUT, f"{m.data} to retire")
        write(role_file(b, "psk", "after"), b"after the rotation\n")
        wait_content(role_file(a, "psk", "after"), b"after the rotation\n")

        refused = {m.data: transport(m)["refused_keys"] for m in (a, b)}
        for m, target in ((a, a_target), (b, b_target)):
            attempt = intrude(c_seed, old_psk, target)
            assert attempt["connected"] is False, attempt
            # closed at its first bytes and counted (the count reaches `peers` with the
            # worker's next status report)
            wait_for(
                functools.partial(refused_more, m, refused[m.data]),
                SYNC_TIMEOUT,
                f"{m.data} to count the refused key",
            )
        assert read(role_file(c, "psk", "after")) is None  # c's own mount never hears of it
        assert read(role_file(c, "psk", "during")) is None
        for m in mounts:
            m.unmount()
    finally:
        for m in mounts:
            m.sweep()
