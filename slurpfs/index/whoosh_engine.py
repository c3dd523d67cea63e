"""The whoosh engine: one in-memory whoosh index per role, sealed into the store.

`MemoryStorage` is the whoosh `Storage` every file of the index goes through:
files live in memory as bytes and are sealed into the store (`SealedIndexStore`)
after each commit; nothing is ever written to a file system. Three whoosh 2.7
traps are closed here on purpose:

* ``RamStorage.temp_storage()`` returns a `FileStorage` in the system temp
  directory, where the posting pool spills sorted runs of plaintext terms.
  `MemoryStorage.temp_storage()` returns another `MemoryStorage` instead.
* The pool writes a run through ``create_file(...).raw_file()`` and closes that
  raw file directly, so ``StructFile.onclose`` never runs (RamStorage loses the
  run silently). Our files are `_CaptureBuffer`s that hand over their bytes on
  any close.
* ``writer(procs>1)`` pickles whole documents to temp files; the writer is
  always a plain single-process `SegmentWriter`.

How a parsed query is searched (whoosh bugs worked around, phrases through the
pair field, faster leaf matchers) is in `slurpfs.index.whoosh_query`.

A word or phrase that names no field searches one catch-all field, ``alltext``,
rather than every default field in turn (an Or of seven posting lists per word,
scored in Python document by document, was too slow at 25,000 documents). It
holds the default free-text fields (`CATCH_ALL_PARTS`); the keyword defaults
(tags, technologies) keep their own fields, matched whole as before. The parts
are separated by `POSITION_GAP` token positions so that a phrase never spans two
fields, and each part's words carry its field boost as their weight (a summary
word counts twice). Beside it, ``allpairs`` holds every two adjacent words of one
part as one term, so that a phrase is a term lookup rather than a check of word
positions in every document holding its words. An index saved with an older
schema is refused on load (`IndexOutdated`) and rebuilt by the service.
"""

from __future__ import annotations

import io
import pickle
import re
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from whoosh import analysis, collectors, fields, qparser, query
from whoosh.filedb.filestore import Storage
from whoosh.filedb.structfile import BufferFile, StructFile
from whoosh.index import FileIndex
from whoosh.searching import Searcher
from whoosh.writing import SegmentWriter

from slurpfs.errors import QueryError
from slurpfs.index.document import (
    DEFAULT_FIELDS,
    FACETS,
    FIELD_BOOSTS,
    TEXT_FIELDS,
    IndexDoc,
)
from slurpfs.index.results import (
    NO_SNIPPET,
    EngineHit,
    EngineResult,
    highlight_words,
    plain_snippet,
)
from slurpfs.index.sealed import IndexOutdated, SealedIndexStore
from slurpfs.index.setup import EngineSetup
from slurpfs.index.whoosh_query import CATCH_ALL, PAIRS, AndNot, FastIndex, prepare

ENGINE = "whoosh"
POOL_LIMIT_MB = 128  # posting pool size before it spills a run (into memory); whoosh's default
TIDY_SEGMENTS = 2  # `tidy` does nothing below this many segments

CATCH_ALL_PARTS = tuple(name for name in DEFAULT_FIELDS if name in TEXT_FIELDS)
"""The default fields `CATCH_ALL` holds, in this order."""
SEARCHED_FIELDS = (CATCH_ALL, *(name for name in DEFAULT_FIELDS if name not in CATCH_ALL_PARTS))
"""The fields a word that names no field searches."""
POSITION_GAP = 100  # token positions between two parts of the catch-all field
_PART_SEP = "\x1f"  # separates the parts of a catch-all value (never inside a word)
_WORD = re.compile(r"[^\W_]+")  # tantivy's default tokenizer: alphanumeric runs


class _CaptureBuffer(io.BytesIO):
    """A file being written that gives its bytes to the storage however it is closed."""

    def __init__(self, on_close: Callable[[bytes], None]) -> None:
        super().__init__()
        self._on_close: Callable[[bytes], None] | None = on_close

    def close(self) -> None:
        if self._on_close is not None and not self.closed:
            on_close, self._on_close = self._on_close, None
            on_close(self.getvalue())
        super().close()


