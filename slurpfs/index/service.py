"""The search service: per-role indexes kept in step with the store, and queries.

One index per *reader* role this node holds a key for. A context written for
role F is indexed in the index of every role that may read F (F itself and its
configured readers), so each index holds exactly what its role may see: term
statistics, scores, snippets and facet counts of one role are never influenced
by contexts it may not read.

The store's change log is the single source of truth for what to index:
`catch_up` applies every change after the sequence an index reflects, whoever
committed it (this process, another process, replication), so a missed
notification can only delay indexing, never lose it. Applying is idempotent.

Thread-safe: searches run concurrently with indexing; index writes are
serialised. The FUSE layer and the CLI call `search`; the daemon's `Indexer`
calls `catch_up`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from slurpfs import frontmatter
from slurpfs.errors import AccessDenied, BodyUnavailable, Corrupt, KeyMissing, QueryError
from slurpfs.index.document import FACETS, MAX_INDEXED_CHARS, IndexDoc, doc_key, extract
from slurpfs.index.engine import ENGINES, RoleIndex, engine_setup, read_version
from slurpfs.index.query import MAX_LIMIT, check_syntax
from slurpfs.index.results import EngineResult, SearchHit, SearchResult
from slurpfs.index.sealed import IndexConflict, IndexCorrupt, IndexOutdated, SealedIndexStore
from slurpfs.index.setup import EngineSetup
from slurpfs.model import ContextStore

log = logging.getLogger("slurpfs.index")

BUILD_BATCH = 2000  # documents handed to a role index at a time while building
CATCH_UP_BATCH = 2000  # change-log entries per index commit while catching up
FACET_LIMIT = 50  # values listed per facet

Progress = Callable[[int, int], None]  # (contexts done, contexts in all)


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """What one `catch_up` (or build) did."""

    indexed: int = 0  # documents written, counted once per role index
    removed: int = 0  # removals applied, likewise (a removal may find nothing to remove)
    skipped: int = 0  # versions that failed authentication: never indexed
    seq: int = 0  # change sequence now reflected
    oldest_hlc: int | None = None  # HLC of the oldest change applied (for lag)

    def __add__(self, other: ApplyReport) -> ApplyReport:
        hlcs = [h for h in (self.oldest_hlc, other.oldest_hlc) if h is not None]
        return ApplyReport(
            self.indexed + other.indexed,
            self.removed + other.removed,
            self.skipped + other.skipped,
            max(self.seq, other.seq),
            min(hlcs) if hlcs else None,
        )


@dataclass(frozen=True, slots=True)
class SearchStatistics:
    engine: str
    documents: dict[str, int]  # role index -> documents
    seq: int
    indexed: int
    removed: int
    skipped: int
    rebuilt: tuple[str, ...]  # role indexes built from the store when opened
    searches: int
    query_errors: int
    remote: int = 0  # contexts not indexed: their bodies are held by other members


class SearchService:
    """Per-role indexes of one node's contexts, and the query API over them."""

    def __init__(self, model: ContextStore, engine: str) -> None:
        if engine not in ENGINES:
            raise QueryError(f"unknown search engine {engine!r}")
        self.model = model
        self.engine = engine
        self._type = ENGINES[engine]
        self._indexes: dict[str, RoleIndex] = {}
        self._setups: dict[str, EngineSetup] = {}
        self._apply_lock = threading.RLock()
        self._stale: set[tuple[str, str]] = set()
        self._rebuilt: list[str] = []
        self._totals = ApplyReport()
        self._remote = 0  # heads not indexed: their bodies are held by other members
        self._searches = self._query_errors = 0

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        model: ContextStore,
        *,
        engine: str | None = None,
        catch_up: bool = True,
        progress: Progress | None = None,
    ) -> SearchService:
        """Open (or build) the index of every role this node holds a key for.

        A saved index is opened, not rebuilt. One that fails authentication or is
        an older set than its manifest names is refused, logged as an error and
        rebuilt from the store; one saved with an older schema is rebuilt too (an
        INFO line). With `catch_up`, changes committed since the index was saved
        are applied before returning.
        """
        service = cls(model, engine or model.config.search.engine)
        missing: list[str] = []
        roles = sorted(model.held_roles())
        for role in roles:
            sealed = SealedIndexStore(model.store, lambda: model.keyring, role)
            setup = engine_setup(model, sealed, roles=len(roles), text=service._body)
            service._setups[role] = setup
            index = service._load(role, setup)
            if index is None:
                index = service._type.create(role, setup)
                missing.append(role)
            service._indexes[role] = index
        if missing:
            service._build({r: service._indexes[r] for r in missing}, progress)
        if catch_up:
            service.catch_up()
        return service

    def _load(self, role: str, setup: EngineSetup) -> RoleIndex | None:
        try:
            return self._type.load(role, setup)
        except IndexCorrupt as exc:
            log.error("search index of role %s refused, rebuilding it: %s", role, exc)
        except IndexOutdated as exc:
            log.info("search index of role %s is out of date, rebuilding it: %s", role, exc)
        except KeyMissing as exc:
            log.warning("search index of role %s cannot be opened, rebuilding it: %s", role, exc)
        setup.sealed.purge()
        return None

    def _body(self, address: str, role: str, version: str) -> str | None:
        """The body text a version was indexed from (engines cut snippets from it)."""
        record = self.model.store.record(bytes.fromhex(version))
        if record is None or (record.address, record.role) != (address, role):
            return None
        try:
            data = read_version(self.model, record)
        except (Corrupt, KeyMissing, BodyUnavailable):
            return None
        return frontmatter.parse(data).body[:MAX_INDEXED_CHARS]

    def close(self) -> None:
        with self._apply_lock:
            for index in self._indexes.values():
                index.close()
            self._indexes = {}

    def __enter__(self) -> SearchService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def roles(self) -> tuple[str, ...]:
        """The role indexes this service keeps."""
        return tuple(sorted(self._indexes))

    def doc_count(self, role: str) -> int:
        return self._indexes[role].doc_count()

    @property
    def seq(self) -> int:
        """The store change sequence every index reflects."""
        return min((i.seq for i in self._indexes.values()), default=0)

    # -- indexing ------------------------------------------------------------------

    def _targets(self, file_role: str, among: Collection[str]) -> list[str]:
        """Role indexes (among `among`) that hold contexts written for `file_role`."""
        if file_role not in self.model.config.roles:
            return []
        return [r for r in self.model.config.readers_of(file_role) if r in among]

    def _document(self, address: str, role: str) -> tuple[IndexDoc | None, int, int | None]:
        """(document or None if it must not be indexed, skipped count, hlc)."""
        head = self.model.store.head(address, role)
        if head is None or head.deleted:
            return None, 0, None
        if (head.address, head.role) != (address, role):
            log.error("not indexing %s [%s]: its head belongs to another context", address, role)
            return None, 1, head.hlc
        try:
            data = read_version(self.model, head)
        except Corrupt as exc:
            log.error("not indexing %s [%s]: %s", address, role, exc)
            return None, 1, head.hlc
        except KeyMissing:
            return None, 0, head.hlc
        except BodyUnavailable:
            # Held by other members (placement): indexed where a body is held, not
            # fetched here (that would copy every body to every node).
            self._remote += 1
            return None, 0, head.hlc
        return extract(head, data), 0, head.hlc

    def _apply(
        self, contexts: Iterable[tuple[str, str]], seq: int, *, merge: bool = True
    ) -> ApplyReport:
        upserts: dict[str, list[IndexDoc]] = {r: [] for r in self._indexes}
        deletes: dict[str, set[str]] = {r: set() for r in self._indexes}
        skipped = 0
        hlcs: list[int] = []
        for address, role in dict.fromkeys(contexts):
            targets = self._targets(role, self._indexes)
            if not targets:
                continue
            doc, bad, hlc = self._document(address, role)
            skipped += bad
            if hlc is not None:
                hlcs.append(hlc)
            for target in targets:
                if doc is None:
                    deletes[target].add(doc_key(address, role))
                else:
                    upserts[target].append(doc)
        for role, index in self._indexes.items():
            self._write(role, index, upserts[role], deletes[role], seq, merge=merge)
        return ApplyReport(
            indexed=sum(len(v) for v in upserts.values()),
            removed=sum(len(v) for v in deletes.values()),
            skipped=skipped,
            seq=seq,
            oldest_hlc=min(hlcs) if hlcs else None,
        )

    def _write(  # noqa: PLR0913
        self,
        role: str,
        index: RoleIndex,
        docs: list[IndexDoc],
        keys: set[str],
        seq: int,
        *,
        merge: bool = True,
    ) -> None:
        # A replaced index is not closed: a search may still be running on it
        # (garbage collection frees it); the dict is replaced, never mutated.
        try:
            index.write(docs, keys, seq=seq, merge=merge)
        except (IndexConflict, IndexCorrupt, KeyMissing) as exc:
            self._replace(role, exc)

    def _replace(self, role: str, exc: IndexConflict | IndexCorrupt | KeyMissing) -> None:
        """After a write, save or search of `role`'s index failed with `exc`."""
        if isinstance(exc, IndexCorrupt):
            # Damage found in use (an engine that reads its index on demand): never
            # served again; built afresh from the store, which is the truth.
            log.error("search index of role %s refused, rebuilding it: %s", role, exc)
            self._setups[role].sealed.purge()
            with self._apply_lock:
                fresh = {role: self._type.create(role, self._setups[role])}
                self._build(fresh, None)
                self._indexes = {**self._indexes, **fresh}
        elif isinstance(exc, IndexConflict):
            # Another process saved this index: take its version; the next
            # catch-up (from its sequence) re-applies whatever it lacks.
            log.info("search index of role %s was saved elsewhere; reloading it", role)
            setup = self._setups[role]
            fresh_index = self._load(role, setup) or self._type.create(role, setup)
            self._indexes = {**self._indexes, role: fresh_index}
        else:
            # The role's key was dropped from this node meanwhile: it no longer
            # reads the role, so it keeps no index of it either.
            log.warning("dropping the search index of role %s: %s", role, exc)
            self._indexes = {r: i for r, i in self._indexes.items() if r != role}

    def catch_up(
        self, *, batch: int = CATCH_UP_BATCH, limit: int | None = None, merge: bool = True
    ) -> ApplyReport:
        """Apply the changes in the store's change log that the indexes lack.

        Every change when `limit` is None, else at least the next `limit` (fewer
        only if no more are logged): the background indexer applies a long backlog
        in such steps, each one engine commit, so that it can pause between them.
        `pending` tells whether changes are left. Without `merge` the commits
        merge no segments (while the mount is busy); `tidy` merges them later.

        Blocking (decrypts and commits): run it in a worker thread from async code.
        """
        store = self.model.store
        report = ApplyReport(seq=min((i.seq for i in self._indexes.values()), default=0))
        applied = 0
        with self._apply_lock:
            while self._indexes and (limit is None or applied < limit):
                start = min(i.seq for i in self._indexes.values())
                step = batch if limit is None else max(1, min(batch, limit - applied))
                last, records = store.changes_since(start, limit=step)
                stale, self._stale = self._stale, set()
                if last == start and not stale:
                    break
                contexts = [*((r.address, r.role) for r in records), *stale]
                report = report + self._apply(contexts, last, merge=merge)
                applied += len(records)
            self._totals = self._totals + report
        return report

    def forget(self, contexts: Iterable[tuple[str, str]]) -> None:
        """(address key, file role) removed without a change record (a TTL purge):
        the next `catch_up` takes them out of the indexes."""
        self._stale.update(contexts)

    def tidy(self) -> bool:
        """Merge what commits without `merge` left unmerged; whether any index did.

        Blocking: run it in a worker thread from async code.
        """
        tidied = False
        with self._apply_lock:
            for role, index in self._indexes.items():  # replaced, never mutated
                try:
                    tidied = index.tidy() or tidied
                except (IndexConflict, IndexCorrupt, KeyMissing) as exc:
                    self._replace(role, exc)
        return tidied

    def pending(self) -> bool:
        """Whether the store logged changes the indexes do not reflect yet (or
        contexts removed without a change record are waiting to be dropped)."""
        return bool(self._indexes) and (bool(self._stale) or self.seq < self.model.store.sequence())

    def _build(self, indexes: dict[str, RoleIndex], progress: Progress | None) -> ApplyReport:
        """Index every live context into the given empty role indexes, then save them."""
        store = self.model.store
        report = ApplyReport()
        with self._apply_lock:
            seq = store.sequence()  # changes after this are caught up later
            contexts = [(a, r) for a, r, _ in store.iter_contexts() if self._targets(r, indexes)]
            # Each role index takes BUILD_BATCH documents of its own at a time, not
            # BUILD_BATCH contexts read; it commits them all at the end (for whoosh
            # one segment: it searches every segment of an index in turn).
            pending: dict[str, list[IndexDoc]] = {r: [] for r in indexes}
            for n, (address, role) in enumerate(contexts, 1):
                doc, bad, _ = self._document(address, role)
                report = report + ApplyReport(skipped=bad)
                if doc is not None:
                    for target in self._targets(role, indexes):
                        pending[target].append(doc)
                for target, docs in pending.items():
                    if docs and (len(docs) >= BUILD_BATCH or n == len(contexts)):
                        indexes[target].write(docs, (), seq=0, save=False, commit=False)
                        report = report + ApplyReport(indexed=len(docs))
                        docs.clear()
                if progress is not None:
                    progress(n, len(contexts))
            for role, index in indexes.items():
                try:
                    index.write([], (), seq=seq)
                except IndexConflict:
                    # Another process saved this index while we built it: ours is
                    # complete up to `seq`, so it replaces theirs.
                    self._setups[role].sealed.take_over()
                    index.write([], (), seq=seq)
                self._rebuilt.append(role)
            self._totals = self._totals + report
        log.info("built search indexes %s: %d documents", ", ".join(indexes), report.indexed)
        return report

    def rebuild(
        self, roles: Collection[str] | None = None, *, progress: Progress | None = None
    ) -> int:
        """Rebuild role indexes from the store (all by default); returns documents indexed.

        The old indexes keep answering queries until the new ones replace them.
        `KeyMissing` for a role this node keeps no index for.
        """
        chosen = sorted(self._indexes if roles is None else roles)
        for role in chosen:
            if role not in self._indexes:
                raise KeyMissing(f"this node keeps no search index for role {role!r}")
        with self._apply_lock:
            fresh = {r: self._type.create(r, self._setups[r]) for r in chosen}
            report = self._build(fresh, progress)
            self._indexes = {**self._indexes, **fresh}  # the old ones: see _write
        self.catch_up()
        return report.indexed

    # -- queries ---------------------------------------------------------------------

    def _plan(
        self, caller_roles: Collection[str], role: str | None
    ) -> dict[str, frozenset[str] | None]:
        """Which role indexes to search, each restricted to which file roles.

        Every file role the caller may read (or just `role`) is assigned to exactly
        one index the caller holds, so no context is counted twice.
        """
        config = self.model.config
        readable = self.model.readable_roles(caller_roles)
        if role is not None:
            if role not in config.roles:
                raise QueryError(
                    f"@role={role}: no such role (roles: {', '.join(config.role_names)})"
                )
            if role not in readable:
                raise AccessDenied(f"the caller may not read role {role!r}")
            wanted = {role}
        else:
            wanted = set(readable)
        usable = sorted(set(caller_roles) & self.model.held_roles() & set(self._indexes))
        holds = {x: {f for f in config.role_names if x in config.readers_of(f)} for x in usable}
        plan: dict[str, frozenset[str] | None] = {}
        while wanted:
            best = max(usable, key=lambda x: (len(holds[x] & wanted), x in wanted), default=None)
            if best is None or not holds[best] & wanted:
                break
            assigned = holds[best] & wanted
            plan[best] = None if assigned == holds[best] else frozenset(assigned)
            wanted -= assigned
        return plan

    def _file_roles(self, index: str, assigned: frozenset[str] | None) -> tuple[str, ...]:
        """The file roles a `_plan` entry searches in `index` (None: all it holds)."""
        config = self.model.config
        if assigned is None:
            assigned = frozenset(f for f in config.role_names if index in config.readers_of(f))
        return tuple(sorted(assigned))

    def search(
        self,
        query: str,
        caller_roles: Collection[str],
        *,
        role: str | None = None,
        limit: int = 50,
        snippets: bool = True,
    ) -> SearchResult:
        """Search the contexts a caller holding `caller_roles` may read.

        `role` restricts hits to that role's files. Hits are in score order,
        one per (address, role). Without `snippets` every hit's snippet is `NO_SNIPPET`:
        making them is a good part of a query's time, and a listing shows none.
        Raises `QueryError` (the message says what is wrong), `AccessDenied` if
        `role` is not readable by the caller.
        Blocking: run it in a worker thread from async code.
        """
        started = time.perf_counter()
        try:
            if not 1 <= limit <= MAX_LIMIT:
                raise QueryError(f"the limit must be from 1 to {MAX_LIMIT}, not {limit}")
            check_syntax(query)
            indexes = self._indexes
            plan = self._plan(caller_roles, role)
            parts = [
                (x, self._search_role(indexes[x], query, f, limit, snippets))
                for x, f in plan.items()
            ]
        except QueryError:
            self._query_errors += 1
            raise
        self._searches += 1
        merged = sorted(
            (hit for _, part in parts for hit in part.hits),
            key=lambda h: (-h.score, h.address, h.file_role),
        )
        hits: list[SearchHit] = []
        seen: set[tuple[str, str]] = set()
        for hit in merged:
            ctx = (hit.address, hit.file_role)
            if ctx in seen:
                continue
            seen.add(ctx)
            head = self.model.store.head(*ctx)
            if head is None or head.deleted:
                self._stale.add(ctx)  # gone from the store (e.g. expired): drop it next batch
                continue
            hits.append(
                SearchHit(
                    rank=len(hits) + 1,
                    score=hit.score,
                    address=hit.address,
                    role=hit.file_role,
                    version_id=bytes.fromhex(hit.version),
                    hlc=hit.hlc,
                    summary=hit.summary,
                    snippet=hit.snippet,
                )
            )
            if len(hits) == limit:
                break
        searched_as = {x: self._file_roles(x, f) for x, f in plan.items()}
        facets: dict[str, tuple[tuple[str, int], ...]] = {}
        for name in FACETS:
            counts: dict[str, int] = {}
            for _, part in parts:
                for value, n in part.facets.get(name, {}).items():
                    counts[value] = counts.get(value, 0) + n
            facets[name] = tuple(
                sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:FACET_LIMIT]
            )
        return SearchResult(
            query=query,
            hits=tuple(hits),
            total=sum(part.total for _, part in parts),
            facets=facets,
            roles_searched=tuple(sorted(r for roles in searched_as.values() for r in roles)),
            searched_as=searched_as,
            elapsed=time.perf_counter() - started,
        )

    def _search_role(
        self,
        index: RoleIndex,
        query: str,
        file_roles: frozenset[str] | None,
        limit: int,
        snippets: bool,
    ) -> EngineResult:
        """One role index's part of a search; a damaged index is rebuilt, then asked again."""
        try:
            return index.search(query, file_roles=file_roles, limit=limit, snippets=snippets)
        except IndexCorrupt as exc:
            with self._apply_lock:
                if self._indexes.get(index.role) is index:  # not replaced meanwhile
                    self._replace(index.role, exc)
                fresh = self._indexes[index.role]
            return fresh.search(query, file_roles=file_roles, limit=limit, snippets=snippets)

    def statistics(self) -> SearchStatistics:
        totals = self._totals
        return SearchStatistics(
            engine=self.engine,
            documents={r: i.doc_count() for r, i in sorted(self._indexes.items())},
            seq=self.seq,
            indexed=totals.indexed,
            removed=totals.removed,
            skipped=totals.skipped,
            rebuilt=tuple(self._rebuilt),
            searches=self._searches,
            query_errors=self._query_errors,
            remote=self._remote,
        )
