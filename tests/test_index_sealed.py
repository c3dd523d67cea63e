"""The index at rest: sealed files, the authenticated manifest, rollback and conflicts."""

from __future__ import annotations

import pytest
from conftest import Nodes
from test_index_support import new_model

from slurpfs.errors import KeyMissing
from slurpfs.index import IndexConflict, IndexCorrupt, IndexRollback
from slurpfs.index.sealed import (
    CHUNK_BYTES,
    INDEX_TABLE,
    SealedIndexStore,
    index_key,
    open_file,
    seal_file,
)
from slurpfs.model import ContextStore


@pytest.fixture
def model(nodes: Nodes) -> ContextStore:
    return new_model(nodes, "whoosh")


def sealed(model: ContextStore, role: str = "developer") -> SealedIndexStore:
    return SealedIndexStore(model.store, lambda: model.keyring, role)


def rows(model: ContextStore, prefix: bytes) -> dict[bytes, bytes]:
    return dict(model.store.aux_scan(INDEX_TABLE, prefix))


def test_index_key_is_per_role_and_generation(model: ContextStore) -> None:
    dev = index_key(model.keyring, "developer", 1)
    assert len(dev) == 32
    assert dev != index_key(model.keyring, "architect", 1)
    with pytest.raises(KeyMissing):
        index_key(model.keyring, "developer", 2)


def test_a_sealed_file_opens_only_under_its_role_and_name(model: ContextStore) -> None:
    key = index_key(model.keyring, "developer", 1)
    blob = seal_file(key, "developer", "_MAIN_1.toc", b"plaintext postings")
    assert b"plaintext" not in blob
    assert open_file(key, "developer", "_MAIN_1.toc", blob) == b"plaintext postings"
    with pytest.raises(IndexCorrupt):
        open_file(key, "developer", "_MAIN_2.toc", blob)  # renamed
    with pytest.raises(IndexCorrupt):
        open_file(key, "architect", "_MAIN_1.toc", blob)  # moved to another role


def test_save_and_load_round_trip_in_chunks(model: ContextStore) -> None:
    big = bytes(range(256)) * (CHUNK_BYTES // 256 + 10)  # more than one chunk
    s = sealed(model)
    assert s.load("whoosh") is None
    toc = b"a table of contents, in plaintext"
    meta = s.save("whoosh", {"a.seg": big, "b.toc": toc}, {"a.seg", "b.toc"}, seq=7, docs=3)
    assert (meta.generation, meta.seq, meta.docs) == (1, 7, 3)
    loaded = sealed(model).load("whoosh")
    assert loaded is not None
    got_meta, files = loaded
    assert files == {"a.seg": big, "b.toc": toc}
    assert got_meta == meta
    # nothing in the store holds the plaintext
    assert all(big[:64] not in v and toc not in v for v in rows(model, b"").values())


def test_removed_files_are_deleted_and_unchanged_ones_kept(model: ContextStore) -> None:
    s = sealed(model)
    s.save("whoosh", {"a": b"1", "b": b"2"}, {"a", "b"}, seq=1, docs=0)
    before = rows(model, b"developer\0f\0a")
    s.save("whoosh", {"a": b"1", "c": b"3"}, {"c"}, seq=2, docs=0)
    assert rows(model, b"developer\0f\0a") == before  # not re-sealed
    assert rows(model, b"developer\0f\0b") == {}
    _, files = sealed(model).load("whoosh") or (None, {})
    assert files == {"a": b"1", "c": b"3"}


def test_an_older_valid_set_is_refused(model: ContextStore) -> None:
    s = sealed(model)
    s.save("whoosh", {"seg": b"old postings"}, {"seg"}, seq=1, docs=1)
    old = rows(model, b"developer\0f\0")
    s.save("whoosh", {"seg": b"new postings"}, {"seg"}, seq=2, docs=1)
    model.store.aux_write(INDEX_TABLE, old)  # put back the older, validly sealed file
    with pytest.raises(IndexRollback, match="older or altered"):
        sealed(model).load("whoosh")


def test_a_missing_file_is_refused(model: ContextStore) -> None:
    s = sealed(model)
    s.save("whoosh", {"seg": b"postings", "toc": b"toc"}, {"seg", "toc"}, seq=1, docs=1)
    model.store.aux_write(INDEX_TABLE, {}, list(rows(model, b"developer\0f\0seg")))
    with pytest.raises(IndexRollback):
        sealed(model).load("whoosh")


def test_altered_bytes_and_manifest_are_refused(model: ContextStore) -> None:
    s = sealed(model)
    s.save("whoosh", {"seg": b"postings"}, {"seg"}, seq=1, docs=1)
    (key, value), *_ = rows(model, b"developer\0f\0").items()
    flipped = value[:-1] + bytes([value[-1] ^ 1])
    model.store.aux_write(INDEX_TABLE, {key: flipped})
    with pytest.raises(IndexCorrupt):
        sealed(model).load("whoosh")
    model.store.aux_write(INDEX_TABLE, {key: value})
    meta = model.store.aux_get(INDEX_TABLE, b"developer\0m")
    assert meta is not None
    model.store.aux_write(INDEX_TABLE, {b"developer\0m": meta[:-1] + bytes([meta[-1] ^ 1])})
    with pytest.raises(IndexCorrupt, match="fails authentication"):
        sealed(model).load("whoosh")


def test_a_manifest_moved_to_another_role_is_refused(model: ContextStore) -> None:
    sealed(model, "developer").save("whoosh", {"seg": b"x"}, {"seg"}, seq=1, docs=1)
    meta = model.store.aux_get(INDEX_TABLE, b"developer\0m")
    assert meta is not None
    model.store.aux_write(INDEX_TABLE, {b"architect\0m": meta})
    with pytest.raises(IndexCorrupt):
        sealed(model, "architect").load("whoosh")


def test_concurrent_saves_conflict(model: ContextStore) -> None:
    first, second = sealed(model), sealed(model)
    assert first.load("whoosh") is None
    assert second.load("whoosh") is None
    first.save("whoosh", {"a": b"1"}, {"a"}, seq=1, docs=1)
    with pytest.raises(IndexConflict):
        second.save("whoosh", {"b": b"2"}, {"b"}, seq=1, docs=1)
    assert second.load("whoosh") is not None  # after reloading it may save again
    second.save("whoosh", {"b": b"2"}, {"b"}, seq=2, docs=1)


def test_key_rotation_reseals_under_the_new_generation(model: ContextStore) -> None:
    s = sealed(model)
    s.save("whoosh", {"seg": b"postings"}, {"seg"}, seq=1, docs=1)
    model.rotate_role("developer")  # destroys generation 1
    with pytest.raises(KeyMissing):
        sealed(model).load("whoosh")
    fresh = sealed(model)
    fresh.purge()
    meta = fresh.save("whoosh", {"seg": b"postings"}, {"seg"}, seq=2, docs=1)
    assert meta.key_generation == 2
    assert sealed(model).load("whoosh") is not None