class MemoryStorage(Storage):  # type: ignore[misc]
    """A whoosh storage whose files exist only in this process's memory."""

    supports_mmap = False
    readonly = False

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self._files: dict[str, bytes] = dict(files or {})
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._changed: set[str] = set()
        self.folder = ""  # whoosh reads this attribute of every storage
        self.runs_spilled = 0  # posting runs written to temp storages made here

    # -- what the index layer uses ------------------------------------------------

    def snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._files)

    def take_changed(self) -> set[str]:
        """Names written since the last call (to be sealed)."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return changed

    def mark_changed(self, names: set[str]) -> None:
        with self._lock:
            self._changed |= names & self._files.keys()

    # -- whoosh Storage ---------------------------------------------------------------

    def create_file(self, name: str, **kwargs: Any) -> StructFile:
        def keep(data: bytes) -> None:
            with self._lock:
                self._files[name] = data
                self._changed.add(name)

        return StructFile(_CaptureBuffer(keep), name=name)

    def open_file(self, name: str, **kwargs: Any) -> BufferFile:
        with self._lock:
            data = self._files.get(name)
        if data is None:
            raise NameError(name)
        return _SharedFile(data, name=name)

    def list(self) -> list[str]:
        with self._lock:
            return list(self._files)

    def file_exists(self, name: str) -> bool:
        with self._lock:
            return name in self._files

    def file_length(self, name: str) -> int:
        with self._lock:
            if name not in self._files:
                raise NameError(name)
            return len(self._files[name])

    def file_modified(self, name: str) -> float:
        return 0.0

    def delete_file(self, name: str) -> None:
        with self._lock:
            if self._files.pop(name, None) is None:
                raise NameError(name)
            self._changed.discard(name)

    def rename_file(self, name: str, newname: str, safe: bool = False) -> None:
        with self._lock:
            if name not in self._files:
                raise NameError(name)
            if safe and newname in self._files:
                raise NameError(f"file {newname!r} exists")
            self._files[newname] = self._files.pop(name)
            self._changed.discard(name)
            self._changed.add(newname)

    def lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(name, threading.Lock())

    def temp_storage(self, name: str | None = None) -> _TempStorage:
        return _TempStorage(self)

    def destroy(self, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self._files.clear()


class _SharedFile(BufferFile):  # type: ignore[misc]
    """A read-only in-memory file whose sub-files share its buffer.

    whoosh's `BufferFile.subset` copies the range, and a segment is one compound
    file opened as a subset per part: every reader (re)opened after a commit
    copied the whole segment (its postings run to hundreds of MiB). Here a subset
    is a view of the same bytes, read through `_ViewStream`.
    """

    def __init__(self, buf: bytes | memoryview, name: str | None = None) -> None:
        self._buf = buf
        self._name = name
        self.file: io.BytesIO | _ViewStream = (
            io.BytesIO(buf) if isinstance(buf, bytes) else _ViewStream(buf)
        )  # BytesIO shares a bytes object without copying it, but copies a view
        self.onclose = None
        self.is_real = False
        self.is_closed = False

    def subset(self, position: int, length: int, name: str | None = None) -> _SharedFile:
        view = memoryview(self._buf)[position : position + length]
        return _SharedFile(view, name=name or self._name)


class _ViewStream:
    """The file-object calls whoosh makes of a `_SharedFile`, over a view (no copy)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        start = self._pos
        end = len(self._view) if size is None or size < 0 else min(start + size, len(self._view))
        self._pos = max(start, end)
        return bytes(self._view[start:end])

    def readline(self, size: int | None = -1) -> bytes:
        end = (
            len(self._view) if size is None or size < 0 else min(self._pos + size, len(self._view))
        )
        at = self._pos
        while at < end:  # look for the newline a page at a time, not in a copy of the rest
            found = bytes(self._view[at : min(at + 4096, end)]).find(b"\n")
            if found >= 0:
                return self.read(at + found + 1 - self._pos)
            at += 4096
        return self.read(end - self._pos)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        pass


