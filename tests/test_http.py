"""The daemon's HTTP endpoints: the protocol, the server under hostile clients, and a real mount.

Three parts: the request parser alone; `HttpServer` and `Endpoints` in this
process on real sockets (pytest-trio: timeouts and limits small enough to
reach); and a real ``slurpfs mount`` whose endpoints are found through
``.slurp/status`` and driven with ``http.client`` and raw sockets.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from conftest import Nodes, find_canary
from fsutil import AUTH, Mounted, is_mounted, mounted_at, running, slurpfs, wait_for
from prometheus_client.parser import text_string_to_metric_families

from slurpfs.config import ListenAddress
from slurpfs.fs.ops import Operations
from slurpfs.health import FAIL, OK, Check
from slurpfs.service.endpoints import METRICS_CONTENT_TYPE, Endpoints, MountProbe
from slurpfs.service.http import (
    HEAD_TIMEOUT,
    MAX_HEAD,
    HttpError,
    HttpServer,
    Request,
    Response,
    Route,
    head_end,
    is_loopback_authority,
    parse_request,
)

LOOPBACK = ListenAddress("127.0.0.1", 0)
ENDPOINTS = ["/metrics", "/health", "/health/live", "/health/ready", "/health/checks"]
CHECKS = ["store", "mount", "search", "audit", "disk"]
DAEMON_CHECKS = [*CHECKS, "tasks", "journal"]  # a mount's daemon: its tasks, its journal


# -- the parser --------------------------------------------------------------------------


def test_a_request_is_parsed() -> None:
    head = b"GET /health/ready?verbose=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAccept: a\r\naccept: b\r\n\r\n"

    assert head_end(head + b"body") == len(head)
    assert parse_request(head) == Request(
        "GET",
        "/health/ready",
        (1, 1),
        {"host": "127.0.0.1:9", "accept": "a, b"},
        "127.0.0.1:9",
    )


def test_bare_newlines_leading_empty_lines_and_http_1_0_without_host() -> None:
    head = b"\r\n\nHEAD /metrics HTTP/1.0\nUser-Agent: x\n\n"

    assert head_end(head) == len(head)
    assert parse_request(head) == Request("HEAD", "/metrics", (1, 0), {"user-agent": "x"}, None)


def test_an_absolute_target_names_the_authority() -> None:
    request = parse_request(b"GET http://localhost:9/health HTTP/1.1\r\nHost: other\r\n\r\n")

    assert (request.path, request.authority) == ("/health", "localhost:9")


def test_head_end_waits_for_the_blank_line() -> None:
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    assert head_end(b"\r\n\r\n") == -1  # empty lines before a request are skipped


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain port
        (b"GET /\r\n\r\n", 400),  # HTTP/0.9
        (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTX/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.10\r\nHost: x\r\n\r\n", 400),
        (b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET ftp://x/health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://u@x/health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # 1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n: empty name\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 100 + b"\r\n", 431),
    ],
)
def test_malformed_requests_are_refused(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_request(head[: head_end(head)] if head_end(head) > 0 else head)
    assert info.value.status == status


@pytest.mark.parametrize(
    ("authority", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1:9464", True),
        ("127.8.9.10:1", True),
        ("localhost", True),
        ("LOCALHOST.:80", True),
        ("[::1]:80", True),
        ("[::1]", True),
        ("attacker.example:9464", False),
        ("127.0.0.1.attacker.example", False),
        ("localhost.attacker.example", False),
        ("10.0.0.1:80", False),
        ("[::1", False),
        ("", False),
    ],
)
def test_loopback_authorities(authority: str, loopback: bool) -> None:
    assert is_loopback_authority(authority) is loopback


def test_a_response_and_its_head() -> None:
    response = Response(200, b'{"status": "ok"}\n', "application/json", (("Allow", "GET"),))

    whole = response.encode()
    head = response.encode(head_only=True)

    assert whole.startswith(b"HTTP/1.1 200 OK\r\n")
    assert whole == head + b'{"status": "ok"}\n'
    assert b"\r\nContent-Length: 17\r\n" in head
    assert b"\r\nConnection: close\r\n" in head
    assert b"\r\nAllow: GET\r\n" in head
    assert head.endswith(b"\r\n\r\n")


# -- the server in this process, on real sockets -----------------------------------------


class Reply:
    """One response as a client reads it: everything up to the server's close."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}


