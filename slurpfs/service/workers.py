"""Worker processes: CPU-heavy background work in children of the mount's daemon.

The daemon's FUSE loop must never wait for background work, and pure-Python
work in its process would hold the interpreter lock the loop needs (measured:
a mount 3.5-11x slower while the indexer built its first index). So such work
runs in a *worker process*: a plain ``trio.run`` program (``python -m
slurpfs.service.<worker>``) connected to the daemon by one end of a
``socketpair`` (`slurpfs.service.wire`).

Supervisor side, `WorkerProcess` is a `slurpfs.service.supervisor.Task`:

- `run` starts the child (``close_fds``: it inherits only its socket end and
  stdout/stderr, which are the daemon's log; never the FUSE device), exchanges
  ``hello`` (the fields the child needs to start, from `WorkerLogic.setup`),
  serves the connection, and raises `WorkerDied` when the child ends without
  being asked to, so the supervisor restarts it with backoff;
- `stop` sends the ``stop`` notice; the child finishes the work in hand and
  exits 0. If it has not exited when the supervisor's share of the shutdown
  time runs out, the run is cancelled and the child is killed (SIGKILL) and
  reaped: no worker outlives its task.

The child is started from the daemon's main thread (not from a helper thread
as `trio.lowlevel.open_process` does): its parent-death signal fires when the
*thread* that forked it ends, and the main thread lives as long as the daemon.

Child side, `child_start` runs first in every worker: it sets
``PR_SET_PDEATHSIG`` (SIGKILL: the worker dies with the daemon, even when the
daemon is killed), low priority for the whole process (``SCHED_IDLE``, else
nice 19: the worker uses only CPU nothing else wants), ignores SIGTERM and
SIGINT (the daemon stops it, in order; a terminal's Ctrl-C or systemd's
SIGTERM to the whole group must not kill it first), and logs to stderr. EOF
on its socket also ends a worker. Plaintext a worker holds stays in its memory
and the socket: a worker writes no files of its own.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from slurpfs import logs
from slurpfs.config import Config, render_toml
from slurpfs.errors import SlurpError
from slurpfs.service.wire import Message, Peer, PeerGone

log = logging.getLogger("slurpfs.workers")

__all__ = [
    "WorkerDied",
    "WorkerLogic",
    "WorkerProcess",
    "WorkerStatistics",
    "background_priority",
    "child_start",
    "foreground_priority",
    "process_rss",
]

HELLO_TIMEOUT = 60.0  # seconds a new child has to answer hello (imports, on a busy machine)
STOP_TIMEOUT = 15.0  # seconds a child has to exit once asked to stop; then it is killed
_PR_SET_PDEATHSIG = 1


def store_hello(config: Config, passphrase: bytes | None) -> dict[str, Any]:
    """The hello of a worker that opens the store: the effective configuration as
    TOML text and the key passphrase (base64, or None)."""
    return {
        "config": render_toml(config),
        "passphrase": None if passphrase is None else base64.b64encode(passphrase).decode(),
    }


class WorkerDied(SlurpError):
    """A worker process ended without being asked to (its exit status says how)."""


class WorkerLogic(Protocol):
    """What one kind of worker adds to `WorkerProcess` on the supervisor side."""

    def setup(self) -> Mapping[str, Any]:
        """The fields of the supervisor's ``hello``: what the child needs to start."""

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        """A request or notice from the child (see `slurpfs.service.wire.Handler`)."""

    def connected(self, peer: Peer) -> None:
        """The child answered hello: `peer` reaches it until `disconnected`."""

    def disconnected(self, reason: str) -> None:
        """The child is gone (asked to stop, or died: `reason` says which)."""

    async def feed(self, peer: Peer) -> None:
        """Runs while the child is connected: notices to send it (cancelled at the end)."""


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    pid: int  # 0 while no child runs
    starts: int
    unexpected_exits: int  # children that died without being asked to
    last_exit: str  # how the last child ended ("" before the first)
    rss_bytes: int  # resident memory of the running child (0 if none)


