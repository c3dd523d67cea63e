"""Concurrent versions merged three-way (`slurpfs.net.merge`, ``slurpfs merge``).

The leaves are made as a cluster makes them: nodes sharing the role keys each write
a child of the same version, then ingest each other's versions (`slurpfs.ingest`,
the envelopes handed over as a peer would send them).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WEAK_KDF, Nodes, make_config, run_cli
from fsutil import Mounted, wait_for

from slurpfs import audit
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import ConfigError
from slurpfs.ingest import Incoming, Ingest
from slurpfs.model import ContextStore, VersionInfo
from slurpfs.net.merge import MAX_MERGE_BYTES, merge_context, merge_leaves
from slurpfs.store import StaleHead
from slurpfs.ucxl import Address, parse

ADDR = parse("ucxl://claude:architect@bzzz:auth/src/auth.go")
KEY = ADDR.key
DEV = "developer"
BASE = b"".join(b"line %d\n" % n for n in range(1, 11))


def edit(text: bytes, line: int, new: bytes) -> bytes:
    """`text` with its line number `line` (1-based) replaced by `new`."""
    lines = text.splitlines(keepends=True)
    lines[line - 1] = new
    return b"".join(lines)


class Cluster:
    """Nodes holding the same role keys, each trusting the others' signatures."""

    def __init__(self, nodes: Nodes, count: int, **overrides: object) -> None:
        made = [nodes.new(f"n{i}", overrides=overrides)[0] for i in range(count)]
        for node in made:
            node.close_all()
        first = made[0].data_dir / "keys"
        for node in made[1:]:
            keys = node.data_dir / "keys"
            shutil.rmtree(keys / "roles")
            shutil.copytree(first / "roles", keys / "roles")
            shutil.copy2(first / "public.json", keys / "public.json")
        stores = [Keystore(n.data_dir, None, WEAK_KDF) for n in made]
        ids = [s.load().node.node_id for s in stores]
        for store, own in zip(stores, ids, strict=True):
            for other in ids:
                if other != own:
                    store.trust_node(other)
        self.nodes = made
        self.models = [n.open() for n in made]

    def exchange(self) -> None:
        """Every node ingests every version the others hold (parents first: a version
        orders after its parents)."""
        for source in self.models:
            versions = sorted(source.store.iter_records(), key=lambda v: v.order)
            for target in self.models:
                if target is not source:
                    Ingest(target).accept(shipped(source, *versions))

    def close(self) -> None:
        for node in self.nodes:
            node.close_all()


def shipped(model: ContextStore, *infos: VersionInfo) -> list[Incoming]:
    out = []
    for info in infos:
        stored = model.store.read_version(info.version_id)
        assert stored is not None
        out.append(Incoming(info.version_id, stored.envelope, stored.slots))
    return out


def concurrent(
    cluster: Cluster, *texts: bytes | None, address: Address = ADDR
) -> list[VersionInfo]:
    """Each node writes its text (None: deletes) on the same version BASE, then the
    nodes exchange what they wrote. The versions, in node order."""
    cluster.models[0].put(address, DEV, BASE)
    cluster.exchange()
    written = [
        model.delete(address, DEV) if text is None else model.put(address, DEV, text)
        for model, text in zip(cluster.models, texts, strict=True)
    ]
    cluster.exchange()
    for model in cluster.models:
        assert len(model.store.leaves(address.key, DEV)) == len(texts)
    return written


def leaf_ids(model: ContextStore) -> set[bytes]:
    return {v.version_id for v in model.store.leaves(KEY, DEV)}


@pytest.fixture
def pair(nodes: Nodes) -> Iterator[Cluster]:
    cluster = Cluster(nodes, 2)
    yield cluster
    cluster.close()


def test_edits_that_do_not_overlap_merge_into_one_version_on_every_node(pair: Cluster) -> None:
    a, b = pair.models
    on_a, on_b = concurrent(pair, edit(BASE, 2, b"two, from a\n"), edit(BASE, 8, b"eight, b\n"))
    assert len(a.conflicts(ADDR, DEV)) == 1

    merged = merge_leaves(a, KEY, DEV)

    assert merged is not None
    assert set(merged.parents) == {on_a.version_id, on_b.version_id}
    assert merged.author == a.keyring.node.node_id
    both = edit(edit(BASE, 2, b"two, from a\n"), 8, b"eight, b\n")
    assert a.get(ADDR, DEV).data == both
    assert a.conflicts(ADDR, DEV) == ()
    assert a.store.leaves(KEY, DEV) == [merged]
    # the merge version replicates like any version: the same head everywhere
    pair.exchange()
    assert b.stat(ADDR, DEV) == merged
    assert b.get(ADDR, DEV).data == both
    assert b.conflicts(ADDR, DEV) == ()


