"""How the whoosh engine runs a parsed query: corrected and faster queries and matchers.

`prepare` rewrites a parsed query before it is searched:

* every ``AndNot`` runs with `_AndNotMatcher`: whoosh 2.7's ``AndNotMatcher``
  does not exclude the first positive match when the excluded side starts at an
  earlier document, so ``a ANDNOT b``, ``a -b`` and the file-role filter could
  let an excluded document through;
* every ``Or`` runs as a tree of union matchers: whoosh's ``Or`` preloads every
  match of a segment of under 5,000 documents into arrays the size of the
  segment, even for a word that matches a handful of documents;
* a phrase of the catch-all field (`CATCH_ALL`) is looked up in its word-pair
  field (`PAIRS`, see `PairPhrase`) instead of checking the word positions of
  every document that holds all its words (most of a phrase query's time).

`FastIndex` opens readers that read the postings whoosh wrote (the same
format) with a leaf matcher that skips within a block by binary search and
decodes document numbers in C; whoosh steps through a block one posting at a
time in Python, which was most of the time of an AND of two common words.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from whoosh import query
from whoosh.codec.whoosh3 import W3Codec, W3LeafMatcher
from whoosh.index import FileIndex
from whoosh.matching import AndNotMatcher, Matcher, NullMatcher, ReadTooFar, WrappingMatcher
from whoosh.query.compound import DefaultOr
from whoosh.reading import EmptyReader, IndexReader, MultiReader, SegmentReader
from whoosh.searching import Searcher

CATCH_ALL = "alltext"
"""The field a word or phrase that names no field searches (with tags and technologies)."""
PAIRS = "allpairs"
"""Each two adjacent words of one part of `CATCH_ALL`, as one term ``"w1 w2"``."""


def pair_terms(words: list[str]) -> list[str]:
    """The `PAIRS` terms of consecutive words."""
    return [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


class _AndNotMatcher(AndNotMatcher):  # type: ignore[misc]
    def _find_first(self) -> None:
        # whoosh only skips when both sides start on the same document; the
        # excluded side may start earlier and still hold the first positive match.
        if self.a.is_active() and self.b.is_active():
            self._find_next()


class AndNot(query.AndNot):  # type: ignore[misc]
    """``a ANDNOT b`` that excludes every match of `b` (see the module docstring)."""

    def matcher(self, searcher: Searcher, context: Any = None) -> _AndNotMatcher:
        scored = self.a.matcher(searcher, context)
        return _AndNotMatcher(scored, self.b.matcher(searcher, searcher.boolean_context()))


class _PhraseCheck(WrappingMatcher):  # type: ignore[misc]
    """The documents of `child` (those holding every word pair of a phrase) where the
    phrase's words also stand at consecutive positions.

    `words` are position postings of the phrase's distinct words; `offsets` gives,
    for each of them, where it occurs in the phrase. Only candidates are checked:
    the word postings are skipped to each one, never scanned.
    """

    def __init__(
        self, child: Matcher, words: list[Matcher], offsets: list[list[int]], boost: float
    ) -> None:
        super().__init__(child, boost=boost)
        self._words = words
        self._offsets = offsets
        self._settle()

    def _phrase_at(self, doc: int) -> bool:
        starts: set[int] | None = None
        for matcher, offsets in zip(self._words, self._offsets, strict=True):
            if not matcher.is_active():
                return False
            matcher.skip_to(doc)
            if not matcher.is_active() or matcher.id() != doc:
                return False
            positions = matcher.value_as("positions")
            for offset in offsets:
                found = {p - offset for p in positions}
                starts = found if starts is None else starts & found
                if not starts:
                    return False
        return True

    def _settle(self) -> None:
        child = self.child
        while child.is_active() and not self._phrase_at(child.id()):
            child.next()

    def next(self) -> bool:
        self.child.next()
        self._settle()
        return False

    def skip_to(self, id: int) -> bool:
        self.child.skip_to(id)
        self._settle()
        return False

    def all_ids(self) -> Iterator[int]:
        while self.is_active():
            yield self.id()
            self.next()

    def copy(self) -> _PhraseCheck:
        raise NotImplementedError("a phrase check is not copied")

    def replace(self, minquality: float = 0) -> Matcher:
        return self if self.is_active() else NullMatcher()

    def supports_block_quality(self) -> bool:
        return False


class PairPhrase(query.Phrase):  # type: ignore[misc]
    """An exact phrase of `CATCH_ALL`, found through `PAIRS`.

    Pairs are made within one part only, so a pair never spans two fields. Two
    words are one pair term: exactly the documents where they stand side by side.
    Longer phrases take the documents holding every pair of the phrase, then keep
    those where the words stand at consecutive positions (``a b`` and ``b c``
    apart are not ``a b c``). Scored by the pair terms (a rare pair counts more).
    The query's words stay those of the phrase (highlights, term listing).
    """

    def matcher(self, searcher: Searcher, context: Any = None) -> Matcher:
        pairs = list(dict.fromkeys(pair_terms(list(self.words))))
        if len(pairs) == 1:
            return query.Term(PAIRS, pairs[0], boost=self.boost).matcher(searcher, context)
        candidates = query.And([query.Term(PAIRS, p) for p in pairs]).matcher(searcher, context)
        if not candidates.is_active():
            return NullMatcher()
        reader = searcher.reader()
        offsets: dict[str, list[int]] = {}
        for i, word in enumerate(self.words):
            offsets.setdefault(word, []).append(i)
        if any((self.fieldname, word) not in reader for word in offsets):
            return NullMatcher()
        words = [reader.postings(self.fieldname, word) for word in offsets]
        return _PhraseCheck(candidates, words, list(offsets.values()), self.boost)


def prepare(q: query.Query) -> query.Query:
    """`q` as the engine searches it (see the module docstring); apply with ``q.accept``."""
    if type(q) is query.AndNot:
        return AndNot(q.a, q.b)
    if type(q) is query.Or:
        return DefaultOr(q.subqueries, boost=q.boost, minmatch=q.minmatch, scale=q.scale)
    if type(q) is query.Phrase and q.fieldname == CATCH_ALL and q.slop == 1 and len(q.words) > 1:
        return PairPhrase(q.fieldname, q.words, boost=q.boost, char_ranges=q.char_ranges)
    return q


class _FastLeafMatcher(W3LeafMatcher):  # type: ignore[misc]
    """whoosh's block posting reader, skipping within a block by binary search."""

    # whoosh's state of the current block
    _i: int  # position in the block
    _ids: Any  # document numbers of the block (a sequence), or None until read
    _maxid: int
    _data: Any
    _byteids: bool

    def skip_to(self, targetid: int) -> None:
        if not self.is_active():
            raise ReadTooFar
        if self._ids is None:
            self._read_ids()
        if targetid <= self._ids[self._i]:
            return
        if targetid > self._maxid:
            while self.is_active() and targetid > self._maxid:
                self._next_block()
            if not self.is_active():
                return
            if self._ids is None:
                self._read_ids()
        # targetid <= the block's last id now, so it is found within the block.
        self._i = bisect_left(self._ids, targetid, self._i)

    def _read_ids(self) -> None:
        if self._data is None:
            self._read_data()
        ids = self._data[0]
        # Document numbers are stored as deltas unless they fit in bytes as they are.
        self._ids = ids if self._byteids else tuple(accumulate(ids))


