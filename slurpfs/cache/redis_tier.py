"""The Redis tier: envelopes, by version id, shared by the nodes that use one Redis.

What it holds are envelopes only (`slurpfs.crypto.envelope`): signed ciphertext,
never plaintext, never key slots. A value is keyed ``slurpfs:env:<version id hex>``
and, since a version id is the BLAKE2b-256 of its envelope, checked against its key
on every read: Redis is not trusted, and a value that does not hash to its id is
dropped (counted in ``rejected``) and never served. What a reader does with a body
is what it does with one from the store: signature and AEAD checks before any byte
is served.

- **Pooling**: one `redis.ConnectionPool` per daemon (threads share it; the model
  calls the tier from its worker threads). ``redis://``, ``rediss://`` (TLS; the CA,
  client certificate and verification as redis-py's URL options, e.g.
  ``?ssl_ca_certs=/etc/ssl/redis-ca.pem``) and ``unix://``; an ACL user in the URL
  (``rediss://slurpfs@cache:6380/0``), its password read from
  ``cache.redis_password_file``, never from the URL.
- **Expiry**: every write sets ``cache.redis_ttl``; every hit refreshes it
  (``GETEX``), so bodies in use stay.
- **Eviction** is the server's: ``maxmemory-policy`` belongs to the operator. An
  LFU policy (``allkeys-lfu``) keeps the bodies read often; any other policy makes
  the health check warn (`check`).
- **Outages degrade, never fail a read**: a call that fails (refused, timed out,
  reset) counts an error, logs one WARNING for the outage and returns a miss; for
  `retry_after` seconds (doubling up to `MAX_RETRY`) no call is tried, so a dead
  server costs nothing on the read path; the next call after that reconnects (the
  pool's connections are remade) and an INFO line says so. The ``redis`` health
  check warns meanwhile. Local data is read from the store first and never waits
  for Redis.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from slurpfs.crypto.envelope import blake2b_256
from slurpfs.health import OK, WARN, Check
from slurpfs.metrics import NO_LATENCY, Latency

log = logging.getLogger("slurpfs.cache")

KEY_PREFIX = b"slurpfs:env:"
VERSION_ID_BYTES = 32
RETRY_AFTER = 1.0  # seconds without calls after a failure (doubling)
MAX_RETRY = 30.0
POLICY_REFRESH = 60.0  # seconds between reads of the server's maxmemory-policy
MAX_CONNECTIONS = 32
LFU_POLICIES = ("allkeys-lfu", "volatile-lfu")


@dataclass(frozen=True, slots=True)
class RedisStatistics:
    up: int  # 1 while calls are made, 0 during an outage
    hits: int
    misses: int
    puts: int
    errors: int  # calls that failed (an outage counts each call it failed)
    rejected: int  # values that did not hash to their key (dropped, never served)
    reconnects: int  # outages that ended


def envelope_key(version_id: bytes) -> bytes:
    return KEY_PREFIX + version_id.hex().encode()


def describe_url(url: str) -> str:
    """``scheme://host:port`` (or the socket path) of a Redis URL, for logs and health:
    no user, no password, no options."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    return f"{parts.scheme}://{host}:{parts.port or 6379}"


def read_password(path: str) -> str | None:
    """The password in `path` (its first line), or None without a file. OSError."""
    if not path:
        return None
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return lines[0] if lines else ""


