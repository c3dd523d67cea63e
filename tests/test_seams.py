"""The seams other implementations plug into: checked statically (mypy strict runs
over the tests) and by one real call each."""

from __future__ import annotations

from slurpfs.index import SearchService
from slurpfs.index.searcher import Searcher
from slurpfs.model import ContextStore
from slurpfs.store.reader import StoreReader
from slurpfs.ucxl import parse


def test_the_lmdb_store_is_a_store_reader(model: ContextStore) -> None:
    info = model.put(parse("ucxl://a:developer@p:t/x"), "developer", b"sealed\n")
    reader: StoreReader = model.store
    head = reader.head("a:developer@p:t/x", "developer")
    assert head is not None
    assert head.version_id == info.version_id
    envelope = reader.envelope(info.version_id)
    assert envelope is not None
    assert b"sealed" not in envelope  # ciphertext only: what a cache tier may hold
    assert reader.sequence() >= 1


def test_the_search_service_is_a_searcher(model: ContextStore) -> None:
    model.put(parse("ucxl://a:developer@p:t/x"), "developer", b"a findable word\n")
    with SearchService.open(model) as service:
        searcher: Searcher = service
        result = searcher.search("findable", {"developer"})
        assert [h.role for h in result.hits] == ["developer"]
        assert searcher.seq == model.store.sequence()
