"""The tantivy engine: one tantivy index per role, held in RAM only.

Tantivy offers no pluggable storage, so its index never leaves memory: it is
built from the store when the search service opens (decrypting every head the
role may read) and kept current by the indexer. Nothing of it reaches a file
system. Opening therefore costs a rebuild; in exchange queries and indexing
are one to two orders of magnitude faster than whoosh.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

import tantivy

from slurpfs.errors import QueryError
from slurpfs.index.document import DEFAULT_FIELDS, FACETS, FIELD_BOOSTS, IndexDoc
from slurpfs.index.results import (
    MARK_CLOSE,
    MARK_OPEN,
    NO_SNIPPET,
    EngineHit,
    EngineResult,
    Snippet,
    clean_text,
    plain_snippet,
    snippet_from_marked,
)
from slurpfs.index.setup import EngineSetup

ENGINE = "tantivy"
WRITER_HEAP = 64 << 20
FACET_BUCKETS = 100
_LOWER_RAW = "slurp_lower_raw"  # whole value as one term, lower-cased: tags, technologies
_TEXT = ("content", "summary", "purpose", "insights", "influences", "path")
_EXACT = ("agent", "role", "project", "task")


def _schema() -> tantivy.Schema:
    b = tantivy.SchemaBuilder()
    b.add_text_field("key", stored=True, tokenizer_name="raw")
    b.add_text_field("address", stored=True, tokenizer_name="raw")
    b.add_text_field("file_role", stored=True, tokenizer_name="raw")
    b.add_text_field("version", stored=True, tokenizer_name="raw")
    b.add_unsigned_field("hlc", stored=True)
    b.add_bytes_field("excerpt", stored=True, indexed=False)
    for name in _TEXT:
        b.add_text_field(name, stored=name == "summary")
    for name in ("tags", "technologies"):
        b.add_text_field(name, stored=True, fast=True, tokenizer_name=_LOWER_RAW)
    for name in _EXACT:
        b.add_text_field(
            name, stored=name == "project", fast=name == "project", tokenizer_name="raw"
        )
    return b.build()


def _document(doc: IndexDoc) -> tantivy.Document:
    d = tantivy.Document()
    for name in ("key", "address", "file_role", "version", *_TEXT, *_EXACT):
        d.add_text(name, getattr(doc, "key" if name == "key" else name))
    d.add_unsigned("hlc", doc.hlc)
    d.add_bytes("excerpt", doc.excerpt.encode())
    for name in ("tags", "technologies"):
        for value in getattr(doc, name):
            d.add_text(name, value)
    return d


def _marked(fragment: str, ranges: list[tuple[int, int]]) -> str:
    """Wrap byte ranges of a UTF-8 fragment in highlight marks."""
    raw = fragment.encode()
    out: list[str] = []
    at = 0
    for start, end in sorted(ranges):
        if start < at:
            continue
        out += [
            raw[at:start].decode(errors="ignore"),
            MARK_OPEN,
            raw[start:end].decode(errors="ignore"),
            MARK_CLOSE,
        ]
        at = end
    out.append(raw[at:].decode(errors="ignore"))
    return "".join(out)


class TantivyIndex:
    """One role's tantivy index in RAM. Thread-safe (one writer at a time)."""

    engine = ENGINE
    persistent = False

    def __init__(self, role: str) -> None:
        self.role = role
        self.seq = 0
        self._schema = _schema()
        self._index = tantivy.Index(self._schema)  # no path: a RAM directory
        lower_raw = (
            tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.raw())
            .filter(tantivy.Filter.lowercase())
            .build()
        )
        self._index.register_tokenizer(_LOWER_RAW, lower_raw)
        self._index.register_fast_field_tokenizer(_LOWER_RAW, lower_raw)
        self._writer = self._index.writer(heap_size=WRITER_HEAP, num_threads=1)
        self._lock = threading.Lock()
        self._searcher = self._index.searcher()

    @classmethod
    def create(cls, role: str, setup: EngineSetup) -> TantivyIndex:
        return cls(role)

    @classmethod
    def load(cls, role: str, setup: EngineSetup) -> TantivyIndex | None:
        """Nothing is kept at rest: the service rebuilds a tantivy index at open."""
        return None

    def write(
        self,
        upserts: Sequence[IndexDoc],
        deletes: Collection[str],
        *,
        seq: int,
        save: bool = True,
        commit: bool = True,
        merge: bool = True,
    ) -> None:
        # Always committed: tantivy merges its segments in its own threads.
        with self._lock:
            if upserts or deletes:
                if self._searcher.num_docs:
                    for key in {*deletes, *(d.key for d in upserts)}:
                        self._writer.delete_documents_by_term("key", key)
                for doc in upserts:
                    self._writer.add_document(_document(doc))
                self._writer.commit()
                self._index.reload()
                self._searcher = self._index.searcher()
            self.seq = seq

    def save(self) -> None:
        """Nothing to save: this index lives in memory only."""

    def tidy(self) -> bool:
        """Nothing to do: tantivy merges in its own threads, outside the interpreter."""
        return False

    def doc_count(self) -> int:
        return int(self._searcher.num_docs)

    def documents(self) -> dict[str, str]:
        searcher = self._searcher
        out: dict[str, str] = {}
        if searcher.num_docs:
            result = searcher.search(tantivy.Query.all_query(), limit=searcher.num_docs)
            for _score, address in result.hits:
                doc = searcher.doc(address)
                out[str(doc.get_first("key"))] = str(doc.get_first("version"))
        return out

    def _parse(self, text: str) -> tantivy.Query:
        try:
            return self._index.parse_query(
                text,
                default_field_names=list(DEFAULT_FIELDS),
                field_boosts=FIELD_BOOSTS,
                conjunction_by_default=True,
            )
        except ValueError as exc:
            raise QueryError(f"the query {text!r} does not parse: {exc}") from None

    def search(
        self, text: str, *, file_roles: frozenset[str] | None, limit: int, snippets: bool = True
    ) -> EngineResult:
        q = self._parse(text)
        if file_roles is not None:
            only = tantivy.Query.term_set_query(self._schema, "file_role", sorted(file_roles))
            q = tantivy.Query.boolean_query(
                [
                    (tantivy.Occur.Must, q),
                    (tantivy.Occur.Must, tantivy.Query.const_score_query(only, 0.0)),
                ]
            )
        searcher = self._searcher
        try:
            result = searcher.search(q, limit=limit, count=True)
        except ValueError as exc:  # e.g. a name tantivy took for a field: "/ :x"
            raise QueryError(f"the query {text!r} cannot be run: {exc}") from None
        generator = None
        if snippets:
            generator = tantivy.SnippetGenerator.create(searcher, q, self._schema, "content")
            generator.set_max_num_chars(200)
        hits = []
        for score, address in result.hits:
            doc = searcher.doc(address)
            summary = str(doc.get_first("summary") or "")
            snippet = NO_SNIPPET if generator is None else self._snippet(generator, doc, summary)
            hits.append(
                EngineHit(
                    score=float(score),
                    address=str(doc.get_first("address")),
                    file_role=str(doc.get_first("file_role")),
                    version=str(doc.get_first("version")),
                    hlc=int(doc.get_first("hlc") or 0),
                    summary=summary,
                    snippet=snippet,
                )
            )
        facets: dict[str, dict[str, int]] = {name: {} for name in FACETS}
        total = int(getattr(result, "count", 0) or 0)  # missing from the stub
        if total:
            aggs = searcher.aggregate(
                q, {name: {"terms": {"field": name, "size": FACET_BUCKETS}} for name in FACETS}
            )
            for name in FACETS:
                for bucket in aggs.get(name, {}).get("buckets", []):
                    facets[name][str(bucket["key"])] = int(bucket["doc_count"])
        return EngineResult(hits, total, facets)

    @staticmethod
    def _snippet(
        generator: tantivy.SnippetGenerator, doc: tantivy.Document, summary: str
    ) -> Snippet:
        excerpt = clean_text(bytes(doc.get_first("excerpt") or b"").decode(errors="replace"))
        if excerpt:
            found = generator.snippet_from_doc(tantivy.Document(content=excerpt))
            ranges = [(r.start, r.end) for r in found.highlighted()]
            if ranges:
                return snippet_from_marked(_marked(found.fragment(), ranges))
        return plain_snippet(summary, excerpt)

    def close(self) -> None:
        with self._lock:
            self._writer.wait_merging_threads()
