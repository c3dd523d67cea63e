"""Real redis-server processes for the tests.

`shared`: the server scripts/test starts for the run (``SLURPFS_TEST_REDIS``, a
unix socket), emptied for each test; without it (pytest run by hand) a server of
the test's own. `RedisServer`: a server per test, for what the shared one cannot
do (kill it mid-run, TLS, ACL users, persistence, an eviction policy): started on
a free loopback port in the test's directory, stopped or killed by its PID,
restartable on the same port. scripts/install installs redis-server and never
leaves it running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis


def _own_database(url: str) -> str:
    """`url` with a database of this pytest-xdist worker's own (gw0 → 0, gw1 → 1, ...),
    so that workers running at once never empty each other's keys."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not url or not worker.startswith("gw"):
        return url
    return f"{url}{'&' if '?' in url else '?'}db={int(worker[2:])}"


# Read at import: the tests' environment is scrubbed of SLURPFS_* (conftest).
TEST_REDIS = _own_database(os.environ.get("SLURPFS_TEST_REDIS", ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """One redis-server process (see module docstring)."""

    dir: Path
    args: Sequence[str] = ()
    tls: bool = False
    acl: Sequence[str] = ()  # lines of an ACL file (``user NAME on >password ~keys +@all``)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is missing: scripts/install installs it"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "redis.log").unlink(missing_ok=True)  # `wait_ready` reads this run's
        listen = (
            ["--port", "0", "--tls-port", str(self.port), *self.tls_args()]
            if self.tls
            else ["--port", str(self.port)]
        )
        if self.acl:
            (self.dir / "users.acl").write_text("\n".join(self.acl) + "\n")
            listen += ["--aclfile", str(self.dir / "users.acl")]
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", *listen, "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log"), "--save", "", "--appendonly", "no",
             *self.args],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.wait_ready()

    def tls_args(self) -> list[str]:
        d = self.dir
        return [
            "--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key"),
            "--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", "no",
        ]  # fmt: skip

    def wait_ready(self, timeout: float = 30.0) -> None:
        log = self.dir / "redis.log"
        deadline = time.monotonic() + timeout  # a hang guard
        while time.monotonic() < deadline:
            assert self.proc is not None
            assert self.proc.poll() is None, log.read_text() if log.exists() else "exited"
            if log.exists() and "Ready to accept connections" in log.read_text():
                return
            time.sleep(0.02)
        raise AssertionError(f"redis-server did not start: {log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, as in a crash."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            self.proc = None

    def client(self, **kwargs: object) -> redis.Redis:
        if self.tls:
            kwargs.setdefault("ssl", True)
            kwargs.setdefault("ssl_ca_certs", str(self.dir / "ca.pem"))
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def values(self, **kwargs: object) -> dict[bytes, bytes]:
        """Every string key and its value, as the server holds them."""
        with contextlib.closing(self.client(**kwargs)) as r:
            out: dict[bytes, bytes] = {}
            for key in r.scan_iter(count=1000):
                value = r.get(key)
                assert isinstance(key, bytes)
                assert isinstance(value, bytes)
                out[key] = value
            return out

    def memory(self) -> bytes:
        """The server process's writable memory (heap, anonymous maps), read from /proc."""
        out = bytearray()
        maps = Path(f"/proc/{self.pid}/maps").read_text().splitlines()
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
            for line in maps:
                parts = line.split()
                if "w" not in parts[1] or (len(parts) > 5 and parts[5].startswith("/")):
                    continue  # read-only, or a file's own pages (the binary, libraries)
                start, end = (int(x, 16) for x in parts[0].split("-"))
                with contextlib.suppress(OSError):
                    mem.seek(start)
                    out += mem.read(end - start)
        return bytes(out)


def make_certificates(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=slurpfs test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName = IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.pem")  # fmt: skip


@contextlib.contextmanager
def running(
    directory: Path, *args: str, tls: bool = False, acl: Sequence[str] = ()
) -> Iterator[RedisServer]:
    server = RedisServer(directory, args, tls=tls, acl=acl)
    if tls:
        make_certificates(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SharedRedis:
    """The run's Redis server, by URL (see module docstring)."""

    url: str

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def values(self) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        with contextlib.closing(self.client()) as r:
            for key in r.scan_iter(count=1000):
                value = r.get(key)
                assert isinstance(key, bytes)
                assert isinstance(value, bytes)
                out[key] = value
        return out


@contextlib.contextmanager
def shared(directory: Path) -> Iterator[SharedRedis | RedisServer]:
    """The run's server, emptied, or one of this test's own in `directory`."""
    url = TEST_REDIS
    if not url:
        with running(directory) as own:
            yield own
        return
    run = SharedRedis(url)
    with contextlib.closing(run.client()) as r:
        r.flushdb()
    yield run


def log_lines(server: RedisServer, pattern: str) -> list[str]:
    text = (server.dir / "redis.log").read_text()
    return [line for line in text.splitlines() if re.search(pattern, line)]
