"""Envelope bodies only on the holders of each address (replication.factor R).

A version a node does not hold the body of is stored as a *stub* (the envelope
without its ciphertext); its metadata is whole everywhere. These tests drive
the store's body API, ingest of metadata-only versions, the model's remote read
path, ``slurpfs peers settings``, fsck, backups and the search indexer on stubs;
the real-process tests below run three nodes on loopback with R = 2.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest
from conftest import WEAK_KDF, Node, Nodes, assert_no_canary, find_canary, run_cli, twin
from fsutil import Mounted, raises_oserror, running, wait_for
from redisutil import shared
from replica_nodes import (
    AUTH,
    ROLE,
    SYNC_TIMEOUT,
    make_cluster,
    role_file,
    wait_connected,
    wait_content,
    worker_pid,
    write,
)

from slurpfs import compact
from slurpfs import model as model_module
from slurpfs.backup import create as backup_create
from slurpfs.backup import keys as backup_keys
from slurpfs.backup import restore as backup_restore
from slurpfs.cache.redis_tier import RedisTier, envelope_key
from slurpfs.crypto import envelope as env
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import BodyUnavailable, Corrupt, NotFound
from slurpfs.index import SearchService
from slurpfs.ingest import Incoming, Ingest
from slurpfs.model import ContextStore, VersionInfo
from slurpfs.net import peerscmd, placement
from slurpfs.net.members import ClusterSettings
from slurpfs.ucxl import parse

ADDR = parse("ucxl://claude:architect@bzzz:auth/src/auth.go")
DEV = "developer"
CANARY = b"CANARY-bodies-7f3a91c2e5"


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


def test_the_oldest_cached_bodies_are_evicted_past_the_limit(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, a_model = nodes.new("a")
    infos = [a_model.put(parse(f"ucxl://{AUTH}/c/{i}"), DEV, b"%d" % i) for i in range(12)]
    b, b_model = twin(nodes, a, a_model)
    Ingest(b_model).accept([metadata_only(a_model, i) for i in infos])
    bodies = {i.version_id: a_model.store.envelope(i.version_id) or b"" for i in infos}
    b_model.fetch_body = lambda info: bodies[info.version_id]
    monkeypatch.setattr(model_module, "BODY_CACHE_VERSIONS", 10)
    for i in range(12):
        assert b_model.get(parse(f"ucxl://{AUTH}/c/{i}"), DEV).data == b"%d" % i
    # at 11 cached the two fetched first went (down to 9; the same millisecond orders
    # by id), then the twelfth came
    assert b_model.store.body_count() == (0, 10)
    assert b_model.store.has_body(infos[11].version_id)
    evicted = [i for i in infos if not b_model.store.has_body(i.version_id)]
    assert len(evicted) == 2
    assert b_model.caches_evicted == 2  # counted (the status's dropped: cache_evicted)
    assert all(b_model.store.stub(i.version_id) is not None for i in evicted)
    assert b_model.get(parse(f"ucxl://{AUTH}/c/{infos.index(evicted[0])}"), DEV).data


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


def test_a_stubs_body_is_read_from_the_redis_tier_before_any_holder(
    nodes: Nodes, tmp_path: Path
) -> None:
    a, a_model = nodes.new("a")
    first = a_model.put(ADDR, DEV, b"first " + CANARY)
    b, b_model = twin(nodes, a, a_model)
    Ingest(b_model).accept([metadata_only(a_model, first)])
    body = a_model.store.envelope(first.version_id)
    assert body is not None
    asked: list[bytes] = []

    def fetch_body(wanted: VersionInfo) -> bytes:
        asked.append(wanted.version_id)
        return body

    with shared(tmp_path / "redis") as server:
        tier = RedisTier(server.url)
        try:
            b_model.envelopes, b_model.fetch_body = tier, fetch_body
            assert b_model.get(ADDR, DEV).data == b"first " + CANARY
            assert asked == [first.version_id]  # not in Redis: from a holder ...
            assert server.values() == {envelope_key(first.version_id): body}  # ... and kept
            b_model = b.reopen(b_model)
            b_model.store.drop_body(first.version_id)  # (the cache evicted)
            b_model.envelopes, b_model.fetch_body = tier, fetch_body
            assert b_model.get(ADDR, DEV).data == b"first " + CANARY
            assert asked == [first.version_id]  # the tier answered: no holder asked
        finally:
            tier.close()


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
        self.env = lmdb.open(str(self.node.data_dir / "store"), max_dbs=64)
        db = self.env.open_db(b"stubs")

        def put(key: bytes, value: bytes) -> None:
            with self.env.begin(write=True) as txn:
                txn.put(key, value, db=db)

        return put

    def __exit__(self, *exc: object) -> None:
        self.env.close()


def stubbed(nodes: Nodes) -> tuple[Node, Node, ContextStore, list[VersionInfo]]:
    """Node a wrote three contexts (one of them twice); node b holds them all as
    stubs but one, whose body it holds: a non-holder of most of a's addresses."""
    a, a_model = nodes.new("a")
    infos = [
        a_model.put(parse(f"ucxl://{AUTH}/s/{name}"), DEV, f"{name} {n} {CANARY.decode()}".encode())
        for n, name in enumerate(("one", "two", "three", "three"))
    ]
    b, b_model = twin(nodes, a, a_model)
    Ingest(b_model).accept([metadata_only(a_model, i) for i in infos])
    Ingest(b_model).accept([whole(a_model, infos[1])])
    return a, b, b_model, infos