async def read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def exchange(port: int, data: bytes, *, close_write: bool = True) -> Reply:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if close_write:
            await stream.send_eof()
        return Reply(await read_all(stream))


def get(path: str, method: str = "GET", host: str = "127.0.0.1") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def hello() -> Response:
    return Response(200, b"hello\n")


@asynccontextmanager
async def serving(
    routes: dict[str, Route], *, head_timeout: float = HEAD_TIMEOUT, max_connections: int = 100
) -> AsyncIterator[HttpServer]:
    server = HttpServer(
        LOOPBACK, routes, head_timeout=head_timeout, max_connections=max_connections
    )
    server.bind()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


def port_of(server: HttpServer) -> int:
    assert server.bound is not None
    return server.bound.port


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the server run until `condition()` holds (polling, with a deadline)."""
    with trio.fail_after(30):
        while not condition():  # noqa: ASYNC110 - polled under a deadline
            await trio.sleep(0.001)


async def test_get_head_404_405() -> None:
    async with serving({"/hello": hello}) as server:
        port = port_of(server)
        got = await exchange(port, get("/hello"))
        head = await exchange(port, get("/hello", "HEAD"))
        missing = await exchange(port, get("/nope"))
        post = await exchange(port, get("/hello", "POST"))
        delete = await exchange(port, get("/hello", "DELETE"))

    assert (got.status, got.body) == (200, b"hello\n")
    assert got.headers["content-type"] == "text/plain; charset=utf-8"
    assert got.headers["connection"] == "close"
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == "6"
    assert missing.status == 404
    assert post.status == delete.status == 405
    assert post.headers["allow"] == delete.headers["allow"] == "GET, HEAD"


async def test_a_stalled_client_does_not_hold_the_server() -> None:
    async with serving({"/hello": hello}) as server:
        port = port_of(server)
        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        async with stalled:
            await stalled.send_all(b"GET /hello HTTP/1.1\r\n")  # and nothing more
            await until(lambda: server.statistics().active == 1, "the stalled connection")
            others = [await exchange(port, get("/hello")) for _ in range(3)]
            assert server.statistics().active == 1  # still waiting for the rest

    assert [r.status for r in others] == [200, 200, 200]


async def test_a_client_that_sends_nothing_in_time_gets_408_and_is_closed() -> None:
    async with serving({"/hello": hello}, head_timeout=0.05) as server:
        stalled = await trio.open_tcp_stream("127.0.0.1", port_of(server))
        async with stalled:
            reply = Reply(await read_all(stalled))  # ends when the server shuts its side
        await until(lambda: server.statistics().active == 0, "the connection to end")

    assert reply.status == 408
    assert server.statistics().timeouts == 1


async def test_connections_beyond_the_limit_get_503() -> None:
    async with serving({"/hello": hello}, max_connections=2) as server:
        port = port_of(server)
        first = await trio.open_tcp_stream("127.0.0.1", port)
        second = await trio.open_tcp_stream("127.0.0.1", port)
        async with first, second:
            await until(lambda: server.statistics().active == 2, "two connections")
            refused = await exchange(port, get("/hello"))
        await until(lambda: server.statistics().active == 0, "both closed")
        after = await exchange(port, get("/hello"))

    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert server.statistics().rejected == 1
    assert after.status == 200


async def test_many_concurrent_clients() -> None:
    replies: list[Reply] = []

    async def one(port: int) -> None:
        replies.append(await exchange(port, get("/hello")))

    async with serving({"/hello": hello}) as server, trio.open_nursery() as clients:
        for _ in range(60):
            clients.start_soon(one, port_of(server))

    assert [r.status for r in replies] == [200] * 60


async def test_an_oversized_head_gets_431_and_the_client_reads_it_whole() -> None:
    # The client sends far more than the server reads; the server drains it before
    # closing, so the client gets the response rather than a reset.
    huge = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * MAX_HEAD) + b"\r\n\r\n"
    endless = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * MAX_HEAD)
    async with serving({"/hello": hello}) as server:
        port = port_of(server)
        big = await exchange(port, huge)
        unterminated = await exchange(port, endless)
        exact = await exchange(port, get("/hello") + b"x" * 100)  # a body is ignored
        ok = await exchange(port, get("/hello"))

    assert big.status == unterminated.status == 431
    assert exact.status == ok.status == 200


async def test_garbage_and_hangups_are_answered_or_ignored_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving({"/hello": hello}) as server:
        port = port_of(server)
        garbage = await exchange(port, os.urandom(200) + b"\r\n\r\n")
        truncated = await exchange(port, b"GET /hello HTTP/1.1\r\nHost")
        silent = await exchange(port, b"")
        rude = trio.socket.socket()
        await rude.connect(("127.0.0.1", port))
        await rude.send(get("/hello"))
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rude.close()  # a reset instead of reading the answer
        await until(lambda: server.statistics().active == 0, "the reset connection")
        ok = await exchange(port, get("/hello"))

    assert garbage.status == truncated.status == 400
    assert silent.raw == b""  # connected and left: nothing to answer
    assert ok.status == 200
    loud = [r for r in caplog.records if r.name == "slurpfs.http" and r.levelno > logging.DEBUG]
    assert loud == []
    assert all(r.exc_info is None for r in caplog.records if r.name == "slurpfs.http")


async def test_requests_for_another_host_are_misdirected() -> None:
    async with serving({"/hello": hello}) as server:
        port = port_of(server)
        rebound = await exchange(port, get("/hello", host="attacker.example:9464"))
        absolute = await exchange(
            port, b"GET http://attacker.example/hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        named = await exchange(port, get("/hello", host="localhost:9464"))
        old = await exchange(port, b"GET /hello HTTP/1.0\r\n\r\n")

    assert rebound.status == absolute.status == 421
    assert named.status == old.status == 200
    assert b"attacker" not in rebound.raw + absolute.raw  # nothing the client sent comes back


def test_only_a_loopback_address_restricts_the_host() -> None:
    assert HttpServer(ListenAddress("127.0.0.1", 0), {}).local_only
    assert HttpServer(ListenAddress("::1", 0), {}).local_only
    assert not HttpServer(ListenAddress("0.0.0.0", 0), {}).local_only


@pytest.mark.expect_warnings("http: GET /broken failed")
async def test_an_endpoint_that_raises_is_a_500_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> Response:
        raise ValueError("a bug")

    async with serving({"/broken": broken, "/hello": hello}) as server:
        port = port_of(server)
        failed = await exchange(port, get("/broken"))
        ok = await exchange(port, get("/hello"))

    assert failed.status == 500
    assert b"a bug" not in failed.raw
    assert ok.status == 200
    assert server.statistics().failures == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["http: GET /broken failed"]
    assert errors[0].exc_info is not None


async def test_cancelling_the_server_with_clients_connected_is_clean() -> None:
    async with serving({"/hello": hello}) as server:
        port = port_of(server)
        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        await until(lambda: server.statistics().active == 1, "the stalled connection")
    # The nursery ended (cancelled) with the connection open: it is closed, not leaked.
    assert await stalled.receive_some(100) == b""
    await stalled.aclose()
    with pytest.raises(OSError, match="all attempts to connect"):  # refused: nobody listens
        await trio.open_tcp_stream("127.0.0.1", port)


def test_binding_a_port_in_use_raises() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(ListenAddress("127.0.0.1", port), {})
        with pytest.raises(OSError, match="Address already in use") as info:
            server.bind()
    assert info.value.errno == errno.EADDRINUSE


def test_binding_ipv6_loopback() -> None:
    server = HttpServer(ListenAddress("::1", 0), {})
    try:
        bound = server.bind()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert bound.host == "::1"
        assert bound.port > 0
        assert str(bound) == f"[::1]:{bound.port}"
    finally:
        server.close()


# -- the endpoints over a real store (no kernel mount) -----------------------------------


def answers(tmp_path: Path) -> Path:
    """A file the probe can stat: stands in for a mount that answers."""
    status = tmp_path / ".slurp" / "status"
    status.parent.mkdir()
    status.write_text("")
    return status


async def test_endpoints_over_a_store(ops: Operations, tmp_path: Path) -> None:
    probe = MountProbe(answers(tmp_path), lambda: ops.stopping)
    endpoints = Endpoints(ops.health, probe, lambda: ops.virtual.produce("metrics"))
    async with serving(endpoints.routes()) as server:
        port = port_of(server)
        replies = {path: await exchange(port, get(path)) for path in ENDPOINTS}
        ops.stopping = True  # shutdown began
        stopping = {path: await exchange(port, get(path)) for path in ENDPOINTS}

    assert {p: r.status for p, r in replies.items()} == dict.fromkeys(ENDPOINTS, 200)
    assert json.loads(replies["/health/ready"].body) == {
        "status": "ok",
        "checks": {"store": "ok", "mount": "ok"},
    }
    summary = json.loads(replies["/health"].body)
    assert summary == {
        "status": "warn",
        "checks": {**dict.fromkeys(CHECKS, "ok"), "search": "warn"},
    }
    assert {p: r.status for p, r in stopping.items()} == {
        "/metrics": 200,
        "/health": 503,
        "/health/live": 200,
        "/health/ready": 503,
        "/health/checks": 503,
    }
    checks = json.loads(stopping["/health/checks"].body)["checks"]
    assert checks[1] == {"name": "mount", "status": "fail", "detail": "shutting down"}


async def test_the_probe_fails_when_the_mount_is_gone(tmp_path: Path) -> None:
    probe = MountProbe(tmp_path / "mnt" / ".slurp" / "status", lambda: False)

    check = await probe.check()

    assert check == Check("mount", FAIL, "the mount does not answer: No such file or directory")


class HangingProbe(MountProbe):
    """A probe whose ``stat`` hangs until released, as on a mount whose loop is stuck."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, lambda: False, timeout=0.05, fresh=0.0)
        self.release = threading.Event()
        self.calls = 0

    def _stat(self) -> None:
        self.calls += 1
        try:
            self.release.wait(60)
        finally:
            self._waiting_since = None


