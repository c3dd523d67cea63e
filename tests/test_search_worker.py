"""The search worker process and its client, without FUSE: a real worker over a real store.

`WorkerProcess` starts ``python -m slurpfs.service.search_worker``; `SearchClient`
talks to it over the socket pair. Queries go through `RemoteSearcher` from a
worker thread, as ``.search/`` sends them, and through the ``.search/`` tree of
an `Operations` without a kernel.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from collections.abc import Callable

import pytest
import trio
import trio.testing
from conftest import Nodes
from fsutil import OpsHarness, running
from test_index_support import ENGINES, address, document, seed

from slurpfs.errors import AccessDenied, QueryError
from slurpfs.fs.ops import Operations
from slurpfs.fs.search import ERROR
from slurpfs.index import SearchResult, SearchService
from slurpfs.index.searcher import SearchProgress, SearchUnavailable
from slurpfs.model import ContextStore
from slurpfs.service.remote_search import SEARCH_WORKER, SearchClient
from slurpfs.service.search_protocol import progress_to_wire
from slurpfs.service.search_worker import SearchWorker
from slurpfs.service.supervisor import Supervisor
from slurpfs.service.wire import PROTOCOL, Message, Peer, encode
from slurpfs.service.workers import WorkerProcess

ARCH = frozenset({"architect"})


@pytest.fixture(params=ENGINES)
def model(request: pytest.FixtureRequest, nodes: Nodes) -> ContextStore:
    _node, model = nodes.new(overrides={"search.engine": request.param})
    seed(model)
    return model


async def until(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Poll `condition` (state another process changes) under a hang guard."""
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - polled under a deadline
            await trio.sleep(0.02)


def ready(client: SearchClient) -> Callable[[], bool]:
    return lambda: client.progress.state == "ready"


def same(remote: SearchResult, local: SearchResult) -> None:
    """The result that crossed the wire is the one the service made (but its time)."""
    assert remote.hits == local.hits
    assert remote.total == local.total
    assert dict(remote.facets) == dict(local.facets)
    assert remote.roles_searched == local.roles_searched


async def search(
    client: SearchClient, query: str, roles: frozenset[str], **kw: object
) -> SearchResult:
    searcher = client.searcher
    return await trio.to_thread.run_sync(lambda: searcher.search(query, roles, **kw))  # type: ignore[arg-type]


@pytest.mark.expect_warnings(  # the supervisor's line for the killed worker
    r"task search failed \(1 in a row\); restarting in \d+ s; the mount goes on serving"
)
async def test_remote_searcher_answers_as_the_service_does_and_survives_a_kill(
    model: ContextStore,
) -> None:
    # A real worker: its answers equal an in-process service's, hit for hit
    # (version ids, snippets and their highlights, facets); errors come back as
    # the same classes; a commit notice makes a new context searchable; after
    # SIGKILL a query fails at once with EAGAIN-style SearchUnavailable (never
    # a hang), the supervisor starts a new worker, and search works again.
    client = SearchClient(model.config, None)
    worker = WorkerProcess("search", SEARCH_WORKER, client)
    supervisor = Supervisor(initial=2.0)
    model.subscribe(client.committed)
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "search", worker)
        await until(ready(client), "the worker to open its indexes")
        with SearchService.open(model) as local:
            for query, kw in [
                ("key", {}),
                ("rotating OR leak", {"limit": 2}),
                ("key", {"role": "developer"}),
            ]:
                same(await search(client, query, ARCH, **kw), local.search(query, ARCH, **kw))  # type: ignore[arg-type]
            no_snippets = await search(client, "key", ARCH, snippets=False)
            same(no_snippets, local.search("key", ARCH, snippets=False))
        with pytest.raises(QueryError):
            await search(client, "key AND (", ARCH)
        with pytest.raises(AccessDenied):
            await search(client, "key", frozenset({"developer"}), role="architect")

        model.put(address("src/late.go"), "developer", document("a lateword arrives"))
        await until(lambda: client.seq == model.store.sequence(), "the commit to be indexed", 10)
        assert len((await search(client, "lateword", ARCH)).hits) == 1

        first = worker.pid
        os.kill(first, signal.SIGKILL)
        await until(lambda: client.progress.state == "restarting", "the death to be noticed")
        with pytest.raises(SearchUnavailable, match="killed by SIGKILL.*restarted") as raised:
            await search(client, "key", ARCH)
        assert raised.value.errno == 11  # EAGAIN
        await until(ready(client), "a new worker")
        assert worker.pid not in (0, first)
        assert not running(first)
        assert len((await search(client, "lateword", ARCH)).hits) == 1
        [state] = supervisor.states()
        assert state.restarts == 1
        last = worker.pid
        await supervisor.stop(30)
    assert not running(last)
    assert worker.statistics().last_exit == "exited with status 0"


async def test_the_tree_queries_through_the_worker_and_shows_progress(model: ContextStore) -> None:
    ops = Operations(model, model.config, owner_uid=os.getuid(), owner_gid=os.getgid())
    fs = OpsHarness(ops)
    client = SearchClient(model.config, None)
    ops.search.attach(client.searcher, client.progress_view)
    worker = WorkerProcess("search", SEARCH_WORKER, client)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        assert len(await fs.listdir(".search/key")) == 5  # (waits while the worker starts)
        status = (await fs.read(".slurp/status")).decode()
        assert "search_progress: ready" in status
        assert "search: ok" in (await fs.read(".slurp/health")).decode()
        worker.stop()
    assert worker.statistics().last_exit == "exited with status 0"
    await fs.forget_all()


