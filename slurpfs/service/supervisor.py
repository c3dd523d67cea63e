"""Runs the daemon's background tasks and restarts the ones that fail.

Every long-lived part of the daemon that is not the FUSE loop itself (the
invalidator, the indexer, the control socket, the HTTP endpoints, the sync,
TTL and key tasks; later the worker processes, each a task whose ``run``
starts and watches a child) is a `Task`: ``run(task_status=...)`` serves until
cancelled or stopped, ``stop()`` asks it to end soon (after the work in hand),
``statistics()`` returns a frozen dataclass of its counters.

The semantics are systemd's ``Restart=on-failure`` with ``TimeoutStopSec``:

- a task whose ``run`` raises is logged (ERROR, with the traceback), recorded
  and started again after a delay that doubles with each consecutive failure,
  from `INITIAL_DELAY` up to `MAX_DELAY`; a run that lasted `MAX_DELAY` or
  longer counts as healthy, so the next failure starts the count again;
- a task whose ``run`` returns by itself has nothing (more) to do and is not
  restarted (e.g. the systemd watchdog without ``WATCHDOG_USEC``);
- a failure never leaves the supervisor: the mount goes on serving files while
  a task restarts, however often it fails. What *is* fatal to the daemon is
  decided by the daemon (`slurpfs.service.daemon`), not here;
- `stop` ends the tasks in the reverse order of their start, each asked with
  its ``stop()`` and given what is left of the timeout (at least `LAST_CHANCE`
  seconds, so that one slow task does not get the others cancelled at once),
  then cancelled.

`states` and `check` report each task (running, restarting after N failures,
its last error and when it is retried next): ``.slurp/status`` and the
``tasks`` health check show them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

from slurpfs.health import FAIL, OK, WARN, Check

log = logging.getLogger("slurpfs.supervisor")

__all__ = [
    "INITIAL_DELAY",
    "MAX_DELAY",
    "Stoppable",
    "Supervisor",
    "Task",
    "TaskState",
]

INITIAL_DELAY = 1.0  # seconds before the first restart
MAX_DELAY = 60.0  # the longest wait between restarts (also: a run this long was healthy)
LAST_CHANCE = 2.0  # seconds a task still gets when an earlier one used up the stop's time
FAILING = 5  # consecutive failures from which the health check fails rather than warns

State = Literal["starting", "running", "restarting", "stopping", "stopped", "exited"]


class Task(Protocol):
    """One long-lived part of the daemon, run by the `Supervisor`."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or `stop`-ped; ``task_status.started()`` once ready."""

    def stop(self) -> None:
        """Ask `run` to return soon (after the work in hand). Any thread of the loop."""

    def statistics(self) -> object:
        """The task's counters: a frozen dataclass."""


