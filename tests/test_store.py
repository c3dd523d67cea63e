"""The LMDB store: heads, tombstones, the address tree, TTLs, changes, concurrency, space."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import WEAK_KDF, Node, Nodes, cli_env

from slurpfs import fsck
from slurpfs.crypto import envelope as env
from slurpfs.crypto.keys import NodeIdentity
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import AlreadyExists, NotEmpty, NotFound, SlurpError, StoreFull
from slurpfs.model import ContextStore
from slurpfs.store import Commit, StaleHead, Store, VersionRecord
from slurpfs.store import schema as s
from slurpfs.ucxl import MAX_ADDRESS_BYTES, Address, parse

ADDR = parse("ucxl://claude:architect@bzzz:auth/src/auth.go")
DEV = "developer"


def sealed_commit(
    model: ContextStore,
    key: str,
    role: str,
    data: bytes,
    *,
    parents: Sequence[bytes],
    hlc: int,
    author: NodeIdentity,
    deleted: bool = False,
) -> Commit:
    """A version as another node would have written it (for replicas and races)."""
    readers = [model.keyring.current_public(r) for r in model.config.readers_of(role)]
    sealed = env.seal(
        data,
        address=key,
        role=role,
        parents=parents,
        hlc=hlc,
        deleted=deleted,
        readers=readers,
        node=author,
    )
    record = VersionRecord(
        sealed.version_id, key, role, tuple(parents), hlc, author.node_id, len(data), deleted
    )
    return Commit(record, sealed.encoded, sealed.slots)


def trusting(node: Node, model: ContextStore, *others: NodeIdentity) -> ContextStore:
    """Make `model`'s node trust `others` and return the reopened model."""
    keystore = Keystore(node.data_dir, None, WEAK_KDF)
    for other in others:
        keystore.trust_node(other.node_id)
    return node.reopen(model)


# -- deterministic heads ------------------------------------------------------------


@pytest.mark.parametrize("late_by", ["this-node", "peer"])
@pytest.mark.parametrize("arrival", ["early-first", "late-first"])
def test_head_is_the_leaf_with_the_greatest_hlc_whatever_the_arrival_order(
    nodes: Nodes, tmp_path: Path, arrival: str, late_by: str
) -> None:
    node, model = nodes.new()
    peer = NodeIdentity.generate()
    model = trusting(node, model, peer)
    me = model.keyring.node
    base = model.put(ADDR, DEV, b"base")
    early = sealed_commit(
        model, ADDR.key, DEV, b"early", parents=[base.version_id], hlc=base.hlc + 10,
        author=me if late_by == "peer" else peer,
    )  # fmt: skip
    late = sealed_commit(
        model, ADDR.key, DEV, b"late", parents=[base.version_id], hlc=base.hlc + 20,
        author=peer if late_by == "peer" else me,
    )  # fmt: skip
    order = [early, late] if arrival == "early-first" else [late, early]

    for c in order:
        model.store.commit([c])

    leaves = model.store.leaves(ADDR.key, DEV)
    assert [v.version_id for v in leaves] == [late.record.version_id, early.record.version_id]
    assert model.get(ADDR, DEV).data == b"late"
    # The loser is kept, shown as a conflict, and still readable.
    assert [v.version_id for v in model.conflicts(ADDR, DEV)] == [early.record.version_id]
    listing = model.list_dir(ADDR)
    assert listing.roles == (DEV,)
    assert [(r, v.version_id) for r, v in listing.conflicts] == [(DEV, early.record.version_id)]
    assert model.get_version(ADDR, DEV, early.record.version_id).data == b"early"
    # A replica receiving the same versions in the other order agrees on the leaves.
    replica = Store(tmp_path / "replica", map_size=model.config.store.map_size)
    try:
        stored = model.store.read_version(base.version_id)
        assert stored is not None
        replica.commit([Commit(base, stored.envelope, stored.slots)])
        for c in reversed(order):
            replica.commit([c])
        assert replica.leaves(ADDR.key, DEV) == leaves
    finally:
        replica.close()


