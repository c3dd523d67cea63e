"""The write-behind journal's file (`slurpfs.store.journal`) and the store's mark of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurpfs.crypto.keys import NodeIdentity
from slurpfs.model import ContextStore, JournaledSave
from slurpfs.store import journal
from slurpfs.ucxl import parse

ADDRESS = "claude:architect@bzzz:auth/src/journal"
HEAD = b"\x01" * 32


@pytest.fixture
def key() -> bytes:
    return journal.journal_key(NodeIdentity.generate())


def three(path: Path, key: bytes) -> journal.Journal:
    j = journal.Journal(path, key)
    j.append(ADDRESS, "developer", b"first\n", 1, None)
    j.append(ADDRESS, "developer", b"second\n", 2, journal.CHAINED)
    j.append(ADDRESS, "architect", b"", 3, HEAD)
    return j


def test_entries_read_back_in_order(tmp_path: Path, key: bytes) -> None:
    j = three(tmp_path / "journal", key)
    found = journal.scan(j.path, key)
    assert found.problems == []
    assert found.journal_id == j.journal_id
    assert [(e.seq, e.role, e.data, e.mtime_ns, e.based_on) for e in found.entries] == [
        (1, "developer", b"first\n", 1, None),
        (2, "developer", b"second\n", 2, journal.CHAINED),
        (3, "architect", b"", 3, HEAD),
    ]
    assert {e.address for e in found.entries} == {ADDRESS}


def test_a_damaged_entry_is_reported_and_skipped(tmp_path: Path, key: bytes) -> None:
    j = three(tmp_path / "journal", key)
    raw = bytearray(j.path.read_bytes())
    raw[journal.HEADER_BYTES + 30] ^= 1  # inside the first entry's nonce
    j.path.write_bytes(bytes(raw))
    found = journal.scan(j.path, key)
    assert [e.seq for e in found.entries] == [2, 3]
    assert len(found.problems) == 1
    assert f"damaged entry at byte {journal.HEADER_BYTES}" in found.problems[0]


def test_a_torn_tail_is_reported(tmp_path: Path, key: bytes) -> None:
    j = three(tmp_path / "journal", key)
    raw = j.path.read_bytes()
    j.path.write_bytes(raw[:-5])
    found = journal.scan(j.path, key)
    assert [e.seq for e in found.entries] == [1, 2]
    assert "torn or damaged entry" in found.problems[0]


def test_another_key_reads_nothing(tmp_path: Path, key: bytes) -> None:
    j = three(tmp_path / "journal", key)
    other = journal.journal_key(NodeIdentity.generate())
    found = journal.scan(j.path, other)
    assert found.entries == []
    assert len(found.problems) == 3


def test_no_journal_and_a_foreign_file(tmp_path: Path, key: bytes) -> None:
    assert journal.scan(tmp_path / "missing", key).entries == []
    (tmp_path / "junk").write_bytes(b"not a journal")
    found = journal.scan(tmp_path / "junk", key)
    assert found.entries == []
    assert "not a journal" in found.problems[0]


def test_truncate_keeps_the_sequence_and_the_mark_selects_what_is_left(
    tmp_path: Path, key: bytes
) -> None:
    j = three(tmp_path / "journal", key)
    j.truncate()
    assert journal.scan(j.path, key).entries == []
    j.append(ADDRESS, "developer", b"fourth\n", 4, None)
    j.append(ADDRESS, "developer", b"fifth\n", 5, journal.CHAINED)
    found = journal.scan(j.path, key)
    assert [e.seq for e in found.entries] == [4, 5]
    assert [e.seq for e in journal.pending(found, j.mark(4))] == [5]
    assert [e.seq for e in journal.pending(found, None)] == [4, 5]
    other = journal.mark(os.urandom(journal.ID_BYTES), 99)  # another journal's mark
    assert [e.seq for e in journal.pending(found, other)] == [4, 5]


def test_the_store_keeps_the_mark_with_the_version(model: ContextStore) -> None:
    address = parse("ucxl://" + ADDRESS)
    mark = journal.mark(b"\x07" * journal.ID_BYTES, 3)
    saved = model.save(address, "developer", b"journaled\n", journal=mark)
    assert saved.stored
    assert model.store.journal_mark() == mark


def test_a_save_based_on_an_older_head_becomes_a_conflict(model: ContextStore) -> None:
    address = parse("ucxl://" + ADDRESS)
    base = model.put(address, "developer", b"base\n")
    model.put(address, "developer", b"theirs\n")  # another writer, after the acknowledgement
    model.save(address, "developer", b"mine\n", based_on=(base.version_id,))
    assert len(model.conflicts(address, "developer")) == 1
    leaves = {
        model.get_version(address, "developer", v.version_id).data
        for v in model.store.leaves(address.key, "developer")
    }
    assert leaves == {b"theirs\n", b"mine\n"}


def write_transactions(model: ContextStore) -> int:
    """The store's last LMDB transaction id, read by another process (as any reader would)."""
    probe = "import lmdb, sys; print(lmdb.open(sys.argv[1], readonly=True).info()['last_txnid'])"
    done = subprocess.run(
        [sys.executable, "-c", probe, str(model.store.path)], capture_output=True, check=True
    )
    return int(done.stdout)


