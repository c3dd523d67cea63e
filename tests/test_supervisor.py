"""The supervisor of the daemon's background tasks (`slurpfs.service.supervisor`).

Restart scheduling runs on trio's `MockClock` (the ``autojump_clock`` fixture):
time jumps to the next deadline whenever every task waits, so the backoff is
checked to the second without a real sleep.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from slurpfs.health import FAIL, OK, WARN
from slurpfs.service.supervisor import (
    FAILING,
    INITIAL_DELAY,
    LAST_CHANCE,
    MAX_DELAY,
    Stoppable,
    Supervisor,
    backoff,
)

# Failures and stubborn stops are logged as errors: each test names those it causes.
FAILED = r"task \S+ failed \(\d+ in a row\); restarting in \d+ s; the mount goes on serving"
CANCELLED = r"task \S+ did not stop in time: cancelled"


class Flaky(Stoppable):
    """Fails its first `failures` runs (after `runs_for` seconds each), then serves."""

    def __init__(self, failures: int, runs_for: float = 0.0, log: list[str] | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.runs_for = runs_for
        self.starts: list[float] = []
        self.log = log if log is not None else []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        with self.stoppable():
            task_status.started()
            await trio.sleep(self.runs_for)
            if len(self.starts) <= self.failures:
                raise ValueError(f"failure {len(self.starts)}")
            await trio.sleep_forever()

    def stop(self) -> None:
        self.log.append(f"stop {id(self)}")
        super().stop()

    def statistics(self) -> object:
        return None


class Stubborn:
    """Ignores `stop` (only a cancellation ends it)."""

    def __init__(self) -> None:
        self.cancelled = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled = True
            raise

    def stop(self) -> None:
        pass

    def statistics(self) -> object:
        return None


async def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff(10_000) == MAX_DELAY
    assert backoff(0) == 0


@pytest.mark.expect_warnings(FAILED)
async def test_a_failed_task_restarts_with_backoff_and_is_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor()
    flaky, steady = Flaky(failures=3), Flaky(failures=0)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "flaky", flaky)
        await supervisor.start(nursery, "steady", steady)
        # Failed at 0, restarting at 1: what status and health say meanwhile.
        await trio.sleep(0.5)
        state = {s.name: s for s in supervisor.states()}
        assert state["flaky"].state == "restarting"
        assert state["flaky"].failures == 1
        assert state["flaky"].last_error == "ValueError: failure 1"
        assert state["flaky"].retry_in == pytest.approx(0.5)
        assert state["steady"].state == "running"
        check = supervisor.check()
        assert check.status == WARN
        assert "flaky restarting after 1 failure (next try in 0 s): ValueError" in check.detail
        assert supervisor.status()["task_steady"] == "running"

        await trio.sleep(10)
        assert flaky.starts == [0, INITIAL_DELAY, 3, 7]  # waits of 1, 2 and 4 s
        assert steady.starts == [0]  # a sibling's failures never touch it
        state = {s.name: s for s in supervisor.states()}
        assert state["flaky"].state == "running"
        assert state["flaky"].restarts == 3
        assert supervisor.check().status == OK
        assert "3 restarts since the start" in supervisor.check().detail
        assert supervisor.status()["task_flaky"] == (
            "running (restarted 3 times; last error: ValueError: failure 3)"
        )
        await supervisor.stop(5)
    assert [s.state for s in supervisor.states()] == ["stopped", "stopped"]


@pytest.mark.expect_warnings(FAILED)
async def test_a_task_that_keeps_failing_is_retried_at_the_cap_and_fails_health(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor()
    broken = Flaky(failures=10**9)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "broken", broken)
        await trio.sleep(400)
        gaps = [b - a for a, b in zip(broken.starts, broken.starts[1:], strict=False)]
        assert gaps[:9] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
        (state,) = supervisor.states()
        assert state.state == "restarting"
        assert state.failures >= FAILING
        assert supervisor.check().status == FAIL
        await supervisor.stop(5)  # during a wait: ends at once, no further start
        starts = len(broken.starts)
    assert len(broken.starts) == starts
    assert supervisor.states()[0].state == "stopped"


@pytest.mark.expect_warnings(FAILED)
async def test_a_run_that_lasted_long_enough_starts_the_count_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor()
    task = Flaky(failures=4, runs_for=0.0)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "task", task)
        await trio.sleep(2)  # failed at 0 and at 1; waits 2 s now
        task.runs_for = MAX_DELAY  # from now on each run lasts a minute before failing
        await trio.sleep(200)
        # 0, 1, 3 (then a minute's run), +1 s (the count started again), 124 (a minute, +1)
        assert task.starts == [0, 1, 3, 3 + MAX_DELAY + 1, 3 + 2 * (MAX_DELAY + 1)]
        await supervisor.stop(5)


@pytest.mark.expect_warnings(CANCELLED)
async def test_stop_ends_tasks_in_reverse_order_and_cancels_the_stubborn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor()
    order: list[str] = []
    first, second = Flaky(0, log=order), Flaky(0, log=order)
    stubborn = Stubborn()
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "first", first)
        await supervisor.start(nursery, "stubborn", stubborn)
        await supervisor.start(nursery, "second", second)
        started = trio.current_time()
        await supervisor.stop(7)
        assert trio.current_time() - started == 7  # the stubborn one had the rest of it
    assert order == [f"stop {id(second)}", f"stop {id(first)}"]
    assert stubborn.cancelled
    assert [s.state for s in supervisor.states()] == ["stopped", "stopped", "stopped"]


class Slow:
    """Ends `takes` seconds after its `stop`."""

    def __init__(self, takes: float) -> None:
        self.takes = takes
        self.asked = trio.Event()
        self.ended = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.asked.wait()
        await trio.sleep(self.takes)
        self.ended = True

    def stop(self) -> None:
        self.asked.set()

    def statistics(self) -> object:
        return None


@pytest.mark.expect_warnings(CANCELLED)
async def test_a_task_stopped_after_a_stubborn_one_still_gets_a_moment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The stubborn task (stopped first: started last) uses up the stop's time; the
    # slow one, asked only then, still ends on its own within `LAST_CHANCE` instead
    # of being cancelled and blamed at once (one error, the stubborn one's).
    supervisor = Supervisor()
    slow = Slow(LAST_CHANCE / 2)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "slow", slow)
        await supervisor.start(nursery, "stubborn", Stubborn())
        started = trio.current_time()
        await supervisor.stop(5)
        assert trio.current_time() - started == 5 + LAST_CHANCE / 2
    assert slow.ended
    assert [s.state for s in supervisor.states()] == ["stopped", "stopped"]


async def test_a_task_that_returns_is_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Once(Flaky):
        async def run(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            self.starts.append(trio.current_time())
            task_status.started()

    supervisor = Supervisor()
    once = Once(0)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "once", once)
        await trio.sleep(100)
        assert once.starts == [0]
        assert supervisor.states()[0].state == "exited"
        assert supervisor.check().status == OK
        await supervisor.stop(5)


@pytest.mark.expect_warnings(FAILED, CANCELLED)
async def test_a_task_failing_before_it_is_ready_does_not_hold_up_the_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Early(Flaky):
        async def run(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            self.starts.append(trio.current_time())
            if len(self.starts) == 1:
                raise OSError("not yet")
            task_status.started()
            await trio.sleep_forever()

    supervisor = Supervisor()
    early = Early(0)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "early", early)
        assert trio.current_time() == 0  # returned at the failure, not at the restart
        assert supervisor.states()[0].last_error == "OSError: not yet"
        await trio.sleep(5)
        assert early.starts == [0, 1]
        assert supervisor.states()[0].state == "running"
        await supervisor.stop(5)