class _TempStorage(MemoryStorage):
    """A writer's scratch space (posting runs, column buffers): memory only."""

    def __init__(self, owner: MemoryStorage) -> None:
        super().__init__()
        self._owner = owner

    def create_file(self, name: str, **kwargs: Any) -> StructFile:
        if name.endswith(".run"):
            self._owner.runs_spilled += 1
        return super().create_file(name, **kwargs)


class PartsTokenizer(analysis.Tokenizer):  # type: ignore[misc]
    """Words of a catch-all value: parts joined by `_PART_SEP`, each part's words
    weighted by its boost, `POSITION_GAP` positions between two parts.

    A query (one part, no separator) is split into words as `_WORD` splits it.
    Saved indexes name this class in their pickled schema: keep its name and module.
    """

    def __init__(self, boosts: Sequence[float] = ()) -> None:
        super().__init__()
        self.boosts = tuple(boosts)

    def __call__(  # noqa: PLR0913 (whoosh's tokenizer signature)
        self,
        value: str,
        positions: bool = False,
        chars: bool = False,
        keeporiginal: bool = False,
        removestops: bool = True,
        start_pos: int = 0,
        start_char: int = 0,
        tokenize: bool = True,
        mode: str = "",
        **kwargs: Any,
    ) -> Iterator[analysis.Token]:
        t = analysis.Token(positions, chars, removestops=removestops, mode=mode, **kwargs)
        if not tokenize:
            t.original = t.text = value
            t.boost = 1.0
            if positions:
                t.pos = start_pos
            if chars:
                t.startchar, t.endchar = start_char, start_char + len(value)
            yield t
            return
        pos, offset = start_pos, start_char
        for i, part in enumerate(value.split(_PART_SEP)):
            boost = self.boosts[i] if i < len(self.boosts) else 1.0
            for match in _WORD.finditer(part):
                t.text = match.group(0)
                t.boost = boost
                t.stopped = False
                if keeporiginal:
                    t.original = t.text
                if positions:
                    t.pos = pos
                if chars:
                    t.startchar, t.endchar = offset + match.start(), offset + match.end()
                pos += 1
                yield t
            pos += POSITION_GAP
            offset += len(part) + len(_PART_SEP)


class PairsTokenizer(PartsTokenizer):
    """Each two adjacent words of one part of a catch-all value, lower-cased, as one
    token ``"w1 w2"`` weighted by the part's boost: no pair spans two parts.

    Words never hold a space, so a pair names its two words unambiguously.
    Saved indexes name this class in their pickled schema: keep its name and module.
    """

    def __call__(  # noqa: PLR0913 (whoosh's tokenizer signature)
        self,
        value: str,
        positions: bool = False,
        chars: bool = False,
        keeporiginal: bool = False,
        removestops: bool = True,
        start_pos: int = 0,
        start_char: int = 0,
        tokenize: bool = True,
        mode: str = "",
        **kwargs: Any,
    ) -> Iterator[analysis.Token]:
        if not tokenize:
            yield from super().__call__(
                value, positions, chars, keeporiginal, removestops, start_pos, start_char,
                tokenize, mode, **kwargs,
            )  # fmt: skip
            return
        pair = analysis.Token(positions, False, removestops=removestops, mode=mode, **kwargs)
        previous, previous_pos = "", -2
        n = start_pos
        words = super().__call__(value, positions=True, mode=mode, **kwargs)
        for word in words:
            text = word.text.lower()
            if word.pos == previous_pos + 1:
                pair.text = f"{previous} {text}"
                pair.boost = word.boost
                pair.stopped = False
                if keeporiginal:
                    pair.original = pair.text
                if positions:
                    pair.pos = n
                    n += 1
                yield pair
            previous, previous_pos = text, word.pos


def _catch_all(doc: IndexDoc) -> str:
    return _PART_SEP.join(
        str(getattr(doc, name)).replace(_PART_SEP, " ") for name in CATCH_ALL_PARTS
    )


