"""The search service, run against both engines (real whoosh, real tantivy)."""

from __future__ import annotations

import contextlib
import logging
import time

import pytest
from conftest import Nodes
from test_index_support import ENGINES, SECRET, address, document, new_model, put_many, seed

from slurpfs.crypto import envelope
from slurpfs.errors import AccessDenied, QueryError
from slurpfs.index import SearchResult, SearchService, check_index, service
from slurpfs.index.render import facets_text, link_name, link_target, results_text
from slurpfs.index.sealed import INDEX_TABLE
from slurpfs.model import ContextStore


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def model(nodes: Nodes, engine: str) -> ContextStore:
    return new_model(nodes, engine)


def everything(result: SearchResult) -> str:
    """Every piece of a result a caller can see, as text."""
    return results_text(result) + facets_text(result) + repr(result)


def test_need_to_know_for_a_developer(model: ContextStore) -> None:
    seed(model)
    with SearchService.open(model) as search:
        for query in ("xylophonesecret", "tags:secrettag", "technologies:secrettech", "ceremony"):
            result = search.search(query, ["developer"])
            assert result.total == 0
            assert result.hits == ()
            assert all(count == () for count in result.facets.values())
        # a broad query: the architect-only context shows up in no form at all
        result = search.search("key OR rotating OR banners", ["developer"])
        assert result.total == 3
        assert {h.role for h in result.hits} == {"developer"}
        shown = everything(result)
        for secret in ("xylophonesecret", "secrettag", "secrettech", "vault", "hsm", "ceremony"):
            assert secret not in shown
        assert dict(result.facets["tags"]) == {"backend": 2, "security": 1, "frontend": 1}
        assert dict(result.facets["project"]) == {"bzzz": 2, "web": 1}
        with pytest.raises(AccessDenied):
            search.search("key", ["developer"], role="architect")


def test_need_to_know_for_an_architect(model: ContextStore) -> None:
    seed(model)
    with SearchService.open(model) as search:
        result = search.search("xylophonesecret", ["architect"])
        assert [(h.url, h.role) for h in result.hits] == [
            ("ucxl://claude:architect@vault:keys/hsm/ceremony", "architect")
        ]
        assert "[xylophonesecret]" in result.hits[0].snippet.marked()
        everything_visible = search.search("key OR rotating OR banners", ["architect"])
        assert everything_visible.total == 4  # architects read developer contexts too
        assert dict(everything_visible.facets["tags"])["secrettag"] == 1
        only_dev = search.search("key OR rotating", ["architect"], role="developer")
        assert {h.role for h in only_dev.hits} == {"developer"}
        assert only_dev.total == 3


def test_other_roles_contexts_do_not_change_a_roles_scores(model: ContextStore) -> None:
    seed(model)
    with SearchService.open(model) as search:
        before = [(h.address, h.score) for h in search.search("key", ["developer"]).hits]
    put_many(
        model,
        [
            (address(f"hsm/k{i}", "claude:architect@vault:keys"), "architect", SECRET)
            for i in range(30)
        ],
    )
    with SearchService.open(model) as search:
        after = [(h.address, h.score) for h in search.search("key", ["developer"]).hits]
        assert search.search("key", ["architect"]).total == 33
    assert after == before


def test_results_are_ranked_with_snippets_and_links(model: ContextStore) -> None:
    seed(model)
    with SearchService.open(model) as search:
        result = search.search('tags:security "rotating key"', ["developer"], limit=5)
    (hit,) = result.hits
    assert (hit.rank, hit.url, hit.role) == (
        1,
        "ucxl://claude:architect@bzzz:auth/src/auth.go",
        "developer",
    )
    assert hit.summary == "JWT validation for the public API"
    assert "rotating" in hit.snippet.marked().lower()
    assert "[" in hit.snippet.marked()
    assert link_name(hit) == "001-auth.go-developer"
    assert link_target(hit) == "../../ucxl/claude:architect@bzzz:auth/src/auth.go/developer"
    text = results_text(result)
    assert text.splitlines()[2].startswith("1\t")
    assert "\tdeveloper" in text


def test_limit_and_rank_order(model: ContextStore) -> None:
    put_many(
        model,
        [(address(f"many/d{i}"), "developer", document("alpha " * (i + 1))) for i in range(12)],
    )
    with SearchService.open(model) as search:
        result = search.search("alpha", ["developer"], limit=5)
    assert result.total == 12
    assert len(result.hits) == 5
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)


