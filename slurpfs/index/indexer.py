"""The background indexer: keeps the search indexes in step with commits.

Runs in the daemon's trio nursery (``await nursery.start(indexer.run)``). The
model calls its subscriber from whichever thread committed; that thread must
never wait for indexing, so the callback only puts a notice into a bounded
memory channel with `send_nowait` (directly when the commit ran on the trio
loop, through `TrioToken.run_sync_soon` from any other thread). A full channel
drops the notice and counts it: nothing is lost, because indexing reads the
store's change log (`SearchService.catch_up`), which also carries commits of
other processes; notices only wake the loop early and measure lag.

Indexing is background work: the FUSE handlers come first. The engines are
Python and share the interpreter with the handlers, so an engine commit that
runs while files are being written or read slows every request down. Hence:

- After a notice the indexer waits until commits and requests on the mount
  (`activity`) pause for `quiet` seconds, at the latest `max_delay` seconds.
  A single save is searchable a fraction of a second later.
- It applies the backlog in steps (`SearchService.catch_up(limit=...)`, each
  one engine commit in a worker thread under a `CapacityLimiter`), starting
  with `min_step` changes and doubling up to `max_step` while the mount stays
  quiet, so a burst of writes that starts meanwhile waits for a short step at
  most. When writes or requests resume it waits for the next pause again.
- Past `max_delay`, with the mount still busy, it goes on in short steps,
  each followed by a pause as long as the step took. Those steps merge no
  index segments (a whoosh merge holds the interpreter lock in stretches of
  tens of milliseconds, and every request waits meanwhile); once the mount is
  idle for a whole `poll_interval`, `SearchService.tidy` merges what they left.

Without notices the loop polls every `poll_interval` seconds for commits of
other processes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from slurpfs.errors import SlurpError
from slurpfs.index.service import ApplyReport, SearchService
from slurpfs.model import VersionInfo

log = logging.getLogger("slurpfs.index")

QUEUE_SIZE = 1024
POLL_INTERVAL = 1.0
QUIET = 0.1  # seconds without a new commit before indexing starts...
MAX_DELAY = 5.0  # ...or at the latest this long after the first commit waiting
MIN_STEP = 8  # change records per engine commit: the first step after a pause...
MAX_STEP = 256  # ...doubling up to this while no commit comes in


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
    tidied: int  # merges of segments that commits made while the mount was busy left
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
        quiet: float = QUIET,
        max_delay: float = MAX_DELAY,
        min_step: int = MIN_STEP,
        max_step: int = MAX_STEP,
        activity: Callable[[], int] | None = None,
    ) -> None:
        self._service = service
        self._queue_size = queue_size
        self._poll = poll_interval
        self._quiet = quiet
        self._max_delay = max_delay
        self._min_step = min_step
        self._max_step = max(min_step, max_step)
        self._activity = activity
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread: int | None = None
        self._arrivals = 0  # notices enqueued so far (settling compares counts)
        self._send: trio.MemorySendChannel[int | None] | None = None
        self._receive: trio.MemoryReceiveChannel[int | None] | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = False
        self._subscribed = False
        self._waiting: list[int] = []  # HLCs of notices taken but not yet indexed
        self._totals = ApplyReport()
        self._lag = 0.0
        self._batches = self._dropped = self._errors = 0
        self._unmerged = False  # commits made while busy merged no segments
        self._tidied = 0

    # -- any thread ------------------------------------------------------------------

    def _on_commit(self, info: VersionInfo) -> None:
        """Model subscriber: runs in the committing thread; never blocks it."""
        token = self._token
        if token is None:
            return
        if threading.get_ident() == self._loop_thread:
            # Committed by a handler on the trio loop itself (most commits): no
            # round trip through the loop's wakeup socket is needed.
            self._enqueue(info.hlc)
            return
        # If the loop is gone, the change log still has the commit.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._enqueue, info.hlc)

    def wake(self, hlc: int | None = None) -> None:
        """Index now: another process committed (e.g. a `slurpfs put` notified us, or
        the daemon passed on a commit with its `hlc`, which measures the lag)."""
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._enqueue, hlc)

    # -- trio thread ------------------------------------------------------------------

    def _enqueue(self, hlc: int | None) -> None:
        if self._send is None:
            return
        self._arrivals += 1
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
        self._loop_thread = threading.get_ident()
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
        quiet = self._marker()
        with trio.move_on_after(self._poll) as idle:
            self._note(await receive.receive())
        deadline = trio.current_time() + self._max_delay
        busy = False
        if idle.cancelled_caught:
            if self._unmerged and self._marker() == quiet:
                await self._tidy()
        else:
            busy = await self._settle(receive, deadline)
        # Steps start small and double while no commit comes in, so that a burst
        # of writes starting meanwhile waits for a short step only. While the
        # mount stays busy past the deadline the steps merge no segments: a merge
        # holds the interpreter lock long enough to stall the FUSE loop.
        step = self._min_step
        while True:
            self._drain(receive)
            marker = self._marker()
            started = trio.current_time()
            try:
                report = await trio.to_thread.run_sync(
                    functools.partial(self._service.catch_up, limit=step, merge=not busy),
                    limiter=self._limiter,
                )
            except SlurpError as exc:
                # e.g. the store is full: keep what is waiting and try again next round
                self._errors += 1
                log.error("indexing failed, retrying in %.1f s: %s", self._poll, exc)
                await trio.sleep(self._poll)
                return
            if busy and (report.indexed or report.removed):
                self._unmerged = True
            pending = self._service.pending()
            self._account(report, caught_up=not pending)
            if not pending:
                return
            if self._marker() == marker:  # neither commits nor requests meanwhile
                step = min(2 * step, self._max_step)
                busy = False
                continue
            step = self._min_step
            busy = await self._settle(receive, deadline)
            if busy:
                # Commits went on past the deadline: index in turns with them, each
                # pause as long as the step before it took.
                await trio.sleep(trio.current_time() - started)

    async def _tidy(self) -> None:
        """Merge the segments that busy commits left, once the mount is idle."""
        try:
            await trio.to_thread.run_sync(self._service.tidy, limiter=self._limiter)
        except SlurpError as exc:
            self._errors += 1
            log.error("merging index segments failed, retrying later: %s", exc)
            return
        self._unmerged = False
        self._tidied += 1

    async def _settle(
        self, receive: trio.MemoryReceiveChannel[int | None], deadline: float
    ) -> bool:
        """Wait until commits pause for `quiet` seconds, at the latest until `deadline`.

        Returns whether commits are still coming (the wait ended at the deadline).
        Notices are counted, not waited for one by one: a burst of commits costs
        the loop nothing here.
        """
        while True:
            now = trio.current_time()
            if now >= deadline:
                return True
            seen = self._marker()
            await trio.sleep_until(min(now + self._quiet, deadline))
            self._drain(receive)
            if self._marker() == seen:
                return trio.current_time() >= deadline

    def _marker(self) -> tuple[int, int]:
        """Moves with every commit notice and every request the mount serves."""
        return self._arrivals, 0 if self._activity is None else self._activity()

    def _drain(self, receive: trio.MemoryReceiveChannel[int | None]) -> None:
        while True:
            try:
                self._note(receive.receive_nowait())
            except trio.WouldBlock:
                return

    def _account(self, report: ApplyReport, *, caught_up: bool) -> None:
        hlcs = [*self._waiting, *([report.oldest_hlc] if report.oldest_hlc is not None else [])]
        if hlcs:
            self._lag = max(0.0, time.time() - _wall(min(hlcs)))
        if report.indexed or report.removed or report.skipped:
            self._batches += 1
        self._totals = self._totals + report
        if caught_up:
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
            tidied=self._tidied,
            seq=self._service.seq,
        )
