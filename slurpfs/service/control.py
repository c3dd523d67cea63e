"""The daemon's local control socket: ``<data dir>/daemon.sock`` (a unix socket, 0600).

One request line, one reply line:

``changed``  a writer outside the daemon committed: re-read the change feed and
             invalidate the kernel's caches, then reply ``ok``. The CLI calls
             `notify_daemon` after ``put``/``rm``/``import`` so that, once it
             returns, no reader of the mount sees the old version.
``cluster``  the node's cluster (``<data dir>/cluster/``) changed: a ``slurpfs peers``
             command founded, joined or changed it; the replication layer takes
             it up (the ``cluster`` hook: the daemon starts its replication worker, or
             has it read the member log again), then reply ``ok``.
``ping``     reply ``pong <pid> <mountpoint>``.
``search``   reply ``search <progress>``: where the search worker stands (``ready``,
             ``building the search indexes: indexed N of M contexts (R/s, ETA T s)``...);
             ``slurpfs status`` shows it.
``peers``    reply ``peers <JSON>``: the members' state as the replication worker
             reported it (``peers none`` without a cluster); ``slurpfs peers``.
``watch``    reply ``watching``, keep the connection, and write ``exit <status>``
             just before the daemon exits (how ``slurpfs umount`` learns the
             daemon's exit status without being its parent).

Only the daemon's user can connect (the socket is 0600 in a 0700 directory).
Paths longer than a unix socket address allows are reached through
``/proc/self/fd/<dir fd>/daemon.sock``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger("slurpfs.daemon")

SOCKET_NAME = "daemon.sock"
_MAX_PATH = 100
_LINE = 256


def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A path a unix socket address can hold, for as long as the block runs."""
    if len(os.fsencode(path)) <= _MAX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def request(data_dir: Path, line: str, timeout: float) -> str | None:
    """Send one request; the reply line, or None if no daemon serves `data_dir`."""
    path = socket_path(data_dir)
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _addressable(path) as address:
                sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a stale socket file: no daemon
        sock.sendall(line.encode() + b"\n")
        return _read_line(sock)


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(_LINE)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def notify_daemon(data_dir: Path, timeout: float = 5.0) -> bool:
    """Tell a daemon serving `data_dir` that contexts changed; wait for its caches to drop.

    Returns True once the daemon acknowledged; False if no daemon is running, or
    if it did not answer within `timeout` (logged: the commit itself is done,
    but readers of the mount may see the old version until the caches expire).
    """
    try:
        reply = request(data_dir, "changed", timeout)
    except OSError as exc:
        log.warning("the daemon serving %s did not acknowledge a change: %s", data_dir, exc)
        return False
    if reply is None:
        return False
    if reply != "ok":
        log.error("daemon answered %r to a change notification", reply)
        return False
    return True


def watch(data_dir: Path, timeout: float) -> socket.socket | None:
    """A connection on which the daemon will write ``exit <status>`` (None: no daemon)."""
    path = socket_path(data_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _addressable(path) as address:
            sock.connect(address)
        sock.sendall(b"watch\n")
        if _read_line(sock) != "watching":
            sock.close()
            return None
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    return sock


def read_exit_status(sock: socket.socket) -> int | None:
    """Block until the daemon reports its exit status (None if it died without one)."""
    try:
        line = _read_line(sock)  # TimeoutError past the socket's timeout
    finally:
        sock.close()
    if line.startswith("exit "):
        return int(line.split()[1])
    return None


@dataclass(frozen=True, slots=True)
class ControlStatistics:
    requests: int
    watchers: int


class ControlServer:
    """Serves the control socket inside the daemon's nursery."""

    def __init__(
        self,
        data_dir: Path,
        on_changed: Callable[[], Awaitable[None]],
        describe: Callable[[], str],
        search: Callable[[], str] | None = None,
        cluster: Callable[[], Awaitable[None]] | None = None,
        peers: Callable[[], str | None] | None = None,
    ) -> None:
        self.path = socket_path(data_dir)
        self._cluster = cluster
        self._on_changed = on_changed
        self._describe = describe
        self._search = search
        self._peers = peers
        self.watchers: list[int] = []  # dup'ed fds, written at exit
        self.requests = 0
        self._scope: trio.CancelScope | None = None

    def claim(self) -> None:
        """Fail if another daemon serves this data directory; clear a stale socket."""
        reply = request(self.path.parent, "ping", timeout=2.0)
        if reply is not None:
            raise OSError(errno.EBUSY, f"data directory already in use by a daemon ({reply})")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _addressable(self.path) as address:
            await sock.bind(address)
        # (The data directory is 0700 already; the socket itself is the daemon user's only.)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(trio.serve_listeners, self._serve, [listener])
                task_status.started()
        finally:
            self._scope = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(requests=self.requests, watchers=len(self.watchers))

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.requests += 1
        async with stream:
            data = b""
            while not data.endswith(b"\n") and len(data) < _LINE:
                chunk = await stream.receive_some(_LINE)
                if not chunk:
                    return
                data += chunk
            command = data.decode(errors="replace").strip()
            if command == "changed":
                await self._on_changed()
                await stream.send_all(b"ok\n")
            elif command == "cluster":
                if self._cluster is not None:
                    await self._cluster()
                await stream.send_all(b"ok\n")
            elif command == "ping":
                await stream.send_all(f"pong {self._describe()}\n".encode())
            elif command == "search" and self._search is not None:
                await stream.send_all(f"search {self._search()}\n".encode())
            elif command == "peers" and self._peers is not None:
                answer = self._peers()
                await stream.send_all(f"peers {answer or 'none'}\n".encode())
            elif command == "watch":
                self.watchers.append(os.dup(stream.socket.fileno()))
                await stream.send_all(b"watching\n")
            else:
                await stream.send_all(b"error unknown command\n")

    def report_exit(self, status: int) -> None:
        """Tell every watcher the exit status (called after the trio loop has ended)."""
        for fd in self.watchers:
            with contextlib.suppress(OSError):
                os.write(fd, f"exit {status}\n".encode())
            os.close(fd)
        self.watchers.clear()