def test_backup_restore_retention_and_the_indexer_accept_stubs(
    nodes: Nodes, tmp_path: Path
) -> None:
    a, b, model, infos = stubbed(nodes)
    # the search indexer skips (and counts) what it would have to fetch
    with SearchService.open(model) as service:
        hits = service.search("CANARY", {DEV}).hits
        assert [h.address for h in hits] == [f"{AUTH}/s/two"]
        assert service.statistics().remote == 2
    # a backup carries the stubs as they are; the restore keeps them as stubs
    key_file = tmp_path / "backup.key"
    backup_keys.init(b.data_dir, key_file)
    made = backup_create.create(model, tmp_path / "dest")
    b.close_all()
    again = nodes.new("again", toml="[retention]\nkeep_versions = 1\n")[0]
    again.close_all()
    shutil.rmtree(again.data_dir)
    backup_restore.restore(
        tmp_path / "dest", made.id, again.data_dir, backup_keys.load_private(key_file),
        passphrase=None, kdf=WEAK_KDF,
    )  # fmt: skip
    model = again.open()
    assert model.store.body_count() == (1, 0)
    assert set(model.store.stub_ids()) == {infos[0].version_id, infos[2].version_id,
                                            infos[3].version_id}  # fmt: skip
    assert model.get(parse(f"ucxl://{AUTH}/s/two"), DEV).data.startswith(b"two ")
    # retention drops an old version held as a stub like any other
    plan = compact.plan_retention(model, now=time.time() + 60)
    assert [d.version_id for d in plan.drops] == [infos[2].version_id]
    assert compact.apply_retention(model, plan) == 1
    assert model.store.stub(infos[2].version_id) is None
    assert compact.dictionary_gain(model, DEV).documents == 1  # stubs are not sampled
    # the command line reads metadata of a stub, but not its body
    again.close_all()
    history = run_cli("history", "--data", again.data_dir, f"{AUTH}/s/three", "--role", DEV)
    assert history.returncode == 0, history.stderr
    got = run_cli("get", "--data", again.data_dir, f"{AUTH}/s/three", "--role", DEV)
    assert got.returncode == 1
    assert b"held by other members" in got.stderr


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


# -- real processes: three mounts on loopback, R = 2 ----------------------------------------

TAMPERED = "tampered"
FAILOVER = ("failover-a", "failover-b")
BOTH_DOWN = "both-down"


def node_id(data: Path) -> bytes:
    return Keystore(data, None, WEAK_KDF).load().node.node_id


def key_of(name: str) -> str:
    return f"{AUTH}/p/{name}"


def names_placed(
    place: placement.Placement, ids: list[bytes], want: tuple[int, ...], count: int, tag: str
) -> list[str]:
    """`count` context names whose holders are exactly the nodes `want` (indices into
    `ids`), in that failover order."""
    wanted = tuple(ids[i] for i in want)
    out = []
    for n in itertools.count():
        name = f"{tag}-{n}"
        if place.holders_of_address(key_of(name)) == wanted:
            out.append(name)
            if len(out) == count:
                return out
    raise AssertionError("unreachable")