def test_edits_and_deletions_are_reflected(model: ContextStore) -> None:
    target = address("src/auth.go")
    model.put(target, "developer", document("the oldword is here", tags=["old"]))
    with SearchService.open(model) as search:
        assert search.search("oldword", ["developer"]).total == 1
        model.put(target, "developer", document("the newword replaced it", tags=["new"]))
        search.catch_up()
        assert search.search("oldword", ["developer"]).total == 0
        result = search.search("newword", ["developer"])
        assert result.total == 1
        assert dict(result.facets["tags"]) == {"new": 1}
        model.delete(target, "developer")
        report = search.catch_up()
        assert report.removed == 2  # from the developer and the architect index
        for roles in (["developer"], ["architect"]):
            gone = search.search("newword", roles)
            assert gone.total == 0
            assert gone.hits == ()
            assert gone.facets["tags"] == ()


def test_bad_queries_raise_a_readable_query_error(model: ContextStore) -> None:
    seed(model)
    with SearchService.open(model) as search:
        for query, says in [
            ('"rotating key', "never closed"),
            ("nosuchfield:x", "unknown field 'nosuchfield'"),
            ("key AND", "after it"),
            ("", "empty"),
        ]:
            with pytest.raises(QueryError, match=says):
                search.search(query, ["developer"])
        with pytest.raises(QueryError, match="no such role"):
            search.search("key", ["developer"], role="nobody")
        with pytest.raises(QueryError):
            search.search("key", ["developer"], limit=0)
        assert search.statistics().query_errors == 6


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("project:web", {"docs/readme"}),
        ("path:session", {"src/session.go"}),
        ("technologies:jwt", {"src/auth.go"}),
        ("tags:Backend", {"src/auth.go", "src/session.go"}),  # keywords ignore case
        ("summary:lifetime", {"src/session.go"}),
        ("key -shared", {"src/auth.go"}),
        ("key NOT shared", {"src/auth.go"}),
        ("banners OR sessions", {"docs/readme", "src/session.go"}),
        ('"key set"', {"src/auth.go", "src/session.go"}),
        ("agent:alice", {"docs/readme"}),
    ],
)
def test_query_syntax_both_engines_agree_on(
    model: ContextStore, query: str, expected: set[str]
) -> None:
    seed(model)
    with SearchService.open(model) as search:
        hits = search.search(query, ["developer"]).hits
    assert {h.address.split("/", 1)[1] for h in hits} == expected


def test_exclusions_and_the_role_filter_drop_every_excluded_context(model: ContextStore) -> None:
    # The excluded side matching an earlier document than the first hit is the case
    # whoosh 2.7's AndNot gets wrong on its own.
    seed(model)
    with SearchService.open(model) as search:
        for query in ("key -rotating", "key NOT rotating"):
            hits = search.search(query, ["architect"]).hits
            assert [h.address.rsplit("/", 1)[1] for h in hits] == ["session.go"], query
        only = search.search("key", ["architect"], role="architect")
        assert [(h.address, h.role) for h in only.hits] == [
            ("claude:architect@vault:keys/hsm/ceremony", "architect")
        ]
        assert only.total == 1


@pytest.mark.parametrize("query", ["(key -rotating) OR banners", "NOT NOT key", "/ : * !"])
def test_queries_an_engine_cannot_run_are_query_errors(model: ContextStore, query: str) -> None:
    seed(model)
    # it runs, or says why not: nothing else
    with SearchService.open(model) as search, contextlib.suppress(QueryError):
        search.search(query, ["developer"])


def test_reopening_does_not_rebuild_a_saved_index(nodes: Nodes, engine: str) -> None:
    node, model = nodes.new(overrides={"search.engine": engine})
    seed(model)
    with SearchService.open(model) as search:
        counts = search.statistics().documents
        assert counts == {"architect": 4, "developer": 3, "reviewer": 0}
    model = node.reopen(model)
    with SearchService.open(model) as search:
        stats = search.statistics()
        assert stats.documents == counts
        if engine in ("sqlite", "whoosh"):  # kept at rest
            assert stats.rebuilt == ()
            assert stats.indexed == 0
        else:
            assert stats.rebuilt == ("architect", "developer", "reviewer")  # RAM only
        assert search.search("xylophonesecret", ["architect"]).total == 1
    assert check_index(model) == []


