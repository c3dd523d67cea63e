"""The daemon's side of the search worker: ``.search/`` answered over a socket.

`SearchClient` is the search worker's `slurpfs.service.workers.WorkerLogic`:
it gives the worker its setup (the effective configuration, the passphrase),
passes on the daemon's commits, the control socket's ``changed`` and the TTL
purges as notices, and keeps what the worker last reported (progress, change
sequence, statistics). ``.search/`` sees it through two seams
(`slurpfs.index.searcher`): `RemoteSearcher` (queries, from worker threads)
and `RemoteProgress` (the ``search`` health check and the status lines).

No query waits long on a worker that cannot answer: while the worker starts
or builds its indexes, a query waits up to `READY_WAIT` seconds for it (a
small index is built in that time; a large one is not, and the query's
``.error`` shows the build's progress); while the worker restarts, or search
is unavailable, it fails at once with `SearchUnavailable` (EAGAIN, and
``.error`` says why); and every request is bounded by `REQUEST_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Collection, Mapping
from typing import Any

import trio

from slurpfs.config import Config
from slurpfs.index.indexer import IndexerStatistics
from slurpfs.index.results import SearchResult
from slurpfs.index.searcher import SearchProgress, SearchUnavailable
from slurpfs.index.service import SearchStatistics
from slurpfs.model import VersionInfo
from slurpfs.service.search_protocol import (
    indexer_from_wire,
    local_error,
    progress_from_wire,
    result_from_wire,
    search_from_wire,
)
from slurpfs.service.wire import Message, Peer, PeerGone, RemoteError, WireError
from slurpfs.service.workers import store_hello

log = logging.getLogger("slurpfs.daemon")

__all__ = ["READY_WAIT", "REQUEST_TIMEOUT", "RemoteProgress", "RemoteSearcher", "SearchClient"]

READY_WAIT = 5.0  # seconds a query waits for a worker that is starting
REQUEST_TIMEOUT = 30.0  # seconds a query waits for the worker's answer
SEARCH_WORKER = "slurpfs.service.search_worker"
DEFAULT_LIMIT = 50
OPENING = ("starting", "building")  # a query waits (briefly) for these to pass


class SearchClient:
    """What the daemon knows of, and tells, its search worker (see module docstring)."""

    def __init__(
        self,
        config: Config,
        passphrase: bytes | None,
        *,
        ready_wait: float = READY_WAIT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.config = config
        self._passphrase = passphrase
        self.ready_wait = ready_wait
        self.request_timeout = request_timeout
        self._peer: Peer | None = None
        self._progress = SearchProgress("starting")
        self._settled = trio.Event()  # set once the worker no longer starts or builds
        self.seq = 0
        self.search_statistics = SearchStatistics(config.search.engine, {}, 0, 0, 0, 0, (), 0, 0)
        self.indexer_statistics = IndexerStatistics(0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0)
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread: int | None = None
        self._news = trio.Event()
        self._oldest: int | None = None  # HLC of the oldest commit not yet passed on
        self._forget: list[tuple[str, str]] = []
        self.searcher = RemoteSearcher(self)
        self.progress_view = RemoteProgress(self)

    # -- WorkerLogic -------------------------------------------------------------------

    def setup(self) -> Mapping[str, Any]:
        return store_hello(self.config, self._passphrase)

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        if message.kind != "status" or message.id is not None:
            raise WireError(f"the search worker sent an unexpected {message.kind!r}")
        fields = message.fields
        if "progress" in fields:
            self._set_progress(progress_from_wire(fields["progress"]))
        if "seq" in fields:
            self.seq = int(fields["seq"])
        if "search" in fields:
            self.search_statistics = search_from_wire(fields["search"])
        if "indexer" in fields:
            self.indexer_statistics = indexer_from_wire(fields["indexer"])
        return None

    def connected(self, peer: Peer) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        self._peer = peer
        self._set_progress(SearchProgress("starting"))

    def disconnected(self, reason: str) -> None:
        self._peer = None
        self._set_progress(SearchProgress("restarting", reason=f"the search worker {reason}"))

    async def feed(self, peer: Peer) -> None:
        """Pass on commits and purges as they come (coalesced while a send is under way)."""
        self._news.set()  # commits noted while the worker was down: at least one wake-up
        while True:
            await self._news.wait()
            self._news = trio.Event()
            oldest, forget = self._oldest, self._forget
            self._oldest, self._forget = None, []
            try:
                if forget:
                    await peer.notify("forget", contexts=[list(c) for c in forget])
                await peer.notify("changed", hlc=oldest)
            except PeerGone:
                self._forget = forget + self._forget  # for the next worker
                return

    def _set_progress(self, progress: SearchProgress) -> None:
        self._progress = progress
        if progress.state in OPENING:
            if self._settled.is_set():
                self._settled = trio.Event()
        else:
            self._settled.set()

    # -- from the daemon -------------------------------------------------------------------

    def committed(self, info: VersionInfo) -> None:
        """Model subscriber: runs in the committing thread; never blocks it."""
        token = self._token
        if token is None:
            return  # no worker yet: it catches up from the change log when it starts
        if threading.get_ident() == self._loop_thread:
            self._note(info.hlc)
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._note, info.hlc)

    def _note(self, hlc: int | None) -> None:
        if hlc is not None:
            self._oldest = hlc if self._oldest is None else min(self._oldest, hlc)
        self._news.set()

    def wake(self) -> None:
        """Another process committed (the control socket's ``changed``). Trio thread."""
        self._note(None)

    def forget(self, contexts: list[tuple[str, str]]) -> None:
        """Contexts purged without a change record (TTL): out of the indexes. Trio thread."""
        self._forget += contexts
        self._news.set()

    # -- queries ---------------------------------------------------------------------------

    @property
    def progress(self) -> SearchProgress:
        return self._progress

    async def search(
        self, query: str, roles: Collection[str], role: str | None, limit: int, snippets: bool
    ) -> SearchResult:
        peer = await self._ready()
        with trio.move_on_after(self.request_timeout) as waited:
            try:
                answer = await peer.request(
                    "search",
                    query=query,
                    roles=sorted(roles),
                    role=role,
                    limit=limit,
                    snippets=snippets,
                )
            except PeerGone:
                raise SearchUnavailable(
                    "the search worker ended while answering; it is being restarted;"
                    " try again in a moment"
                ) from None
            except RemoteError as exc:
                raise local_error(exc) from None
        if waited.cancelled_caught:
            raise SearchUnavailable(
                f"the search worker did not answer within {self.request_timeout:g} s;"
                " try again in a moment"
            )
        return result_from_wire(answer["result"])

    async def _ready(self) -> Peer:
        if self._progress.state in OPENING:
            with trio.move_on_after(self.ready_wait):
                await self._settled.wait()
        peer, progress = self._peer, self._progress
        if peer is not None and progress.state in ("ready", "catching up"):
            return peer
        if progress.state == "starting":
            raise SearchUnavailable(
                f"the search worker is still starting (waited {self.ready_wait:g} s);"
                " try again in a moment"
            )
        if progress.state == "unavailable":
            raise SearchUnavailable(progress.reason)
        if progress.state == "restarting":
            raise SearchUnavailable(
                f"{progress.reason}; it is being restarted: try again in a moment"
            )
        raise SearchUnavailable(f"{progress.describe()}; try again in a moment")


class RemoteSearcher:
    """`slurpfs.index.searcher.Searcher` over the search worker (blocking: call from a
    thread the trio loop started, as ``.search/`` does)."""

    def __init__(self, client: SearchClient) -> None:
        self._client = client

    @property
    def seq(self) -> int:
        return self._client.seq

    def search(
        self,
        query: str,
        caller_roles: Collection[str],
        *,
        role: str | None = None,
        limit: int = DEFAULT_LIMIT,
        snippets: bool = True,
    ) -> SearchResult:
        run = functools.partial(
            self._client.search, query, frozenset(caller_roles), role, limit, snippets
        )
        return trio.from_thread.run(run)

    def statistics(self) -> SearchStatistics:
        return self._client.search_statistics


class RemoteProgress:
    """`slurpfs.index.searcher.IndexProgress` of the search worker."""

    def __init__(self, client: SearchClient) -> None:
        self._client = client

    def statistics(self) -> IndexerStatistics:
        return self._client.indexer_statistics

    def progress(self) -> SearchProgress:
        return self._client.progress
