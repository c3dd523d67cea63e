"""Clusters of real mounts on loopback for the replication tests.

Each node is its own data directory and ``slurpfs mount`` process; the nodes
hold the same role keys (copied before the cluster is founded, as a node
granted every role would), and the cluster is founded and joined with
`slurpfs.net.members` (founder, invite, admit, adopt), as ``slurpfs peers
invite`` / ``join`` do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from conftest import WEAK_KDF, Nodes
from fsutil import Mounted, session_members, wait_for

from slurpfs.crypto.keystore import Keystore
from slurpfs.net import members
from slurpfs.net.members import Cluster, ClusterSettings, Member

AUTH = "claude:architect@bzzz:auth"
ROLE = "developer"
SYNC_TIMEOUT = 60.0  # hang guard for "the other node sees it"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def address(port: int) -> str:
    return f"/ip4/127.0.0.1/tcp/{port}"


def unclustered(nodes: Nodes, root: Path, *names: str) -> list[Mounted]:
    """A data directory per name, in no cluster yet (not mounted): for tests that
    found and join through the CLI."""
    mounts = []
    for name in names:
        node, model = nodes.new(name)
        node.close(model)
        mounts.append(Mounted(node.data_dir, root / f"mnt-{name}"))
    return mounts


def make_cluster(
    nodes: Nodes,
    root: Path,
    count: int,
    *,
    toml: str = "",
    settings: ClusterSettings | None = None,
) -> list[Mounted]:
    """`count` data directories in one cluster (not mounted yet)."""
    dirs = []
    for i in range(count):
        node, model = nodes.new(f"n{i}", toml=toml or None)
        node.close(model)
        dirs.append(node.data_dir)
    for other in dirs[1:]:
        _copy_role_keys(dirs[0], other)
    keystores = [Keystore(d, None, WEAK_KDF) for d in dirs]
    names = [f"n{i}" for i in range(count)]
    founder = Cluster.found(dirs[0], keystores[0], [address(free_port())], names[0], settings)
    for data, keystore, name in zip(dirs[1:], keystores[1:], names[1:], strict=True):
        token = founder.invite()
        identity = keystore.load().node
        request = members.join_request(
            identity, token, Member(identity.node_id, (address(free_port()),), name)
        )
        entries = members.decode_entries(founder.admit(request))
        Cluster.adopt(data, keystore, founder.psk, entries)
    return [Mounted(d, root / f"mnt{i}") for i, d in enumerate(dirs)]


def _copy_role_keys(source: Path, target: Path) -> None:
    for name in ("roles", "public.json"):
        src, dst = source / "keys" / name, target / "keys" / name
        if src.is_dir():
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def worker_pid(m: Mounted) -> int:
    """The replication worker of `m`'s daemon (a process of its session)."""
    for member in session_members(m.pid):
        pid = int(member.split()[0])
        with contextlib.suppress(OSError):
            if b"slurpfs.net.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise AssertionError(f"no replication worker in the session of {m.pid}")


def role_file(m: Mounted, *parts: str) -> Path:
    return m.ucxl / AUTH / Path(*parts) / ROLE


def write(path: Path, data: bytes, *, fsync: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def wait_content(path: Path, data: bytes, what: str = "") -> None:
    wait_for(lambda: read(path) == data, SYNC_TIMEOUT, what or f"{path} to hold {data!r}")


def peers_json(m: Mounted) -> dict[str, object]:
    result = m.cli("peers", "--json")
    loaded = json.loads(result.stdout)
    assert isinstance(loaded, dict)
    return loaded


def all_up(m: Mounted, count: int) -> bool:
    snapshot = peers_json(m)
    peers = snapshot.get("peers")
    assert isinstance(peers, list)
    return sum(1 for p in peers if p["state"] == "up") == count


def wait_connected(mounts: Sequence[Mounted]) -> None:
    for m in mounts:
        wait_for(
            functools.partial(all_up, m, len(mounts) - 1), SYNC_TIMEOUT, f"{m.data}'s peers up"
        )


def cluster_of(nodes: Nodes, root: Path, count: int, toml: str = "") -> Iterator[list[Mounted]]:
    """`count` nodes in one cluster, mounted and connected; unmounted (checked) after."""
    mounts = make_cluster(nodes, root, count, toml=toml)
    try:
        for m in mounts:
            m.mount()
        wait_connected(mounts)
        yield mounts
        for m in mounts:
            m.unmount()
    finally:
        for m in mounts:
            m.sweep()