async def test_a_probe_without_answer_fails_and_is_not_repeated_until_it_returns(
    tmp_path: Path,
) -> None:
    probe = HangingProbe(answers(tmp_path))

    first = await probe.check()
    second = await probe.check()  # the first thread is still stuck: no second one
    probe.release.set()
    await until(lambda: probe._waiting_since is None, "the stuck thread")
    third = await probe.check()

    assert first == Check("mount", FAIL, "the mount did not answer within 0.05 s")
    assert second.status == FAIL
    assert second.detail.startswith("a request to the mount has had no answer for ")
    assert third == Check("mount", OK, "answering")
    assert probe.calls == 2


async def test_concurrent_checks_share_one_probe(tmp_path: Path) -> None:
    probe = HangingProbe(answers(tmp_path))
    probe.timeout = 30
    results: list[Check] = []

    async def ask() -> None:
        results.append(await probe.check())

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
        await until(lambda: probe.calls == 1, "the probe")
        probe.release.set()

    assert results == [Check("mount", OK, "answering")] * 5
    assert probe.calls == 1


# -- a real mount --------------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse here")


def endpoint(m: Mounted) -> tuple[str, int]:
    """(host, port) of the mount's HTTP endpoints, as ``.slurp/status`` says."""
    status = (m.mnt / ".slurp" / "status").read_text()
    found = re.search(r"^http: http://127\.0\.0\.1:(\d+)/$", status, re.MULTILINE)
    assert found is not None, status
    return "127.0.0.1", int(found[1])


