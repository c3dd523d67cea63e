"""The daemon: the FUSE loop, and the background tasks under a `Supervisor`.

Background tasks (each a `slurpfs.service.supervisor.Task`, started in this
order, stopped in the reverse order):

- ``invalidator``: `Invalidator`, the store's change feed to kernel cache invalidations;
- ``control``: `ControlServer`, the local control socket (change notifications, ``watch``);
- ``http``: `HttpServer`, ``/metrics`` and ``/health*`` on ``http.listen`` (unless
  ``off``); its socket is bound before the mount is made, so a port in use stops the start;
- ``search``: a `WorkerProcess` running the search worker (the search engine and
  the `Indexer`, in a process of their own: `slurpfs.service.search_worker`); the mount
  does not wait for it, ``.search/`` asks it over its socket (`SearchClient`);
- ``replication``: a `WorkerProcess` running the replication worker
  (`slurpfs.net.worker`) when the data directory has a cluster (``<data>/cluster/``),
  or from the control socket's ``cluster`` (a cluster was founded or joined while
  mounted); the daemon passes its commits on and runs the invalidator when a
  peer's versions arrive (`ReplicationClient`);
- ``sync``: `Syncer`, the periodic sync to stable storage (``durability.sync_interval``);
- ``ttl``: `TtlCleaner`, expired contexts are purged (once a minute);
- ``keys``: `KeyPreparer`, data keys sealed ahead of time in a thread of its own;
- ``busy_poll``: `BusyPoll` keeps the loop polling for requests for ``mount.busy_poll``
  seconds after each one (a tree walk's requests then find it awake);
- ``watchdog``: `Watchdog`, systemd's ``WATCHDOG=1`` when it asks for it.

What is fatal, decided here and nowhere else: a failure to start (the control
socket's claim on the data directory, the HTTP socket's bind, mounting) stops
the start with nothing mounted; once mounted, only the FUSE loop itself
(`pyfuse3.main` raising) and the signal handler end the daemon. A background
task that fails is logged, shown in ``.slurp/status`` and the ``tasks`` health
check, and restarted with backoff; the mount goes on serving files.

SIGTERM/SIGINT end the FUSE loop; so does the kernel (``umount``). Teardown is one
ordered `contextlib.AsyncExitStack`, the same on every exit path (a loop that
raised included): commit every open file's unsaved writes, sync, stop the tasks
(the search worker after the batch in progress, or abandoning an index build;
a worker still running when the time is over is killed) within
`SHUTDOWN_TIMEOUT`, unmount, close the store; then the exit status goes to
``slurpfs umount``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from slurpfs.config import Config
from slurpfs.crypto.keypool import DEFAULT_DEPTH, KeyPool
from slurpfs.errors import SlurpError
from slurpfs.fs.handles import Gateway
from slurpfs.fs.invalidate import FuseKernel, Invalidator, Kernel
from slurpfs.fs.ops import Operations
from slurpfs.fs.virtual import flatten
from slurpfs.fs.writebehind import WriteBehind, WriteBehindStatistics, replay
from slurpfs.health import OK, WARN, Check
from slurpfs.index.sealed import open_table
from slurpfs.metrics import Metrics
from slurpfs.model import ContextStore
from slurpfs.net.members import cluster_dir
from slurpfs.service.cache_tier import RedisProbe, open_tier
from slurpfs.service.commit_worker import COMMIT_WORKER, CommitClient
from slurpfs.service.control import ControlServer, notify_daemon, socket_path
from slurpfs.service.endpoints import Endpoints, MountProbe
from slurpfs.service.http import HttpServer
from slurpfs.service.maintenance_client import MaintenanceClient
from slurpfs.service.maintenance_worker import MAINTENANCE_WORKER
from slurpfs.service.remote_search import SEARCH_WORKER, SearchClient
from slurpfs.service.replication import REPLICATION_WORKER, ReplicationClient
from slurpfs.service.supervisor import Stoppable, Supervisor
from slurpfs.service.workers import WorkerProcess, background_priority, foreground_priority
from slurpfs.store import journal

log = logging.getLogger("slurpfs.daemon")

__all__ = ["Daemon", "MountError", "MountOptions", "notify_daemon"]

TTL_INTERVAL = 60.0
SHUTDOWN_TIMEOUT = 30.0  # seconds the background tasks have to stop, in all
GIL_SWITCH_INTERVAL = 0.0005  # seconds (Python's default is 0.005)


class MountError(SlurpError):
    """The filesystem cannot be mounted (mountpoint, FUSE device, busy data directory)."""

    errno = errno.EIO
    exit_code = 10


@dataclass(frozen=True, slots=True)
class MountOptions:
    mountpoint: Path
    allow_other: bool = False
    debug_fuse: bool = False

    def fuse_options(self) -> set[str]:
        # No default_permissions: access is decided per role in the handlers, not by mode bits.
        options = set(pyfuse3.default_options) - {"default_permissions"}
        options |= {"fsname=slurpfs", "subtype=slurpfs", "noatime"}
        if self.allow_other:
            options.add("allow_other")
        if self.debug_fuse:
            options.add("debug")
        return options


@dataclass(frozen=True, slots=True)
class SyncStatistics:
    passes: int


class Syncer(Stoppable):
    """Syncs the store every `interval` seconds when this process wrote to it, and
    anchors the audit log when it has new entries (the window in which entries can
    be cut off the log unnoticed is one interval)."""

    def __init__(self, gateway: Gateway, interval: float) -> None:
        super().__init__()
        self.gateway = gateway
        self.interval = interval
        self.passes = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.stoppable():
            task_status.started()
            while True:
                await trio.sleep(self.interval)
                await self.gateway.sync()  # returns at once if nothing is new
                await self.gateway.anchor_audit()  # likewise
                self.passes += 1

    def statistics(self) -> SyncStatistics:
        return SyncStatistics(self.passes)


class GroupCommit(Stoppable):
    """Runs the write-behind group commit (`WriteBehind.serve`) as a supervised task."""

    def __init__(self, writebehind: WriteBehind) -> None:
        super().__init__()
        self.writebehind = writebehind

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.stoppable():
            task_status.started()
            await self.writebehind.serve()

    def statistics(self) -> WriteBehindStatistics:
        return self.writebehind.statistics()


class JournalHealth:
    """The ``journal`` health check: what a replay could not read, a failing group commit."""

    def __init__(self, directory: Path, writebehind: WriteBehind | None) -> None:
        self.directory = directory
        self.writebehind = writebehind

    def check(self) -> Check:
        problems = []
        kept = journal.damaged_files(self.directory)
        if kept:
            names = ", ".join(p.name for p in kept)
            problems.append(
                f"journal entries that could not be replayed are kept in {names}"
                f" (in {self.directory}; the log names each; remove the file once read)"
            )
        wb = self.writebehind
        if wb is not None and wb.failure is not None:
            problems.append(f"group commit failing ({len(wb)} saves journaled): {wb.failure}")
        if problems:
            return Check("journal", WARN, "; ".join(problems))
        mode = "write-behind" if wb is not None else "off (commits at close)"
        return Check("journal", OK, mode)


@dataclass(frozen=True, slots=True)
class TtlStatistics:
    passes: int
    purged_versions: int


class TtlCleaner(Stoppable):
    """Purges contexts whose TTL has passed, and has the kernel forget them."""

    def __init__(
        self,
        gateway: Gateway,
        on_purge: Callable[[list[tuple[str, str]]], Awaitable[None]],
        interval: float = TTL_INTERVAL,
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.on_purge = on_purge
        self.interval = interval
        self.passes = self.purged = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        model = self.gateway.model
        with self.stoppable():
            task_status.started()
            while True:
                purged: list[tuple[str, str]] = []
                expire = functools.partial(model.expire, purged=purged)
                removed = await trio.to_thread.run_sync(expire)
                self.passes += 1
                if removed:
                    self.purged += removed
                    self.gateway.expired()
                    await self.on_purge(purged)
                    log.info("TTL cleanup removed %d expired versions", removed)
                await trio.sleep(self.interval)

    def statistics(self) -> TtlStatistics:
        return TtlStatistics(self.passes, self.purged)


class KeyThreadEnded(SlurpError):
    """The key preparer's thread ended without being asked to (its error is the cause)."""


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    roles: int
    filling: bool


