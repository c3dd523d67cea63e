"""Role key rotation across a cluster: the new generation's public key and grants
travel in the member log, re-wrapped key slots travel with the versions, and the
nodes that held the role keep reading throughout (in-process nodes on disk: the
log entries and versions are handed over as the replication worker hands them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import WEAK_KDF, Node, Nodes, run_cli_process

from slurpfs.crypto import envelope as env
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import Corrupt, KeyMissing
from slurpfs.ingest import Incoming, Ingest, IngestReport
from slurpfs.model import ContextStore
from slurpfs.net import members
from slurpfs.net.members import Cluster, Member
from slurpfs.net.peerscmd import rotation_announcer
from slurpfs.ucxl import parse

ADDR = parse("ucxl://claude:architect@bzzz:auth/src/auth.go")
OTHER = parse("ucxl://claude:architect@bzzz:auth/src/main.go")
DEV = "developer"


class World:
    """Nodes in one cluster, founded by the first; each with its store and log."""

    def __init__(self, nodes: Nodes, names: str) -> None:
        self.nodes: dict[str, Node] = {}
        self.models: dict[str, ContextStore] = {}
        self.clusters: dict[str, Cluster] = {}
        for name in names:
            node, model = nodes.new(name)
            self.nodes[name], self.models[name] = node, model
        first = names[0]
        self.clusters[first] = Cluster.found(
            self.nodes[first].data_dir, self.keys(first), ["/ip4/127.0.0.1/tcp/7400"], first
        )
        for name in names[1:]:
            self._join(name)
        self.sync_logs()

    def keys(self, name: str) -> Keystore:
        return Keystore(self.nodes[name].data_dir, None, WEAK_KDF)

    def _join(self, name: str) -> None:
        founder = next(iter(self.clusters.values()))
        token = founder.invite()
        keys = self.keys(name)
        node = keys.load().node
        me = Member(node.node_id, ("/ip4/127.0.0.2/tcp/7400",), name)
        entries = members.decode_entries(founder.admit(members.join_request(node, token, me)))
        self.clusters[name] = Cluster.adopt(self.nodes[name].data_dir, keys, token.psk, entries)

    def node_id(self, name: str) -> bytes:
        return self.clusters[name].me().node_id

    def sync_logs(self) -> None:
        """Every log takes every other's entries (what the workers' hellos do), and
        each model reloads its keys (as the worker and the daemon do on a change)."""
        for _ in range(2):
            for a in self.clusters.values():
                for b in self.clusters.values():
                    b.merge(a.entries())
        for model in self.models.values():
            model.reload_keyring()

    def ship(self, source: str, target: str, since: int = 0) -> IngestReport:
        """`target` ingests everything in `source`'s change log past `since`, with
        each version's current slots (what a pull carries)."""
        store = self.models[source].store
        _, records = store.changes_since(since)
        items = [incoming(self.models[source], r.version_id) for r in records]
        ingest = Ingest(self.models[target], self.clusters[target].removed)
        return ingest.accept(items, origin="peer:test")

    def restart(self, name: str) -> ContextStore:
        """A fresh process on `name`'s data directory (no plaintext cache)."""
        self.models[name] = self.nodes[name].reopen(self.models[name])
        return self.models[name]


def incoming(model: ContextStore, version_id: bytes) -> Incoming:
    stored = model.store.read_version(version_id)
    assert stored is not None
    return Incoming(version_id, stored.envelope, stored.slots)


def generations_of(model: ContextStore, version_id: bytes, role: str = DEV) -> set[int]:
    return {s.generation for s in model.store.slots(version_id) if s.role == role}


def only_generation(model: ContextStore, version_id: bytes, generation: int) -> bytes:
    """The plaintext opened from the version's `generation` slot alone."""
    stored = model.store.read_version(version_id)
    assert stored is not None
    slots = [s for s in stored.slots if (s.role, s.generation) == (DEV, generation)]
    data_key = env.unwrap_data_key(slots, model.keyring)
    return env.decrypt(env.Envelope.decode(stored.envelope), data_key)