def test_equal_hlc_is_broken_by_author_id(nodes: Nodes) -> None:
    node, model = nodes.new()
    a, b = sorted([NodeIdentity.generate(), NodeIdentity.generate()], key=lambda n: n.node_id)
    model = trusting(node, model, a, b)
    base = model.put(ADDR, DEV, b"base")
    stamp = base.hlc + 5
    low = sealed_commit(
        model, ADDR.key, DEV, b"low", parents=[base.version_id], hlc=stamp, author=a
    )
    high = sealed_commit(
        model, ADDR.key, DEV, b"high", parents=[base.version_id], hlc=stamp, author=b
    )

    model.store.commit([high])
    model.store.commit([low])

    assert model.store.head(ADDR.key, DEV) == high.record
    assert model.get(ADDR, DEV).data == b"high"
    assert model.conflicts(ADDR, DEV) == (low.record,)


def test_resolving_a_conflict_merges_the_leaves_and_keeps_history(nodes: Nodes) -> None:
    node, model = nodes.new()
    peer = NodeIdentity.generate()
    model = trusting(node, model, peer)
    base = model.put(ADDR, DEV, b"base")
    loser = sealed_commit(
        model, ADDR.key, DEV, b"loser", parents=[base.version_id], hlc=base.hlc + 1, author=peer
    )
    winner = sealed_commit(
        model, ADDR.key, DEV, b"winner", parents=[base.version_id], hlc=base.hlc + 2, author=peer
    )
    model.store.commit([loser, winner])
    report = fsck.check(model)
    assert (report.ok, report.conflicts) == (True, 1)  # not damage, but fsck tells

    with pytest.raises(NotFound):
        model.resolve_conflict(ADDR, DEV, winner.record.version_id)  # the head is no conflict
    merged = model.resolve_conflict(ADDR, DEV, loser.record.version_id)
    assert fsck.check(model).conflicts == 0

    assert set(merged.parents) == {winner.record.version_id, loser.record.version_id}
    assert model.store.leaves(ADDR.key, DEV) == [merged]
    assert model.conflicts(ADDR, DEV) == ()
    assert model.get(ADDR, DEV).data == b"winner"
    history = [v.version_id for v in model.history(ADDR, DEV)]
    assert history == [
        base.version_id,
        loser.record.version_id,
        winner.record.version_id,
        merged.version_id,
    ]


def test_a_winning_tombstone_hides_the_file_but_not_the_conflict(nodes: Nodes) -> None:
    node, model = nodes.new()
    peer = NodeIdentity.generate()
    model = trusting(node, model, peer)
    base = model.put(ADDR, DEV, b"base")
    edit = sealed_commit(
        model, ADDR.key, DEV, b"edit", parents=[base.version_id], hlc=base.hlc + 1, author=peer
    )
    gone = sealed_commit(
        model, ADDR.key, DEV, b"", parents=[base.version_id], hlc=base.hlc + 2, author=peer,
        deleted=True,
    )  # fmt: skip
    model.store.commit([edit, gone])

    with pytest.raises(NotFound):
        model.get(ADDR, DEV)
    listing = model.list_dir(ADDR)
    assert listing.roles == ()
    assert [v.version_id for _, v in listing.conflicts] == [edit.record.version_id]


# -- tombstones ---------------------------------------------------------------------


def test_delete_stores_a_tombstone_and_keeps_history(node: Node, model: ContextStore) -> None:
    v1 = model.put(ADDR, DEV, b"one")
    v2 = model.put(ADDR, DEV, b"two")

    tomb = model.delete(ADDR, DEV)

    assert tomb.deleted
    assert (tomb.parents, tomb.size) == ((v2.version_id,), 0)
    with pytest.raises(NotFound):
        model.get(ADDR, DEV)
    with pytest.raises(NotFound):
        model.delete(ADDR, DEV)
    assert model.history(ADDR, DEV) == (v1, v2)
    assert model.all_versions(ADDR, DEV) == (v1, v2, tomb)
    assert model.list_dir(ADDR).roles == ()
    assert model.get_version(ADDR, DEV, v1.version_id).data == b"one"

    v3 = model.put(ADDR, DEV, b"three")

    assert v3.parents == (tomb.version_id,)
    model = node.reopen(model)
    assert model.get(ADDR, DEV).data == b"three"
    assert [v.version_id for v in model.all_versions(ADDR, DEV)] == [
        v1.version_id,
        v2.version_id,
        tomb.version_id,
        v3.version_id,
    ]


def test_delete_of_something_never_written_is_not_found(model: ContextStore) -> None:
    with pytest.raises(NotFound):
        model.delete(ADDR, DEV)
    assert model.store.statistics().versions == 0