class OnDisk:
    """What one node's store holds of each version, read from its LMDB file while
    its daemon runs (LMDB allows readers in other processes)."""

    def __init__(self, data: Path) -> None:
        env = lmdb.open(str(data / "store"), readonly=True, max_dbs=64, subdir=True)
        try:
            with env.begin() as txn:
                self.envelopes = self._table(env, txn, b"envelopes")
                self.stubs = self._table(env, txn, b"stubs")
                self.cached = self._table(env, txn, b"cached")
                self.leaves = self._table(env, txn, b"leaves")
        finally:
            env.close()

    @staticmethod
    def _table(env: lmdb.Environment, txn: lmdb.Transaction, name: bytes) -> dict[bytes, bytes]:
        try:
            db = env.open_db(name, txn=txn, create=False)
        except lmdb.NotFoundError:
            return {}
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}

    def head(self, name: str) -> bytes | None:
        raw = self.leaves.get(f"{key_of(name)}\0{ROLE}".encode())
        return None if raw is None else raw[:32]

    def holds_only(self, version_id: bytes, *, body: bool) -> bool:
        """Holds the version's body as a copy (`body`), or no copy: its stub, or a
        body fetched for a read (a cache)."""
        copy = version_id in self.envelopes and version_id not in self.cached
        if body:
            return copy
        return not copy and (version_id in self.stubs or version_id in self.cached)


def kill_daemon(m: Mounted) -> None:
    os.kill(m.pid, signal.SIGKILL)
    wait_for(lambda: not running(m.pid), SYNC_TIMEOUT, "the daemon to die")
    m.check_killed()


def content(name: str) -> bytes:
    return CANARY + f" {name}\n".encode() + bytes(range(256)) * 4


@pytest.mark.mount
def test_bodies_live_on_their_holders_and_reads_fail_over(nodes: Nodes, tmp_path: Path) -> None:
    toml = "[replication]\nwrite_quorum = 1\nquorum_timeout = 30.0\n"
    mounts = make_cluster(nodes, tmp_path, 3, toml=toml, settings=ClusterSettings(factor=2))
    n0, n1, n2 = mounts
    ids = [node_id(m.data) for m in mounts]
    place = placement.Placement.compute(ids, 2)
    # Contexts over every holder pair (n0 writes them all: a third of them it does not
    # hold, and hands off); the rest have holders n1 then n0 and are read at n2 only
    # in the failure cases.
    spread = [f"spread-{i}" for i in range(12)]
    assert {place.holders_of_address(key_of(n))[0] for n in spread} == set(ids)
    tampered, down = (names_placed(place, ids, (1, 0), 1, t)[0] for t in (TAMPERED, BOTH_DOWN))
    failover = names_placed(place, ids, (1, 0), 2, "failover")
    everything = [*spread, tampered, down, *failover]
    n2.expect_warnings = (
        r"\S+ sent a body for version \S+ that does not hash to its id: refused",
        r"cannot read \S+ \[developer\]: .*no member gave its body.*",
        r"replication with \S+ interrupted: .*",
    )
    try:
        for m in mounts:
            m.mount()
        wait_connected(mounts)
        for name in everything:
            # fsync waits for write_quorum = 1 holder: one holds the body already
            write(role_file(n0, "p", name), content(name), fsync=True)
            vid = OnDisk(n0.data).head(name)
            assert vid is not None
            others = [i for i in (1, 2) if ids[i] in place.holders_of_address(key_of(name))]
            assert any(OnDisk(mounts[i].data).holds_only(vid, body=True) for i in others)

        def placed() -> bool:
            disks = [OnDisk(m.data) for m in mounts]
            for name in everything:
                vid = disks[0].head(name)
                holders = place.holders_of_address(key_of(name))
                if vid is None or not all(
                    disk.holds_only(vid, body=ids[i] in holders) for i, disk in enumerate(disks)
                ):
                    return False
            return True

        # bodies only on the holders (n0 dropped the ones it wrote but does not hold
        # once both holders acknowledged them); stubs everywhere else
        wait_for(placed, SYNC_TIMEOUT, "every body on its two holders only")
        disks = [OnDisk(m.data) for m in mounts]
        for disk in disks:
            assert not disk.cached
            for stub in disk.stubs.values():
                assert env.Stub.decode(stub)  # a stub parses, and holds no plaintext:
                assert find_canary(stub, CANARY) is None
        assert sum(len(d.stubs) for d in disks) == len(everything)  # one non-holder each

        for name in spread:  # read through every mount, byte for byte
            for m in mounts:
                assert role_file(m, "p", name).read_bytes() == content(name)
        cached = OnDisk(n2.data).cached
        assert cached  # what n2 read from a holder it keeps as a cache ...
        assert placed()  # ... never as a copy: placement unchanged

        # a holder that serves a body that is not the version's: refused, the next asked
        n1.unmount()
        nodes.created[1].expect_damage()
        flip_ciphertext(n1.data, OnDisk(n0.data).head(tampered))
        n1.mount()
        wait_connected(mounts)
        assert role_file(n2, "p", tampered).read_bytes() == content(tampered)
        assert "does not hash to its id: refused" in n2.log.read_text()

        # the first holder not answering (stopped: as if partitioned away), then
        # killed: reads fail over to the other one
        stopped = worker_pid(n1)
        os.kill(stopped, signal.SIGSTOP)
        try:
            assert role_file(n2, "p", failover[0]).read_bytes() == content(failover[0])
        finally:
            os.kill(stopped, signal.SIGCONT)
        kill_daemon(n1)
        assert role_file(n2, "p", failover[1]).read_bytes() == content(failover[1])

        # both holders gone (one killed, one not answering): EIO, not a hang
        worker = worker_pid(n0)
        os.kill(worker, signal.SIGSTOP)
        try:
            with raises_oserror(errno.EIO):
                role_file(n2, "p", down).read_bytes()
        finally:
            os.kill(worker, signal.SIGCONT)
        assert "no member gave its body" in n2.log.read_text()
        wait_content(role_file(n2, "p", down), content(down), "the read once n0 answers")
        n0.unmount()
        n2.unmount()
        for m in mounts:  # (the killed node's control socket is left: not a file)
            assert_no_canary(m.data, CANARY, exclude=[m.data / "daemon.sock"])
    finally:
        for m in mounts:
            m.sweep()