class KeyPreparer:
    """Keeps the model's `KeyPool` topped up from a thread of its own.

    The thread runs under Linux's ``SCHED_IDLE`` policy: it seals only when a CPU
    would otherwise be idle. At normal priority it competed with the FUSE loop and
    the process being served for the two cores a small machine has, and a save now
    and then waited a scheduler time slice (3-5 ms) for it: the pool made the
    typical save faster and the slowest ones much slower. A commit that finds the
    pool low wakes the thread (`threading.Event`, from whatever thread commits).
    At start it prepares keys for every role, so the first saves find some.
    `run` ends (and the supervisor restarts it) if the thread dies; meanwhile
    commits seal inline.
    """

    def __init__(self, model: ContextStore, depth: int = DEFAULT_DEPTH) -> None:
        self.model = model
        self.pool = KeyPool(depth, on_low=self._low)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stopped = False
        self.filling = False  # set by the thread while it seals (read by the busy poll)

    def _low(self) -> None:  # any thread
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for role in self.model.config.role_names:
            self.pool.want(self.model.reader_set(role))
        self._stop.clear()
        if self._stopped:
            self._stop.set()
        self._wake.set()
        ended = trio.Event()
        token = trio.lowlevel.current_trio_token()
        failure: list[BaseException] = []

        def body() -> None:
            try:
                self._fill()
            except BaseException as exc:  # handed to `run`, which raises it
                failure.append(exc)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(ended.set)

        thread = threading.Thread(target=body, name="slurpfs-keys", daemon=True)
        thread.start()
        self.model.key_pool = self.pool
        try:
            task_status.started()
            await ended.wait()
            if not self._stop.is_set():
                cause = failure[0] if failure else None
                raise KeyThreadEnded(f"the key thread ended: {cause!r}") from cause
        finally:
            self.model.key_pool = None
            self._stop.set()
            self._wake.set()
            if thread.native_id is not None:  # else it never ran: nothing to wait for
                foreground_priority(os.getpid(), threads=[thread.native_id])
            with trio.CancelScope(shield=True):  # it finishes the key in hand (< 1 ms)
                await trio.to_thread.run_sync(thread.join)
            self.pool.clear()

    def stop(self) -> None:
        self._stopped = True
        self._stop.set()
        self._wake.set()

    def statistics(self) -> KeyStatistics:
        return KeyStatistics(len(self.model.config.role_names), self.filling)

    def _fill(self) -> None:
        background_priority()
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            self.filling = True
            try:
                self.pool.fill()
            finally:
                self.filling = False


