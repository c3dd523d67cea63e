"""The FUSE loop polls for `mount.busy_poll` seconds after a request, and sleeps when idle."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import Nodes
from fsutil import Mounted, wait_for

from slurpfs.fs.busypoll import HOLD, BusyPoll

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


async def test_a_poke_starts_one_spell_of_polling_that_ends_a_window_after_the_last() -> None:
    poll = BusyPoll(0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll.run)
        await trio.testing.wait_all_tasks_blocked()
        assert poll.windows == 0  # asleep until a request comes
        poll.poke()
        passes = 0
        # While the window is open the poller stays runnable: the loop never blocks.
        while poll.windows == 0 or passes < 20:
            await trio.lowlevel.checkpoint()
            passes += 1
        poll.poke()  # a request inside the window extends it: still one spell
        start = time.perf_counter()
        await trio.testing.wait_all_tasks_blocked()  # returns once the poller sleeps again
        assert time.perf_counter() - start >= 0.04  # it did not sleep before the window ended
        assert poll.windows == 1
        poll.poke()  # after a sleep, the next request starts a new spell
        await trio.testing.wait_all_tasks_blocked()
        assert poll.windows == 2
        nursery.cancel_scope.cancel()


async def test_it_steps_aside_while_another_thread_works_for_the_daemon() -> None:
    """While `yield_to` says a thread (an fsync, the key preparer) is at work, a
    request does not start polling: that thread would wait for the interpreter lock."""
    working = True
    poll = BusyPoll(5.0, yield_to=lambda: working)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll.run)
        await trio.testing.wait_all_tasks_blocked()
        poll.poke()
        with trio.fail_after(2):  # far less than the 5 s window: it went back to sleep
            await trio.testing.wait_all_tasks_blocked()
        assert poll.windows == 1
        working = False
        poll.poke()
        for _ in range(50):  # now it polls: the loop stays busy
            await trio.lowlevel.checkpoint()
        assert poll.windows == 2
        nursery.cancel_scope.cancel()


async def test_a_change_suspends_polling_for_a_while() -> None:
    """Saves do not gain from polling (and their slow tail grew with it): after a
    change (`hold`) a request does not start polling until `HOLD` has passed."""
    poll = BusyPoll(5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll.run)
        await trio.testing.wait_all_tasks_blocked()
        poll.hold()
        poll.poke()
        with trio.fail_after(2):  # far less than the 5 s window: it did not poll
            await trio.testing.wait_all_tasks_blocked()
        assert poll.windows == 0  # (not even woken)
        await trio.sleep(HOLD)
        poll.poke()
        for _ in range(50):  # the hold is over: it polls again
            await trio.lowlevel.checkpoint()
        assert poll.windows == 1
        nursery.cancel_scope.cancel()


async def test_a_window_of_zero_turns_polling_off() -> None:
    poll = BusyPoll(0)
    with trio.fail_after(5):
        await poll.run()  # returns at once instead of waiting for requests
    poll.poke()
    assert poll.windows == 0


@pytest.fixture
def two(nodes: Nodes, tmp_path: Path) -> Iterator[tuple[Mounted, Mounted]]:
    mounts = []
    for name, env in (("a", {}), ("b", {"SLURPFS_MOUNT_BUSY_POLL": "0"})):
        node, _ = nodes.new(name)
        node.close_all()  # the daemon opens the store
        mounts.append(Mounted(node.data_dir, tmp_path / f"mnt-{name}", env=env))
    try:
        for m in mounts:
            m.mount()
        yield mounts[0], mounts[1]
    finally:
        for m in mounts:
            m.sweep()


@pytest.mark.mount
def test_a_mount_polls_during_a_walk_and_not_when_idle(two: tuple[Mounted, Mounted]) -> None:
    """A tree walk makes the daemon poll between requests (counted in the status);
    with `mount.busy_poll = 0` it never does. Idle, a polling daemon sleeps: it uses
    (almost) no CPU, where one that kept polling would use a whole CPU."""
    polling, quiet = two
    for m in two:
        base = m.ucxl / "claude:architect@bzzz:auth"
        for i in range(20):
            (base / f"d{i}").mkdir(parents=True)
            (base / f"d{i}" / "developer").write_bytes(b"context %d\n" % i)
        for _ in range(3):
            for top, _dirs, files in os.walk(m.ucxl):
                for name in files:
                    Path(top, name).read_bytes()
    # (.slurp/status is rendered at most once a second)
    wait_for(lambda: _windows(polling) > 0, what="polling spells counted")
    time.sleep(1.1)
    assert _windows(quiet) == 0
    # The indexer's work on the writes above is CPU too: let it finish first.
    wait_for(lambda: _caught_up(polling), what="the indexer to catch up")
    pid = _pid(polling)
    time.sleep(0.5)  # the last window (1 ms) is long over
    before = _cpu_seconds(pid)
    time.sleep(2.0)
    used = _cpu_seconds(pid) - before
    assert used < 0.5, f"an idle daemon used {used:.2f} s of CPU in 2 s"
    for m in two:
        m.unmount()


def _status(m: Mounted) -> str:
    return (m.mnt / ".slurp" / "status").read_text()


def _windows(m: Mounted) -> int:
    found = re.search(r"^fs_busy_poll_windows: (\d+)$", _status(m), re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def _caught_up(m: Mounted) -> bool:
    fields = dict(re.findall(r"^(\w+): (.*)$", _status(m), re.MULTILINE))
    return fields.get("search_ready") == "1" and fields.get("indexer_seq") == fields.get(
        "model_store_sequence"
    )


def _pid(m: Mounted) -> int:
    found = re.search(r"^pid: (\d+)$", _status(m), re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