def test_overlapping_edits_stay_a_conflict_with_both_texts_intact(pair: Cluster) -> None:
    a, b = pair.models
    texts = [edit(BASE, 5, b"five, as a wrote it\n"), edit(BASE, 5, b"five, as b did\n")]
    on_a, on_b = concurrent(pair, *texts)
    versions = a.all_versions(ADDR, DEV)

    assert merge_leaves(a, KEY, DEV) is None
    outcome = merge_context(a, KEY, DEV)

    assert outcome.merged is None
    assert [u.reason for u in outcome.unmerged] == ["changes overlap at lines 5"]
    assert a.all_versions(ADDR, DEV) == versions  # nothing written
    assert leaf_ids(a) == {on_a.version_id, on_b.version_id}
    for model in (a, b):
        for version, text in ((on_a, texts[0]), (on_b, texts[1])):
            assert model.get_version(ADDR, DEV, version.version_id).data == text
        assert len(model.conflicts(ADDR, DEV)) == 1


@pytest.mark.parametrize(
    ("bad", "reason"),
    [(b"\0nine\n", "it is binary (it holds NUL bytes)"), (b"nine \xff\n", "it is not UTF-8 text")],
    ids=["nul", "not-utf8"],
)
def test_a_version_that_is_not_text_is_never_merged(pair: Cluster, bad: bytes, reason: str) -> None:
    """The edits are on different lines: as text they would merge."""
    a, b = pair.models
    text, binary = concurrent(pair, edit(BASE, 2, b"two\n"), edit(BASE, 9, bad))

    for model in (a, b):
        outcome = merge_context(model, KEY, DEV)
        assert outcome.merged is None
        (unmerged,) = outcome.unmerged
        head = model.store.leaves(KEY, DEV)[0]
        if head.version_id == binary.version_id:  # the head is the binary one
            assert unmerged.reason == reason.replace("it is", "the head is")
        else:
            assert unmerged.reason == reason
        assert leaf_ids(model) == {text.version_id, binary.version_id}


