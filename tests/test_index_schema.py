"""The whoosh schema: the catch-all field a word without a field searches, and
indexes saved with an older schema (rebuilt when the search service opens)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Nodes
from test_index_support import ENGINES, address, document, new_model, put_many
from whoosh import analysis, fields, query

from slurpfs import config, fsck
from slurpfs.index import SearchService, check_index
from slurpfs.index import whoosh_engine as we
from slurpfs.index.document import IndexDoc
from slurpfs.index.whoosh_query import CATCH_ALL, PAIRS, PairPhrase, prepare
from slurpfs.model import ContextStore

FIXTURE = Path(__file__).parent / "fixtures" / "format1"
PASSPHRASE = b"fixture-passphrase"


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def model(nodes: Nodes, engine: str) -> ContextStore:
    return new_model(nodes, engine)


def test_a_phrase_never_spans_two_fields(model: ContextStore) -> None:
    put_many(
        model,
        [
            (
                address("src/edge.go"),
                "developer",
                document("the body ends with gamma", summary="delta opens the summary"),
            )
        ],
    )
    with SearchService.open(model) as search:
        assert search.search('"gamma delta"', ["developer"]).total == 0
        assert search.search('"with gamma"', ["developer"]).total == 1
        assert search.search('"delta opens"', ["developer"]).total == 1
        assert search.search("gamma delta", ["developer"]).total == 1


def test_a_summary_match_ranks_above_a_body_match(model: ContextStore) -> None:
    put_many(
        model,
        [
            (address("a/body"), "developer", document("notes on quokka habits", summary="x")),
            (address("a/summary"), "developer", document("notes on habits", summary="quokka")),
        ],
    )
    with SearchService.open(model) as search:
        hits = search.search("quokka", ["developer"]).hits
    assert [h.address.rsplit("/", 1)[1] for h in hits] == ["summary", "body"]


PHRASES = {
    '"alpha beta gamma"': 1,  # not in b: it has both pairs, apart
    '"alpha beta"': 2,
    '"beta gamma delta"': 1,
    '"alpha beta gamma delta"': 1,
    '"beta alpha"': 0,
    '"tick tock tick"': 1,  # not in c: "tick tock tock tick"
    '"tock tick"': 2,
    '"two three"': 0,  # the body ends with "two", the summary starts with "three"
    '"one two three"': 0,
    '"three four"': 1,
    "utf8_decode": 1,  # split into a phrase of two words by both engines
    '"decode utf8"': 0,
}


def test_phrases_are_exact_at_any_length(model: ContextStore) -> None:
    put_many(
        model,
        [
            (address("p/a"), "developer", document("alpha beta gamma delta")),
            (address("p/b"), "developer", document("alpha beta then beta gamma")),
            (address("p/c"), "developer", document("tick tock tock tick")),
            (address("p/d"), "developer", document("one two", summary="three four")),
            (address("p/e"), "developer", document("Tick TOCK tick calls utf8_decode")),
        ],
    )
    with SearchService.open(model) as search:
        found = {q: search.search(q, ["developer"]).total for q in PHRASES}
    assert found == PHRASES  # the same for both engines


def test_pairs_never_span_two_parts_of_the_catch_all() -> None:
    analyzer = we.schema()[PAIRS].analyzer
    value = we._PART_SEP.join(["One two", "THREE", "", "four five six"])
    assert [t.text for t in analyzer(value)] == ["one two", "four five", "five six"]


def test_whoosh_finds_a_catch_all_phrase_through_the_pair_field() -> None:
    phrase = query.Phrase(CATCH_ALL, ["a", "b", "c"])
    assert isinstance(phrase.accept(prepare), PairPhrase)
    # A phrase with slop, or of one field, is searched by its positions as before.
    for other in (query.Phrase(CATCH_ALL, ["a", "b"], slop=2), query.Phrase("summary", ["a", "b"])):
        assert type(other.accept(prepare)) is query.Phrase


_current_schema = we.schema
_current_fields = we._fields


# Fields older schemas lacked: before the catch-all field a word searched every
# default field; before the pair field a phrase checked word positions.
LEGACY = {"before alltext": (CATCH_ALL, PAIRS), "before allpairs": (PAIRS,)}


def _legacy(missing: tuple[str, ...]) -> tuple[Any, Any]:
    def schema() -> Any:
        old = _current_schema()
        for name in missing:
            old.remove(name)
        return old

    def fields(doc: IndexDoc) -> dict[str, Any]:
        return {k: v for k, v in _current_fields(doc).items() if k not in missing}

    return schema, fields


@pytest.fixture
def format1(tmp_path: Path) -> config.Config:
    data = tmp_path / "format1"
    shutil.copytree(FIXTURE, data)
    for path in [data, *data.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    return config.load(
        data / "config.toml",
        environ={"HOME": str(tmp_path)},
        overrides={"node.data_dir": str(data)},
    )


@pytest.mark.parametrize("missing", LEGACY.values(), ids=LEGACY.keys())
def test_an_index_with_an_older_schema_is_rebuilt(
    format1: config.Config,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    missing: tuple[str, ...],
) -> None:
    with ContextStore.open(format1, PASSPHRASE) as model:
        # Saved as before these fields existed.
        legacy_schema, legacy_fields = _legacy(missing)
        with monkeypatch.context() as old:
            old.setattr(we, "schema", legacy_schema)
            old.setattr(we, "_fields", legacy_fields)
            with SearchService.open(model) as search:
                assert search.search("content:version", ["developer"]).total == 1
        assert check_index(model) == []  # an older schema is not a problem for fsck

        caplog.set_level(logging.INFO, logger="slurpfs.index")
        with SearchService.open(model) as search:
            rebuilt = [r for r in caplog.records if "out of date, rebuilding" in r.getMessage()]
            assert {r.levelno for r in rebuilt} == {logging.INFO}
            assert len(rebuilt) == len(model.held_roles())
            assert search.search("version", ["developer"]).total == 1
            assert search.search('"second version"', ["developer"]).total == 1
            assert search.search("notes", ["architect"]).total == 1

        caplog.clear()
        with SearchService.open(model) as search:  # saved with this schema: opened as is
            assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]
            assert search.search("version", ["developer"]).total == 1
        assert check_index(model) == []
        assert fsck.check(model).ok


class FutureTokenizer(analysis.Tokenizer):  # type: ignore[misc]
    """Stands for a class a newer slurpfs pickles into the schema and this one lacks."""

    def __call__(self, value: str, **kwargs: Any) -> Any:
        return analysis.RegexTokenizer()(value, **kwargs)


def test_an_index_whose_schema_names_an_unknown_class_is_rebuilt(
    format1: config.Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Written by a newer version (its schema pickles a class this one does not
    # have): rebuilt with an INFO line, not a failed mount.
    current = we.schema

    def newer_schema() -> Any:
        s = current()
        s.add("future", fields.TEXT(analyzer=FutureTokenizer()))
        return s

    with ContextStore.open(format1, PASSPHRASE) as model:
        with monkeypatch.context() as newer:
            newer.setattr(we, "schema", newer_schema)
            with SearchService.open(model) as search:
                assert search.search("version", ["developer"]).total == 1
        monkeypatch.delattr(sys.modules[__name__], "FutureTokenizer")
        caplog.set_level(logging.INFO, logger="slurpfs.index")
        with SearchService.open(model) as search:
            rebuilt = [r for r in caplog.records if "out of date, rebuilding" in r.getMessage()]
            assert len(rebuilt) == len(model.held_roles())
            assert "cannot read" in rebuilt[0].getMessage()
            assert search.search("version", ["developer"]).total == 1
        assert fsck.check(model).ok
