"""The background indexer under trio: commits become searchable, deletions vanish."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from conftest import Node, Nodes, run_cli_process
from test_index_support import ENGINES, address, document

from slurpfs.index import Indexer, SearchService
from slurpfs.model import BatchItem, ContextStore

# A guard against a hang, not a speed check: how soon a save is searchable (the
# goal is a second) is measured by scripts/bench, on a machine with nothing else on.
DEADLINE = 30.0


async def eventually(condition: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Wait until `condition()` holds, failing after `deadline` seconds.

    The conditions are searches of an index another task updates: there is no
    event to wait for, so poll at a short interval under a deadline.
    """
    with trio.fail_after(deadline):
        while not condition():  # noqa: ASYNC110 - polled under a deadline
            await trio.sleep(0.005)


def hits(search: SearchService, query: str, role: str = "developer") -> int:
    return search.search(query, [role]).total


@pytest.fixture(params=ENGINES)
def setup(request: pytest.FixtureRequest, nodes: Nodes) -> tuple[Node, ContextStore]:
    return nodes.new(held=["developer"], overrides={"search.engine": request.param})


async def test_commits_become_searchable_and_deletions_vanish(
    setup: tuple[Node, ContextStore],
) -> None:
    _node, model = setup
    search = SearchService.open(model)
    indexer = Indexer(search, poll_interval=60.0)  # only commit notices can wake it in time
    async with trio.open_nursery() as nursery:
        await nursery.start(indexer.run)
        target = address("src/auth.go")
        await trio.to_thread.run_sync(
            model.put, target, "developer", document("freshly saved words", tags=["fresh"])
        )
        await eventually(lambda: hits(search, "freshly") == 1)
        await trio.to_thread.run_sync(
            model.put, target, "developer", document("replacement text", tags=["fresh"])
        )
        await eventually(lambda: hits(search, "replacement") == 1)
        assert hits(search, "freshly") == 0
        await trio.to_thread.run_sync(model.delete, target, "developer")
        await eventually(lambda: hits(search, "replacement") == 0)
        # the batch is searchable as soon as it is committed; its counts follow
        await eventually(lambda: indexer.statistics().documents_removed >= 1)
        # a query may have caught up first: the indexer still takes its notices
        await eventually(lambda: indexer.statistics().queue_depth == 0)
        stats = indexer.statistics()
        assert stats.documents_indexed == 2
        assert stats.documents_removed >= 1  # removals applied (a query may ask for one too)
        assert stats.queue_depth == 0
        assert stats.lag >= 0
        assert stats.errors == 0
        assert stats.seq == model.store.sequence()
        indexer.stop()
    search.close()


async def test_commits_from_the_trio_thread_and_bursts(setup: tuple[Node, ContextStore]) -> None:
    _node, model = setup
    search = SearchService.open(model)
    indexer = Indexer(search, queue_size=1, poll_interval=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(indexer.run)
        model.put(address("direct"), "developer", document("from the loop itself"))
        await eventually(lambda: hits(search, "loop") == 1)
        burst = [
            BatchItem(address(f"burst/b{i}"), "developer", document(f"burstword {i}"))
            for i in range(50)
        ]
        # put_many notifies once per commit, from its thread: the queue of 1 overflows
        await trio.to_thread.run_sync(model.put_many, burst)
        await eventually(lambda: hits(search, "burstword") == 50)
        assert indexer.statistics().dropped_notices > 0  # dropped, yet indexed from the log
        indexer.stop()
    search.close()


async def put_elsewhere(node: Node, path: str, text: str) -> None:
    """`slurpfs put` in a subprocess: a commit this process is not told about."""
    done = await trio.to_thread.run_sync(
        lambda: run_cli_process(
            "--data",
            node.data_dir,
            "put",
            f"ucxl://claude:architect@bzzz:auth/{path}",
            "--role",
            "developer",
            input=document(text),
        )
    )
    assert done.returncode == 0, done.stderr


async def test_commits_of_other_processes(setup: tuple[Node, ContextStore]) -> None:
    node, model = setup
    search = SearchService.open(model)
    polling = Indexer(search, poll_interval=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(polling.run)
        await put_elsewhere(node, "elsewhere", "polled")
        await eventually(lambda: hits(search, "polled") == 1)
        polling.stop()
    waking = Indexer(search, poll_interval=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(waking.run)
        await put_elsewhere(node, "elsewhere2", "notified")
        waking.wake()  # what the daemon does when `slurpfs put` tells it
        await eventually(lambda: hits(search, "notified") == 1)
        waking.stop()
    search.close()


async def test_stop_before_start_and_statistics_when_idle(nodes: Nodes) -> None:
    _node, model = nodes.new(held=["developer"])
    search = SearchService.open(model)
    indexer = Indexer(search)
    idle = indexer.statistics()
    assert (idle.queue_depth, idle.documents_indexed, idle.batches) == (0, 0, 0)
    indexer.stop()
    async with trio.open_nursery() as nursery:
        await nursery.start(indexer.run)  # returns at once: it was stopped
    search.close()