# -- the address tree -------------------------------------------------------------


def test_an_empty_directory_persists_across_a_reopen(node: Node, model: ContextStore) -> None:
    deep = parse("ucxl://claude:architect@bzzz:auth/docs/adr/empty")

    model.mkdir(deep)
    with pytest.raises(AlreadyExists):
        model.mkdir(deep)
    model = node.reopen(model)

    assert model.is_dir(deep)
    assert model.list_dir(deep).dirs == ()
    assert model.list_dir(deep.parent()).dirs == ("empty",)
    assert model.list_dir(None).dirs == ("claude:architect@bzzz:auth",)


def test_put_creates_every_ancestor_directory(model: ContextStore) -> None:
    model.put(ADDR, DEV, b"x")
    other = parse("ucxl://gpt:dev@bzzz:auth/src/session.go")
    model.put(other, DEV, b"y")

    assert model.list_dir(None).dirs == ("claude:architect@bzzz:auth", "gpt:dev@bzzz:auth")
    assert model.list_dir(ADDR.parent()).dirs == ("auth.go",)
    assert model.list_dir(ADDR).dirs == ()
    assert model.list_dir(ADDR).roles == (DEV,)
    with pytest.raises(NotFound):
        model.list_dir(ADDR.child("missing"))


def test_rmdir_rules(node: Node, model: ContextStore) -> None:
    parent = parse("ucxl://claude:architect@bzzz:auth/src")
    model.put(ADDR, DEV, b"live")

    with pytest.raises(NotEmpty):
        model.rmdir(parent)  # has a subdirectory
    with pytest.raises(NotEmpty):
        model.rmdir(ADDR)  # holds a live context
    with pytest.raises(NotFound):
        model.rmdir(parent.child("nothing"))

    model.delete(ADDR, DEV)
    model.rmdir(ADDR)  # only a deleted context: allowed, history stays
    model.rmdir(parent)

    assert not model.is_dir(ADDR)
    assert not model.is_dir(parent)
    (only,) = model.history(ADDR, DEV)
    assert model.get_version(ADDR, DEV, only.version_id).data == b"live"
    model = node.reopen(model)
    assert not model.is_dir(ADDR)
    assert model.list_dir(parse("ucxl://claude:architect@bzzz:auth")).dirs == ()
    # Writing again recreates the directories.
    model.put(ADDR, DEV, b"back")
    assert model.is_dir(parent)
    assert model.list_dir(ADDR).roles == (DEV,)


def test_rmdir_of_an_empty_mkdir_directory(model: ContextStore) -> None:
    empty = parse("ucxl://a:b@c:d/x")
    model.mkdir(empty)

    model.rmdir(empty)

    assert not model.is_dir(empty)
    assert model.list_dir(parse("ucxl://a:b@c:d")).dirs == ()


# -- TTL ----------------------------------------------------------------------------


def test_expire_purges_only_what_has_expired(node: Node, model: ContextStore) -> None:
    keep = parse("ucxl://a:b@c:d/keep")
    model.put(keep, DEV, b"kept")
    model.put(ADDR, DEV, b"v1", ttl=100)
    model.put(ADDR, "architect", b"other role, no ttl")
    model.put(ADDR, DEV, b"v2", ttl=100)
    seq = model.store.sequence()
    now = model.history(ADDR, DEV)[-1].mtime

    assert model.expire(now=now + 50) == 0
    assert model.expire(now=now + 150) == 2

    with pytest.raises(NotFound):
        model.get(ADDR, DEV)
    assert model.history(ADDR, DEV) == ()
    assert model.list_dir(ADDR).roles == ("architect",)
    assert model.get(keep, DEV).data == b"kept"
    assert model.get(ADDR, "architect").data == b"other role, no ttl"
    assert model.expire(now=now + 1000) == 0
    assert model.changes_since(seq) == (seq, [])
    report = fsck.check(model)
    assert report.ok, report.problems
    assert report.versions == 2
    model = node.reopen(model)
    with pytest.raises(NotFound):
        model.get(ADDR, DEV)


def test_a_new_ttl_replaces_the_old_one(model: ContextStore) -> None:
    model.put(ADDR, DEV, b"short", ttl=10)
    model.put(ADDR, DEV, b"long", ttl=1000)
    now = model.history(ADDR, DEV)[-1].mtime

    assert model.expire(now=now + 100) == 0
    assert model.get(ADDR, DEV).data == b"long"
    assert model.expire(now=now + 2000) == 2