def request(
    address: tuple[str, int], path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=60)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=60) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.fixture
def served(nodes: Nodes, tmp_path: Path) -> Iterator[Mounted]:
    m = mounted_at(nodes, tmp_path, env={"SLURPFS_HTTP_LISTEN": "127.0.0.1:0"})
    try:
        yield m
        m.unmount()
    finally:
        m.sweep()


@pytest.mark.mount
@needs_fuse
def test_every_endpoint_of_a_mount(served: Mounted) -> None:
    address = endpoint(served)
    wait_for(lambda: "search_ready: 1" in (served.mnt / ".slurp" / "status").read_text())
    # The search worker's document counts arrive in a report of their own, after
    # ready: both reads below must see the same families.
    wait_for(lambda: "slurpfs_index_documents" in (served.mnt / ".slurp" / "metrics").read_text())

    replies = {path: request(address, path) for path in ENDPOINTS}

    assert {p: r[0] for p, r in replies.items()} == dict.fromkeys(ENDPOINTS, 200)
    status, headers, body = replies["/metrics"]
    assert headers["content-type"] == METRICS_CONTENT_TYPE
    types = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    names = set(types)
    file_names = {
        f.name
        for f in text_string_to_metric_families((served.mnt / ".slurp" / "metrics").read_text())
    }
    assert names == file_names  # the same metrics as .slurp/metrics
    assert {
        "slurpfs_model_store_versions",
        "slurpfs_fs_commits",
        "slurpfs_search_ready",
        "slurpfs_indexer_lag",
        "slurpfs_http_requests",
        "slurpfs_uptime_seconds",
    } <= names
    assert types["slurpfs_fs_commits"] == types["slurpfs_http_requests"] == "counter"
    assert types["slurpfs_model_store_versions"] == types["slurpfs_indexer_lag"] == "gauge"
    assert types["slurpfs_fuse_request_seconds"] == "histogram"
    assert types["slurpfs_process_resident_memory_bytes"] == "gauge"  # the process collector
    assert b"\nslurpfs_fs_commits_total " in body
    for path in ["/health", "/health/live", "/health/ready", "/health/checks"]:
        assert replies[path][1]["content-type"] == "application/json", path
    assert json.loads(replies["/health/live"][2]) == {"status": "ok"}
    assert json.loads(replies["/health/ready"][2]) == {
        "status": "ok",
        "checks": {"store": "ok", "mount": "ok"},
    }
    assert json.loads(replies["/health"][2]) == {
        "status": "ok",
        "checks": dict.fromkeys(DAEMON_CHECKS, "ok"),
    }
    checks = json.loads(replies["/health/checks"][2])
    assert checks["status"] == "ok"
    assert [c["name"] for c in checks["checks"]] == DAEMON_CHECKS
    assert all(set(c) == {"name", "status", "detail"} and c["detail"] for c in checks["checks"])
    assert checks["checks"][1] == {"name": "mount", "status": "ok", "detail": "answering"}


