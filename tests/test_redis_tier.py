"""The Redis tier of envelopes, against real redis-server processes (tests/redisutil.py).

Envelopes only, checked against their id on every read; TTL refreshed on access;
the eviction policy reported; outages degrade to a miss and end by themselves;
TLS and an ACL user with a password from a file; and through the model: saves
write through, a body the store lacks is read from Redis.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Node, Nodes, find_canary
from fsutil import AUTH, Mounted, mounted_at, wait_for
from redisutil import RedisServer, SharedRedis, running, shared
from test_writebehind import commit_worker_ready, status

from slurpfs.cache.redis_tier import RedisTier, envelope_key
from slurpfs.config import CacheConfig
from slurpfs.crypto.envelope import blake2b_256
from slurpfs.errors import ConfigError, Corrupt
from slurpfs.health import OK, WARN
from slurpfs.metrics import Metrics
from slurpfs.model import ContextStore
from slurpfs.service.cache_tier import open_tier
from slurpfs.store import schema as store_schema
from slurpfs.ucxl import parse

LFU = ("--maxmemory-policy", "allkeys-lfu")
ADDRESS = parse("ucxl://alice:developer@proj:task/src/auth.go")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SharedRedis | RedisServer]:
    """The run's Redis (scripts/test starts it), emptied; else one of the test's own."""
    with shared(tmp_path / "redis") as srv:
        yield srv


@pytest.fixture
def tier(server: SharedRedis | RedisServer) -> Iterator[RedisTier]:
    t = RedisTier(server.url, ttl=600)
    yield t
    t.close()


def envelope(n: int = 100) -> tuple[bytes, bytes]:
    body = b"SLEV" + secrets.token_bytes(n)
    return blake2b_256(body), body


def test_an_envelope_is_kept_by_its_id_and_its_expiry_refreshed(
    tier: RedisTier, server: SharedRedis | RedisServer
) -> None:
    """Expected: a put is read back; the key carries the TTL; a read after the TTL
    was cut to 5 s sets it back to the full TTL (GETEX); a missing id is a miss."""
    version_id, body = envelope()
    tier.put(version_id, body)
    assert tier.get(version_id) == body
    r = server.client()
    key = envelope_key(version_id)
    assert 590 <= r.ttl(key) <= 600
    r.expire(key, 5)
    assert tier.get(version_id) == body
    assert r.ttl(key) > 5
    assert tier.get(envelope()[0]) is None
    stats = tier.statistics()
    assert (stats.hits, stats.misses, stats.puts, stats.errors) == (2, 1, 1, 0)


def test_a_batch_of_envelopes_is_kept_in_one_call(
    tier: RedisTier, server: SharedRedis | RedisServer
) -> None:
    """Expected (a group commit's write-through): every envelope of the batch is read
    back by its id with the full TTL, each counted as a put; an entry whose id is not a
    version id is left out, as `put` leaves it."""
    batch = [envelope(n) for n in (10, 200, 3000)]
    tier.put_many([*batch, (b"short id", b"SLEV not stored")])
    assert [tier.get(vid) for vid, _ in batch] == [body for _, body in batch]
    r = server.client()
    assert all(590 <= r.ttl(envelope_key(vid)) <= 600 for vid, _ in batch)
    assert r.dbsize() == 3
    assert tier.statistics().puts == 3


@pytest.mark.expect_warnings(r"the Redis tier at \S+ returned a value that is not the envelope .*")
def test_a_value_that_is_not_the_envelope_of_its_id_is_never_served(
    tier: RedisTier, server: SharedRedis | RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis is not trusted: another node, or anyone who can write to the server,
    could put anything under a key. Expected: None, the value dropped, counted."""
    version_id, body = envelope()
    r = server.client()
    r.set(envelope_key(version_id), body + b"tampered")
    with caplog.at_level(logging.WARNING, "slurpfs.cache"):
        assert tier.get(version_id) is None
    assert r.exists(envelope_key(version_id)) == 0
    assert tier.statistics().rejected == 1
    assert "is not the envelope of version" in caplog.text


def test_the_health_check_warns_without_an_lfu_policy(tmp_path: Path) -> None:
    with running(tmp_path / "r", "--maxmemory-policy", "noeviction") as srv:
        t = RedisTier(srv.url)
        try:
            assert t.check().status == OK  # not probed yet: nothing known
            t.probe()
            check = t.check()
        finally:
            t.close()
    assert check.status == WARN
    assert "maxmemory-policy is noeviction; set allkeys-lfu" in check.detail


@pytest.mark.expect_warnings(r"the Redis tier at redis://127\.0\.0\.1:\d+ fails \(.*")
def test_an_outage_is_a_miss_and_ends_by_itself(tmp_path: Path) -> None:
    """The server is killed between calls, then started again on its port.
    Expected: calls return a miss or nothing, never raise; the check warns; for the
    retry interval no call is tried (no new error counted); once the server answers,
    a probe ends the outage and the tier works again."""
    clock = Clock()
    server = RedisServer(tmp_path / "redis", LFU)  # its own: it is killed
    server.start()
    t = RedisTier(server.url, clock=clock)
    try:
        version_id, body = envelope()
        t.put(version_id, body)
        server.kill()
        assert t.get(version_id) is None
        t.put(*envelope())
        assert t.statistics().errors == 1  # the put was not tried: the tier is down
        check = t.check()
        assert check.status == WARN
        assert "unreachable" in check.detail
        assert "reads go on from local data and peers" in check.detail
        assert t.statistics().up == 0
        clock.now += 1.5  # past the first retry interval
        assert t.get(version_id) is None  # tried again, still down
        assert t.statistics().errors == 2
        server.start()  # the same port, an empty server (no persistence)
        t.probe()
        assert t.check().status == OK
        stats = t.statistics()
        assert (stats.up, stats.reconnects) == (1, 1)
        t.put(version_id, body)
        assert t.get(version_id) == body
    finally:
        t.close()
        server.stop()


@pytest.mark.expect_warnings(r"the Redis tier at rediss://\S+ fails \(.*(password|WRONGPASS).*")
def test_tls_and_an_acl_user_with_a_password_file(tmp_path: Path) -> None:
    """rediss:// with the CA in the URL, the user in the URL and the password in
    ``cache.redis_password_file``. Expected: the tier works; the default user
    cannot read; the wrong password is an outage (a warning), not an exception."""
    acl = ["user default off", "user slurpfs on >s3cret ~slurpfs:* +@all"]
    with running(tmp_path / "tls", *LFU, tls=True, acl=acl) as srv:
        secret = tmp_path / "redis.password"
        secret.write_text("s3cret\n")
        url = f"rediss://slurpfs@127.0.0.1:{srv.port}/0?ssl_ca_certs={srv.dir / 'ca.pem'}"
        cfg = CacheConfig(redis_url=url, redis_password_file=str(secret))
        t = open_tier(cfg, Metrics(process=False).redis)
        assert t is not None
        try:
            version_id, body = envelope()
            t.put(version_id, body)
            assert t.get(version_id) == body
            t.probe()
            assert t.check().status == OK
            assert t.where == f"rediss://127.0.0.1:{srv.port}"  # no user, no options
        finally:
            t.close()
        values = srv.values(username="slurpfs", password="s3cret")
        assert values == {envelope_key(version_id): body}
        secret.write_text("wrong\n")
        wrong = open_tier(cfg, Metrics(process=False).redis)
        assert wrong is not None
        try:
            assert wrong.get(version_id) is None
            assert wrong.check().status == WARN
        finally:
            wrong.close()


def test_an_unreadable_password_file_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = CacheConfig(redis_url="redis://127.0.0.1:1/0", redis_password_file=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"^cache.redis_password_file: cannot read .*/x: No such"):
        open_tier(cfg, Metrics(process=False).redis)


def _drop_local_envelope(model: ContextStore, version_id: bytes) -> None:
    """Remove a body from the store, as a node that holds the record but not the body."""
    store = model.store
    with store._env.begin(write=True) as txn:  # test-only reach into the store
        assert txn.delete(version_id, db=store._dbs[store_schema.DB_ENVELOPES])


def test_saves_write_through_and_a_body_the_store_lacks_is_read_from_redis(
    server: SharedRedis | RedisServer, node: Node, model: ContextStore
) -> None:
    """Expected: a save puts its envelope (not its plaintext) in Redis under its id;
    after the store loses that body, a fresh read is served from Redis, verified;
    without the tier the same read is Corrupt."""
    tier = RedisTier(server.url)
    model.envelopes = tier
    canary = secrets.token_hex(16).encode()
    info = model.put(ADDRESS, "developer", b"plaintext " + canary)
    values = server.values()
    assert list(values) == [envelope_key(info.version_id)]
    assert blake2b_256(values[envelope_key(info.version_id)]) == info.version_id
    assert find_canary(b"".join(values.values()), canary) is None

    node.expect_damage()  # fsck would report the body we remove
    _drop_local_envelope(model, info.version_id)
    fresh = node.reopen(model)  # nothing cached
    fresh.envelopes = tier
    assert fresh.get(ADDRESS, "developer").data == b"plaintext " + canary
    assert tier.statistics().hits == 1
    fresh.envelopes = None
    with pytest.raises(Corrupt, match="missing its envelope"):
        node.reopen(fresh).get(ADDRESS, "developer")
    tier.close()


def test_no_plaintext_reaches_redis_memory_or_its_files(
    tmp_path: Path, model: ContextStore
) -> None:
    """A server with RDB snapshots and an append-only file; contexts with a canary
    saved through the model with the tier. Expected: the envelopes are there (one
    key per version), and the canary is in no encoding in the server's memory, its
    AOF or its RDB snapshot."""
    args = (*LFU, "--appendonly", "yes", "--appendfsync", "always", "--save", "3600 1")
    with running(tmp_path / "persisted", *args) as srv:
        tier = RedisTier(srv.url)
        model.envelopes = tier
        canary = secrets.token_hex(16).encode()
        ids = []
        for i in range(5):
            text = b"line %d of a secret: " % i + canary + b"\n"
            ids.append(model.put(ADDRESS, "developer", text * 20).version_id)
        assert sorted(srv.values()) == sorted(envelope_key(v) for v in ids)
        with srv.client() as r:
            marker = secrets.token_hex(16).encode()
            r.set(b"not-slurpfs", marker)  # the control: a value the scans must find
            r.save()
        memory = srv.memory()
        files = [p for p in srv.dir.rglob("*") if p.is_file() and p.suffix != ".log"]
        tier.close()
    assert any(p.name.endswith(".rdb") for p in files), files
    assert any("appendonly" in p.name for p in files), files
    assert find_canary(memory, marker) is not None
    assert any(find_canary(p.read_bytes(), marker) for p in files if "appendonly" in p.name)
    assert find_canary(memory, canary) is None
    for path in files:
        assert find_canary(path.read_bytes(), canary) is None, path
    assert os.path.getsize(next(p for p in files if p.name.endswith(".rdb"))) > 0


needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse here")


@pytest.mark.mount
@needs_fuse
def test_a_mount_keeps_serving_while_redis_is_killed_and_reconnects(
    nodes: Nodes, tmp_path: Path
) -> None:
    """A mount with ``cache.redis_url``; its Redis server is killed mid-run (SIGKILL),
    then started again on the same port. Expected: saves write their envelopes
    through; with the server dead every read and save of local data still works,
    ``redis`` warns in health and the metrics say it is down; once the server is
    back the daemon reconnects by itself (health ok again, new saves written
    through), and it exits cleanly with one warning logged about the outage."""
    srv = RedisServer(tmp_path / "redis", LFU)
    srv.start()
    try:
        m = mounted_at(nodes, tmp_path, env={"SLURPFS_CACHE_REDIS_URL": srv.url})
        m.expect_warnings = (r"the Redis tier at redis://127\.0\.0\.1:\d+ fails \(.*",)
        try:
            _outage_and_back(m, srv)
            m.unmount()
        finally:
            m.sweep()
    finally:
        srv.stop()


@pytest.mark.mount
@needs_fuse
def test_saves_a_write_behind_mount_journaled_are_written_through(
    nodes: Nodes, tmp_path: Path
) -> None:
    """With write-behind the commit worker seals and commits a mount's saves in its
    own process: their envelopes still reach the Redis tier (after the group commit),
    as a synchronous save's do."""
    srv = RedisServer(tmp_path / "redis", LFU)
    srv.start()
    try:
        env = {"SLURPFS_CACHE_REDIS_URL": srv.url, "SLURPFS_DURABILITY_WRITE_BEHIND": "true"}
        m = mounted_at(nodes, tmp_path, env=env)
        try:
            commit_worker_ready(m)
            where = m.ucxl / AUTH / "journaled"
            where.mkdir(parents=True)
            for n in range(3):
                (where / "developer").write_text(f"save {n}\n")
            wait_for(lambda: len(srv.values()) == 3, what="three envelopes in Redis")
            wait_for(  # sealed in the worker (its count reaches the status a moment later)
                lambda: status(m)["commit_worker_batches"] != "0", what="the worker's batches"
            )
            m.unmount()
        finally:
            m.sweep()
    finally:
        srv.stop()


def _outage_and_back(m: Mounted, srv: RedisServer) -> None:
    health = m.mnt / ".slurp" / "health"
    where = m.ucxl / AUTH / "src"
    where.mkdir(parents=True)
    (where / "developer").write_text("first\n")
    # written through at the commit (with write-behind: the group commit's)
    wait_for(lambda: len(srv.values()) == 1, what="the envelope in Redis")
    wait_for(lambda: "redis: ok - redis://127.0.0.1:" in health.read_text(), what="probe")

    srv.kill()
    (where / "developer").write_text("second\n")  # a save while Redis is dead
    with open(where / "developer", "rb") as f:
        assert f.read() == b"second\n"
    assert (where / ".history" / "developer").is_dir()
    assert len(os.listdir(where / ".history" / "developer")) == 2
    wait_for(lambda: "redis: warn" in health.read_text(), what="the outage in health")
    assert "reads go on from local data and peers" in health.read_text()
    metrics = (m.mnt / ".slurp" / "metrics").read_text()
    assert "\nslurpfs_redis_up 0.0\n" in metrics
    assert "\nslurpfs_redis_errors_total " in metrics

    srv.start()  # an empty server on the same port
    wait_for(lambda: "redis: ok" in health.read_text(), what="the reconnection")
    (where / "developer").write_text("third\n")
    wait_for(lambda: len(srv.values()) == 1, what="the new version's envelope in Redis")
    metrics = (m.mnt / ".slurp" / "metrics").read_text()
    assert "\nslurpfs_redis_reconnects_total 1.0\n" in metrics