def test_a_version_without_ttl_makes_the_context_permanent(model: ContextStore) -> None:
    """`put --ttl` then a plain `put` (or a save through a mount): the newest version
    was written to stay. Expected: nothing expires, history intact."""
    model.put(ADDR, DEV, b"draft", ttl=10)
    model.put(ADDR, DEV, b"final")
    now = model.history(ADDR, DEV)[-1].mtime

    assert model.expire(now=now + 10_000) == 0
    assert model.get(ADDR, DEV).data == b"final"
    assert len(model.history(ADDR, DEV)) == 2
    model.put(ADDR, DEV, b"temporary again", ttl=10)
    assert model.expire(now=now + 10_000) == 3


def test_an_expired_context_is_gone_before_it_is_purged(model: ContextStore) -> None:
    """No daemon runs the cleanup (or it has not run yet). Expected: once the TTL has
    passed, the context reads as absent (NotFound), although its versions are still
    stored until a cleanup pass purges them."""
    model.put(ADDR, DEV, b"short-lived", ttl=0.001)
    time.sleep(0.01)  # past the expiry
    with pytest.raises(NotFound):
        model.get(ADDR, DEV)
    with pytest.raises(NotFound):
        model.stat(ADDR, DEV)
    assert len(model.history(ADDR, DEV)) == 1  # purged only by `expire`
    assert model.expire() == 1


def test_a_purged_context_can_be_written_again(model: ContextStore) -> None:
    model.put(ADDR, DEV, b"old", ttl=1)
    assert model.expire(now=model.history(ADDR, DEV)[-1].mtime + 10) == 1

    fresh = model.put(ADDR, DEV, b"new")

    assert fresh.parents == ()
    assert model.get(ADDR, DEV).data == b"new"


# -- changes ------------------------------------------------------------------------


def test_changes_since_lists_commits_in_order(model: ContextStore) -> None:
    start = model.store.sequence()
    other = parse("ucxl://a:b@c:d/x")
    model.put(ADDR, DEV, b"1")
    model.put(other, "architect", b"2")
    model.delete(ADDR, DEV)

    last, changes = model.changes_since(start)

    assert last == start + 3 == model.store.sequence()
    assert changes == [(ADDR.key, DEV), (other.key, "architect"), (ADDR.key, DEV)]
    assert model.changes_since(last) == (last, [])
    _, first_two = model.store.changes_since(start, limit=2)
    assert [(r.address, r.role) for r in first_two] == changes[:2]


def test_changes_by_another_process_are_seen(node: Node, model: ContextStore) -> None:
    start = model.store.sequence()
    script = f"""
        from pathlib import Path
        from slurpfs import config
        from slurpfs.crypto.keystore import KdfParams
        from slurpfs.model import ContextStore
        from slurpfs.ucxl import parse
        cfg = config.load(None, {{"HOME": "/nonexistent"}}, {{"node.data_dir": {str(node.data_dir)!r}}})
        with ContextStore.open(cfg, kdf=KdfParams.weak()) as m:
            m.put(parse("ucxl://a:b@c:d/from-elsewhere"), "reviewer", b"hi")
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=cli_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()

    assert model.changes_since(start) == (start + 1, [("a:b@c:d/from-elsewhere", "reviewer")])
    assert model.get(parse("ucxl://a:b@c:d/from-elsewhere"), "reviewer").data == b"hi"


# -- concurrent writers ---------------------------------------------------------------


def test_stale_head_is_refused_and_writes_nothing(model: ContextStore) -> None:
    base = model.put(ADDR, DEV, b"base")
    stale = sealed_commit(
        model, ADDR.key, DEV, b"late", parents=[], hlc=base.hlc + 1, author=model.keyring.node
    )
    stats = model.store.statistics()

    with pytest.raises(StaleHead):
        model.store.commit([Commit(stale.record, stale.envelope, stale.slots, expected_leaves=())])

    assert model.store.statistics() == stats
    assert model.store.record(stale.record.version_id) is None


def test_a_commit_between_read_and_write_makes_the_writer_retry_on_the_new_head(
    model: ContextStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer A reads the head, another writer commits, then A commits: A re-seals."""
    base = model.put(ADDR, DEV, b"base")
    original: Callable[..., Commit] = model._seal
    seen_parents: list[tuple[bytes, ...]] = []
    others: list[Commit] = []

    def seal_after_another_commit(*args: Any, **kwargs: Any) -> Commit:
        seen_parents.append(args[3])
        if not others:
            others.append(
                sealed_commit(
                    model,
                    ADDR.key,
                    DEV,
                    b"from B",
                    parents=[base.version_id],
                    hlc=base.hlc + 1,
                    author=model.keyring.node,
                )  # fmt: skip
            )
            model.store.commit(others)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "_seal", seal_after_another_commit)
    from_a = model.put(ADDR, DEV, b"from A")

    from_b = others[0].record
    assert seen_parents == [(base.version_id,), (from_b.version_id,)]  # exactly one retry
    assert from_a.parents == (from_b.version_id,)
    assert from_a.hlc > from_b.hlc
    assert model.store.leaves(ADDR.key, DEV) == [from_a]
    assert [v.version_id for v in model.history(ADDR, DEV)] == [
        base.version_id,
        from_b.version_id,
        from_a.version_id,
    ]
    assert model.get(ADDR, DEV).data == b"from A"