def test_a_group_commit_stores_its_saves_in_one_transaction(model: ContextStore) -> None:
    a, b = parse("ucxl://" + ADDRESS), parse("ucxl://" + ADDRESS + "/other")
    base = model.put(a, "developer", b"base\n")
    mark = journal.mark(b"\x07" * journal.ID_BYTES, 4)
    before = write_transactions(model)
    saved = model.save_journaled(
        [
            JournaledSave(a, "developer", b"one\n", (base.version_id,)),
            JournaledSave(a, "developer", b"two\n", None),  # chained on "one"
            JournaledSave(b, "developer", b"new\n", ()),
            JournaledSave(a, "developer", b"two\n", None),  # equal to its predecessor
        ],
        mark,
    )
    assert write_transactions(model) == before + 1
    assert [s.stored for s in saved] == [True, True, True, False]
    assert saved[3].info == saved[1].info
    assert saved[1].info.parents == (saved[0].info.version_id,)
    assert saved[0].info.parents == (base.version_id,)
    assert [v.version_id for v in model.store.leaves(a.key, "developer")] == [
        saved[1].info.version_id
    ]
    assert model.get(a, "developer").data == b"two\n"
    assert model.get(b, "developer").data == b"new\n"
    assert model.store.journal_mark() == mark


def test_a_group_commit_on_an_older_head_makes_a_conflict_and_chains_on(
    model: ContextStore,
) -> None:
    address = parse("ucxl://" + ADDRESS)
    base = model.put(address, "developer", b"base\n")
    theirs = model.put(address, "developer", b"theirs\n")  # after the acknowledgement
    mark = journal.mark(b"\x07" * journal.ID_BYTES, 2)
    saved = model.save_journaled(
        [
            JournaledSave(address, "developer", b"mine\n", (base.version_id,)),
            JournaledSave(address, "developer", b"mine, again\n", None),
        ],
        mark,
    )
    assert saved[1].info.parents == (saved[0].info.version_id,)
    leaves = {v.version_id for v in model.store.leaves(address.key, "developer")}
    assert leaves == {theirs.version_id, saved[1].info.version_id}


def test_a_scan_from_where_an_entry_starts_reads_that_one_and_the_rest(
    tmp_path: Path, key: bytes
) -> None:
    j = journal.Journal(tmp_path / "journal", key)
    j.append(ADDRESS, "developer", b"first\n", 1, None)
    second = j.end
    j.append(ADDRESS, "developer", b"second\n", 2, journal.CHAINED)
    j.append(ADDRESS, "developer", b"third\n", 3, journal.CHAINED)
    found = journal.scan(j.path, key, second)
    assert found.problems == []
    assert [e.data for e in found.entries] == [b"second\n", b"third\n"]