@pytest.mark.mount
@needs_fuse
def test_a_mount_answers_bad_requests_and_keeps_serving(served: Mounted) -> None:
    address = endpoint(served)

    head = request(address, "/metrics", "HEAD")
    get_ = request(address, "/metrics")
    missing = request(address, "/nope")
    post = request(address, "/health", "POST")
    garbage = raw(address, b"\x00\xffgarbage\r\n\r\n")
    oversized = raw(address, b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
    misdirected = request(address, "/metrics", headers={"Host": "rebound.example"})

    assert head[0] == 200
    assert head[2] == b""
    assert head[1]["content-type"] == METRICS_CONTENT_TYPE
    assert int(head[1]["content-length"]) > 0
    assert get_[0] == 200
    assert missing[0] == 404
    assert (post[0], post[1]["allow"]) == (405, "GET, HEAD")
    assert garbage.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert oversized.startswith(b"HTTP/1.1 431 ")
    assert misdirected[0] == 421
    assert request(address, "/health/live")[0] == 200


@pytest.mark.mount
@needs_fuse
def test_a_client_that_sends_nothing_does_not_hold_the_endpoints(served: Mounted) -> None:
    address = endpoint(served)
    with socket.create_connection(address, timeout=60) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\n")  # then nothing
        others = [request(address, path)[0] for path in ENDPOINTS]
        assert others == [200] * len(ENDPOINTS)


@pytest.mark.mount
@needs_fuse
def test_no_endpoint_shows_a_context_or_its_address(served: Mounted) -> None:
    canary = b"canary" + secrets.token_hex(16).encode()  # one word for the search
    hidden_path = "p" + secrets.token_hex(16)
    d = served.ucxl / AUTH / hidden_path
    d.mkdir(parents=True)
    text = canary.decode()
    (d / "developer").write_bytes(
        f"---\nsummary: {text}\ntags: [{text}]\n---\n{text} in the body\n".encode()
    )
    query = served.mnt / ".search" / text
    wait_for(
        lambda: [n for n in os.listdir(query) if not n.startswith(".")] != [],
        what="the context to be indexed",
    )
    address = endpoint(served)

    seen = b"".join(request(address, path)[2] for path in ENDPOINTS)
    seen += request(address, f"/{text}")[2] + request(address, f"/health?{text}")[2]
    seen += raw(address, f"GET /{text} HTTP/1.1\r\nHost: {text}\r\n\r\n".encode())

    assert b"slurpfs_model_store_versions 1" in seen  # the context is counted
    assert find_canary(seen, canary) is None
    assert find_canary(seen, hidden_path.encode()) is None


@pytest.mark.mount
@needs_fuse
def test_a_full_disk_threshold_fails_health_but_not_readiness(nodes: Nodes, tmp_path: Path) -> None:
    env = {"SLURPFS_HEALTH_MIN_FREE_BYTES": str(1 << 60)}
    m = mounted_at(nodes, tmp_path, env=env)
    try:
        address = endpoint(m)
        summary = request(address, "/health")
        checks = request(address, "/health/checks")
        ready = request(address, "/health/ready")
        health_file = (m.mnt / ".slurp" / "health").read_text()
        m.unmount()
    finally:
        m.sweep()

    assert summary[0] == checks[0] == 503
    assert json.loads(summary[2])["checks"]["disk"] == "fail"
    disk = json.loads(checks[2])["checks"][4]
    assert (disk["name"], disk["status"]) == ("disk", "fail")
    assert "; health.min_free_bytes is 1048576.0 TiB" in disk["detail"]
    assert ready[0] == 200
    assert health_file.startswith("unhealthy\n")
    assert "\ndisk: FAILING - " in health_file


@pytest.mark.mount
@needs_fuse
def test_off_listens_nowhere(nodes: Nodes, tmp_path: Path) -> None:
    m = mounted_at(nodes, tmp_path, env={"SLURPFS_HTTP_LISTEN": "off"})
    try:
        status = (m.mnt / ".slurp" / "status").read_text()
        metrics = (m.mnt / ".slurp" / "metrics").read_text()
        m.unmount()
    finally:
        m.sweep()

    assert "\nhttp: off\n" in status
    assert "slurpfs_http_" not in metrics
    assert "HTTP endpoints are off" in m.log.read_text()


@pytest.mark.mount
@needs_fuse
def test_a_port_in_use_fails_the_mount_clearly(nodes: Nodes, tmp_path: Path) -> None:
    node, _ = nodes.new()
    node.close_all()
    (tmp_path / "mnt").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"SLURPFS_HTTP_LISTEN": f"127.0.0.1:{port}"}
        failed = slurpfs("mount", "--data", node.data_dir, tmp_path / "mnt", env=env, check=False)

    assert failed.returncode == 10
    message = failed.stderr.decode()
    assert message == (
        f"slurpfs: http.listen: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    assert not is_mounted(tmp_path / "mnt")
    assert "Traceback" not in (node.data_dir / "daemon.log").read_text()


@pytest.mark.mount
@needs_fuse
def test_a_bad_listen_value_fails_the_mount_naming_it(nodes: Nodes, tmp_path: Path) -> None:
    node, _ = nodes.new()
    node.close_all()
    (tmp_path / "mnt").mkdir()
    env = {"SLURPFS_HTTP_LISTEN": "garbage"}

    failed = slurpfs("mount", "--data", node.data_dir, tmp_path / "mnt", env=env, check=False)

    assert failed.returncode == 7
    assert failed.stderr.decode().startswith("slurpfs: SLURPFS_HTTP_LISTEN: expected HOST:PORT")
    assert not is_mounted(tmp_path / "mnt")


@pytest.mark.mount
@needs_fuse
def test_sigterm_with_http_clients_connected_exits_0_quietly(nodes: Nodes, tmp_path: Path) -> None:
    m = mounted_at(nodes, tmp_path)
    try:
        address = endpoint(m)
        pid = int(os.getxattr(m.mnt, "user.slurp.pid"))
        with socket.create_connection(address, timeout=60) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")  # never finished
            assert request(address, "/health/ready")[0] == 200
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not running(pid), what="the daemon to exit")
            assert slow.recv(100) == b""  # closed, not left hanging
        assert not is_mounted(m.mnt)
        m.check_ended()  # "exiting with status 0", no warning or error, nothing left
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=60).close()
    finally:
        m.sweep()