WRITER = """
import sys
from slurpfs import config
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import BatchItem, ContextStore
from slurpfs.ucxl import parse
data_dir, name, count, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = config.load(None, {"HOME": "/nonexistent"}, {"node.data_dir": data_dir})
address = parse("ucxl://claude:architect@bzzz:auth/src/auth.go")
with ContextStore.open(cfg, kdf=KdfParams.weak()) as m:
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    sys.stdin.readline()  # start together
    for i in range(count):
        data = f"{name} {i}".encode()
        if how == "put":
            m.put(address, "developer", data)
        else:  # as `slurpfs import` does
            assert not m.put_many([BatchItem(address, "developer", data)]).failed
"""


@pytest.mark.parametrize("how", [("put", "put"), ("put_many", "put")], ids=["put", "put_many"])
def test_two_processes_writing_one_context_keep_it_linear(
    node: Node, model: ContextStore, how: tuple[str, str]
) -> None:
    """Two processes write one context at once (`slurpfs put`, `slurpfs import`, a
    mount). Expected: every version is stored, each on the one before: no conflict
    leaves, history a single line."""
    model.put(ADDR, DEV, b"base")
    count = 1000
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(node.data_dir), name, str(count), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=cli_env(),
        )
        for name, kind in zip("AB", how, strict=True)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline() == b"ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()

    versions = model.store.history(ADDR.key, DEV)
    assert len(versions) == 1 + 2 * count
    assert len(model.store.leaves(ADDR.key, DEV)) == 1
    for parent, child in zip(versions, versions[1:], strict=False):
        assert child.parents == (parent.version_id,)
    contents = {model.get_version(ADDR, DEV, v.version_id).data for v in versions[1:]}
    assert contents == {f"{n} {i}".encode() for n in "AB" for i in range(count)}


# -- statistics ---------------------------------------------------------------------


def test_statistics_count_what_was_stored(model: ContextStore) -> None:
    empty = model.statistics()
    assert (empty.store.versions, empty.store.contexts, empty.store.sequence) == (0, 0, 0)
    other = parse("ucxl://a:b@c:d/x/y")

    model.put(ADDR, DEV, b"12345")
    model.put(ADDR, DEV, b"1234567890")
    model.put(other, "architect", b"abc")
    model.delete(other, "architect")
    model._cache.clear()
    model.get(ADDR, DEV)

    st = model.statistics()
    assert st.store.versions == 4
    assert st.store.contexts == 2
    # a:b@c:d, x, y  +  claude:architect@bzzz:auth, src, auth.go
    assert st.store.directories == 6
    assert st.store.plaintext_bytes == 5 + 10 + 3 + 0
    assert st.store.envelope_bytes > 0
    assert st.store.sequence == 4
    assert 0 < st.store.map_used <= st.store.map_size == model.config.store.map_size
    assert (st.puts, st.gets, st.denied, st.corrupt) == (3, 1, 0, 0)
    assert st.cache.misses >= 1
    assert st.cache.entries >= 1


# -- a full store ---------------------------------------------------------------------