def test_a_rotation_reaches_the_holders_and_reads_go_on(nodes: Nodes) -> None:
    w = World(nodes, "ab")
    a, b = w.models["a"], w.models["b"]
    w.clusters["a"].grant(DEV, w.node_id("b"))
    w.sync_logs()
    first = a.put(ADDR, DEV, b"first\n")
    w.ship("a", "b")
    assert b.get(ADDR, DEV).data == b"first\n"
    before = a.store.sequence()
    reads: list[bytes] = []
    announce = rotation_announcer(w.nodes["a"].config, a.keystore, DEV)
    assert announce is not None
    publish: Callable[[], None] = announce

    def announce_and_read() -> None:
        publish()  # the new generation is published and granted here...
        w.sync_logs()
        reads.append(b.get(ADDR, DEV).data)  # ...while b reads with the old one

    report = a.rotate_role(DEV, announce_and_read)

    assert (report.old_generation, report.new_generation, report.rewrapped) == (1, 2, 1)
    assert reads == [b"first\n"]
    assert a.keyring.generations(DEV) == (2,)  # the old key is gone on a
    b = w.restart("b")
    assert b.get(ADDR, DEV).data == b"first\n"  # b still reads (its old key, old slot)
    assert b.keyring.private(DEV, 2) is not None  # the rotation granted b the new key
    # the re-wrap is a change: the version is listed again, with its new slot
    _, again = a.store.changes_since(before)
    assert [r.version_id for r in again] == [first.version_id]
    merged = w.ship("a", "b", before)
    assert merged.reslotted == (first.version_id,)
    assert merged.stored == ()
    assert generations_of(b, first.version_id) == {1, 2}  # added, the old one kept
    assert only_generation(b, first.version_id, 2) == b"first\n"
    # b retires generation 1 too: everything still reads, with generation 2
    w.keys("b").destroy_generation(DEV, 1)
    b = w.restart("b")
    assert b.keyring.generations(DEV) == (2,)
    assert b.get(ADDR, DEV).data == b"first\n"
    second = a.put(OTHER, DEV, b"after the rotation\n")
    w.ship("a", "b", before)
    assert b.get(OTHER, DEV).data == b"after the rotation\n"
    assert generations_of(b, second.version_id) == {2}
    # a version listed again with no new slot changes nothing
    seq = b.store.sequence()
    assert w.ship("a", "b").reslotted == ()
    assert b.store.sequence() == seq


def test_slots_of_a_generation_retired_here_are_not_merged(nodes: Nodes) -> None:
    w = World(nodes, "ab")
    a, b = w.models["a"], w.models["b"]
    w.clusters["a"].grant(DEV, w.node_id("b"))
    w.sync_logs()
    old = a.put(ADDR, DEV, b"old\n")
    w.ship("a", "b")
    announce = rotation_announcer(w.nodes["a"].config, a.keystore, DEV)
    a.rotate_role(DEV, announce)
    w.sync_logs()
    # b still holds generation 1 and sends it back: a, which destroyed it, skips it
    seq = a.store.sequence()
    back = w.ship("b", "a")
    assert (back.reslotted, back.stored, a.store.sequence()) == ((), (), seq)
    assert generations_of(a, old.version_id) == {2}
    # a version b writes with the old generation only (before it heard of the
    # rotation) still enters a whole, its old slot kept for the nodes that hold
    # generation 1 (a cannot open that slot)
    late = incoming(b, b.put(OTHER, DEV, b"late\n").version_id)
    old_public = b.keyring.public(DEV, 1)
    assert old_public is not None
    stale = [s for s in late.slots if s.role != DEV]
    stale.append(env.wrap_data_key(b"\0" * 32, old_public))
    report = Ingest(a).accept([Incoming(late.version_id, late.envelope, stale)])
    assert len(report.stored) == 1
    assert generations_of(a, late.version_id) == {1}