def schema() -> fields.Schema:
    """The index schema; analysers match tantivy's default tokenizer (alphanumeric
    runs, lower-cased, no stemming, no stop words) so both engines find the same."""
    words = analysis.RegexTokenizer(_WORD.pattern) | analysis.LowercaseFilter()
    boosts = [FIELD_BOOSTS.get(name, 1.0) for name in CATCH_ALL_PARTS]
    catch_all = PartsTokenizer(boosts) | analysis.LowercaseFilter()
    pairs = PairsTokenizer(boosts)

    def text(stored: bool = False) -> fields.TEXT:
        return fields.TEXT(analyzer=words, stored=stored)

    def keyword() -> fields.KEYWORD:
        return fields.KEYWORD(lowercase=True, commas=True, scorable=True, stored=True)

    return fields.Schema(
        key=fields.ID(unique=True, stored=True),
        address=fields.STORED(),
        file_role=fields.ID(stored=True),
        version=fields.STORED(),
        hlc=fields.STORED(),
        excerpt=fields.STORED(),
        # A query word the tokenizer splits (e.g. "utf8_decode") is a phrase, as
        # tantivy's parser makes it, so its words stay together within one part.
        alltext=fields.TEXT(analyzer=catch_all, multitoken_query="phrase"),
        # Phrases of alltext are looked up here (whoosh_query.PairPhrase): counts
        # and weights only, no positions.
        allpairs=fields.TEXT(analyzer=pairs, phrase=False),
        content=text(),
        summary=text(stored=True),
        purpose=text(),
        insights=text(),
        influences=text(),
        path=text(),
        tags=keyword(),
        technologies=keyword(),
        agent=fields.ID(),
        role=fields.ID(),
        project=fields.ID(stored=True),
        task=fields.ID(),
    )


def _fields(doc: IndexDoc) -> dict[str, Any]:
    catch_all = _catch_all(doc)
    return {
        "key": doc.key,
        "address": doc.address,
        "file_role": doc.file_role,
        "version": doc.version,
        "hlc": doc.hlc,
        "excerpt": doc.excerpt,
        CATCH_ALL: catch_all,
        PAIRS: catch_all,
        "content": doc.content,
        "summary": doc.summary,
        "purpose": doc.purpose,
        "insights": doc.insights,
        "influences": doc.influences,
        "path": doc.path,
        "tags": ",".join(doc.tags),
        "technologies": ",".join(doc.technologies),
        "agent": doc.agent,
        "role": doc.role,
        "project": doc.project,
        "task": doc.task,
    }


class _CountingCollector(collectors.TopCollector):  # type: ignore[misc]
    """Top hits, plus the total and facet counts of every match, in one pass.

    Block-quality skipping and quality-driven matcher replacement are off so
    that every match is seen (and counted); `total` is the collector's own count
    of matches.
    """

    matcher: Any  # whoosh's matcher of the current segment

    def __init__(
        self, limit: int, facets: Callable[[Searcher], dict[str, list[list[str]]] | None]
    ) -> None:
        super().__init__(limit=limit, usequality=False, replace=0)
        self._facets = facets
        self._values: dict[str, list[list[str]]] | None = None
        self.counts: dict[str, dict[str, int]] = {name: {} for name in FACETS}

    def set_subsearcher(self, subsearcher: Searcher, offset: int) -> None:
        super().set_subsearcher(subsearcher, offset)
        # Drop sub-matchers with nothing to match in this segment (a word absent
        # from a field): a word that names no field is an Or over `SEARCHED_FIELDS`
        # (most words are in no tag), and each inactive branch still costs a call
        # per candidate document.
        # `replace(0)` removes only inactive branches; every match is still seen.
        self.matcher = self.matcher.replace(0)
        self._values = self._facets(subsearcher)

    def collect(self, sub_docnum: int) -> Any:
        values = self._values
        if values is not None:
            for name, bucket in self.counts.items():
                for value in values[name][sub_docnum]:
                    bucket[value] = bucket.get(value, 0) + 1
        return super().collect(sub_docnum)