class RedisTier:
    """Envelopes in Redis by version id (see module docstring). Thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        ttl: float = 86400.0,
        timeout: float = 0.5,
        latency: Latency = NO_LATENCY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = describe_url(url)
        self.ttl = max(1, int(ttl))
        self.latency = latency
        self._clock = clock
        self._pool = redis.ConnectionPool.from_url(
            url,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=MAX_CONNECTIONS,
        )
        self._redis = redis.Redis(connection_pool=self._pool)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = RETRY_AFTER
        self._last_error = ""
        self._policy: str | None = None
        self._policy_at: float | None = None
        self._hits = self._misses = self._puts = self._errors = 0
        self._rejected = self._reconnects = 0

    # -- the two calls -----------------------------------------------------------------

    def get(self, version_id: bytes) -> bytes | None:
        """The envelope of `version_id`, its expiry refreshed; None when absent, when
        the value does not hash to the id, or while Redis is unreachable."""
        if not self._may_call():
            return None
        key = envelope_key(version_id)
        try:
            with self.latency.time("get"):
                value = self._redis.getex(key, ex=self.ttl)
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        self._succeeded()
        if value is None:
            self._count(misses=1)
            return None
        body = value if isinstance(value, bytes) else value.encode()  # (no decoding is set)
        if not hmac.compare_digest(blake2b_256(body), version_id):
            self._reject(key, version_id)
            return None
        self._count(hits=1)
        return body

    def put(self, version_id: bytes, envelope: bytes) -> None:
        """Keep `envelope` (whose id is `version_id`) for ``ttl`` seconds; nothing while
        Redis is unreachable (a failure is counted and logged, never raised)."""
        self.put_many([(version_id, envelope)])

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """`put` of each (version id, envelope), in one round trip (a pipeline): a
        group commit's batch costs the caller one wait for Redis, not one per save."""
        items = [(vid, body) for vid, body in items if len(vid) == VERSION_ID_BYTES]
        if not items or not self._may_call():
            return
        try:
            with self.latency.time("put"):
                pipe = self._redis.pipeline(transaction=False)
                for vid, body in items:
                    pipe.set(envelope_key(vid), body, ex=self.ttl)
                pipe.execute()
        except redis.RedisError as exc:
            self._failed(exc)
            return
        self._succeeded()
        self._count(puts=len(items))

    # -- health --------------------------------------------------------------------------

    def probe(self) -> None:
        """Ping the server and read its eviction policy (blocking: from a worker thread).
        A server that was down is tried again at once: this is how an idle node notices
        that Redis is back."""
        try:
            with self.latency.time("ping"):
                self._redis.ping()
                memory = self._redis.info("memory")
        except redis.RedisError as exc:
            self._failed(exc)
            return
        self._succeeded()
        with self._lock:
            self._policy = str(memory.get("maxmemory_policy", ""))
            self._policy_at = self._clock()

    def check(self) -> Check:
        """The ``redis`` health check, from what the calls and probes saw (no I/O)."""
        with self._lock:
            down, error, policy = self._down_since, self._last_error, self._policy
        if down is not None:
            silent = self._clock() - down
            return Check(
                "redis",
                WARN,
                f"{self.where} unreachable for {silent:.0f} s ({error}); reads go on from"
                " local data and peers",
            )
        if policy is None:
            return Check("redis", OK, f"{self.where}: not probed yet")
        if policy not in LFU_POLICIES:
            return Check(
                "redis",
                WARN,
                f"{self.where}: maxmemory-policy is {policy}; set allkeys-lfu so the"
                " bodies read most stay",
            )
        return Check("redis", OK, f"{self.where}: answering, maxmemory-policy {policy}")

    def statistics(self) -> RedisStatistics:
        with self._lock:
            return RedisStatistics(
                up=int(self._down_since is None),
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                errors=self._errors,
                rejected=self._rejected,
                reconnects=self._reconnects,
            )

    def close(self) -> None:
        self._pool.disconnect()

    # -- the outage state -----------------------------------------------------------------

    def _may_call(self) -> bool:
        with self._lock:
            return self._down_since is None or self._clock() >= self._retry_at

    def _failed(self, exc: redis.RedisError) -> None:
        reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
        with self._lock:
            self._errors += 1
            self._last_error = reason
            now = self._clock()
            first = self._down_since is None
            if first:
                self._down_since = now
                self._backoff = RETRY_AFTER
            else:
                self._backoff = min(self._backoff * 2, MAX_RETRY)
            self._retry_at = now + self._backoff
        if first:
            log.warning(
                "the Redis tier at %s fails (%s): reads go on from local data and peers;"
                " trying again in the background",
                self.where,
                reason,
            )
        # The pool's connections are remade on the next call.
        self._pool.disconnect(inuse_connections=False)

    def _succeeded(self) -> None:
        with self._lock:
            down = self._down_since
            if down is None:
                return
            self._down_since = None
            self._reconnects += 1
            silent = self._clock() - down
        log.info("the Redis tier at %s answers again (after %.0f s)", self.where, silent)

    def _reject(self, key: bytes, version_id: bytes) -> None:
        with self._lock:
            self._rejected += 1
        log.warning(
            "the Redis tier at %s returned a value that is not the envelope of version %s: dropped",
            self.where,
            version_id.hex()[:16],
        )
        try:
            self._redis.delete(key)
        except redis.RedisError as exc:
            self._failed(exc)

    def _count(self, *, hits: int = 0, misses: int = 0, puts: int = 0) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses
            self._puts += puts