def test_a_merged_slot_is_checked_and_never_replaces_one(nodes: Nodes) -> None:
    w = World(nodes, "ab")
    w.clusters["a"].grant(DEV, w.node_id("b"))
    w.sync_logs()
    a, b = w.models["a"], w.models["b"]
    version = a.put(ADDR, DEV, b"text\n")
    w.ship("a", "b")
    item = incoming(a, version.version_id)
    ingest = Ingest(b)
    # a slot for a role that does not read developer contexts: refused, nothing stored
    foreign = env.wrap_data_key(b"\1" * 32, b.keyring.current_public("reviewer"))
    seq = b.store.sequence()
    with pytest.raises(Corrupt, match="not a reader"):
        ingest.accept([Incoming(version.version_id, item.envelope, [*item.slots, foreign])])
    assert b.store.sequence() == seq
    # a different slot for a (role, generation) b has: kept as it was
    forged = [env.wrap_data_key(b"\2" * 32, b.keyring.current_public(s.role)) for s in item.slots]
    report = ingest.accept([Incoming(version.version_id, item.envelope, forged)])
    assert (report.reslotted, b.store.sequence()) == ((), seq)
    assert b.store.slots(version.version_id) == list(item.slots)
    assert w.restart("b").get(ADDR, DEV).data == b"text\n"


def test_removing_a_member_rotates_what_it_held_and_it_cannot_open_the_new(
    nodes: Nodes, tmp_path: Path
) -> None:
    w = World(nodes, "abc")
    a = w.models["a"]
    for name in "bc":
        w.clusters["a"].grant(DEV, w.node_id(name))
    w.sync_logs()
    before = a.put(ADDR, DEV, b"before\n")
    for name in "bc":
        w.ship("a", name)
    for name in "abc":
        w.nodes[name].close(w.models[name])  # the CLI opens the stores itself

    removed = run_cli_process(
        "peers", "remove", w.node_id("c").hex()[:12], "--data", w.nodes["a"].data_dir, "--json"
    )

    assert removed.returncode == 0, removed.stderr
    assert b"developer: generation 1 -> 2, 1 versions re-wrapped" in removed.stderr
    assert b"granted developer generation 2 to b" in removed.stderr
    for name in "abc":
        w.models[name] = w.nodes[name].open()
    w.clusters["a"] = Cluster.load(w.nodes["a"].data_dir, w.keys("a"))  # type: ignore[assignment]
    w.sync_logs()
    a, b, c = w.models["a"], w.models["b"], w.models["c"]
    assert a.keyring.generations(DEV) == (2,)
    assert generations_of(a, before.version_id) == {2}
    secret = a.put(OTHER, DEV, b"after the removal\n")
    w.ship("a", "b")
    assert b.get(OTHER, DEV).data == b"after the removal\n"
    assert only_generation(b, before.version_id, 2) == b"before\n"
    # the canary: c heard of generation 2 but holds no key of it, and cannot open
    # what is sealed to it (it keeps what it had before, as it always could)
    assert c.keyring.public(DEV, 2) is not None
    assert c.keyring.private(DEV, 2) is None
    stored = a.store.read_version(secret.version_id)
    assert stored is not None
    with pytest.raises(KeyMissing):
        env.unwrap_data_key(stored.slots, c.keyring)
    assert DEV not in c.held_roles()
    assert only_generation(c, before.version_id, 1) == b"before\n"


def test_a_holder_completes_the_rotation_for_what_it_sealed_to_the_old_key(
    nodes: Nodes,
) -> None:
    w = World(nodes, "ab")
    w.clusters["a"].grant(DEV, w.node_id("b"))
    w.sync_logs()
    a, b = w.models["a"], w.models["b"]
    a.rotate_role(DEV, rotation_announcer(w.nodes["a"].config, a.keystore, DEV))
    # b saves before it hears of the rotation: sealed to generation 1, which a destroyed
    late = b.put(ADDR, DEV, b"sealed in the window\n")
    assert generations_of(b, late.version_id) == {1}
    w.ship("b", "a")
    with pytest.raises(KeyMissing):
        only_generation(a, late.version_id, 2)
    w.sync_logs()  # b hears of generation 2 and holds it (the rotation's grant)

    assert b.complete_rotations() == 1

    assert generations_of(b, late.version_id) == {1, 2}
    assert b.complete_rotations() == 0  # done once
    assert w.ship("b", "a").reslotted == (late.version_id,)
    assert only_generation(a, late.version_id, 2) == b"sealed in the window\n"
