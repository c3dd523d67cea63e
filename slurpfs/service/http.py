"""A small HTTP/1.x server for the daemon's endpoints, on trio, in the daemon's nursery.

It answers ``GET`` and ``HEAD`` on a fixed set of paths and nothing else, one
request per connection (every response says ``Connection: close``). What it
guarantees, whatever a client sends:

- the request line and headers are read up to `MAX_HEAD` bytes (431 beyond),
  within `HEAD_TIMEOUT` seconds (408 after); the response must be taken within
  `SEND_TIMEOUT` seconds. A stalled client holds one connection, never the server;
- at most `MAX_CONNECTIONS` connections are served at once; more get 503;
- a malformed request is a 400 (a folded or nameless header, a bad request line,
  HTTP/1.1 without ``Host``), another major version a 505, an unknown path a 404,
  another method a 405 with ``Allow``. None of it is logged above DEBUG, and
  no response repeats what the client sent;
- bound to a loopback address, it answers only requests whose ``Host`` names a
  loopback address or ``localhost`` (421 otherwise): a web page cannot read the
  endpoints through a DNS name rebound to 127.0.0.1;
- an endpoint that raises is a bug: 500 for that request, an ERROR line with the
  traceback, and the server goes on (as the FUSE handlers do, `slurpfs.fs.errmap`).

`bind` opens the socket before the daemon mounts, so a port in use stops the
start before anything is mounted; `run` serves until cancelled.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import urlsplit

import trio

from slurpfs.config import ListenAddress

log = logging.getLogger("slurpfs.http")

MAX_HEAD = 8192  # bytes: request line and headers, with the blank line ending them
MAX_HEADERS = 100
HEAD_TIMEOUT = 10.0  # seconds for a client to send its request line and headers
SEND_TIMEOUT = 10.0  # seconds for a client to take a response
LINGER_TIMEOUT = 2.0  # seconds to wait for the client to close after the response
LINGER_BYTES = 64 * 1024
MAX_CONNECTIONS = 100
BACKLOG = 128
METHODS = ("GET", "HEAD")
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no spaces, no controls
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # no controls but tab
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class HttpError(Exception):
    """A request this server will not serve: its status and a fixed explanation."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query
    version: tuple[int, int]
    headers: Mapping[str, str]  # lower-case names; repeated fields joined with ", "
    authority: str | None  # the host the request is for: an absolute target's, else Host


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        """The whole response; for HEAD, the same headers without the body."""
        lines = [
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head if head_only else head + self.body


def error_response(
    status: int, detail: str = "", headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    text = f"{status} {HTTPStatus(status).phrase}" + (f": {detail}" if detail else "") + "\n"
    return Response(status, text.encode(), TEXT, headers)


def head_end(data: bytes | bytearray) -> int:
    """The length of the request head in `data` (through its blank line), or -1."""
    # Empty lines before the request line are allowed (RFC 9112 2.2): skip them.
    start = 0
    while data.startswith(b"\n", start) or data.startswith(b"\r\n", start):
        start += 1 if data[start] == 0x0A else 2
    match = _HEAD_END.search(data, start)
    if match is None:
        return -1
    return match.end()


def parse_request(head: bytes) -> Request:
    """Parse a request line and header fields (`head` as `head_end` delimits it).

    Raises `HttpError`: 400 when malformed, 431 for too many fields, 505 for a
    major version other than 1. Bare LF line ends are accepted (RFC 9112 2.2).
    """
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HttpError(400, "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "the request line is not METHOD TARGET HTTP/1.x")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed method")
    matched = _VERSION.fullmatch(version)
    if matched is None:
        raise HttpError(400, "malformed HTTP version")
    major, minor = int(matched[1]), int(matched[2])
    if major != 1:
        raise HttpError(505, "this server speaks HTTP/1.0 and HTTP/1.1")
    if not _TARGET.fullmatch(target):
        raise HttpError(400, "malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "folded header lines are not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise HttpError(400, "malformed header field")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key == "host" and key in headers:
            raise HttpError(400, "more than one Host header")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if (major, minor) >= (1, 1) and "host" not in headers:
        raise HttpError(400, "an HTTP/1.1 request needs a Host header")
    path, authority = _target(target.decode("ascii"))
    return Request(
        method.decode("ascii"),
        path,
        (major, minor),
        headers,
        authority if authority is not None else headers.get("host"),
    )


def _target(target: str) -> tuple[str, str | None]:
    """(path, authority of an absolute target) of a request target."""
    if target.startswith("/"):
        return target.partition("?")[0], None
    if target == "*":
        return target, None
    parts = urlsplit(target)
    if parts.scheme.lower() != "http" or not parts.netloc or "@" in parts.netloc:
        raise HttpError(400, "malformed request target")
    return parts.path or "/", parts.netloc


def is_loopback_authority(authority: str) -> bool:
    """Whether ``host[:port]`` names a loopback address or ``localhost``."""
    if authority.startswith("["):
        host, bracket, _ = authority[1:].partition("]")
        if not bracket:
            return False
    else:
        host = authority.partition(":")[0]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class HttpStatistics:
    connections: int  # accepted
    active: int  # being served now
    requests: int  # parsed requests (whatever their answer)
    bad_requests: int  # malformed, oversized, misdirected or another version (4xx, 505)
    timeouts: int  # clients that did not send a request, or take the response, in time
    rejected: int  # connections beyond MAX_CONNECTIONS (503)
    failures: int  # an endpoint raised (500; a bug, logged with its traceback)


Route = Callable[[], Awaitable[Response]]


class HttpServer:
    """Serves `routes` (path -> handler) on `address`. `bind`, then `run` in a nursery."""

    def __init__(
        self,
        address: ListenAddress,
        routes: Mapping[str, Route],
        *,
        head_timeout: float = HEAD_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        linger_timeout: float = LINGER_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.address = address
        self.routes = dict(routes)
        self.head_timeout = head_timeout
        self.send_timeout = send_timeout
        self.linger_timeout = linger_timeout
        self.max_connections = max_connections
        # On a loopback address only requests for a loopback name are answered.
        self.local_only = address.loopback
        self._sock: socket.socket | None = None
        self._scope: trio.CancelScope | None = None
        self.bound: ListenAddress | None = None
        self._connections = self._active = self._requests = self._bad = 0
        self._timeouts = self._rejected = self._failures = 0

    def bind(self) -> ListenAddress:
        """Open the listening socket; returns the address bound (the port chosen for 0).

        Raises `OSError` (the address is in use, or not this machine's).
        """
        address = self.address
        family = socket.AF_INET6 if address.ipv6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Restarting while old connections linger in TIME_WAIT must not fail;
            # a port another process listens on still does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.ipv6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address.host, address.port))
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.bound = ListenAddress(address.host, sock.getsockname()[1])
        return self.bound

    def close(self) -> None:
        """Close a socket `bind` opened that `run` never took over."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or `stop` (the listening socket is closed then).

        A run after a failure binds the address the first one was bound to again."""
        if self._sock is None:
            if self.bound is None:
                raise RuntimeError("HttpServer.run before bind")
            self.address = ListenAddress(self.address.host, self.bound.port)
            self.bind()
        assert self._sock is not None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        self._sock = None  # the listener owns it now
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(trio.serve_listeners, self._connection, [listener])
                task_status.started()
        finally:
            self._scope = None

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def statistics(self) -> HttpStatistics:
        return HttpStatistics(
            connections=self._connections,
            active=self._active,
            requests=self._requests,
            bad_requests=self._bad,
            timeouts=self._timeouts,
            rejected=self._rejected,
            failures=self._failures,
        )

    # -- one connection ------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        self._connections += 1
        try:
            if self._active >= self.max_connections:
                self._rejected += 1
                log.debug("http: more than %d connections: refused one", self.max_connections)
                busy = error_response(503, "too many connections", (("Retry-After", "1"),))
                await self._send(stream, busy, head_only=False)
                return
            self._active += 1
            try:
                answer = await self._exchange(stream)
                if answer is not None:
                    await self._send(stream, *answer)
            finally:
                self._active -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("http: the client went away: %s", exc)
        # (serve_listeners closes the stream.)

    async def _exchange(self, stream: trio.SocketStream) -> tuple[Response, bool] | None:
        """Read and answer one request: (response, head only), or None to just close."""
        head: bytes | None = None
        with trio.move_on_after(self.head_timeout) as waiting:
            try:
                head = await self._read_head(stream)
            except HttpError as exc:
                return self._refuse(exc), False
        if waiting.cancelled_caught:
            self._timeouts += 1
            log.debug("http: no request within %g s", self.head_timeout)
            return error_response(408, "no request in time"), False
        if head is None:
            return None  # connected and left without a word (a port probe)
        try:
            request = parse_request(head)
            if (
                self.local_only
                and request.authority is not None
                and not is_loopback_authority(request.authority)
            ):
                raise HttpError(421, "this server answers requests for a loopback address only")
        except HttpError as exc:
            return self._refuse(exc), False
        self._requests += 1
        head_only = request.method == "HEAD"
        route = self.routes.get(request.path)
        if route is None:
            response = error_response(404)
        elif request.method not in METHODS:
            response = error_response(405, headers=(("Allow", ", ".join(METHODS)),))
        else:
            try:
                response = await route()
            except Exception:
                self._failures += 1
                log.exception("http: %s %s failed", request.method, request.path)
                response = error_response(500)
        log.debug("http: %s %s -> %d", request.method, request.path, response.status)
        return response, head_only

    def _refuse(self, exc: HttpError) -> Response:
        self._bad += 1
        log.debug("http: refused a request (%d): %s", exc.status, exc.detail)
        return error_response(exc.status, exc.detail)

    async def _read_head(self, stream: trio.SocketStream) -> bytes | None:
        """The request line and headers; None if the client closed before sending any."""
        data = bytearray()
        while True:
            end = head_end(data)
            if end > MAX_HEAD or (end < 0 and len(data) > MAX_HEAD):
                raise HttpError(431, f"the request line and headers exceed {MAX_HEAD} bytes")
            if end >= 0:
                return bytes(data[:end])
            chunk = await stream.receive_some(MAX_HEAD)
            if not chunk:
                if not data.strip():
                    return None
                raise HttpError(400, "the request ended before its headers did")
            data += chunk

    async def _send(self, stream: trio.SocketStream, response: Response, head_only: bool) -> None:
        with trio.move_on_after(self.send_timeout) as sending:
            await stream.send_all(response.encode(head_only=head_only))
            await stream.send_eof()
        if sending.cancelled_caught:
            self._timeouts += 1
            log.debug("http: the client did not take the response within %g s", self.send_timeout)
            return
        # Lingering close (RFC 9112 9.6): closing with unread bytes from the client
        # (an oversized request, a body) would reset the connection, and the client
        # could lose the response it has not read yet. Read until it closes, briefly.
        with trio.move_on_after(self.linger_timeout):
            drained = 0
            while drained < LINGER_BYTES:
                chunk = await stream.receive_some(16384)
                if not chunk:
                    break
                drained += len(chunk)
