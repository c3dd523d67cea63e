"""Keep the FUSE loop polling for a moment after each request, instead of sleeping.

Tools walk a tree as a chain of requests: ``grep -r`` opens, reads and closes one
file after another, ``find`` lists one directory after another, each request
issued a few tens of microseconds after the previous answer. Between two of
them the FUSE loop blocks in ``epoll_wait`` and its CPU goes idle, and waking
it again costs more than handling many requests does: on a virtual machine an
idle vCPU halts and needs an interrupt from the host to run again. `BusyPoll`
keeps the trio loop cycling (one scheduler pass at a time, each polling the
FUSE device without blocking) until no request came for `window` seconds;
then it sleeps until the next one. Handlers call `poke`.

It polls for reading bursts only: a change (`hold`: a create, a write, a
commit, a mkdir) suspends it for `HOLD` seconds. A save costs far more than a
wake-up: in a two-mount comparison a create loop was no faster with polling,
so the CPU is not spent there. Nor does it poll while another thread works for
the daemon (`yield_to`: a worker running an fsync or a large read, the key
preparer sealing): polling holds the interpreter lock between passes, and such
a thread would get it only when Python forces a switch (every 0.5 ms here).

Measured on the 2-vCPU test machine (two mounts of one store, interleaved
rounds, medians; see docs/ARCHITECTURE.md and docs/BENCHMARKS.md): a 1 ms window
made ``find`` 23 %, ``grep -r`` 20 % and ``ls -lR`` 24 % faster than no polling;
0.1 ms was too short to help (the gaps between a tool's requests are longer).
An idle mount does not poll: the cost is at most one CPU for `window` after the
last request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["HOLD", "BusyPoll", "BusyPollStatistics"]

HOLD = 0.05  # seconds without polling after a change


@dataclass(frozen=True, slots=True)
class BusyPollStatistics:
    windows: int


class BusyPoll:
    """Polls for `window` seconds after the last `poke` (a request), then sleeps.

    `yield_to` says whether another thread is working for the daemon now; polling
    stops then (until the next request).
    """

    __slots__ = (
        "_asleep",
        "_held_until",
        "_last",
        "_scope",
        "_wake",
        "window",
        "windows",
        "yield_to",
    )

    def __init__(self, window: float, yield_to: Callable[[], bool] = lambda: False) -> None:
        self.window = window
        self.yield_to = yield_to
        self.windows = 0  # polling spells begun (after a sleep): for the status file
        self._last = 0.0
        self._held_until = 0.0
        self._asleep = False
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None

    def poke(self) -> None:
        """A request arrived (called by the handlers, on the loop's thread)."""
        self._last = now = time.perf_counter()
        if self._asleep and now >= self._held_until:
            self._asleep = False
            self._wake.set()

    def hold(self) -> None:
        """A change (create, write, commit): no polling for the next `HOLD` seconds."""
        self._held_until = time.perf_counter() + HOLD

    def _polling(self) -> bool:
        now = time.perf_counter()
        return now - self._last < self.window and now >= self._held_until and not self.yield_to()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll after requests until cancelled or `stop` (a task of the daemon)."""
        task_status.started()
        if self.window <= 0:
            return
        with trio.CancelScope() as self._scope:
            await self._serve()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def statistics(self) -> BusyPollStatistics:
        return BusyPollStatistics(windows=self.windows)

    async def _serve(self) -> None:
        while True:
            self._wake = trio.Event()
            self._asleep = True
            await self._wake.wait()
            self.windows += 1
            # Each checkpoint is one pass of the scheduler, which polls the FUSE
            # device (epoll with no timeout) because this task is runnable.
            while self._polling():
                await trio.lowlevel.checkpoint()