async def test_stopping_a_starting_worker_ends_it_cleanly(model: ContextStore) -> None:
    client = SearchClient(model.config, None)
    worker = WorkerProcess("search", SEARCH_WORKER, client)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        pid = worker.pid
        worker.stop()  # before (or while) it opens the store and the indexes
    assert not running(pid)
    assert worker.statistics().last_exit == "exited with status 0"
    assert worker.statistics().unexpected_exits == 0


def scheduler(pid: int) -> set[int]:
    """The scheduling policies of the threads of process `pid`."""
    return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(os.geteuid() != 0, reason="leaving SCHED_IDLE takes CAP_SYS_NICE")
@pytest.mark.expect_warnings(
    r"the search worker \(pid \d+\) did not exit within 5 s of being asked to stop: killing it"
)
async def test_a_stopping_worker_gets_its_priority_back_and_is_killed_if_it_hangs(
    model: ContextStore,
) -> None:
    # The worker runs at SCHED_IDLE (every thread). Asked to stop, it is first put
    # back at normal priority (at idle priority on a busy machine it would take
    # minutes to exit); one that still does not exit (here: SIGSTOPped) is killed
    # after `stop_timeout`, logged once as a warning and not as a failed task.
    client = SearchClient(model.config, None)
    worker = WorkerProcess("search", SEARCH_WORKER, client, stop_timeout=5)
    supervisor = Supervisor()
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery, "search", worker)
        await until(ready(client), "the worker to open its indexes")
        pid = worker.pid
        assert scheduler(pid) == {os.SCHED_IDLE}
        os.kill(pid, signal.SIGSTOP)
        nursery.start_soon(supervisor.stop, 30)
        await until(lambda: scheduler(pid) == {os.SCHED_OTHER}, "the priority to be raised", 5)
    assert not running(pid)
    assert worker.statistics().last_exit == "was killed by SIGKILL"
    assert worker.statistics().unexpected_exits == 0
    [state] = supervisor.states()
    assert (state.state, state.failures) == ("stopped", 0)


async def test_a_service_that_cannot_open_leaves_the_mount_up(model: ContextStore) -> None:
    # The worker cannot open search (an engine it does not know): it stays up and
    # says why; .search/ shows it in .error, the health check fails, and the
    # worker stops cleanly. (The worker's ERROR line goes to the daemon's log.)
    broken = dataclasses.replace(
        model.config, search=dataclasses.replace(model.config.search, engine="no-such-engine")
    )
    ops = Operations(model, model.config, owner_uid=os.getuid(), owner_gid=os.getgid())
    fs = OpsHarness(ops)
    client = SearchClient(broken, None)
    ops.search.attach(client.searcher, client.progress_view)
    worker = WorkerProcess("search", SEARCH_WORKER, client)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await until(lambda: client.progress.state == "unavailable", "the worker to give up")
        assert await fs.listdir(".search/key") == [ERROR]
        assert b"search is unavailable on this mount" in await fs.read(f".search/key/{ERROR}")
        assert (
            "search: FAILING - unavailable: search is unavailable"
            in (await fs.read(".slurp/health")).decode()
        )
        worker.stop()
    assert worker.statistics().last_exit == "exited with status 0"
    await fs.forget_all()


async def test_the_client_keeps_the_workers_last_status_when_reports_arrive_together(
    nodes: Nodes,
) -> None:
    # A daemon busy serving the mount reads the worker's socket late, so the last
    # "building" status and the "ready" after it arrive in one read. The client
    # must end at "ready": the worker sends only what changed, so a "building"
    # applied last would stay (it did, for 15 minutes, in a benchmark).
    _node, model = nodes.new()
    client = SearchClient(model.config, None)
    a, b = socket.socketpair()
    worker_end = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    daemon_end = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    peer = Peer(daemon_end, client.handle, name="the search worker")
    async with worker_end, daemon_end, trio.open_nursery() as nursery:
        await worker_end.send_all(encode(Message("hello", {"protocol": PROTOCOL})))
        await peer.hello()
        client.connected(peer)
        nursery.start_soon(peer.serve)
        for burst in range(32):
            building = SearchProgress("building", 100, 100, 1000.0 + burst)
            reports = [
                Message("status", {"progress": progress_to_wire(building), "seq": burst}),
                Message("status", {"progress": progress_to_wire(SearchProgress("ready"))}),
            ]
            await worker_end.send_all(b"".join(encode(m) for m in reports))
            await trio.testing.wait_all_tasks_blocked()
            assert client.progress.state == "ready"
            assert client.seq == burst
        nursery.cancel_scope.cancel()


@pytest.mark.expect_warnings(
    r"search is unavailable on this mount: configuration text: .*",
)
async def test_a_worker_whose_reports_cannot_reach_the_daemon_stops() -> None:
    # The status reports are the daemon's only view of the worker: when they
    # cannot be sent, the worker stops (here one that waits, search being
    # unavailable, until told to stop: nothing else would end it).
    worker = SearchWorker()
    ours, theirs = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    worker.peer = Peer(stream, worker.handle, name="the daemon")
    theirs.close()  # the daemon's end is gone
    async with stream:
        with trio.fail_after(60):  # hang guard: before, the worker waited forever
            await worker.run(Message("hello", {"config": "not = [toml"}))