def flip_ciphertext(data: Path, version_id: bytes | None) -> None:
    """Flip a ciphertext byte of a version's body in a stopped node's store."""
    assert version_id is not None
    store = lmdb.open(str(data / "store"), max_dbs=64, subdir=True)
    try:
        db = store.open_db(b"envelopes", create=False)
        with store.begin(write=True) as txn:
            body = txn.get(version_id, db=db)
            assert body is not None
            txn.put(version_id, tampered(bytes(body)), db=db)
    finally:
        store.close()


@pytest.mark.mount
def test_a_factor_signed_while_mounted_places_new_bodies(nodes: Nodes, tmp_path: Path) -> None:
    mounts = make_cluster(nodes, tmp_path, 2)
    n0, n1 = mounts
    ids = [node_id(m.data) for m in mounts]
    place = placement.Placement.compute(ids, 1)
    # written on n0, held by n1 alone once the factor is 1
    name = names_placed(place, ids, (1,), 1, "moved")[0]
    try:
        for m in mounts:
            m.mount()
        wait_connected(mounts)
        before = "before-" + name
        write(role_file(n0, "p", before), content(before))
        wait_content(role_file(n1, "p", before), content(before))

        settings = n0.cli("peers", "settings", "--factor", "1", "--json")
        assert b'"factor": 1' in settings.stdout
        wait_for(
            lambda: b'"factor": 1' in n1.cli("peers", "settings", "--json").stdout,
            SYNC_TIMEOUT,
            "the signed factor on n1",
        )
        write(role_file(n0, "p", name), content(name))

        def handed_off() -> bool:
            vid = OnDisk(n0.data).head(name)
            return (
                vid is not None
                and OnDisk(n1.data).holds_only(vid, body=True)
                and OnDisk(n0.data).holds_only(vid, body=False)
            )

        wait_for(handed_off, SYNC_TIMEOUT, "n0 to hand the new body to its holder n1")
        vid = OnDisk(n0.data).head(before)
        assert vid is not None

        def copies_of_before() -> int:
            return sum(OnDisk(m.data).holds_only(vid, body=True) for m in mounts)

        # The body written before moves to its holder under the new factor when the
        # rebalancer gets to it: never no copy meanwhile, one copy in the end.
        assert copies_of_before() >= 1
        wait_for(lambda: copies_of_before() == 1, SYNC_TIMEOUT, "one copy of the older body")
        assert role_file(n0, "p", name).read_bytes() == content(name)  # (cached, or from n1)
        for m in mounts:
            m.unmount()
    finally:
        for m in mounts:
            m.sweep()