def test_a_text_too_large_to_merge_stays_a_conflict(pair: Cluster) -> None:
    big = BASE + b"more\n" * (MAX_MERGE_BYTES // 5)
    concurrent(pair, edit(big, 1, b"one\n"), edit(big, 10, b"ten\n"))

    outcome = merge_context(pair.models[0], KEY, DEV)

    assert outcome.merged is None
    assert [u.reason for u in outcome.unmerged] == [
        f"it is over {MAX_MERGE_BYTES} bytes, too large to merge"
    ]


def test_a_deletion_and_an_edit_stay_a_conflict(pair: Cluster) -> None:
    a, b = pair.models
    deletion, changed = concurrent(pair, None, edit(BASE, 3, b"three\n"))

    for model in (a, b):
        outcome = merge_context(model, KEY, DEV)
        assert outcome.merged is None
        assert "a deletion (deletions are never merged)" in outcome.unmerged[0].reason
        assert leaf_ids(model) == {deletion.version_id, changed.version_id}
    # whichever won, the edit is still there to read
    if a.store.leaves(KEY, DEV)[0] == changed:
        assert a.get(ADDR, DEV).data == edit(BASE, 3, b"three\n")
    else:
        assert a.conflicts(ADDR, DEV) == (changed,)


def test_three_leaves_merge_into_one_version_with_three_parents(nodes: Nodes) -> None:
    cluster = Cluster(nodes, 3)
    texts = [edit(BASE, n, b"changed %d\n" % n) for n in (1, 5, 10)]
    written = concurrent(cluster, *texts)

    merged = merge_leaves(cluster.models[2], KEY, DEV)

    assert merged is not None
    assert set(merged.parents) == {v.version_id for v in written}
    expected = edit(edit(edit(BASE, 1, b"changed 1\n"), 5, b"changed 5\n"), 10, b"changed 10\n")
    cluster.exchange()
    for model in cluster.models:
        assert model.stat(ADDR, DEV) == merged
        assert model.get(ADDR, DEV).data == expected
        assert model.conflicts(ADDR, DEV) == ()
    cluster.close()


def test_of_three_leaves_the_one_that_overlaps_stays_a_conflict(nodes: Nodes) -> None:
    cluster = Cluster(nodes, 3)
    texts = [edit(BASE, 2, b"two: a\n"), edit(BASE, 2, b"two: b\n"), edit(BASE, 9, b"nine: c\n")]
    on_a, on_b, on_c = concurrent(cluster, *texts)
    model = cluster.models[0]

    outcome = merge_context(model, KEY, DEV)

    assert outcome.merged is not None
    assert on_c.version_id in outcome.merged.parents
    assert len(outcome.merged.parents) == 2
    (left,) = outcome.unmerged
    assert left.version.version_id in {on_a.version_id, on_b.version_id}
    assert left.reason == "changes overlap at lines 2"
    assert model.conflicts(ADDR, DEV) == (left.version,)
    kept = texts[0] if left.version == on_b else texts[1]
    assert model.get(ADDR, DEV).data == edit(kept, 9, b"nine: c\n")
    cluster.close()


@pytest.mark.parametrize("auto_merge", [True, False])
def test_concurrent_versions_with_identical_text_are_one(nodes: Nodes, auto_merge: bool) -> None:
    """Whatever `replication.auto_merge` says: no merge, only a collapse."""
    cluster = Cluster(nodes, 2, **{"replication.auto_merge": auto_merge})
    a, b = cluster.models
    same = edit(BASE, 4, b"four, the same on both\n")
    on_a, on_b = concurrent(cluster, same, same)
    assert on_a.version_id != on_b.version_id  # two versions (time, author), one text

    merged = merge_leaves(b, KEY, DEV)

    assert merged is not None
    assert set(merged.parents) == {on_a.version_id, on_b.version_id}
    cluster.exchange()
    for model in (a, b):
        assert model.stat(ADDR, DEV) == merged
        assert model.get(ADDR, DEV).data == same
        assert model.conflicts(ADDR, DEV) == ()
    cluster.close()


def test_with_auto_merge_off_different_texts_are_not_merged(nodes: Nodes) -> None:
    cluster = Cluster(nodes, 2, **{"replication.auto_merge": False})
    a, _ = cluster.models
    concurrent(cluster, edit(BASE, 2, b"two\n"), edit(BASE, 8, b"eight\n"))

    outcome = merge_context(a, KEY, DEV)

    assert outcome.merged is None
    assert [u.reason for u in outcome.unmerged] == [
        "a different text, and automatic merging is off (replication.auto_merge)"
    ]
    assert merge_context(a, KEY, DEV, three_way=True).merged is not None  # `slurpfs merge`
    cluster.close()


def test_merging_twice_finds_one_leaf(pair: Cluster) -> None:
    a, b = pair.models
    concurrent(pair, edit(BASE, 1, b"one\n"), edit(BASE, 7, b"seven\n"))
    merged = merge_leaves(a, KEY, DEV)
    assert merged is not None
    versions = a.all_versions(ADDR, DEV)

    assert merge_leaves(a, KEY, DEV) is None
    assert merge_context(a, KEY, DEV).unmerged == ()
    pair.exchange()
    assert merge_leaves(b, KEY, DEV) is None  # the other node has it too: nothing to do
    assert a.all_versions(ADDR, DEV) == versions == b.all_versions(ADDR, DEV)


def test_a_merge_descends_from_the_nearest_common_ancestor(pair: Cluster) -> None:
    """After a merge, new concurrent edits merge against the merge version, not BASE:
    the changes merged before do not count as changes again."""
    a, b = pair.models
    concurrent(pair, edit(BASE, 1, b"one\n"), edit(BASE, 10, b"ten\n"))
    first = merge_leaves(a, KEY, DEV)
    assert first is not None
    pair.exchange()
    now = a.get(ADDR, DEV).data
    # against BASE, line 1 and line 10 changed on both sides, differently from here on
    a.put(ADDR, DEV, edit(now, 1, b"one, again\n"))
    b.put(ADDR, DEV, edit(now, 10, b"ten, again\n"))
    pair.exchange()

    merged = merge_leaves(b, KEY, DEV)

    assert merged is not None
    assert b.get(ADDR, DEV).data == edit(edit(now, 1, b"one, again\n"), 10, b"ten, again\n")


def test_a_merge_is_written_only_on_the_leaves_it_was_computed_from(pair: Cluster) -> None:
    a, _ = pair.models
    concurrent(pair, edit(BASE, 2, b"two\n"), edit(BASE, 8, b"eight\n"))
    leaves = [v.version_id for v in a.store.leaves(KEY, DEV)]

    with pytest.raises(ValueError, match="the head among them"):
        a.commit_merge(KEY, DEV, b"merged\n", leaves[1:], leaves)
    a.put(ADDR, DEV, b"a later save\n")  # the leaves move
    with pytest.raises(StaleHead):
        a.commit_merge(KEY, DEV, b"merged\n", leaves, leaves)
    assert a.get(ADDR, DEV).data == b"a later save\n"


def test_the_merge_command(pair: Cluster) -> None:
    other = parse("ucxl://claude:architect@bzzz:auth/src/other.go")
    concurrent(pair, edit(BASE, 5, b"five: a\n"), edit(BASE, 5, b"five: b\n"))
    concurrent(pair, edit(BASE, 1, b"one\n"), edit(BASE, 9, b"nine\n"), address=other)
    pair.close()
    data = pair.nodes[0].data_dir

    refused = run_cli("merge", str(ADDR), DEV, "--data", data)
    assert refused.returncode == 11, refused.stderr
    assert refused.stdout.decode().endswith(": changes overlap at lines 5\n")
    assert refused.stdout.startswith(b"not merged: ")

    done = run_cli("merge", str(other), DEV, "--data", data, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["merged"]["parents"]) == 2
    assert report["unmerged"] == []

    again = run_cli("merge", str(other), DEV, "--data", data)
    assert again.returncode == 0, again.stderr
    assert b"nothing to merge" in again.stdout
    missing = run_cli("merge", str(other.child("gone.go")), DEV, "--data", data)
    assert missing.returncode == 3, missing.stderr

    merges = [e for e in audit.read(data / "audit.log", 20) if e.action == "merge"]
    assert [(e.who, e.allowed) for e in merges] == [("local", True)] * 3

    model = pair.nodes[0].open()
    assert model.get(other, DEV).data == edit(edit(BASE, 1, b"one\n"), 9, b"nine\n")
    assert len(model.conflicts(ADDR, DEV)) == 1
    pair.nodes[0].close(model)


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine")
def test_after_a_merge_the_mount_shows_one_file_with_both_changes(
    pair: Cluster, tmp_path: Path
) -> None:
    concurrent(pair, edit(BASE, 2, b"two: a\n"), edit(BASE, 9, b"nine: b\n"))
    pair.close()
    m = Mounted(pair.nodes[0].data_dir, tmp_path / "mnt")
    m.mount()
    try:
        d = m.mnt.joinpath(*ADDR.to_mount_parts())
        (conflict,) = [n for n in os.listdir(d) if n.startswith(f"{DEV}.conflict-")]
        assert sorted(os.listdir(d)) == [DEV, conflict]

        m.cli("merge", str(ADDR), DEV)

        wait_for(lambda: os.listdir(d) == [DEV], what="the conflict file to go")
        assert (d / DEV).read_bytes() == edit(edit(BASE, 2, b"two: a\n"), 9, b"nine: b\n")
        assert not (d / conflict).exists()
        m.unmount()
    finally:
        m.sweep()


def test_auto_merge_is_a_configuration_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert make_config(data).replication.auto_merge is True
    env = {"SLURPFS_REPLICATION_AUTO_MERGE": "off"}
    assert make_config(data, environ=env).replication.auto_merge is False
    assert (
        make_config(data, toml="[replication]\nauto_merge = false\n").replication.auto_merge
        is False
    )
    with pytest.raises(ConfigError, match=r"^replication\.auto_merge: expected true or false"):
        make_config(data, toml="[replication]\nauto_merge = 1\n")