class WhooshIndex:
    """One role's whoosh index. Thread-safe: one writer at a time, searches
    serialised on the open searcher (whoosh readers share file positions)."""

    engine = ENGINE
    persistent = True

    def __init__(
        self, role: str, sealed: SealedIndexStore, storage: MemoryStorage, seq: int
    ) -> None:
        self.role = role
        self.seq = seq
        self._sealed = sealed
        self._storage = storage
        self._ix = FastIndex(storage)
        self._parser = qparser.MultifieldParser(
            list(SEARCHED_FIELDS),
            self._ix.schema,
            fieldboosts={k: v for k, v in FIELD_BOOSTS.items() if k in SEARCHED_FIELDS},
        )
        self._parser.add_plugin(qparser.PlusMinusPlugin())
        self._write_lock = threading.Lock()
        self._writer: SegmentWriter | None = None  # changes not committed yet (see write)
        self._search_lock = threading.Lock()
        self._searcher: Searcher = self._ix.searcher()
        # Counting through the index opens a reader of every segment: count once
        # per commit, from the searcher that commit refreshed.
        self._docs = int(self._searcher.doc_count())
        self._facet_cache: dict[str, dict[str, list[list[str]]]] = {}

    @classmethod
    def create(cls, role: str, setup: EngineSetup) -> WhooshIndex:
        """A new, empty index (not saved until the first write)."""
        storage = MemoryStorage()
        storage.create_index(schema())
        return cls(role, setup.sealed, storage, 0)

    @classmethod
    def load(cls, role: str, setup: EngineSetup) -> WhooshIndex | None:
        """The saved index, or None. IndexRollback/IndexCorrupt/KeyMissing as `sealed.load`;
        `IndexOutdated` if it was saved with another schema than `schema()`."""
        loaded = setup.sealed.load(ENGINE)
        if loaded is None:
            return None
        meta, files = loaded
        storage = MemoryStorage(files)
        try:
            saved = FileIndex(storage).schema
        except (AttributeError, ImportError, pickle.UnpicklingError) as exc:
            # The TOC pickles the schema: one that names a class this version does
            # not have (an index written by a newer slurpfs) is rebuilt, not fatal.
            raise IndexOutdated(
                f"the saved whoosh index of role {role!r} has a schema this version "
                f"cannot read ({type(exc).__name__}: {exc})"
            ) from None
        current = schema()
        if sorted(saved.names()) != sorted(current.names()) or any(
            saved[name] != current[name] for name in current.names()
        ):
            raise IndexOutdated(
                f"the saved whoosh index of role {role!r} has an older schema "
                f"(fields: {', '.join(sorted(saved.names()))})"
            )
        return cls(role, setup.sealed, storage, meta.seq)

    @property
    def runs_spilled(self) -> int:
        return self._storage.runs_spilled

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
        """Replace/remove documents by key, commit, refresh the searcher, save sealed.

        Without `commit` the changes wait in an open writer for the next write
        that commits (`seq` and `save` apply then): a build adds all its batches to
        one segment. whoosh searches an index one segment at a time, and with a
        segment per 2,000-document batch that was a quarter of a query's time.

        Without `merge` the commit writes its own segment and merges none of the
        existing ones (whoosh's policy otherwise merges small segments now and
        then, 100-150 ms of work that holds the interpreter lock in long
        stretches while the FUSE loop waits); `tidy` merges them later.
        """
        with self._write_lock:
            writer = self._writer
            if writer is None and (upserts or deletes):
                writer = SegmentWriter(self._ix, limitmb=POOL_LIMIT_MB)
            if writer is not None:
                try:
                    if self._docs:
                        # The open searcher reflects the last commit, which is the
                        # writer's starting point (writes are serialised here), so
                        # its document numbers are the writer's; no second reader
                        # of every segment is opened.
                        with self._search_lock:
                            for key in {*deletes, *(d.key for d in upserts)}:
                                writer.delete_by_term("key", key, searcher=self._searcher)
                    for doc in upserts:
                        writer.add_document(**_fields(doc))
                except BaseException:
                    self._writer = None
                    writer.cancel()
                    raise
            if not commit:
                self._writer = writer
                return
            self._writer = None
            if writer is not None:
                writer.commit(merge=merge)
            self._committed(seq, save=save)

    def tidy(self) -> bool:
        """Merge small segments as a commit with `merge` would have (`write`)."""
        with self._write_lock:
            before = self.segments()
            if self._writer is not None or before < TIDY_SEGMENTS:
                return False
            SegmentWriter(self._ix, limitmb=POOL_LIMIT_MB).commit(merge=True)
            self._committed(self.seq, save=True)
            return self.segments() < before

    def segments(self) -> int:
        with self._search_lock:
            return len(self._searcher.leaf_searchers())

    def _committed(self, seq: int, *, save: bool) -> None:
        """After a commit: the new searcher, facet caches of gone segments, the save."""
        self.seq = seq
        with self._search_lock:
            self._searcher = self._searcher.refresh()
            self._docs = int(self._searcher.doc_count())
            live = {
                str(segment.segment_id())
                for leaf, _ in self._searcher.leaf_searchers()
                if (segment := leaf.reader().segment()) is not None
            }
            for segid in set(self._facet_cache) - live:
                del self._facet_cache[segid]
        if save:
            self.save()

    def save(self) -> None:
        """Seal what changed since the last save into the store (one transaction)."""
        files = self._storage.snapshot()
        changed = self._storage.take_changed()
        try:
            self._sealed.save(ENGINE, files, changed, seq=self.seq, docs=self._docs)
        except BaseException:
            self._storage.mark_changed(changed)  # still to be sealed by the next save
            raise

    def doc_count(self) -> int:
        return self._docs

    def documents(self) -> dict[str, str]:
        """key -> hex version id of every document (for consistency checks)."""
        with self._search_lock:
            return {
                fields_["key"]: fields_["version"] for fields_ in self._searcher.all_stored_fields()
            }

    def search(
        self, text: str, *, file_roles: frozenset[str] | None, limit: int, snippets: bool = True
    ) -> EngineResult:
        try:
            q = self._parser.parse(text).accept(prepare)
        except (NotImplementedError, IndexError):
            # whoosh 2.7's parser fails on some combinations check_syntax lets
            # through, e.g. "(a -b) OR c" and "NOT NOT a".
            raise QueryError(
                f"the query {text!r} cannot be parsed: try simpler groups and operators"
            ) from None
        words = {
            term
            for field, term in q.iter_all_terms(phrases=True)
            if field not in ("file_role", "key") and isinstance(term, str)
        }
        with self._search_lock:
            if file_roles is not None:
                # AndNot keeps q's scores (whoosh's Require does not filter correctly).
                present = {t.decode() for t in self._searcher.lexicon("file_role")}
                others = sorted(present - file_roles)
                if others:
                    q = AndNot(q, query.Or([query.Term("file_role", r) for r in others]))
            collector = _CountingCollector(limit, self._segment_facets)
            self._searcher.search_with_collector(q, collector)
            hits = []
            for hit in collector.results():
                stored = hit.fields()
                summary = stored.get("summary", "")
                snippet = NO_SNIPPET
                if snippets:
                    excerpt = stored.get("excerpt", "")
                    snippet = (
                        highlight_words(excerpt, words)
                        or highlight_words(summary, words)
                        or plain_snippet(summary, excerpt)
                    )
                hits.append(
                    EngineHit(
                        score=float(hit.score or 0.0),
                        address=stored["address"],
                        file_role=stored["file_role"],
                        version=stored["version"],
                        hlc=int(stored["hlc"]),
                        summary=summary,
                        snippet=snippet,
                    )
                )
        return EngineResult(hits, int(collector.total), collector.counts)

    def _segment_facets(self, leaf: Searcher) -> dict[str, list[list[str]]] | None:
        # Segments are immutable, so their facet values are read once per segment
        # from the postings (deletions only hide documents, never change them).
        reader = leaf.reader()
        segment = reader.segment()
        if segment is None:
            return None
        segid = str(segment.segment_id())
        cached = self._facet_cache.get(segid)
        if cached is None:
            cached = {}
            n = reader.doc_count_all()
            for name in FACETS:
                lists: list[list[str]] = [[] for _ in range(n)]
                if name in reader.indexed_field_names():
                    for btext in reader.lexicon(name):
                        word = btext.decode("utf-8")
                        for docid in reader.postings(name, btext).all_ids():
                            lists[docid].append(word)
                cached[name] = lists
            self._facet_cache[segid] = cached
        return cached

    def close(self) -> None:
        with self._write_lock:
            if self._writer is not None:
                self._writer.cancel()
                self._writer = None
        with self._search_lock:
            self._searcher.close()
            self._facet_cache.clear()
