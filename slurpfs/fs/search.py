"""``.search/``: every name looked up in it is a query (docs/ARCHITECTURE.md, "Path layout").

::

    .search/                         lists nothing (find, grep -r, indexers never query)
    .search/<query>/                 a read-only directory per query and caller role set
    .search/<query>/.results         rank, score, address, role, snippet per hit
    .search/<query>/.facets          counts by tag, technology, project over every hit
    .search/<query>/<NN>-<name>-<role>   relative symlink to the hit's role file
    .search/<query>/.error           instead of all the above, when the query cannot run

How a query is served:

- A name is ``QUERY[@limit=N][@role=R]`` (`parse_query_name`). Looking up
  ``.search/<name>`` runs nothing (a ``stat`` or a shell's completion costs
  nothing); the query runs when its directory is listed or something in it is
  looked up, stat'ed or read.
- It runs with the roles of the *calling* user (`Caller.roles`, from the role
  map), in a worker thread under a `CapacityLimiter`. The search service answers
  only from indexes of roles the caller holds, so names, snippets, facet counts
  and totals never include a context the caller may not read.
- Each caller role set gets its own inodes (the set is part of the node's key),
  and every size, listing, link target and byte is computed for the caller of the
  request at hand, never taken from another caller's view.
- A result is kept per (name, caller roles) for at most `CACHE_SECONDS`, and
  only while the indexes reflect the same store change sequence: once the
  indexer has applied a commit, the next request runs the query again. The
  kernel is told not to cache these entries at all (timeouts 0): with nothing to
  invalidate them by, it must ask, and the brief cache makes its asking cheap
  (one ``ls -l`` resolves the directory once per entry).
- Listing a query directory, its links and ``.facets`` need no snippets, and
  making them is a good part of a query's time: those run the query without
  snippets. ``.results`` shows them, so looking it up, stat'ing or reading it runs
  the query with snippets (unless a result with them is kept). A listing
  therefore reports ``.results`` with size 0 when it has not been made: the
  kernel keeps no attributes of these entries (timeouts 0), so a ``stat`` or
  ``open`` after the listing asks again and gets the true size.
- Opening the search service can take a while (tantivy rebuilds its index in
  memory at each mount), and the mount does not wait for it. A query meanwhile
  waits up to `READY_WAIT` seconds; if the service is still not open its
  directory holds only an ``.error`` saying so (never cached). If opening failed,
  ``.error`` says why.
- A name that does not parse, or an ``@role=`` the caller may not read, gives a
  directory holding only ``.error`` (what is wrong) and an INFO log line.

Binding a node and counting the kernel's reference happen with no ``await`` in
between (`child` awaits the query first, then binds), as the inode table requires.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as st
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from slurpfs.errors import AccessDenied, NotFound, QueryError, SlurpError
from slurpfs.fs.access import Caller
from slurpfs.fs.inodes import InodeTable, Key, Kind, Node
from slurpfs.fs.tree import Entry, Stat, check_length
from slurpfs.fs.virtual import flatten
from slurpfs.health import FAIL, OK, WARN, Check
from slurpfs.index import parse_query_name
from slurpfs.index.render import (
    error_text,
    facets_text,
    link_name,
    link_target,
    link_width,
    results_text,
)
from slurpfs.index.searcher import IndexProgress, Searcher, SearchUnavailable
from slurpfs.metrics import NO_LATENCY, Latency

log = logging.getLogger("slurpfs.fs")

RESULTS = ".results"
FACETS = ".facets"
ERROR = ".error"
CACHE_SECONDS = 1.0
CACHE_ENTRIES = 256
READY_WAIT = 5.0
QUERY_THREADS = 4
LAG_WARN = 60.0  # seconds behind the store from which the search health check warns

# Nodes whose attributes and bytes come from a query result.
RESULT_KINDS = frozenset({Kind.QUERY_FILE, Kind.QUERY_LINK})


@dataclass(frozen=True, slots=True)
class QueryView:
    """What one query shows one caller role set: files and links, by name."""

    # .results and .facets, or .error; .results is None until made (it needs snippets)
    files: Mapping[str, bytes | None]
    links: Mapping[str, bytes]  # link name -> relative target
    mtime_ns: int
    taken: float  # clock() when computed
    # The index change sequence the result reflects; None for an answer that does
    # not depend on the index (a name that does not parse).
    seq: int | None
    keep: bool = True  # False: answer the next request afresh (the service was not open)


@dataclass(frozen=True, slots=True)
class QueryStatistics:
    """Counters of `.search/` (also exported as metrics)."""

    ready: int  # 1 once the search service answers queries
    queries: int  # queries run on the indexes
    cached: int  # answered from the brief per-caller cache
    invalid: int  # names that did not parse, or an @role= the caller may not read
    not_ready: int  # answered with .error because the service was not open (or failed)
    cache_entries: int


class SearchNotReady(SlurpError):
    """The search service is not open yet (or could not be opened)."""

    errno = errno.EAGAIN


class _Pending:
    """A query being run; callers asking for the same (name, roles) wait for it."""

    __slots__ = ("done", "view")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.view: QueryView | None = None


def roles_tag(roles: frozenset[str]) -> str:
    """A role set as part of an inode key."""
    return ",".join(sorted(roles))


class SearchTree:
    """The ``.search/`` part of the tree over a `Searcher` attached once it is open."""

    def __init__(
        self,
        inodes: InodeTable,
        *,
        owner_uid: int,
        owner_gid: int,
        cache_seconds: float = CACHE_SECONDS,
        ready_wait: float = READY_WAIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inodes = inodes
        self.uid = owner_uid
        self.gid = owner_gid
        self.cache_seconds = cache_seconds
        self.ready_wait = ready_wait
        self.limiter = trio.CapacityLimiter(QUERY_THREADS)
        self._clock = clock
        self._service: Searcher | None = None
        self._indexer: IndexProgress | None = None
        self._failure: str | None = None
        self._ready = trio.Event()
        self._cache: dict[tuple[str, frozenset[str]], QueryView] = {}
        self._pending: dict[tuple[str, frozenset[str], bool], _Pending] = {}
        self._queries = self._cached = self._invalid = self._not_ready = 0
        # Query latency by kind (``results`` with snippets, ``links`` without).
        self.latency: Latency = NO_LATENCY

    # -- the service -------------------------------------------------------------

    def attach(self, service: Searcher, indexer: IndexProgress | None = None) -> None:
        """The service is open: queries run from now on (waiting ones too)."""
        self._service = service
        self._indexer = indexer
        self._ready.set()

    def unavailable(self, reason: str) -> None:
        """The service could not be opened: every query answers `reason` in ``.error``."""
        self._failure = reason
        self._ready.set()

    # -- resolution ----------------------------------------------------------------

    @staticmethod
    def resolves(parent: Node, name: bytes) -> bool:
        """Whether `name` in `parent` is this module's to resolve (not ``.``/``..``)."""
        return parent.kind in (Kind.SEARCH, Kind.QUERY) and name not in (b".", b"..")

    @staticmethod
    def owns(node: Node) -> bool:
        """Whether `node`'s attributes and bytes come from a query result."""
        return node.kind in RESULT_KINDS

    async def child(self, parent: Node, name: bytes, caller: Caller) -> tuple[Node, Stat | None]:
        """The node `name` names in ``.search`` or a query directory, and its attributes.

        A query directory's attributes (None here) are the tree's, like any
        directory's. NotFound if a query directory has no such entry for this caller.
        """
        check_length(name)
        tag = roles_tag(caller.roles)
        text = os.fsdecode(name)
        if parent.kind is Kind.SEARCH:
            key = Key(Kind.QUERY, (text,), extra=tag)
            return self.inodes.bind(key, parent.ino, name), None
        query = self._query_of(parent)
        view = await self.view(query, caller, snippets=text == RESULTS)
        # No await from here on: the node is bound and handed to the kernel at once.
        if text in view.files:
            kind = Kind.QUERY_FILE
        elif text in view.links:
            kind = Kind.QUERY_LINK
        else:
            raise NotFound(f"no {text!r} in the results of {query!r}")
        node = self.inodes.bind(Key(kind, (query, text), extra=tag), parent.ino, name)
        return node, self._stat(view, kind, text)

    async def entries(self, node: Node, caller: Caller) -> list[Entry]:
        """The listing of a query directory for `caller`, with attributes."""
        query = self._query_of(node)
        view = await self.view(query, caller)
        tag = roles_tag(caller.roles)
        out = [
            Entry(
                name.encode(),
                Key(Kind.QUERY_FILE, (query, name), extra=tag),
                stat=self._stat(view, Kind.QUERY_FILE, name),
            )
            for name in sorted(view.files)
        ]
        out += [
            Entry(
                name.encode(),
                Key(Kind.QUERY_LINK, (query, name), extra=tag),
                stat=self._stat(view, Kind.QUERY_LINK, name),
            )
            for name in sorted(view.links)
        ]
        return out

    async def stat(self, node: Node, caller: Caller) -> Stat:
        """Attributes of a result file or link, as `caller` sees them."""
        query, name = self._parts(node)
        view = await self.view(query, caller, snippets=self._needs_snippets(node))
        return self._stat(view, node.kind, name)

    async def read(self, node: Node, caller: Caller) -> bytes:
        """The bytes of ``.results``, ``.facets`` or ``.error`` for `caller`."""
        query, name = self._parts(node)
        view = await self.view(query, caller, snippets=self._needs_snippets(node))
        data = view.files.get(name)
        if node.kind is not Kind.QUERY_FILE or data is None:
            raise NotFound(f"no {name!r} in the results of {query!r}")
        return data

    async def readlink(self, node: Node, caller: Caller) -> bytes:
        query, name = self._parts(node)
        target = (await self.view(query, caller)).links.get(name)
        if node.kind is not Kind.QUERY_LINK or target is None:
            raise NotFound(f"no link {name!r} in the results of {query!r}")
        return target

    def _stat(self, view: QueryView, kind: Kind, name: str) -> Stat:
        if kind is Kind.QUERY_FILE:
            if name not in view.files:
                raise NotFound(f"{name!r} is no longer in the results")
            data = view.files[name]
            size = 0 if data is None else len(data)  # None: not made for a listing
            mode = st.S_IFREG | 0o444
        else:
            target = view.links.get(name)
            if target is None:
                raise NotFound(f"{name!r} is no longer in the results")
            size = len(target)
            mode = st.S_IFLNK | 0o777
        t = view.mtime_ns
        return Stat(mode, size, 1, t, t, self.uid, self.gid, cacheable=False)

    @staticmethod
    def _needs_snippets(node: Node) -> bool:
        return (
            node.kind is Kind.QUERY_FILE and node.key is not None and node.key.parts[1] == RESULTS
        )

    @staticmethod
    def _query_of(node: Node) -> str:
        if node.key is None or node.kind is not Kind.QUERY:
            raise NotFound(f"{node.name!r} is not a query")
        return node.key.parts[0]

    @staticmethod
    def _parts(node: Node) -> tuple[str, str]:
        if node.key is None or node.kind not in RESULT_KINDS:
            raise NotFound(f"{node.name!r} is not a search result")
        query, name = node.key.parts
        return query, name

    # -- running queries ---------------------------------------------------------------

    async def view(self, query: str, caller: Caller, *, snippets: bool = False) -> QueryView:
        """The result of `query` for `caller`'s roles: cached briefly, else run now.

        With `snippets` the view holds ``.results``; without, it may not.
        """
        key = (query, caller.roles)
        while True:
            kept = self._kept(key, snippets)
            if kept is not None:
                self._cached += 1
                return kept
            pending = self._pending.get((*key, snippets))
            if pending is None:
                break
            await pending.done.wait()
            if pending.view is not None:
                self._cached += 1
                return pending.view
        pending = self._pending[(*key, snippets)] = _Pending()
        try:
            view = await self._run(query, caller, snippets)
            pending.view = view
            if view.keep:
                self._keep(key, view)
        finally:
            del self._pending[(*key, snippets)]
            pending.done.set()
        return view

    def _kept(self, key: tuple[str, frozenset[str]], snippets: bool) -> QueryView | None:
        view = self._cache.get(key)
        if view is None:
            return None
        service = self._service
        if self._clock() - view.taken >= self.cache_seconds or (
            view.seq is not None and (service is None or service.seq != view.seq)
        ):
            del self._cache[key]
            return None
        if snippets and view.files.get(RESULTS, b"") is None:
            return None  # kept for a listing: .results is not made yet
        return view

    def _keep(self, key: tuple[str, frozenset[str]], view: QueryView) -> None:
        if len(self._cache) >= CACHE_ENTRIES:
            now = self._clock()
            for k, v in list(self._cache.items()):
                if now - v.taken >= self.cache_seconds:
                    del self._cache[k]
            while len(self._cache) >= CACHE_ENTRIES:
                del self._cache[next(iter(self._cache))]  # the oldest
        self._cache[key] = view

    async def _run(self, query: str, caller: Caller, snippets: bool) -> QueryView:
        raw = os.fsencode(query)
        try:
            spec = parse_query_name(raw.decode("utf-8"))
        except UnicodeDecodeError:
            shown = raw.decode("utf-8", "backslashreplace")
            return self._refused(shown, QueryError("the query is not valid UTF-8"), caller)
        except QueryError as exc:
            return self._refused(query, exc, caller)
        service = self._service
        if service is None and self._failure is None:
            with trio.move_on_after(self.ready_wait):
                await self._ready.wait()
            service = self._service
        if service is None:
            self._not_ready += 1
            reason = self._failure or (
                f"the search index is still being opened (waited {self.ready_wait:g} s);"
                " try again in a moment"
            )
            return self._error(query, SearchNotReady(reason), keep=False)
        seq = service.seq  # read first: a batch applied meanwhile makes the result stale
        run = functools.partial(
            service.search,
            spec.text,
            caller.roles,
            role=spec.role,
            limit=spec.limit,
            snippets=snippets,
        )
        try:
            with self.latency.time("results" if snippets else "links"):
                result = await trio.to_thread.run_sync(run, limiter=self.limiter)
        except (QueryError, AccessDenied) as exc:
            return self._refused(query, exc, caller)
        except SearchUnavailable as exc:  # (building, restarting): asking again may succeed
            self._not_ready += 1
            return self._error(query, exc, keep=False)
        self._queries += 1
        width = link_width(spec.limit)
        return QueryView(
            files={
                RESULTS: results_text(result).encode() if snippets else None,
                FACETS: facets_text(result).encode(),
            },
            links={link_name(h, width): os.fsencode(link_target(h)) for h in result.hits},
            mtime_ns=time.time_ns(),
            taken=self._clock(),
            seq=seq,
        )

    def _refused(self, query: str, exc: SlurpError, caller: Caller) -> QueryView:
        """A query that cannot run: ``.error`` explains, and the log says so (not a warning)."""
        self._invalid += 1
        # The reason goes to the user's .error file; the log names only the kind of
        # error, never the query text (a query can hold words from a context).
        log.info(".search: query refused for uid %d (%s)", caller.uid, type(exc).__name__)
        return self._error(query, exc, keep=True)

    def _error(self, query: str, exc: SlurpError, *, keep: bool) -> QueryView:
        return QueryView(
            files={ERROR: error_text(query, exc).encode()},
            links={},
            mtime_ns=time.time_ns(),
            taken=self._clock(),
            seq=None,
            keep=keep,
        )

    # -- state -------------------------------------------------------------------------

    def statistics(self) -> QueryStatistics:
        return QueryStatistics(
            ready=int(self._service is not None and self._answers()),
            queries=self._queries,
            cached=self._cached,
            invalid=self._invalid,
            not_ready=self._not_ready,
            cache_entries=len(self._cache),
        )

    def _answers(self) -> bool:
        """Whether the attached searcher answers queries now (not building, restarting)."""
        indexer = self._indexer
        return indexer is None or indexer.progress().state in ("ready", "catching up")

    def check(self) -> Check:
        """The ``search`` health check: the indexes are open and the indexer keeps up.

        Opening is a warning (the mount works meanwhile), a service that could not be
        opened a failure (``.search/`` is down until the next start)."""
        if self._failure is not None:
            return Check("search", FAIL, self._failure)
        service = self._service
        if service is None:
            return Check("search", WARN, "opening the search indexes")
        stats = service.statistics()
        detail = (
            f"{stats.engine}: {sum(stats.documents.values())} documents"
            f" in {len(stats.documents)} role indexes"
        )
        if self._indexer is None:
            return Check("search", OK, detail)
        progress = self._indexer.progress()
        if progress.state != "ready":
            status = FAIL if progress.state == "unavailable" else WARN
            return Check("search", status, progress.describe())
        ix = self._indexer.statistics()
        detail += f"; indexer lag {ix.lag:.1f} s, {ix.queue_depth} changes waiting"
        return Check("search", WARN if ix.lag > LAG_WARN else OK, detail)

    def status(self) -> dict[str, Any]:
        """Counters for ``.slurp/status`` and ``metrics``: this layer, the indexes, the indexer."""
        out = flatten(self.statistics(), "search_")
        if self._failure is not None:
            out["search_unavailable"] = self._failure
        if self._service is not None:
            out.update(flatten(self._service.statistics(), "index_"))
        if self._indexer is not None:
            out["search_progress"] = self._indexer.progress().describe()
            out.update(flatten(self._indexer.statistics(), "indexer_"))
        return out
