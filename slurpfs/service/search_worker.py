"""The search worker: the search engine and the indexer, in a process of their own.

Started by the mount's daemon (`slurpfs.service.remote_search.SearchWorkerTask`)
as ``python -m slurpfs.service.search_worker``; the messages are in
`slurpfs.service.search_protocol`, the process rules (priority, parent death,
signals) in `slurpfs.service.workers`.

The worker opens the data directory's store with the configuration and
passphrase the daemon sends in its hello (LMDB is multi-process safe: the
index tables and the contexts are shared with the daemon), opens or builds
the search service exactly as an in-process one would (whichever engine the
configuration names), applies the changes logged since the indexes were saved
in steps, then runs the `Indexer` until told to stop. Meanwhile it reports its
progress (``status`` notices) and answers ``search`` requests once the indexes
are open. Asked to stop (or when the daemon's end of the socket closes), it
abandons a build, finishes the batch in hand, closes the indexes and the store
and exits 0.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import trio

from slurpfs.config import loads
from slurpfs.errors import SlurpError, StoreFull
from slurpfs.index.indexer import Indexer
from slurpfs.index.sealed import open_table
from slurpfs.index.searcher import ProgressState, SearchProgress, SearchUnavailable
from slurpfs.index.service import CATCH_UP_BATCH, SearchService
from slurpfs.model import ContextStore
from slurpfs.service.search_protocol import progress_to_wire, result_to_wire, stats_to_wire
from slurpfs.service.wire import Message, Peer, PeerGone
from slurpfs.service.workers import child_connect, child_start, serve_while

log = logging.getLogger("slurpfs.index")

STATUS_INTERVAL = 0.1  # seconds between checks for news to report (sequence, progress)
STATISTICS_INTERVAL = 1.0  # seconds between reports of the statistics
QUERY_THREADS = 4
FULL_DISK_RETRY = 5.0  # seconds before the indexes are opened again after a full disk
FULL_DISK_RETRY_MAX = 60.0
ABANDON_AFTER = 2.0  # seconds a stopping worker waits for an opening or a build to give up
BACKLOG_SHOWN = 256  # changes behind from which a running indexer reports "catching up"


class Stopped(SlurpError):
    """The daemon asked the worker to stop (an index build gives up)."""


class SearchWorker:
    """The worker's logic: open, build or catch up, index; answer searches."""

    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.model: ContextStore | None = None
        self.service: SearchService | None = None
        self.indexer: Indexer | None = None
        self.limiter = trio.CapacityLimiter(QUERY_THREADS)
        self._abort = threading.Event()  # read by build and catch-up threads
        self._stop = trio.Event()
        self._forgotten: list[tuple[str, str]] = []
        self._state: ProgressState = "starting"
        self._reason = ""
        self._done = self._total = 0
        self._since = time.monotonic()
        self._base = 0  # `done` when the phase began (its rate counts from there)

    # -- progress (any thread) ------------------------------------------------------------

    def _phase(self, state: ProgressState, done: int = 0, total: int = 0) -> None:
        if state != self._state:
            self._state, self._since, self._base = state, time.monotonic(), done
        self._done, self._total = done, total

    def progress(self) -> SearchProgress:
        elapsed = time.monotonic() - self._since
        rate = (self._done - self._base) / elapsed if elapsed > 0 else 0.0
        return SearchProgress(self._state, self._done, self._total, max(rate, 0.0), self._reason)

    def _unavailable(self, reason: str) -> None:
        log.error("search is unavailable on this mount: %s", reason)
        self._reason = f"search is unavailable on this mount: {reason}"
        self._phase("unavailable")

    # -- the run ----------------------------------------------------------------------------

    async def run(self, hello: Message) -> None:
        """Open, build or catch up, index until stopped; close everything at the end."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report)
            nursery.start_soon(self._abandon_when_stuck)
            try:
                await self._serve(hello)
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._close)

    async def _abandon_when_stuck(self) -> None:
        """Once asked to stop: if the indexes are still being opened, built or caught
        up `ABANDON_AFTER` seconds later, exit at once (status 0) rather than wait.

        A build gives up only between documents: the engine's batch writes and final
        commit cannot be interrupted (for whoosh and thousands of documents, tens of
        seconds). Nothing is lost by leaving it: a build's indexes are in memory
        until each role index is saved whole (one store transaction), a catch-up step
        saves in one transaction too, and the next start resumes from what was saved.
        The loop is free meanwhile (the work runs in a thread), so this runs on time.
        """
        await self._stop.wait()
        await trio.sleep(ABANDON_AFTER)
        if self.indexer is None:
            work = {"building": "build", "catching up": "catch-up"}.get(self._state, "opening")
            log.info(
                "stopping: abandoning the search indexes' %s (nothing saved is lost; "
                "the next start goes on from what was saved)",
                work,
            )
            logging.shutdown()
            os._exit(0)

    async def _serve(self, hello: Message) -> None:
        if not await self._open(hello):
            await self._stop.wait()  # answer why search is unavailable until stopped
            return
        if not await self._catch_up():
            return
        assert self.service is not None
        self.indexer = Indexer(self.service)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.indexer.run)
            self._phase("ready")
            self.indexer.wake()  # commits made while the indexes were opening
            await self._stop.wait()
            self.indexer.stop()  # after the batch in hand

    async def _open(self, hello: Message) -> bool:
        started = time.monotonic()
        try:
            config = loads(str(hello["config"]))
            secret = hello.fields.get("passphrase")
            passphrase = None if secret is None else base64.b64decode(secret)
            self.model = await trio.to_thread.run_sync(self._open_store, config, passphrase)
            self.service = await self._open_service_waiting()
        except Stopped:
            log.info("stopped opening the search indexes: shutting down")
            return False
        except SlurpError as exc:
            self._unavailable(str(exc))
            return False
        if self._forgotten:
            self.service.forget(self._forgotten)
            self._forgotten.clear()
        documents = sum(self.service.statistics().documents.values())
        log.info(
            "search ready: %s engine, %d documents in %d role indexes, opened in %.2f s",
            self.service.engine,
            documents,
            len(self.service.roles),
            time.monotonic() - started,
        )
        return True

    @staticmethod
    def _open_store(config: Any, passphrase: bytes | None) -> ContextStore:
        model = ContextStore.open(config, passphrase)
        open_table(model.store)  # before any other thread could (see there)
        return model

    async def _open_service_waiting(self) -> SearchService:
        """Open (or build) the indexes. A full disk is waited out (tried again with
        backoff, the reason in the status meanwhile) rather than leaving the mount
        without search until it is mounted again."""
        delay = FULL_DISK_RETRY
        while True:
            try:
                service = await trio.to_thread.run_sync(self._open_service)
            except StoreFull as exc:
                log.warning("search indexes not opened: %s; trying again in %g s", exc, delay)
                self._reason = f"search waits for disk space: {exc}"
                self._phase("unavailable")
                with trio.move_on_after(delay):
                    await self._stop.wait()
                if self._stop.is_set():
                    raise Stopped("the daemon is shutting down") from None
                delay = min(delay * 2, FULL_DISK_RETRY_MAX)
                continue
            self._reason = ""
            return service

    def _open_service(self) -> SearchService:
        assert self.model is not None

        def progress(done: int, total: int) -> None:
            if self._abort.is_set():
                raise Stopped("the daemon is shutting down")
            self._phase("building", done, total)

        return SearchService.open(self.model, progress=progress, catch_up=False)

    async def _catch_up(self) -> bool:
        """Apply what the change log holds beyond the indexes, in steps (progress)."""
        service = self.service
        assert service is not None
        assert self.model is not None
        store = self.model.store
        start = service.seq
        while service.pending():
            if self._abort.is_set():
                return False
            self._phase("catching up", service.seq - start, store.sequence() - start)
            step = functools.partial(service.catch_up, limit=CATCH_UP_BATCH)
            await trio.to_thread.run_sync(step)
        return not self._abort.is_set()

    def _close(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None
        if self.model is not None:
            self.model.close()
            self.model = None

    def stop(self) -> None:
        self._abort.set()
        self._stop.set()

    # -- reports --------------------------------------------------------------------------

    async def _report(self) -> None:
        """Tell the daemon what changed: progress and sequence at once, statistics now
        and then.

        Each notice carries only the fields that changed (the wire keeps notices
        in order). This task never ends on its own while the worker runs: with the
        daemon gone it stops the worker, and an error stops it too (abandoning a
        build) and ends the process, so the daemon restarts it rather than showing
        stale progress. Either way the log says so.
        """
        try:
            await self._send_status()
        except PeerGone as exc:
            log.info("cannot report to the daemon (%s): stopping", exc)
            self.stop()
        except Exception as exc:
            log.error("the status reports failed (%s): the search worker ends", exc)
            self.stop()
            raise

    async def _send_status(self) -> None:
        last: dict[str, Any] = {}
        counted = 0.0
        while True:
            now = time.monotonic()
            status = self._status(statistics=now - counted >= STATISTICS_INTERVAL)
            if now - counted >= STATISTICS_INTERVAL:
                counted = now
            news = {k: v for k, v in status.items() if last.get(k) != v}
            if news and self.peer is not None:
                await self.peer.notify("status", **news)
                last.update(news)
            await trio.sleep(STATUS_INTERVAL)

    def _status(self, *, statistics: bool) -> dict[str, Any]:
        service, indexer, model = self.service, self.indexer, self.model
        if self._state == "ready" and service is not None and model is not None:
            behind = model.store.sequence() - service.seq
            if behind > BACKLOG_SHOWN:
                self._phase("catching up", 0, behind)  # (counted from the backlog's start)
        elif self._state == "catching up" and indexer is not None and model is not None:
            assert service is not None
            behind = model.store.sequence() - service.seq
            if behind <= BACKLOG_SHOWN // 2:
                self._phase("ready")
            else:
                self._done = self._base + max(0, self._total - behind)
        out: dict[str, Any] = {"progress": progress_to_wire(self.progress())}
        if service is not None:
            out["seq"] = service.seq
            if statistics:
                out["search"] = stats_to_wire(service.statistics())
                if indexer is not None:
                    out["indexer"] = stats_to_wire(indexer.statistics())
        return out

    # -- messages from the daemon -----------------------------------------------------------

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        if message.kind == "search":
            return await self._search(message)
        if message.kind == "changed":
            if self.indexer is not None:
                hlc = message.fields.get("hlc")
                self.indexer.wake(int(hlc) if hlc is not None else None)
        elif message.kind == "forget":
            contexts = [(str(a), str(r)) for a, r in message["contexts"]]
            if self.service is None:
                self._forgotten += contexts
            else:
                self.service.forget(contexts)
                if self.indexer is not None:
                    self.indexer.wake()
        elif message.kind == "stop":
            self.stop()
        else:
            raise SlurpError(f"the search worker does not know {message.kind!r}")
        return None

    async def _search(self, message: Message) -> Mapping[str, Any]:
        service = self.service
        if service is None or self._state not in ("ready", "catching up"):
            raise SearchUnavailable(self._not_ready())
        seq = service.seq  # read first: a batch applied meanwhile makes the result stale
        run = functools.partial(
            service.search,
            str(message["query"]),
            frozenset(str(r) for r in message["roles"]),
            role=message.fields.get("role"),
            limit=int(message["limit"]),
            snippets=bool(message["snippets"]),
        )
        result = await trio.to_thread.run_sync(run, limiter=self.limiter)
        return {"seq": seq, "result": result_to_wire(result)}

    def _not_ready(self) -> str:
        progress = self.progress()
        if progress.state == "unavailable":
            return progress.reason
        return f"search is not ready yet: {progress.describe()}; try again in a moment"


async def _main(args_sock: Any) -> int:
    worker = SearchWorker()
    peer, hello = await child_connect(args_sock, worker.handle)
    worker.peer = peer
    await serve_while(peer, functools.partial(worker.run, hello), worker.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = child_start(sys.argv[1:] if argv is None else argv, "search")
    return trio.run(_main, args.sock)


if __name__ == "__main__":
    sys.exit(main())