def test_a_full_map_is_a_clear_error_and_loses_nothing(nodes: Nodes) -> None:
    node, model = nodes.new(overrides={"store.map_size": 1 << 20})
    stored: dict[Address, bytes] = {}

    def fill() -> None:
        for i in range(64):
            address = parse(f"ucxl://a:b@c:d/blob{i}")
            data = os.urandom(64 << 10)  # incompressible
            model.put(address, DEV, data)
            stored[address] = data

    with pytest.raises(StoreFull, match=r"store\.map_size") as info:
        fill()
    assert 2 <= len(stored) < 64
    assert (info.value.errno, info.value.exit_code) == (28, 8)
    before = model.store.statistics()

    with pytest.raises(StoreFull):
        model.put(parse("ucxl://a:b@c:d/blob-big"), DEV, os.urandom(256 << 10))

    assert model.store.statistics().versions == before.versions
    model = node.reopen(model)
    for address, data in stored.items():
        assert model.get(address, DEV).data == data
    assert model.store.head("a:b@c:d/blob-big", DEV) is None


def test_a_newer_store_format_is_refused(node: Node, model: ContextStore) -> None:
    store_path = node.data_dir / "store"
    node.close(model)
    raw = lmdb.open(str(store_path), max_dbs=16)
    try:
        info = raw.open_db(s.DB_INFO)
        with raw.begin(write=True) as txn:
            txn.put(s.INFO_FORMAT, s.U32.pack(s.FORMAT_VERSION + 1), db=info)
    finally:
        raw.close()

    with pytest.raises(SlurpError, match="newer format"):
        ContextStore.open(node.config, None, kdf=WEAK_KDF)

    node.expect_damage()


def test_the_longest_address_fits_every_store_key(model: ContextStore, tmp_path: Path) -> None:
    """`MAX_ADDRESS_BYTES` is what LMDB's key limit leaves: the longest key holding an
    address (a history entry, with the longest role name) is exactly at the limit, and
    a context at the longest address is stored, listed and read like any other."""
    with lmdb.open(str(tmp_path / "probe")) as probe:
        limit = probe.max_key_size()
    authority = "claude:architect@bzzz:auth"
    left = MAX_ADDRESS_BYTES - len(authority) - 1
    path = ["x" * 250, "y" * (left - 251)]
    address = parse(f"ucxl://{authority}/{'/'.join(path)}")
    assert len(address.key.encode()) == MAX_ADDRESS_BYTES
    longest = s.history_key(address.key, "r" * 64, 2**64 - 1, bytes(32), bytes(s.VERSION_ID_LEN))
    assert len(longest) == limit

    model.put(address, DEV, b"deep context")
    assert model.get(address, DEV).data == b"deep context"
    listing = model.list_dir(parse(f"ucxl://{authority}/{path[0]}"))
    assert (listing.dirs, listing.roles) == ((path[1],), ())
    assert model.list_dir(address).roles == (DEV,)


DEADLOCK = """
import sys, threading, time
from pathlib import Path
from slurpfs.store import Store

store = Store(Path(sys.argv[1]), map_size=1 << 28)
stop = threading.Event()
writing = threading.Event()

def writer():  # an ingest thread: write transaction after write transaction, many puts each
    batch = {b"%d" % i: b"x" * 64 for i in range(5000)}
    while not stop.is_set():
        store.aux_write(b"busy", batch)
        writing.set()

thread = threading.Thread(target=writer)
thread.start()
writing.wait()
for i in range(300):  # the event loop, meanwhile: a table that does not exist, new ones
    time.sleep(0.001)
    store.aux_get(b"absent", b"key")
    if i % 30 == 0:  # (run "again": tables an earlier process made, opened in this one)
        found = store.aux_get(b"new%d" % i, b"key")
        assert found == (b"value" if sys.argv[2] == "again" else None), found
        store.aux_write(b"new%d" % i, {b"key": b"value"})
stop.set()
thread.join()
print("done")
"""


def test_tables_opened_by_one_thread_while_another_writes_do_not_deadlock(
    tmp_path: Path,
) -> None:
    """A thread looks up auxiliary tables that do not exist yet (a new replica's cursor
    table) and creates some while another thread commits write transactions (ingest):
    opening a table must not wait for the writer while holding the interpreter lock
    that the writer needs to finish (both waited forever)."""
    for run in ("first", "again"):
        script = [sys.executable, "-c", DEADLOCK, str(tmp_path / "store"), run]
        try:
            done = subprocess.run(script, env=cli_env(), capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{run}: the two threads deadlocked (no end within the 60 s hang guard)")
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout == b"done\n"
