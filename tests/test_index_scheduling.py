"""The indexer yields to the mount: it waits for a pause, applies a backlog in steps.

Activity is a counter the test moves by hand (the daemon passes the count of
requests the mount served); commits come from the model as usual. The indexer
keeps time with trio's clock, which the tests of its timing run as an
autojumping `MockClock` (`autojump_clock`): a wait passes at once when every
task waits, and the clock stands still while the indexer's worker thread works
(`clock_stops_while`), so a step takes no time on it, however loaded the machine.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import pytest
import trio
import trio.testing
from conftest import Node, Nodes
from test_index_support import ENGINES, address, document

from slurpfs.index import Indexer, SearchService
from slurpfs.index.whoosh_engine import WhooshIndex
from slurpfs.model import BatchItem, ContextStore


async def eventually(condition: Callable[[], bool], deadline: float) -> None:
    """Wait until `condition()` holds (a search of an index another task updates)."""
    with trio.fail_after(deadline):
        while not condition():  # noqa: ASYNC110 - polled under a deadline
            await trio.sleep(0.005)


def hits(search: SearchService, query: str) -> int:
    return search.search(query, ["developer"]).total


@pytest.fixture(params=ENGINES)
def setup(request: pytest.FixtureRequest, nodes: Nodes) -> tuple[Node, ContextStore]:
    return nodes.new(held=["developer"], overrides={"search.engine": request.param})


async def clock_stops_while(limiter: trio.CapacityLimiter) -> None:
    """Keep the mock clock still while a worker thread holds `limiter`.

    The autojumping clock moves whenever every task waits, and a task waiting for
    a thread waits: the clock would run through any wait of the test while the
    indexer's thread works. This task stays runnable while the thread works
    (sleeping for real between checks, so the thread runs), which stops the clock;
    otherwise it checks every millisecond of the clock.
    """
    while True:
        if limiter.statistics().borrowed_tokens:
            time.sleep(0.0005)  # noqa: ASYNC251 - holds the loop, and so the clock
            await trio.lowlevel.checkpoint()
        else:
            await trio.sleep(0.001)


async def busy(activity: list[int], every: float) -> None:
    """The mount serving requests: the counter moves every `every` seconds."""
    while True:
        activity[0] += 1
        await trio.sleep(every)


async def test_indexing_waits_while_the_mount_is_busy(
    setup: tuple[Node, ContextStore], autojump_clock: trio.testing.MockClock
) -> None:
    _node, model = setup
    search = SearchService.open(model)
    activity = [0]
    worker = trio.CapacityLimiter(1)
    indexer = Indexer(
        search,
        poll_interval=60.0,
        quiet=1.0,
        max_delay=60.0,
        activity=lambda: activity[0],
        limiter=worker,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock_stops_while, worker)
        await nursery.start(indexer.run)
        model.put(address("src/busy.go"), "developer", document("deferredword"))
        with trio.move_on_after(1.5):  # requests for longer than `quiet`, never a pause
            await busy(activity, 0.02)
        assert hits(search, "deferredword") == 0
        assert indexer.statistics().queue_depth == 1
        # Requests stop: indexed after the quiet period.
        await eventually(lambda: hits(search, "deferredword") == 1, deadline=5.0)
        indexer.stop()
        nursery.cancel_scope.cancel()
    search.close()


async def test_a_busy_mount_still_gets_indexed_after_the_longest_delay(
    setup: tuple[Node, ContextStore], autojump_clock: trio.testing.MockClock
) -> None:
    _node, model = setup
    search = SearchService.open(model)
    activity = [0]
    worker = trio.CapacityLimiter(1)
    indexer = Indexer(
        search,
        poll_interval=60.0,
        quiet=0.5,
        max_delay=0.3,
        activity=lambda: activity[0],
        limiter=worker,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock_stops_while, worker)
        await nursery.start(indexer.run)
        nursery.start_soon(busy, activity, 0.02)
        model.put(address("src/forced.go"), "developer", document("forcedword"))
        await eventually(lambda: hits(search, "forcedword") == 1, deadline=5.0)
        indexer.stop()
        nursery.cancel_scope.cancel()
    search.close()


async def test_a_backlog_is_applied_in_growing_steps(
    setup: tuple[Node, ContextStore], autojump_clock: trio.testing.MockClock
) -> None:
    _node, model = setup
    search = SearchService.open(model)
    worker = trio.CapacityLimiter(1)
    indexer = Indexer(
        search, poll_interval=60.0, quiet=0.05, min_step=4, max_step=16, limiter=worker
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock_stops_while, worker)
        await nursery.start(indexer.run)
        burst = [
            BatchItem(address(f"burst/b{i}"), "developer", document(f"stepword {i}"))
            for i in range(40)
        ]
        await trio.to_thread.run_sync(model.put_many, burst)
        await eventually(lambda: hits(search, "stepword") == 40, deadline=20.0)
        await eventually(lambda: indexer.statistics().queue_depth == 0, deadline=5.0)
        stats = indexer.statistics()
        assert stats.documents_indexed == 40
        assert 4 <= stats.batches < 10  # 4 + 8 + 16 + 12, not ten steps of 4
        assert stats.seq == model.store.sequence()
        indexer.stop()
        nursery.cancel_scope.cancel()
    search.close()


def test_catch_up_applies_at_most_a_limit_and_says_what_is_left(
    setup: tuple[Node, ContextStore],
) -> None:
    _node, model = setup
    search = SearchService.open(model)
    for i in range(5):
        model.put(address(f"limit/l{i}"), "developer", document(f"limitword {i}"))
    assert search.pending()
    report = search.catch_up(limit=2)
    assert report.indexed == 2
    assert search.pending()
    assert hits(search, "limitword") == 2
    search.catch_up()
    assert not search.pending()
    assert hits(search, "limitword") == 5
    search.close()


def found(search: SearchService, query: str, count: int) -> bool:
    return hits(search, query) == count


def segments(search: SearchService) -> int:
    index = search._indexes["developer"]
    assert isinstance(index, WhooshIndex)
    return index.segments()


def test_commits_without_merge_keep_their_segments_until_tidy(nodes: Nodes) -> None:
    """A whoosh commit made while the mount is busy merges nothing (a merge holds
    the interpreter lock for a long sort); `tidy` merges as the commits would have."""
    _node, model = nodes.new(held=["developer"], overrides={"search.engine": "whoosh"})
    with SearchService.open(model) as search:
        for i in range(8):
            model.put(address(f"seg/s{i}"), "developer", document(f"segword {i}"))
            search.catch_up(merge=False)
        assert segments(search) == 8  # whoosh's policy would have merged five of them
        assert hits(search, "segword") == 8
        assert search.tidy()
        assert segments(search) < 8
        assert hits(search, "segword") == 8
        assert not search.tidy(), "nothing left to merge"
    with SearchService.open(model) as search:  # the merged index was saved
        assert hits(search, "segword") == 8
        assert search.statistics().rebuilt == ()


async def test_a_busy_mount_gets_its_segments_merged_once_idle(
    nodes: Nodes, autojump_clock: trio.testing.MockClock
) -> None:
    _node, model = nodes.new(held=["developer"], overrides={"search.engine": "whoosh"})
    search = SearchService.open(model)
    activity = [0]
    worker = trio.CapacityLimiter(1)
    indexer = Indexer(
        search,
        poll_interval=0.2,
        quiet=0.5,
        max_delay=0.1,
        min_step=1,
        max_step=1,
        activity=lambda: activity[0],
        limiter=worker,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock_stops_while, worker)
        await nursery.start(indexer.run)
        async with trio.open_nursery() as requests:
            requests.start_soon(busy, activity, 0.01)
            for i in range(8):
                model.put(address(f"busy/b{i}"), "developer", document(f"busyword {i}"))
                await eventually(functools.partial(found, search, "busyword", i + 1), 10.0)
            # Every document was committed as a segment of its own while requests went on.
            assert segments(search) == 8
            assert indexer.statistics().tidied == 0
            requests.cancel_scope.cancel()
        await eventually(lambda: indexer.statistics().tidied == 1, deadline=10.0)
        assert segments(search) < 8
        assert hits(search, "busyword") == 8
        indexer.stop()
        nursery.cancel_scope.cancel()
    search.close()


def test_a_tidy_that_finds_the_index_saved_elsewhere_takes_that_one(nodes: Nodes) -> None:
    _node, model = nodes.new(held=["developer"], overrides={"search.engine": "whoosh"})
    first = SearchService.open(model)
    for i in range(2):
        model.put(address(f"race/r{i}"), "developer", document(f"raceword {i}"))
        first.catch_up(merge=False)
    second = SearchService.open(model)
    model.put(address("race/other"), "developer", document("raceword other"))
    second.catch_up()  # saved by `second`: what `first` last read is now stale
    assert not first.tidy(), "its merge could not be saved"
    assert hits(first, "raceword") == 3  # it took the index `second` saved
    first.close()
    second.close()