class WorkerProcess:
    """A supervised `Task` running one worker program (see module docstring)."""

    def __init__(
        self,
        name: str,
        module: str,
        logic: WorkerLogic,
        *,
        log_level: int | None = None,
        log_format: str = "text",
        hello_timeout: float = HELLO_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.name = name
        self.module = module
        self.logic = logic
        self.log_level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self.log_format = log_format  # the daemon's `log.format`: the child writes to its log
        self.hello_timeout = hello_timeout
        self.stop_timeout = stop_timeout
        self.pid = 0
        self._stopping = trio.Event()
        self._stopped = False
        self._starts = self._deaths = 0
        self._last_exit = ""
        self._killed = False  # killed after `stop_timeout` (already logged)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._stopped:
            task_status.started()
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            child = self._spawn(theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._starts += 1
        self._killed = False
        self.pid = child.pid
        log.info("%s worker started (pid %d)", self.name, child.pid)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        peer = Peer(stream, self.logic.handle, name=f"the {self.name} worker")
        reason = "ended"
        try:
            task_status.started()  # the mount does not wait for a worker's start
            reason = await self._serve(child, peer)
        finally:
            self.pid = 0
            with trio.CancelScope(shield=True):
                await _reap(child)
                await stream.aclose()
            status = self._last_exit = _describe_exit(child.returncode)
            self.logic.disconnected(f"{status} ({reason})")
        if self.stopping and child.returncode == 0:
            log.info("%s worker (pid %d) stopped", self.name, child.pid)
            return
        if self._killed:
            return
        self._deaths += 1
        raise WorkerDied(f"the {self.name} worker (pid {child.pid}) {status}")

    def _spawn(self, theirs: socket.socket) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            self.module,
            "--fd",
            str(theirs.fileno()),
            "--parent",
            str(os.getpid()),
            "--log-level",
            str(self.log_level),
            "--log-format",
            self.log_format,
        ]
        # Popen here, on the loop's (main) thread: see the module docstring. A
        # fork and exec of the daemon take a few milliseconds.
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), close_fds=True
        )

    async def _serve(self, child: subprocess.Popen[bytes], peer: Peer) -> str:
        """Hello, then serve until the connection ends; how it ended."""
        async with trio.open_nursery() as nursery:
            exited = trio.Event()
            nursery.start_soon(_watch, child, exited)
            with trio.move_on_after(self.hello_timeout) as waited:
                try:
                    await peer.hello(**self.logic.setup())
                except PeerGone:
                    await exited.wait()
                    nursery.cancel_scope.cancel()
                    return "before its hello"
            if waited.cancelled_caught:
                nursery.cancel_scope.cancel()
                return f"no hello within {self.hello_timeout:g} s"
            self.logic.connected(peer)
            nursery.start_soon(self._stop_when_asked, peer, child, exited)
            nursery.start_soon(self.logic.feed, peer)
            await peer.serve()  # until the child closes its end (exits)
            await exited.wait()
            nursery.cancel_scope.cancel()
        return "asked to stop" if self._stopped else "unexpectedly"

    async def _stop_when_asked(
        self, peer: Peer, child: subprocess.Popen[bytes], exited: trio.Event
    ) -> None:
        """Once `stop` is called: lift the child out of its background priority (a
        worker at ``SCHED_IDLE`` on a machine whose cores are busy gets almost no CPU
        and would take minutes to wind down), ask it to stop, and kill it if it has
        not exited `stop_timeout` seconds later (what a worker keeps is crash-safe:
        it is killed the same way when the daemon dies)."""
        await self._stopping.wait()
        foreground_priority(child.pid)
        with contextlib.suppress(PeerGone):
            await peer.notify("stop")
        with trio.move_on_after(self.stop_timeout):
            await exited.wait()
            return
        log.warning(
            "the %s worker (pid %d) did not exit within %g s of being asked to stop: killing it",
            self.name,
            child.pid,
            self.stop_timeout,
        )
        self._killed = True
        with contextlib.suppress(ProcessLookupError):
            child.kill()

    def stop(self) -> None:
        self._stopped = True
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether `stop` was called (the child's exit is then expected)."""
        return self._stopped

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            self.pid, self._starts, self._deaths, self._last_exit, process_rss(self.pid)
        )


