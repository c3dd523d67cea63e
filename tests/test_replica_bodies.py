"""Envelope bodies only on the holders of each address (replication.factor R).

A version a node does not hold the body of is stored as a *stub* (the envelope
without its ciphertext); its metadata is whole everywhere. These tests drive
the store's body API, ingest of metadata-only versions, the model's remote read
path, ``slurpfs peers settings``, fsck, backups and the search indexer on stubs;
the real-process tests below run three nodes on loopback with R = 2.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
from conftest import WEAK_KDF, Node, Nodes, run_cli

from slurpfs.crypto import envelope as env
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import BodyUnavailable, Corrupt, NotFound
from slurpfs.ingest import Incoming, Ingest
from slurpfs.model import ContextStore, VersionInfo
from slurpfs.net import peerscmd, placement
from slurpfs.ucxl import parse

ADDR = parse("ucxl://claude:architect@bzzz:auth/src/auth.go")
DEV = "developer"
CANARY = b"CANARY-bodies-7f3a91c2e5"


def twin(nodes: Nodes, a: Node, a_model: ContextStore) -> tuple[Node, ContextStore]:
    """A second node with `a`'s role keys that trusts `a`'s signatures."""
    b, b_model = nodes.new("b")
    b.close(b_model)
    for name in ("roles", "public.json"):
        source, target = a.data_dir / "keys" / name, b.data_dir / "keys" / name
        if source.is_dir():
            shutil.rmtree(target)
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    Keystore(b.data_dir, None, WEAK_KDF).trust_node(a_model.keyring.node.node_id)
    return b, b.open()


def metadata_only(model: ContextStore, info: VersionInfo) -> Incoming:
    """A version as a non-holder receives it: its stub, key slots, no body."""
    stub = model.store.stub(info.version_id)
    assert stub is not None
    return Incoming(info.version_id, stub, model.store.slots(info.version_id), body=False)


def whole(model: ContextStore, info: VersionInfo) -> Incoming:
    stored = model.store.read_version(info.version_id)
    assert stored is not None
    return Incoming(info.version_id, stored.envelope, stored.slots)


def tampered(envelope: bytes) -> bytes:
    """The envelope with one ciphertext byte flipped (its signature still holds)."""
    e = env.Envelope.decode(envelope)
    ct = bytearray(e.ciphertext)
    ct[0] ^= 1
    return env.Envelope(e.header, bytes(ct), e.signature).encode()


# -- the stub format and the store's body API --------------------------------------------


def test_a_stub_is_the_envelope_without_its_ciphertext(model: ContextStore) -> None:
    info = model.put(ADDR, DEV, CANARY * 40)
    envelope = model.store.envelope(info.version_id)
    assert envelope is not None
    decoded = env.Envelope.decode(envelope)
    stub = env.Stub.decode(env.stub_bytes(envelope))

    assert stub.header == decoded.header
    assert stub.ct_len == len(decoded.ciphertext)
    assert stub.signature == decoded.signature
    assert stub.matches(decoded, info.version_id)
    assert not stub.matches(env.Envelope.decode(tampered(envelope)), info.version_id)
    raw = env.stub_bytes(envelope)
    assert raw.startswith(env.STUB_MAGIC)
    assert decoded.ciphertext[:32] not in raw
    with pytest.raises(Corrupt):  # a stub is never taken for an envelope, nor the reverse
        env.Envelope.decode(raw)
    with pytest.raises(Corrupt):
        env.Stub.decode(envelope)


def test_dropping_and_putting_back_a_body(node: Node, model: ContextStore) -> None:
    info = model.put(ADDR, DEV, b"held here\n")
    store = model.store
    envelope = store.envelope(info.version_id)
    assert envelope is not None
    assert store.has_body(info.version_id)
    assert store.body_count() == (1, 0)
    assert list(store.body_ids()) == [info.version_id]

    assert store.drop_body(info.version_id)
    assert not store.has_body(info.version_id)
    assert store.envelope(info.version_id) is None
    assert store.stub(info.version_id) == env.stub_bytes(envelope)
    assert store.body_count() == (0, 0)
    assert store.statistics().envelope_bytes == 0
    assert store.record(info.version_id) == info  # the metadata stays whole
    assert [v.version_id for v in model.history(ADDR, DEV)] == [info.version_id]

    fresh = node.reopen(model)  # no plaintext cached: the read needs the body
    with pytest.raises(BodyUnavailable, match="held by other members"):
        fresh.get(ADDR, DEV)
    report = node.fsck()
    assert report.ok, report.problems
    assert report.stubs == 1
    fresh = node.open()
    with pytest.raises(Corrupt, match="not the version's"):
        fresh.store.put_body(info.version_id, tampered(envelope), cache=False)
    with pytest.raises(NotFound):
        fresh.store.put_body(bytes(32), envelope, cache=False)

    assert fresh.store.put_body(info.version_id, envelope, cache=True)
    assert fresh.store.body_count() == (0, 1)  # a cache is never counted as a copy
    assert list(fresh.store.body_ids()) == []
    assert list(fresh.store.body_ids(copies_only=False)) == [info.version_id]
    assert fresh.store.is_cached(info.version_id)
    assert not fresh.store.put_body(info.version_id, envelope, cache=False)
    assert fresh.store.body_count() == (1, 0)  # the copy replaced the cache
    assert fresh.get(ADDR, DEV).data == b"held here\n"


# -- ingest: metadata only, then the body ------------------------------------------------


def test_a_metadata_only_version_is_a_stub_until_its_body_comes(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    first = a_model.put(ADDR, DEV, b"first\n")
    second = a_model.put(ADDR, DEV, CANARY)
    b, b_model = twin(nodes, a, a_model)

    report = Ingest(b_model).accept([metadata_only(a_model, first), metadata_only(a_model, second)])
    assert [r.version_id for r in report.stored] == [first.version_id, second.version_id]
    assert b_model.stat(ADDR, DEV) == a_model.stat(ADDR, DEV)
    assert b_model.store.body_count() == (0, 0)
    with pytest.raises(BodyUnavailable):
        b_model.get(ADDR, DEV)

    # a body that is not the version's is refused with the batch; the stub stays
    bad = whole(a_model, second)
    bad = Incoming(bad.version_id, tampered(bad.envelope), bad.slots)
    with pytest.raises(Corrupt):
        Ingest(b_model).accept([bad])
    assert not b_model.store.has_body(second.version_id)

    again = Ingest(b_model).accept([whole(a_model, second)])
    assert (again.stored, again.bodies) == ((), (second.version_id,))
    assert b_model.store.body_count() == (1, 0)
    assert b_model.get(ADDR, DEV).data == CANARY


def test_a_stub_signed_by_someone_else_is_refused(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    info = a_model.put(ADDR, DEV, b"signed\n")
    b, b_model = twin(nodes, a, a_model)
    item = metadata_only(a_model, info)
    stub = env.Stub.decode(item.envelope)
    forged = env.Stub(stub.header, stub.ct_len, bytes(64)).encode()
    with pytest.raises(Corrupt):
        Ingest(b_model).accept([Incoming(info.version_id, forged, item.slots, body=False)])
    assert b_model.store.record(info.version_id) is None


# -- the model's remote read -------------------------------------------------------------


def test_a_read_of_a_stub_fetches_verifies_and_caches_the_body(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    info = a_model.put(ADDR, DEV, CANARY)
    b, b_model = twin(nodes, a, a_model)
    Ingest(b_model).accept([metadata_only(a_model, info)])
    body = a_model.store.envelope(info.version_id)
    assert body is not None
    asked: list[bytes] = []

    def fetch(answer: bytes) -> Callable[[VersionInfo], bytes]:
        def fetch_body(wanted: VersionInfo) -> bytes:
            asked.append(wanted.version_id)
            return answer

        return fetch_body

    b_model.fetch_body = fetch(tampered(body))  # what a lying holder would send
    with pytest.raises(Corrupt):
        b_model.get(ADDR, DEV)
    assert not b_model.store.has_body(info.version_id)

    b_model.fetch_body = fetch(body)
    assert b_model.get(ADDR, DEV).data == CANARY
    assert asked == [info.version_id, info.version_id]
    assert b_model.store.body_count() == (0, 1)  # kept as a cache
    b_model = b.reopen(b_model)  # no plaintext cache, no fetch: read from the cache
    assert b_model.get(ADDR, DEV).data == CANARY


# -- fsck, backup and restore, the indexer on stubs ----------------------------------------


def test_fsck_reports_a_stub_whose_header_was_altered(node: Node, model: ContextStore) -> None:
    info = model.put(ADDR, DEV, b"x\n")
    model.store.drop_body(info.version_id)
    stub = model.store.stub(info.version_id)
    assert stub is not None
    altered = bytearray(stub)
    altered[12] ^= 1  # in the header: its signature no longer holds
    node.close_all()
    node.expect_damage()
    with NodeRawStubs(node) as put:
        put(info.version_id, bytes(altered))
    report = node.fsck()
    assert not report.ok
    assert any(info.short_id in p for p in report.problems)


class NodeRawStubs:
    """The `stubs` table of a closed node's store, written directly (damage)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def __enter__(self) -> Callable[[bytes, bytes], None]:
        import lmdb

        self.env = lmdb.open(str(self.node.data_dir / "store"), max_dbs=64)
        db = self.env.open_db(b"stubs")

        def put(key: bytes, value: bytes) -> None:
            with self.env.begin(write=True) as txn:
                txn.put(key, value, db=db)

        return put

    def __exit__(self, *exc: object) -> None:
        self.env.close()


