"""A role key rotation across two real mounts on loopback: `slurpfs keys rotate`
on one node while the other reads in a loop; the new generation, its grant and
the re-wrapped key slots reach the other node, whose reads never fail, and
which reads with the new generation alone once it retires the old one."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import pytest
from conftest import WEAK_KDF, Node, Nodes
from fsutil import Mounted, wait_for
from replica_nodes import (
    ROLE,
    SYNC_TIMEOUT,
    address,
    free_port,
    make_cluster,
    peers_json,
    role_file,
    wait_connected,
    wait_content,
    write,
)
from test_replica import holds_role

from slurpfs import config
from slurpfs.crypto import envelope as env
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import KeyMissing
from slurpfs.model import ContextStore
from slurpfs.ucxl import parse

pytestmark = pytest.mark.mount

TEXT = b"written before the rotation\n"


class Reader:
    """Reads a file through a mount in a loop (a thread) and keeps what went wrong."""

    def __init__(self, path: Path, expected: bytes) -> None:
        self.path, self.expected = path, expected
        self.reads = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if data != self.expected:
                self.failures.append(f"read {data!r}")
            self.reads += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=SYNC_TIMEOUT)
        assert not self._thread.is_alive()


def key_generations(m: Mounted) -> dict[str, tuple[int, bool]]:
    rows = json.loads(m.cli("keys", "list", "--json").stdout)["roles"]
    return {r["role"]: (r["generation"], r["held"]) for r in rows}


def slot_generations(node: Node, path: str) -> set[int]:
    """The generations of `ROLE` the head of `path` has key slots for in `node`'s store."""
    model = node.open()
    try:
        info = model.stat(parse(f"ucxl://claude:architect@bzzz:auth/{path}"), ROLE)
        return {s.generation for s in model.store.slots(info.version_id) if s.role == ROLE}
    finally:
        node.close(model)


def test_a_rotation_on_one_mount_reaches_the_other_while_it_reads(
    nodes: Nodes, tmp_path: Path
) -> None:
    nodes_by_name: dict[str, Node] = {}
    mounts = []
    for name in ("a", "b"):
        node, model = nodes.new(name)
        node.close(model)
        nodes_by_name[name] = node
        mounts.append(Mounted(node.data_dir, tmp_path / f"mnt-{name}"))
    a, b = mounts
    try:
        a.mount()
        invite = a.cli("peers", "invite", "--listen", address(free_port()))
        wait_for(lambda: bool(peers_json(a)["listening"]), SYNC_TIMEOUT, "a's worker to listen")
        b.cli("peers", "join", invite.stdout.decode().strip(), "--listen", address(free_port()))
        b_id = json.loads(b.cli("keys", "list", "--json").stdout)["node_id"]
        a.cli("keys", "grant", ROLE, "--to", b_id[:16])
        write(role_file(a, "rot", "doc"), TEXT)
        b.mount()
        wait_connected([a, b])
        wait_for(functools.partial(holds_role, b, ROLE), SYNC_TIMEOUT, "the grant to reach b")
        wait_content(role_file(b, "rot", "doc"), TEXT)
        reader = Reader(role_file(b, "rot", "doc"), TEXT)
        try:
            wait_for(lambda: reader.reads > 0, SYNC_TIMEOUT, "b's first read")
            rotated = a.cli("keys", "rotate", ROLE, "--json")
            assert json.loads(rotated.stdout)["new"] == 2
            assert b"granted developer generation 2 to " in rotated.stderr
            wait_for(lambda: key_generations(b)[ROLE] == (2, True), SYNC_TIMEOUT, "b to hold gen 2")
            wait_for(
                lambda: 2 in slot_generations(nodes_by_name["b"], "rot/doc"),
                SYNC_TIMEOUT,
                "the re-wrapped slot to reach b",
            )
            write(role_file(a, "rot", "after"), b"sealed to generation 2\n")
            wait_content(role_file(b, "rot", "after"), b"sealed to generation 2\n")
            reads = reader.reads
            wait_for(lambda: reader.reads > reads, SYNC_TIMEOUT, "b to read on")
        finally:
            reader.stop()
        assert reader.failures == []
        assert key_generations(a)[ROLE] == (2, True)
        b.unmount()
        # b retires generation 1 as a did: what it holds opens with generation 2
        Keystore(b.data, None, WEAK_KDF).destroy_generation(ROLE, 1)
        b.mount()
        wait_content(role_file(b, "rot", "doc"), TEXT)
        wait_content(role_file(b, "rot", "after"), b"sealed to generation 2\n")
        a.unmount()
        b.unmount()
    finally:
        a.sweep()
        b.sweep()


def test_removing_a_mounted_member_rotates_its_roles_and_the_rest_read_on(
    nodes: Nodes, tmp_path: Path
) -> None:
    mounts = make_cluster(nodes, tmp_path, 3)
    n0, n1, n2 = mounts
    for m in (n0, n1):  # n2 dials on until it hears of its removal
        m.expect_warnings = (r"refused a connection from non-member \S+ at \S+",)
    try:
        for m in (n1, n2):
            n0.cli("keys", "grant", ROLE, "--to", m.data.name)  # (the names are n0..n2)
        for m in mounts:
            m.mount()
        wait_connected(mounts)
        write(role_file(n0, "rm", "doc"), TEXT)
        for m in (n1, n2):
            wait_content(role_file(m, "rm", "doc"), TEXT)
        reader = Reader(role_file(n1, "rm", "doc"), TEXT)
        try:
            removed = n0.cli("peers", "remove", "n2", "--json")
            assert json.loads(removed.stdout)["rotated"] == [ROLE]
            wait_for(
                lambda: key_generations(n1)[ROLE] == (2, True), SYNC_TIMEOUT, "n1 to hold gen 2"
            )
            write(role_file(n0, "rm", "after"), b"after the removal\n")
            wait_content(role_file(n1, "rm", "after"), b"after the removal\n")
        finally:
            reader.stop()
        assert reader.failures == []
        # the canary: what n0 wrote after the removal does not open with n2's keys
        n2_keys = Keystore(n2.data, None, WEAK_KDF).load()
        assert n2_keys.private(ROLE, 2) is None
        slots = cli_slots(n0, "rm/after")
        with pytest.raises(KeyMissing):
            env.unwrap_data_key([s for s in slots if s.role == ROLE], n2_keys)
        for m in mounts:
            m.unmount()
    finally:
        for m in mounts:
            m.sweep()


def cli_slots(m: Mounted, path: str) -> list[env.KeySlot]:
    """The key slots of the head of `path` in `m`'s store (opened beside its mount)."""
    cfg = config.load(None, {"HOME": str(m.data)}, {"node.data_dir": str(m.data)})
    model = ContextStore.open(cfg, None, kdf=WEAK_KDF)
    try:
        info = model.stat(parse(f"ucxl://claude:architect@bzzz:auth/{path}"), ROLE)
        return model.store.slots(info.version_id)
    finally:
        model.close()