async def _watch(child: subprocess.Popen[bytes], exited: trio.Event) -> None:
    await _wait(child)
    exited.set()


async def _wait(child: subprocess.Popen[bytes]) -> int:
    """Wait for `child` to exit without blocking the loop (a pidfd), and reap it."""
    if child.poll() is not None:
        return child.returncode
    try:
        fd = os.pidfd_open(child.pid)
    except OSError:  # reaped meanwhile
        return child.wait()
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
    return child.wait()


async def _reap(child: subprocess.Popen[bytes]) -> None:
    """End `child` if it still runs (SIGKILL: its stop time is over) and reap it."""
    if child.poll() is None:
        log.error("killing the worker process %d", child.pid)
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    await _wait(child)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def process_rss(pid: int) -> int:
    """Resident memory of a process in bytes (0 if it is gone, or `pid` is 0)."""
    if pid <= 0:
        return 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


# -- the child's side --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildArgs:
    sock: socket.socket
    parent: int
    log_level: int


def child_start(argv: list[str], name: str, *, nice: int | None = None) -> ChildArgs:
    """The first thing a worker program does (before any thread starts).

    The worker runs at `background_priority`, or with `nice` at that nice value
    instead: a worker whose work is small but waited for (replication: a peer's
    save should show within milliseconds) cannot wait for an idle CPU.
    """
    parser = argparse.ArgumentParser(prog=f"slurpfs {name} worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice is None:
        background_priority()
    else:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    logs.setup(None, args.log_level, args.log_format)
    sock = socket.socket(fileno=args.fd)
    return ChildArgs(sock, args.parent, args.log_level)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("PR_SET_PDEATHSIG failed (errno %d)", ctypes.get_errno())
    if os.getppid() != parent:  # the daemon died before the line above
        os._exit(1)


def background_priority() -> None:
    """Let the calling thread (and threads it starts later) run only when a CPU would
    otherwise be idle: ``SCHED_IDLE``, else nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except OSError as exc:  # a kernel without SCHED_IDLE: the lowest nice value instead
        log.debug("SCHED_IDLE refused (%s); nice 19 instead", exc)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # per thread on Linux
        except OSError as again:
            log.debug("nice 19 refused too (%s): running at normal priority", again)


def foreground_priority(pid: int, *, threads: list[int] | None = None) -> None:
    """Put the threads of process `pid` (all, or those `threads` name) back at normal
    priority (``SCHED_OTHER``, nice 0), so that they can wind down promptly: a
    background thread holding the interpreter lock would otherwise hold up the
    threads that wait for it. Leaving ``SCHED_IDLE`` takes ``CAP_SYS_NICE`` (or an
    ``RLIMIT_NICE`` that allows nice 0); without it the threads keep their priority
    (and a stop may take until the caller's patience runs out)."""
    if threads is None:
        try:
            threads = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:  # gone already
            return
    for tid in threads:
        try:
            if os.sched_getscheduler(tid) != os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except PermissionError:
            log.debug("cannot raise the priority of process %d (thread %d) back", pid, tid)
            return


async def child_connect(
    sock: socket.socket, handler: Callable[[Message], Awaitable[Mapping[str, Any] | None]]
) -> tuple[Peer, Message]:
    """Connect a worker to its supervisor: the peer and the supervisor's hello."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    peer = Peer(stream, handler, name="the daemon")
    hello = await peer.hello(pid=os.getpid())
    return peer, hello


async def serve_while(
    peer: Peer, work: Callable[[], Awaitable[None]], stop: Callable[[], None]
) -> None:
    """Answer the supervisor's messages while `work` runs; when the supervisor's end
    of the socket closes, `stop` the work (a worker never outlives its daemon's link)."""
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            await peer.serve()
            stop()

        nursery.start_soon(serve)
        await work()
        nursery.cancel_scope.cancel()