def test_commits_made_while_closed_are_caught_up(model: ContextStore) -> None:
    seed(model)
    SearchService.open(model).close()
    model.put(address("later"), "developer", document("afterthought"))
    with SearchService.open(model) as search:
        assert search.search("afterthought", ["developer"]).total == 1


def test_tantivy_keeps_nothing_at_rest(nodes: Nodes) -> None:
    model = new_model(nodes, "tantivy")
    seed(model)
    with SearchService.open(model) as search:
        assert search.search("rotating", ["developer"]).total == 2
    assert model.store.aux_scan(INDEX_TABLE, b"") == []


def test_rebuild_keeps_answering_and_saves(model: ContextStore) -> None:
    seed(model)
    with SearchService.open(model) as search:
        seen: list[tuple[int, int]] = []
        assert search.rebuild(["developer"], progress=lambda n, total: seen.append((n, total))) == 3
        assert seen[-1] == (3, 3)  # the developer index holds developer contexts
        assert search.search("rotating", ["developer"]).total == 2
    assert check_index(model) == []


def test_a_build_in_many_batches_indexes_every_context_once(
    model: ContextStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each role index commits every BUILD_BATCH documents of its own while building.
    monkeypatch.setattr(service, "BUILD_BATCH", 2)
    roles = ("developer", "architect")
    put_many(
        model,
        [
            (address(f"batch/d{i}"), roles[i % 3 % 2], document(f"batchword{i} common"))
            for i in range(11)
        ],
    )
    with SearchService.open(model) as search:
        # architects read developer contexts too: 11 in theirs, 7 in the developer index
        documents = search.statistics().documents
        assert (documents["architect"], documents["developer"]) == (11, 7)
        assert search.search("common", ["architect"]).total == 11
        assert search.search("common", ["developer"]).total == 7
        for i in range(11):
            assert search.search(f"batchword{i}", ["architect"]).total == 1
    assert check_index(model) == []


def test_overlapping_indexes_never_count_a_context_twice(nodes: Nodes) -> None:
    roles = """
[roles.p]
readers = ["q"]
[roles.q]
readers = []
[roles.r]
readers = ["s"]
[roles.s]
readers = []
[roles.t]
readers = ["q", "s"]
"""
    model = new_model(nodes, "whoosh", toml=roles)
    put_many(model, [(address(f"x/doc-{r}"), r, document("shared word")) for r in "pqrst"])
    with SearchService.open(model) as search:
        result = search.search("shared", ["q", "s"])
        assert result.total == 5
        assert sorted(h.role for h in result.hits) == list("pqrst")
        only_q = search.search("shared", ["q"])
        assert sorted(h.role for h in only_q.hits) == ["p", "q", "t"]


@pytest.mark.expect_warnings(
    r"search index of role developer refused, rebuilding it: index file '\S+' of role"
    r" 'developer' is not the one its manifest \(generation 2\) names: refusing an older"
    " or altered index"
)
def test_a_rolled_back_index_is_refused_and_rebuilt(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    model = new_model(nodes, "whoosh", held=["developer"])
    model.put(address("a"), "developer", document("firstword"))
    SearchService.open(model).close()
    old = dict(model.store.aux_scan(INDEX_TABLE, b"developer\0f\0"))
    model.put(address("b"), "developer", document("secondword"))
    model.delete(address("a"), "developer")
    with SearchService.open(model) as search:
        assert search.search("firstword", ["developer"]).total == 0
    current = [k for k, _ in model.store.aux_scan(INDEX_TABLE, b"developer\0f\0")]
    model.store.aux_write(INDEX_TABLE, old, current)  # an attacker restores the older files
    with SearchService.open(model) as search:
        assert search.statistics().rebuilt == ("developer",)
        assert search.search("firstword", ["developer"]).total == 0
        assert search.search("secondword", ["developer"]).total == 1
    assert any(r.levelno == logging.ERROR and "refused" in r.getMessage() for r in caplog.records)
    assert check_index(model) == []


def test_two_processes_saving_the_same_index(nodes: Nodes) -> None:
    model = new_model(nodes, "whoosh", held=["developer"])
    first = SearchService.open(model)
    second = SearchService.open(model)
    model.put(address("one"), "developer", document("fromfirst"))
    first.catch_up()
    model.put(address("two"), "developer", document("fromsecond"))
    second.catch_up()  # finds the index saved by `first` meanwhile, reloads, catches up
    for search in (first, second):
        search.catch_up()
        assert search.search("fromfirst OR fromsecond", ["developer"]).total == 2
        search.close()
    assert check_index(model) == []


def test_fsck_reports_an_index_that_disagrees_with_the_store(nodes: Nodes) -> None:
    model = new_model(nodes, "whoosh", held=["developer"])
    target = address("short/lived")
    model.put(target, "developer", document("ephemeral"), ttl=60)
    with SearchService.open(model) as search:
        model.expire(now=time.time() + 3600)  # purged: no change record to index from
        assert check_index(model) == [
            "search index of role developer: claude:architect@bzzz:auth/short/lived"
            " [developer] is indexed but not live"
        ]
        assert search.search("ephemeral", ["developer"]).hits == ()  # never served
        search.catch_up()  # the query noticed; the next batch removes it
    assert check_index(model) == []
    model.put(address("pending"), "developer", document("uncommitted to the index"))
    assert check_index(model) == []  # a change the indexer has yet to apply is no problem


def test_a_ttl_purge_told_to_the_service_leaves_the_index(nodes: Nodes) -> None:
    """The mount's TTL task hands what it purged to the search service (a purge has
    no change record). Expected: the next catch-up drops those documents, so a
    purge is not left for fsck to find as an index that disagrees with the store."""
    model = new_model(nodes, "whoosh", held=["developer"])
    target = address("short/lived")
    model.put(target, "developer", document("ephemeral"), ttl=60)
    with SearchService.open(model) as search:
        purged: list[tuple[str, str]] = []
        model.expire(now=time.time() + 3600, purged=purged)
        search.forget(purged)
        assert search.pending()
        search.catch_up()
        assert not search.pending()
        assert check_index(model) == []


@pytest.mark.expect_warnings(
    r"not indexing claude:architect@bzzz:auth/bad \[developer\]: version [0-9a-f]{16}:"
    " envelope does not hash to its id"
)
def test_corrupt_versions_are_not_indexed(nodes: Nodes, caplog: pytest.LogCaptureFixture) -> None:
    node, model = nodes.new(held=["developer"], overrides={"search.engine": "tantivy"})
    node.expect_damage()
    info = model.put(address("bad"), "developer", document("tamperedword"))
    model.put(address("good"), "developer", document("goodword"))
    raw = model.store.envelope(info.version_id)
    assert raw is not None
    with model.store._env.begin(write=True) as txn:  # tamper with the stored envelope
        db = model.store._dbs[b"envelopes"]
        txn.put(info.version_id, raw[:-70] + bytes([raw[-70] ^ 1]) + raw[-69:], db=db)
    # The plaintext this process wrote is still in its cache (and is the version's
    # true content); any other process, or this one after a restart, reads the store.
    model._cache.clear()
    with SearchService.open(model) as search:
        assert search.search("goodword", ["developer"]).total == 1
        assert search.search("tamperedword", ["developer"]).total == 0
        assert search.statistics().skipped == 1
    assert any("not indexing" in r.getMessage() for r in caplog.records)


def test_a_rebuild_that_loses_a_race_still_wins(nodes: Nodes) -> None:
    model = new_model(nodes, "whoosh", held=["developer"])
    model.put(address("one"), "developer", document("before"))
    first = SearchService.open(model)
    second = SearchService.open(model)
    model.put(address("two"), "developer", document("during"))
    first.catch_up()  # saves: what `second` last read is now stale
    assert second.rebuild() == 2  # its save conflicts; a complete build replaces it
    first.close()
    second.close()
    with SearchService.open(model) as search:
        assert search.statistics().rebuilt == ()
        assert search.search("before OR during", ["developer"]).total == 2
    assert check_index(model) == []


def test_the_indexer_opens_versions_as_reads_do(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version this node stored is indexed without a second signature check or
    sealed-box open (its verified tag and local key slot), and one still in the
    plaintext cache without decrypting at all."""
    _, model = nodes.new(held=["developer"], overrides={"search.engine": "tantivy"})
    model.put(address("stored"), "developer", document("storedword"))
    model._cache.clear()
    model.put(address("fresh"), "developer", document("freshword"))

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the indexer took the slow path")

    with monkeypatch.context() as patch:
        patch.setattr(envelope, "verify", refuse)
        patch.setattr(envelope, "unwrap_data_key", refuse)
        with SearchService.open(model) as search:
            for word in ("storedword", "freshword"):
                assert search.search(word, ["developer"]).total == 1
    assert model.statistics().cache.entries == 1, "indexing filled the plaintext cache"