class _FastCodec(W3Codec):  # type: ignore[misc]
    """Reads whoosh 3 segments (never writes them: writers use the index's codec)."""

    def postings_reader(
        self, dbfile: Any, terminfo: Any, format_: Any, term: Any = None, scorer: Any = None
    ) -> Matcher:
        if terminfo.is_inlined():
            return super().postings_reader(dbfile, terminfo, format_, term=term, scorer=scorer)
        offset, length = terminfo.extent()
        return _FastLeafMatcher(dbfile, offset, length, format_, term=term, scorer=scorer)


class FastIndex(FileIndex):  # type: ignore[misc]
    """A whoosh index whose readers read postings with `_FastLeafMatcher`."""

    @classmethod
    def _reader(
        cls,
        storage: Any,
        schema: Any,
        segments: list[Any],
        generation: int,
        reuse: IndexReader | None = None,
    ) -> IndexReader:
        # whoosh would reuse the readers of `reuse` whose segments are unchanged,
        # but it looks them up by generation instead of segment id and so never
        # does; it closes them all. A segment's deletions can change under the
        # same id, so none are reused here either.
        if reuse is not None:
            reuse.close()
        if not segments:
            return EmptyReader(schema)
        codec = _FastCodec()
        readers = [
            SegmentReader(storage, schema, segment, generation=generation, codec=codec)
            for segment in segments
        ]
        return readers[0] if len(readers) == 1 else MultiReader(readers, generation=generation)