def test_peers_settings_signs_the_factor_into_the_member_log(nodes: Nodes) -> None:
    from slurpfs.net.members import Cluster

    node, model = nodes.new("solo")
    node.close(model)
    keystore = Keystore(node.data_dir, None, WEAK_KDF)
    Cluster.found(node.data_dir, keystore, ["/ip4/127.0.0.1/tcp/1"], "solo")

    data = node.data_dir
    shown = run_cli("peers", "settings", "--data", data, "--json")
    assert shown.returncode == 0, shown.stderr
    assert b'"factor": 0' in shown.stdout
    assert b'"partitions": 4096' in shown.stdout

    changed = run_cli("peers", "settings", "--data", data, "--factor", "2", "--partitions", "64")
    assert changed.returncode == 0, changed.stderr
    assert b"replication factor: 2" in changed.stdout
    cluster = Cluster.load(data, keystore)
    assert cluster is not None
    assert (cluster.settings().factor, cluster.settings().partitions) == (2, 64)

    back = run_cli("peers", "settings", "--data", data, "--factor", "0")
    assert back.returncode == 0, back.stderr
    cluster = Cluster.load(data, keystore)
    assert cluster is not None
    assert cluster.settings().factor is None
    assert cluster.settings().partitions == 64

    assert run_cli("peers", "settings", "--data", data, "--factor", "-1").returncode == 2
    assert peerscmd.MAX_PARTITIONS == placement.MAX_PARTITIONS
    alone = nodes.new("alone")
    alone[0].close(alone[1])
    assert run_cli("peers", "settings", "--data", alone[0].data_dir).returncode == 7