@dataclass(frozen=True, slots=True)
class WatchdogStatistics:
    interval: float | None


class Watchdog(Stoppable):
    """``WATCHDOG=1`` to systemd every half of ``WATCHDOG_USEC`` (when it asks)."""

    def __init__(self, notify: Callable[[str], None]) -> None:
        super().__init__()
        self._notify = notify
        self.interval = watchdog_interval()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.interval is None:
            return  # nothing to do: the supervisor does not restart a task that returns
        with self.stoppable():
            while True:
                self._notify("WATCHDOG=1")
                await trio.sleep(self.interval)

    def statistics(self) -> WatchdogStatistics:
        return WatchdogStatistics(self.interval)


class Daemon:
    """One mounted filesystem over an open `ContextStore`."""

    def __init__(
        self,
        config: Config,
        model: ContextStore,
        options: MountOptions,
        *,
        kernel: Kernel | None = None,
        notify: Callable[[str], None] | None = None,
        passphrase: bytes | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.options = options
        self._notify = notify or sd_notify
        control = str(socket_path(config.data_dir)).encode()
        self.ops = Operations(
            model,
            config,
            owner_uid=os.getuid(),
            owner_gid=os.getgid(),
            root_xattrs={
                b"user.slurp.pid": str(os.getpid()).encode(),
                b"user.slurp.control": control,
                b"user.slurp.data": str(config.data_dir).encode(),
            },
            status_info={"pid": os.getpid(), "mountpoint": str(options.mountpoint)},
            metrics=Metrics(),
        )
        self.invalidator = Invalidator(self.ops, kernel or FuseKernel())
        self._passphrase = passphrase  # for the commit worker (write-behind)
        self.search_client = SearchClient(config, passphrase)
        self.search = WorkerProcess(
            "search", SEARCH_WORKER, self.search_client, log_format=config.log.format
        )
        self.ops.search.attach(self.search_client.searcher, self.search_client.progress_view)
        model.subscribe(self.search_client.committed)
        self.ops.stat_sources.append(lambda: flatten(self.search.statistics(), "worker_search_"))
        self.maintenance: WorkerProcess | None = None
        if config.backup.schedule or config.compaction.schedule:
            self.maintenance_client = MaintenanceClient(config, passphrase)
            self.maintenance = WorkerProcess(
                "maintenance",
                MAINTENANCE_WORKER,
                self.maintenance_client,
                log_format=config.log.format,
            )
            self.ops.stat_sources.append(self.maintenance_client.report)
            self.ops.health.extra.append(self.maintenance_client.check)
        self.replication_client = ReplicationClient(
            config, passphrase, self._peer_changed, self._members_changed
        )
        self.replication = WorkerProcess(
            "replication",
            REPLICATION_WORKER,
            self.replication_client,
            log_format=config.log.format,
        )
        self._replicating = False
        self._nursery: trio.Nursery | None = None
        self.control = ControlServer(
            config.data_dir,
            self._changed,
            self._describe,
            search=lambda: self.search_client.progress.describe(),
            cluster=self._cluster,
            peers=self._peers,
        )
        self.syncer = Syncer(self.ops.gateway, config.durability.sync_interval)
        self.ttl = TtlCleaner(self.ops.gateway, self._purged)
        self.keys = KeyPreparer(model)
        self.watchdog = Watchdog(self._notify)
        self.supervisor = Supervisor()
        self.ops.health.extra.append(self.supervisor.check)
        self.ops.stat_sources.append(self.supervisor.status)
        self.ops.stat_sources.append(self._task_numbers)
        gateway_threads = self.ops.gateway.limiter
        # The loop stops polling while a thread works for it (see `BusyPoll`).
        self.ops.busy.yield_to = lambda: self.keys.filling or gateway_threads.borrowed_tokens > 0
        self.http = self._http_server()
        self.redis = self._redis_tier()
        self.group_commit: GroupCommit | None = None
        self.committer: CommitClient | None = None
        self.commit_worker: WorkerProcess | None = None

    def _redis_tier(self) -> RedisProbe | None:
        """The Redis tier of envelopes (``cache.redis_url``), wired into the model."""
        tier = open_tier(self.config.cache, self.ops.metrics.redis)
        if tier is None:
            return None
        self.model.envelopes = tier
        self.ops.health.extra.append(tier.check)
        self.ops.stat_sources.append(lambda: flatten(tier.statistics(), "redis_"))
        return RedisProbe(tier)

    def _task_numbers(self) -> dict[str, int]:
        """Restarts and consecutive failures of each background task (for metrics)."""
        out: dict[str, int] = {}
        for s in self.supervisor.states():
            out[f"task_{s.name}_restarts"] = s.restarts
            out[f"task_{s.name}_failures"] = s.failures
        return out

    def _journal(self) -> None:
        """Replay what a previous run journaled, then open this run's journal (write-behind)
        or let the old one go. Before the mount answers anything."""
        directory = self.config.data_dir / "journal"
        directory.mkdir(mode=0o700, exist_ok=True)
        done = replay(self.model, directory)
        if done.stored or done.unchanged:
            log.info(
                "journal replayed: %d saves stored, %d equal to their head",
                done.stored,
                done.unchanged,
            )
        for problem in done.problems:
            log.error("journal: %s (kept as %s)", problem, done.kept)
        wb = None
        path = directory / journal.FILE_NAME
        if self.config.durability.write_behind:
            key = journal.journal_key(self.model.keyring.node)
            self.committer = CommitClient(self.config, self._passphrase)
            self.commit_worker = WorkerProcess(
                "commit", COMMIT_WORKER, self.committer, log_format=self.config.log.format
            )
            wb = WriteBehind(
                journal.Journal(path, key),
                self.ops.gateway,
                self.config.durability.commit_delay,
                self.ops.files.stored,
                self.committer,
            )
            self.ops.files.writebehind = wb
            self.ops.gateway.journal = wb.journal
            self.group_commit = GroupCommit(wb)
            self.ops.stat_sources.append(lambda: flatten(wb.statistics(), "writebehind_"))
            worker = self.commit_worker
            self.ops.stat_sources.append(lambda: flatten(worker.statistics(), "worker_commit_"))
            self.ops.stat_sources.append(self.committer.report)
        else:
            path.unlink(missing_ok=True)
        self.ops.health.extra.append(JournalHealth(directory, wb).check)

    def _http_server(self) -> HttpServer | None:
        address = self.config.http.address
        self.ops.status_info["http"] = "off"
        if address is None:
            return None
        ops = self.ops
        probe = MountProbe(self.options.mountpoint / ".slurp" / "status", lambda: ops.stopping)
        endpoints = Endpoints(ops.health, probe, ops.metrics.render)
        server = HttpServer(address, endpoints.routes())
        ops.stat_sources.append(lambda: flatten(server.statistics(), "http_"))
        return server

    def _listen(self) -> None:
        """Bind the HTTP endpoints' socket (MountError if that fails)."""
        if self.http is None:
            log.info("HTTP endpoints are off (http.listen = off)")
            return
        address = self.http.address
        try:
            bound = self.http.bind()
        except OSError as exc:
            raise MountError(
                f"http.listen: cannot listen on {address}: {exc.strerror or exc}"
            ) from None
        self.ops.status_info["http"] = f"http://{bound}/"
        if not address.loopback:
            log.info(
                "http.listen is %s, not a loopback address: the metrics and health endpoints"
                " answer anyone who can reach it",
                address,
            )

    def _describe(self) -> str:
        return f"{os.getpid()} {self.options.mountpoint}"

    async def _purged(self, contexts: list[tuple[str, str]]) -> None:
        """Contexts the TTL task purged. A purge leaves no change record, so the kernel
        (which would show them for up to mount.entry_timeout) and the search indexes
        are told here."""
        self.search_client.forget(contexts)
        await self.invalidator.forget(contexts)

    async def _peer_changed(self) -> None:
        """The replication worker stored a peer's versions: show them now (a stream of
        them, as in a catch-up, at most one invalidation cycle per `COALESCE`)."""
        self.search_client.wake()
        self.invalidator.nudge()

    async def _members_changed(self) -> None:
        """The member log changed (merged from a peer): trust and granted role keys."""
        await trio.to_thread.run_sync(self.model.reload_keyring)
        if self.committer is not None:
            await self.committer.keys_changed()
        self.ops.roles.set_held(self.model.held_roles())
        held = ", ".join(sorted(self.model.held_roles())) or "(none)"
        log.info("the member log changed: keys read again (roles held: %s)", held)

    async def _cluster(self) -> None:
        """The control socket's ``cluster``: a cluster was founded, joined or changed."""
        if self._replicating:
            self.replication_client.cluster_changed()
            await self._members_changed()
        elif self._nursery is not None:
            await self._members_changed()
            await self._start_replication(self._nursery)

    def _peers(self) -> str | None:
        """The control socket's ``peers``: the members' state as JSON (None: no cluster)."""
        if not self._replicating:
            return None
        return json.dumps(self.replication_client.snapshot(), sort_keys=True)

    async def _start_replication(self, nursery: trio.Nursery) -> None:
        self._replicating = True
        client = self.replication_client
        self.model.subscribe(client.committed)
        self.ops.gateway.replicated = client.replicated
        self.model.fetch_body = client.fetch_body
        client.evicted_here = lambda: self.model.caches_evicted
        self.ops.health.extra.append(client.check)
        self.ops.health.extra.append(client.check_replication)
        client.metrics = self.ops.metrics
        self.ops.stat_sources.append(client.status_lines)
        self.ops.stat_sources.append(
            lambda: flatten(self.replication.statistics(), "worker_replication_")
        )
        self.ops.virtual.register("peers", client.render)
        await self.supervisor.start(nursery, "replication", self.replication)

    async def _changed(self) -> None:
        """A writer outside the daemon committed (control socket ``changed``)."""
        self.search_client.wake()
        self.replication_client.wake()
        await self.invalidator.poke()

    # -- lifecycle ---------------------------------------------------------------------

    def run(self, ready: Callable[[], None] | None = None) -> int:
        """Mount, serve until unmounted or signalled, clean up. Returns the exit status."""
        try:
            self.control.claim()
            self._journal()  # replayed before the mount answers
            self._listen()  # before mounting: a port in use fails the start with nothing mounted
            open_table(self.model.store)  # before any thread could open it (see there)
            try:
                pyfuse3.init(self.ops, str(self.options.mountpoint), self.options.fuse_options())
            except RuntimeError as exc:
                raise MountError(f"cannot mount at {self.options.mountpoint}: {exc}") from None
        except BaseException:
            if self.http is not None:
                self.http.close()
            self.model.close()
            raise
        # The FUSE loop waits for the GIL whenever a background thread (indexer,
        # sync) holds it, by default for up to 5 ms a turn: hand it over sooner.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        status = 1
        try:
            trio.run(self._main, ready)
            status = 0
        finally:
            sys.setswitchinterval(switch_interval)
            log.info("unmounted %s; exiting with status %d", self.options.mountpoint, status)
            self.control.report_exit(status)
        return status

    async def _main(self, ready: Callable[[], None] | None) -> None:
        """Serve until the FUSE loop ends; tear down in order however it ends.

        The stack's callbacks run last-registered first: commit open files, sync,
        stop the tasks and worker processes, (the tasks' nursery ends), unmount,
        close the store. The FUSE loop is the body: when the stack
        unwinds it has ended (returned, raised, or been cancelled by a signal
        handler's failure), so commits can no longer race a handler.
        """
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.model.close)
            if self.redis is not None:
                stack.callback(self.redis.tier.close)  # after the last save wrote through
            if self.group_commit is not None:
                stack.callback(self.group_commit.writebehind.journal.close)
            stack.callback(self._unmount)
            if self.http is not None:
                stack.callback(self.http.close)  # (when the loop ended before serving it)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)  # the signal handler (tasks are stopped)
            stack.push_async_callback(self._shielded, self._stop_tasks)
            stack.push_async_callback(self._shielded, self.ops.gateway.sync)
            stack.push_async_callback(self._shielded, self._commit_open_files)
            await self._start_tasks(nursery)
            nursery.start_soon(self._signals)
            log.info(
                "mounted %s at %s (pid %d)",
                self.config.data_dir,
                self.options.mountpoint,
                os.getpid(),
            )
            if ready is not None:
                ready()
            self._notify("READY=1")
            await pyfuse3.main()  # until the kernel unmounts us or a signal ends it
            self._notify("STOPPING=1")

    async def _start_tasks(self, nursery: trio.Nursery) -> None:
        start = functools.partial(self.supervisor.start, nursery)
        await start("invalidator", self.invalidator)
        await start("control", self.control)
        if self.http is not None:
            await start("http", self.http)
            log.info(
                "HTTP endpoints at %s (/metrics, /health, /health/live, /health/ready,"
                " /health/checks)",
                self.ops.status_info["http"],
            )
        await start("search", self.search)
        if self.maintenance is not None:
            await start("maintenance", self.maintenance)
        self._nursery = nursery
        if (cluster_dir(self.config.data_dir) / "members.log").exists():
            await self._start_replication(nursery)
        await start("sync", self.syncer)
        await start("ttl", self.ttl)
        await start("keys", self.keys)
        if self.commit_worker is not None:
            await start("commit", self.commit_worker)
        if self.group_commit is not None:
            await start("group_commit", self.group_commit)
        await start("busy_poll", self.ops.busy)
        await start("watchdog", self.watchdog)
        if self.redis is not None:
            await start("redis", self.redis)

    @staticmethod
    async def _shielded(step: Callable[[], Awaitable[object]]) -> None:
        """A teardown step runs even when the stack unwinds because of a cancellation."""
        with trio.CancelScope(shield=True):
            await step()

    async def _commit_open_files(self) -> None:
        self.ops.stopping = True
        failed = await self.ops.files.commit_all()
        if failed:
            log.error("%d open files could not be stored at shutdown", failed)

    async def _stop_tasks(self) -> None:
        await self.supervisor.stop(SHUTDOWN_TIMEOUT)

    def _unmount(self) -> None:
        self.ops.inodes.forget_all()
        pyfuse3.close(unmount=True)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: committing open files and unmounting", signal.Signals(signum).name)
                self.ops.stopping = True
                pyfuse3.terminate()


# -- systemd notification (Type=notify): the protocol is the environment's, not config --


def sd_notify(state: str) -> None:
    """Send `state` to systemd if it started us with NOTIFY_SOCKET; otherwise nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", state, exc)


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    return int(usec) / 2_000_000
