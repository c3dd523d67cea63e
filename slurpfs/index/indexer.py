"""The background indexer: keeps the search indexes in step with commits.

Runs in the daemon's trio nursery (``await nursery.start(indexer.run)``). The
model calls its subscriber from whichever thread committed; that thread must
never wait for indexing, so the callback only schedules a notice onto the trio
loop (`TrioToken.run_sync_soon`, thread-safe and non-blocking) where it goes
into a bounded memory channel with `send_nowait`. A full channel drops the
notice and counts it: nothing is lost, because each batch indexes from the
store's change log (`SearchService.catch_up`), which also carries commits of
other processes; the channel only wakes the loop early and measures lag.

Each wake-up drains the channel and runs one catch-up in a worker thread
(bounded by a `CapacityLimiter`), so decryption and engine commits never run
on the trio loop. Without notices the loop still polls every `poll_interval`
seconds for commits made by other processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import trio

from slurpfs.errors import SlurpError
from slurpfs.index.service import ApplyReport, SearchService
from slurpfs.model import VersionInfo

log = logging.getLogger("slurpfs.index")

QUEUE_SIZE = 1024
POLL_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class IndexerStatistics:
    queue_depth: int  # commit notices waiting
    lag: float  # seconds from commit to searchable (of the oldest waiting notice, else the last batch)
    documents_indexed: int  # documents written, counted once per role index
    documents_removed: int
    skipped: int  # versions that failed authentication (never indexed)
    batches: int
    dropped_notices: int  # notices that found the queue full (indexed anyway, from the change log)
    errors: int
    seq: int  # store change sequence the indexes reflect


def _wall(hlc: int) -> float:
    return (hlc >> 16) / 1000.0


class Indexer:
    """Indexes committed contexts in the background. `run` in a nursery, `stop` to end."""

    def __init__(
        self,
        service: SearchService,
        *,
        queue_size: int = QUEUE_SIZE,
        poll_interval: float = POLL_INTERVAL,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self._service = service
        self._queue_size = queue_size
        self._poll = poll_interval
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._token: trio.lowlevel.TrioToken | None = None
        self._send: trio.MemorySendChannel[int | None] | None = None
        self._receive: trio.MemoryReceiveChannel[int | None] | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = False
        self._subscribed = False
        self._waiting: list[int] = []  # HLCs of notices taken but not yet indexed
        self._totals = ApplyReport()
        self._lag = 0.0
        self._batches = self._dropped = self._errors = 0

    # -- any thread ------------------------------------------------------------------

    def _on_commit(self, info: VersionInfo) -> None:
        """Model subscriber: runs in the committing thread; never blocks it."""
        token = self._token
        if token is None:
            return
        # If the loop is gone, the change log still has the commit.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._enqueue, info.hlc)

    def wake(self) -> None:
        """Index now: another process committed (e.g. a `slurpfs put` notified us)."""
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._enqueue, None)

    # -- trio thread ------------------------------------------------------------------

    def _enqueue(self, hlc: int | None) -> None:
        if self._send is None:
            return
        try:
            self._send.send_nowait(hlc)
        except trio.WouldBlock:
            self._dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Index until `stop()` (or cancellation). Ready once subscribed to commits."""
        send, receive = trio.open_memory_channel[int | None](self._queue_size)
        self._send, self._receive = send, receive
        self._token = trio.lowlevel.current_trio_token()
        if not self._subscribed:
            self._service.model.subscribe(self._on_commit)
            self._subscribed = True
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                if self._stopped:
                    scope.cancel()
                task_status.started()
                while True:
                    await self._batch(receive)
        finally:
            self._token = None
            self._send = None
            send.close()
            receive.close()

    async def _batch(self, receive: trio.MemoryReceiveChannel[int | None]) -> None:
        with trio.move_on_after(self._poll):
            self._note(await receive.receive())
        while True:
            try:
                self._note(receive.receive_nowait())
            except trio.WouldBlock:
                break
        try:
            report = await trio.to_thread.run_sync(self._service.catch_up, limiter=self._limiter)
        except SlurpError as exc:
            # e.g. the store is full: keep what is waiting and try again next round
            self._errors += 1
            log.error("indexing failed, retrying in %.1f s: %s", self._poll, exc)
            await trio.sleep(self._poll)
            return
        hlcs = [*self._waiting, *([report.oldest_hlc] if report.oldest_hlc is not None else [])]
        if hlcs:
            self._lag = max(0.0, time.time() - _wall(min(hlcs)))
        if report.indexed or report.removed or report.skipped:
            self._batches += 1
        self._totals = self._totals + report
        self._waiting.clear()

    def _note(self, hlc: int | None) -> None:
        if hlc is not None:
            self._waiting.append(hlc)

    def stop(self) -> None:
        """Stop after the batch in progress (if any) is committed."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    def statistics(self) -> IndexerStatistics:
        receive = self._receive
        depth = 0 if receive is None else receive.statistics().current_buffer_used
        waiting = depth + len(self._waiting)
        lag = self._lag
        if self._waiting:
            lag = max(lag, time.time() - _wall(min(self._waiting)))
        totals = self._totals
        return IndexerStatistics(
            queue_depth=waiting,
            lag=lag if math.isfinite(lag) else 0.0,
            documents_indexed=totals.indexed,
            documents_removed=totals.removed,
            skipped=totals.skipped,
            batches=self._batches,
            dropped_notices=self._dropped,
            errors=self._errors,
            seq=self._service.seq,
        )