class Stoppable:
    """`stop` for tasks whose `run` is a loop that may end at any checkpoint.

    The body of `run` goes inside ``with self.stoppable():``; `stop` cancels it,
    and a `run` that starts after `stop` ends at once. A new run after a
    failure gets a new scope.
    """

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self._stopped = False

    @contextlib.contextmanager
    def stoppable(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._stopped:
                scope.cancel()
            try:
                yield scope
            finally:
                self._scope = None

    def stop(self) -> None:
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()


@dataclass(frozen=True, slots=True)
class TaskState:
    """What the supervisor knows of one task (times in seconds, on the trio clock)."""

    name: str
    state: State
    failures: int  # consecutive failures (0 once a run lasted MAX_DELAY)
    restarts: int  # restarts since the daemon started
    last_error: str | None  # the last failure, one line
    retry_in: float | None  # seconds until the next start, while restarting

    def describe(self) -> str:
        """One line for a person: ``running``, ``restarting after 3 failures (...)``."""
        if self.state != "restarting":
            text: str = self.state
            if self.restarts:
                text += f" (restarted {self.restarts} times; last error: {self.last_error})"
            return text
        retry = f"next try in {self.retry_in:.0f} s" if self.retry_in is not None else "now"
        plural = "s" if self.failures != 1 else ""
        return f"restarting after {self.failures} failure{plural} ({retry}): {self.last_error}"


def backoff(failures: int, initial: float = INITIAL_DELAY, cap: float = MAX_DELAY) -> float:
    """Seconds to wait before starting a task again after `failures` failures in a row."""
    if failures <= 0:
        return 0.0
    return min(cap, initial * 2.0 ** min(failures - 1, 62))


def _one_line(exc: BaseException) -> str:
    # A task's own failure arrives wrapped in its run's nursery group.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Entry:
    def __init__(self, name: str, task: Task) -> None:
        self.name = name
        self.task = task
        self.state: State = "starting"
        self.failures = 0
        self.restarts = 0
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self.stopping = False
        self.scope = trio.CancelScope()  # cancels the task when a stop runs out of time
        self.pause: trio.CancelScope | None = None  # the wait before a restart
        self.done = trio.Event()

    def snapshot(self, now: float) -> TaskState:
        retry = None if self.retry_at is None else max(0.0, self.retry_at - now)
        return TaskState(
            self.name, self.state, self.failures, self.restarts, self.last_error, retry
        )


class Supervisor:
    """Starts named `Task`s in a nursery, restarts failed ones with backoff, stops
    them in reverse order (see module docstring)."""

    def __init__(self, *, initial: float = INITIAL_DELAY, cap: float = MAX_DELAY) -> None:
        self.initial = initial
        self.cap = cap
        self._entries: dict[str, _Entry] = {}

    async def start(self, nursery: trio.Nursery, name: str, task: Task) -> None:
        """Run `task` in `nursery` under supervision; return once it is ready or has
        failed its first start (the daemon goes on either way)."""
        if name in self._entries:
            raise ValueError(f"a task named {name!r} is already supervised")
        entry = self._entries[name] = _Entry(name, task)
        await nursery.start(self._supervise, entry)

    def task(self, name: str) -> Task:
        return self._entries[name].task

    async def _supervise(self, entry: _Entry, *, task_status: trio.TaskStatus[None]) -> None:
        signalled = False
        try:
            with entry.scope:
                while not entry.stopping:
                    started = trio.current_time()
                    try:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(entry.task.run)
                            entry.state = "stopping" if entry.stopping else "running"
                            entry.retry_at = None
                            if not signalled:
                                task_status.started()
                                signalled = True
                    except Exception as exc:
                        if trio.current_time() - started >= self.cap:
                            entry.failures = 0  # it ran long enough to count as healthy
                        self._failed(entry, exc)
                    else:
                        entry.state = "stopped" if entry.stopping else "exited"
                        return
                    if not signalled:
                        task_status.started()
                        signalled = True
                    await self._pause(entry)
        finally:
            if entry.state not in ("stopped", "exited"):
                entry.state = "stopped"
            entry.retry_at = None
            entry.done.set()
            if not signalled:  # cancelled before its first start ended
                task_status.started()

    def _failed(self, entry: _Entry, exc: Exception) -> None:
        entry.failures += 1
        entry.last_error = _one_line(exc)
        if entry.stopping:
            log.error("task %s failed while stopping", entry.name, exc_info=exc)
            return
        delay = backoff(entry.failures, self.initial, self.cap)
        entry.state = "restarting"
        entry.retry_at = trio.current_time() + delay
        log.error(
            "task %s failed (%d in a row); restarting in %.0f s; the mount goes on serving",
            entry.name,
            entry.failures,
            delay,
            exc_info=exc,
        )

    async def _pause(self, entry: _Entry) -> None:
        if entry.stopping or entry.retry_at is None:
            return
        with trio.CancelScope(deadline=entry.retry_at) as pause:
            entry.pause = pause
            await trio.sleep_forever()
        entry.pause = None
        if not entry.stopping:
            entry.restarts += 1
            entry.state = "starting"
            log.info("task %s: starting again (restart %d)", entry.name, entry.restarts)

    async def stop(self, grace: float) -> None:
        """Stop every task, the last started first, within `grace` seconds in all
        (each at least `LAST_CHANCE` seconds); a task still running when its time
        runs out is cancelled."""
        deadline = trio.current_time() + grace
        for entry in reversed(list(self._entries.values())):
            if entry.done.is_set():
                continue
            entry.stopping = True
            if entry.state == "running":
                entry.state = "stopping"
            if entry.pause is not None:
                entry.pause.cancel()
            entry.task.stop()
            # a task stopped after the time ran out (one before it took it all) still
            # gets a moment: most stop within milliseconds, and are not to blame
            with trio.move_on_at(max(deadline, trio.current_time() + LAST_CHANCE)) as waited:
                await entry.done.wait()
            if waited.cancelled_caught:
                log.error("task %s did not stop in time: cancelled", entry.name)
                entry.scope.cancel()
                await entry.done.wait()

    # -- state -----------------------------------------------------------------------

    def states(self) -> list[TaskState]:
        now = trio.current_time() if _in_trio() else math.inf
        return [e.snapshot(now) for e in self._entries.values()]

    def status(self) -> dict[str, object]:
        """``.slurp/status`` lines: ``task_<name>: <state>``, one per task."""
        return {f"task_{s.name}": s.describe() for s in self.states()}

    def check(self) -> Check:
        """The ``tasks`` health check: ``warn`` while a task restarts after a failure,
        ``fail`` once one failed `FAILING` times in a row; the mount serves files in
        both cases (a background failure never takes the mount down)."""
        states = self.states()
        failing = [s for s in states if s.state == "restarting"]
        if not failing:
            restarted = sum(s.restarts for s in states)
            detail = f"{len(states)} tasks running"
            if restarted:
                detail += f"; {restarted} restarts since the start"
            return Check("tasks", OK, detail)
        worst = max(s.failures for s in failing)
        detail = "; ".join(f"{s.name} {s.describe()}" for s in failing)
        return Check("tasks", FAIL if worst >= FAILING else WARN, detail)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
