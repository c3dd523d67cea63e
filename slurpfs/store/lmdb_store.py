"""The LMDB store: versions, heads, history, the address tree, TTLs, changes.

The store keeps sealed envelopes and their metadata; it never sees plaintext
or private keys. Everything one commit writes goes in one LMDB write
transaction, so a commit is all-or-nothing and survives a crash of the process
once `commit` returns. The environment is opened without a per-commit fsync;
`sync()` (called periodically by the daemon, and for every `fsync`) makes
commits survive power loss.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from slurpfs.crypto.envelope import KeySlot
from slurpfs.errors import AddressTooLong, Corrupt, NotEmpty, NotFound, SlurpError, StoreFull
from slurpfs.store import schema as s
from slurpfs.store.schema import VersionRecord


class StaleHead(SlurpError):
    """The context's leaves changed between reading them and committing (retry)."""


@dataclass(frozen=True, slots=True)
class Commit:
    """One version to store. `expected_leaves` (when given) must still be the leaves."""

    record: VersionRecord
    envelope: bytes
    slots: Sequence[KeySlot]
    expected_leaves: tuple[bytes, ...] | None = None
    expires_ms: int | None = None
    local_slots: Sequence[KeySlot] = ()
    verified: bytes | None = None


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """What the store holds for one version: envelope, key slots and local fast paths."""

    envelope: bytes
    slots: list[KeySlot]
    local_slots: list[KeySlot]
    verified: bytes | None


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    versions: int
    contexts: int
    directories: int
    envelope_bytes: int
    plaintext_bytes: int
    sequence: int
    map_size: int
    map_used: int


@dataclass
class _Counters:
    commits: int = 0
    commit_failures: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _scan(
    txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs whose key starts with `prefix`, in key order."""
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return
    for key, value in cur:
        key = bytes(key)
        if not key.startswith(prefix):
            return
        yield key, bytes(value)


class WriterLock:
    """One writer of new versions at a time, across processes (`acquire`, `release`).

    A writer reads a context's leaves, seals a version on them (~0.3 ms) and commits
    it; LMDB serialises only the commit, so two processes writing one context could
    keep invalidating each other's leaves (`StaleHead`) until one gave up. An
    exclusive ``flock`` on ``writers.lock`` in the store's directory, held from the
    read to the commit, makes them take turns instead. Not counted: one `release`
    frees it however often it was taken (the model holds it once per write).
    """

    __slots__ = ("_fd",)

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock; without `blocking`, False at once if another holder has it."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class Store:
    """A handle on one LMDB environment (a directory). Thread-safe."""

    def __init__(self, path: Path, *, map_size: int, readonly: bool = False) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=len(s.ALL_DBS) + 32,  # room for auxiliary tables (search index)
                subdir=True,
                sync=False,  # durability comes from sync(); see module docstring
                metasync=False,
                readahead=False,
                readonly=readonly,
                mode=0o600,
            )
        except lmdb.Error as exc:
            raise SlurpError(f"cannot open store at {path}: {exc}") from exc
        self._dbs = {name: self._env.open_db(name, create=not readonly) for name in s.ALL_DBS}
        self._path = path
        self.writer = WriterLock(path / "writers.lock")
        self._counters = _Counters()
        self._lock = threading.Lock()
        self._aux: dict[bytes, lmdb._Database] = {}
        if not readonly:
            with self._env.begin(write=True) as txn:
                stored = txn.get(s.INFO_FORMAT, db=self._dbs[s.DB_INFO])
                if stored is None:
                    txn.put(s.INFO_FORMAT, s.U32.pack(s.FORMAT_VERSION), db=self._dbs[s.DB_INFO])
                elif s.U32.unpack(stored)[0] > s.FORMAT_VERSION:
                    raise SlurpError(f"store at {path} has a newer format than this slurpfs")

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        self.sync()
        self._env.close()
        self.writer.close()

    def sync(self) -> None:
        """Flush committed transactions to stable storage."""
        self._env.sync(True)

    def problem(self) -> str | None:
        """Why a read transaction fails now; None when the store answers (health check)."""
        try:
            with self._env.begin() as txn:
                txn.stat(self._dbs[s.DB_META])
        except lmdb.Error as exc:
            return str(exc)
        return None

    # -- writing ---------------------------------------------------------

    def commit(self, commits: Sequence[Commit]) -> int:
        """Store versions in one transaction; returns the new change sequence.

        Raises `StaleHead` if a commit's `expected_leaves` no longer match (nothing
        is written then), `StoreFull` when the map or the disk is full.
        """
        try:
            with self._env.begin(write=True) as txn:
                seq = self._sequence(txn)
                for c in commits:
                    seq += 1
                    self._commit_one(txn, c, seq)
                txn.put(s.INFO_SEQUENCE, s.U64.pack(seq), db=self._dbs[s.DB_INFO])
        except lmdb.MapFullError:
            self._counters.commit_failures += 1
            raise StoreFull("the store's map is full (raise store.map_size)") from None
        except lmdb.DiskError as exc:
            self._counters.commit_failures += 1
            raise StoreFull(f"disk error while committing: {exc}") from None
        except lmdb.BadValsizeError:
            # `ucxl` keeps addresses short enough; this is the store's own guard.
            self._counters.commit_failures += 1
            raise AddressTooLong("an address is too long for the store's keys") from None
        except lmdb.Error as exc:
            self._counters.commit_failures += 1
            if exc.args and isinstance(exc.args[0], str) and "No space" in exc.args[0]:
                raise StoreFull(f"no space left on device: {exc}") from None
            raise SlurpError(f"commit failed: {exc}") from exc
        except OSError as exc:
            self._counters.commit_failures += 1
            if exc.errno == errno.ENOSPC:
                raise StoreFull("no space left on device") from None
            raise
        self._counters.commits += len(commits)
        return seq

    def _commit_one(self, txn: lmdb.Transaction, c: Commit, seq: int) -> None:
        rec = c.record
        ctx = s.context_key(rec.address, rec.role)
        dbs = self._dbs
        current = self._leaf_ids(txn, ctx)
        if c.expected_leaves is not None and set(current) != set(c.expected_leaves):
            raise StaleHead(f"{rec.address} [{rec.role}] changed concurrently")
        if not txn.put(rec.version_id, c.envelope, db=dbs[s.DB_ENVELOPES], overwrite=False):
            return  # content-addressed: already stored, nothing else to do
        txn.put(rec.version_id, rec.pack(), db=dbs[s.DB_META])
        self._add_to_counter(txn, s.INFO_ENVELOPE_BYTES, len(c.envelope))
        self._add_to_counter(txn, s.INFO_PLAINTEXT_BYTES, rec.size)
        for slot in c.local_slots:
            txn.put(
                s.slot_key(rec.version_id, slot.role, slot.generation),
                slot.sealed,
                db=dbs[s.DB_LOCAL_SLOTS],
            )
        if c.verified is not None:
            txn.put(rec.version_id, c.verified, db=dbs[s.DB_VERIFIED])
        for slot in c.slots:
            txn.put(
                s.slot_key(rec.version_id, slot.role, slot.generation),
                slot.sealed,
                db=dbs[s.DB_SLOTS],
            )
        leaves = [v for v in current if v not in rec.parents]
        leaves.append(rec.version_id)
        self._put_leaves(txn, ctx, leaves)
        txn.put(
            s.history_key(rec.address, rec.role, rec.hlc, rec.author, rec.version_id),
            b"",
            db=dbs[s.DB_HISTORY],
        )
        self._ensure_dirs(txn, rec.address)
        if c.expires_ms is not None:
            self._set_ttl(txn, ctx, c.expires_ms)
        else:  # a version stored without a TTL makes the context permanent again
            self._clear_ttl(txn, ctx)
        txn.put(s.U64.pack(seq), rec.version_id, db=dbs[s.DB_CHANGES])

    def _put_leaves(self, txn: lmdb.Transaction, ctx: bytes, leaves: list[bytes]) -> None:
        records = [self._record(txn, v) for v in leaves]
        records.sort(key=lambda r: r.order, reverse=True)
        txn.put(ctx, b"".join(r.version_id for r in records), db=self._dbs[s.DB_LEAVES])

    def _set_ttl(self, txn: lmdb.Transaction, ctx: bytes, expires_ms: int) -> None:
        self._clear_ttl(txn, ctx)
        packed = s.U64.pack(expires_ms)
        txn.put(ctx, packed, db=self._dbs[s.DB_TTL_BY_CONTEXT])
        txn.put(packed + ctx, b"", db=self._dbs[s.DB_TTL])

    def _clear_ttl(self, txn: lmdb.Transaction, ctx: bytes) -> None:
        old = txn.get(ctx, db=self._dbs[s.DB_TTL_BY_CONTEXT])
        if old is not None:
            txn.delete(ctx, db=self._dbs[s.DB_TTL_BY_CONTEXT])
            txn.delete(bytes(old) + ctx, db=self._dbs[s.DB_TTL])

    def _ensure_dirs(self, txn: lmdb.Transaction, address: str) -> None:
        parts = address.split("/")
        parent = ""
        for i, name in enumerate(parts):
            # overwrite=False leaves an existing entry's page clean (no copy-on-write)
            txn.put(s.tree_key(parent, name), b"", db=self._dbs[s.DB_TREE], overwrite=False)
            parent = "/".join(parts[: i + 1])

    def resolve(self, address: str, role: str, keep: bytes, drop: bytes, merge: Commit) -> int:
        """Resolve a conflict: `merge` (parents keep+drop) replaces both leaves."""
        if set(merge.record.parents) != {keep, drop}:
            raise ValueError("a merge commit must have exactly the two leaves as parents")
        return self.commit([merge])

    def mkdir(self, address: str) -> None:
        """Create an address directory and its ancestors (idempotent)."""
        try:
            with self._env.begin(write=True) as txn:
                self._ensure_dirs(txn, address)
        except lmdb.BadValsizeError:
            raise AddressTooLong(
                f"address {address[:80]!r}... is too long for the store's keys"
            ) from None

    def rmdir(self, address: str) -> None:
        """Remove an empty address directory; its stored history stays."""
        with self._env.begin(write=True) as txn:
            parent, _, name = address.rpartition("/")
            if txn.get(s.tree_key(parent, name), db=self._dbs[s.DB_TREE]) is None:
                raise NotFound(f"no directory {address}")
            if self._first_child(txn, address) is not None:
                raise NotEmpty(f"{address} has subdirectories")
            for role in self._roles_at(txn, address):
                head = self._leaf_ids(txn, s.context_key(address, role))
                if head and not self._record(txn, head[0]).deleted:
                    raise NotEmpty(f"{address} holds a context for role {role}")
            txn.delete(s.tree_key(parent, name), db=self._dbs[s.DB_TREE])

    def purge(self, address: str, role: str) -> int:
        """Remove every version of a context (TTL expiry). Returns versions removed."""
        ctx = s.context_key(address, role)
        removed = 0
        with self._env.begin(write=True) as txn:
            prefix = s.history_prefix(address, role)
            keys = [k for k, _ in _scan(txn, self._dbs[s.DB_HISTORY], prefix)]
            for key in keys:
                vid = key[-s.VERSION_ID_LEN :]
                txn.delete(key, db=self._dbs[s.DB_HISTORY])
                envelope = txn.get(vid, db=self._dbs[s.DB_ENVELOPES])
                if envelope is not None:
                    self._add_to_counter(txn, s.INFO_ENVELOPE_BYTES, -len(envelope))
                    self._add_to_counter(txn, s.INFO_PLAINTEXT_BYTES, -self._record(txn, vid).size)
                txn.delete(vid, db=self._dbs[s.DB_ENVELOPES])
                txn.delete(vid, db=self._dbs[s.DB_META])
                for slot_key in self._slot_keys(txn, vid):
                    txn.delete(slot_key, db=self._dbs[s.DB_SLOTS])
                for slot_key, _ in list(_scan(txn, self._dbs[s.DB_LOCAL_SLOTS], vid)):
                    txn.delete(slot_key, db=self._dbs[s.DB_LOCAL_SLOTS])
                txn.delete(vid, db=self._dbs[s.DB_VERIFIED])
                removed += 1
            txn.delete(ctx, db=self._dbs[s.DB_LEAVES])
            old = txn.get(ctx, db=self._dbs[s.DB_TTL_BY_CONTEXT])
            if old is not None:
                txn.delete(bytes(old) + ctx, db=self._dbs[s.DB_TTL])
                txn.delete(ctx, db=self._dbs[s.DB_TTL_BY_CONTEXT])
        return removed

    def replace_slots(
        self,
        version_id: bytes,
        add: Sequence[KeySlot],
        remove: Sequence[tuple[str, int]],
        add_local: Sequence[KeySlot] = (),
    ) -> None:
        """Key rotation: add re-wrapped slots and drop old-generation ones, atomically.

        Local slots of the removed generations go too; `add_local` replaces them.
        """
        with self._env.begin(write=True) as txn:
            for role, generation in remove:
                txn.delete(s.slot_key(version_id, role, generation), db=self._dbs[s.DB_LOCAL_SLOTS])
            for slot in add_local:
                txn.put(
                    s.slot_key(version_id, slot.role, slot.generation),
                    slot.sealed,
                    db=self._dbs[s.DB_LOCAL_SLOTS],
                )
            for slot in add:
                txn.put(
                    s.slot_key(version_id, slot.role, slot.generation),
                    slot.sealed,
                    db=self._dbs[s.DB_SLOTS],
                )
            for role, generation in remove:
                txn.delete(s.slot_key(version_id, role, generation), db=self._dbs[s.DB_SLOTS])

    # -- auxiliary sub-databases ---------------------------------------------
    # Other components keep their own (already sealed) records here, e.g. the
    # search index; the store neither reads nor interprets them. `name` is
    # prefixed with "aux:" so it can never collide with the store's own tables.

    def _aux_db(self, name: bytes, *, create: bool) -> lmdb._Database | None:
        with self._lock:
            db = self._aux.get(name)
            if db is None:
                try:
                    db = self._env.open_db(b"aux:" + name, create=create)
                except lmdb.NotFoundError:
                    return None
                self._aux[name] = db
            return db

    def aux_get(self, name: bytes, key: bytes) -> bytes | None:
        """The value under `key` in auxiliary table `name`, or None."""
        db = self._aux_db(name, create=False)
        if db is None:
            return None
        with self._env.begin() as txn:
            raw = txn.get(key, db=db)
            return None if raw is None else bytes(raw)

    def aux_scan(self, name: bytes, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of auxiliary table `name` whose key starts with `prefix`."""
        db = self._aux_db(name, create=False)
        if db is None:
            return []
        with self._env.begin() as txn:
            return list(_scan(txn, db, prefix))

    def aux_write(
        self,
        name: bytes,
        puts: Mapping[bytes, bytes],
        deletes: Iterable[bytes] = (),
        *,
        expect: tuple[bytes, bytes | None] | None = None,
    ) -> None:
        """Put and delete keys of auxiliary table `name` in one transaction.

        With `expect=(key, value)`, the write happens only if `key` currently holds
        `value` (None: is absent); otherwise `StaleHead` is raised and nothing is
        written. `StoreFull` when the map or the disk is full.
        """
        db = self._aux_db(name, create=True)
        assert db is not None
        try:
            with self._env.begin(write=True) as txn:
                if expect is not None:
                    current = txn.get(expect[0], db=db)
                    if (None if current is None else bytes(current)) != expect[1]:
                        raise StaleHead(f"auxiliary record {expect[0]!r} changed concurrently")
                for key in deletes:
                    txn.delete(key, db=db)
                for key, value in puts.items():
                    txn.put(key, value, db=db)
        except lmdb.MapFullError:
            raise StoreFull("the store's map is full (raise store.map_size)") from None
        except lmdb.DiskError as exc:
            raise StoreFull(f"disk error while writing: {exc}") from None
        except lmdb.Error as exc:
            if exc.args and isinstance(exc.args[0], str) and "No space" in exc.args[0]:
                raise StoreFull(f"no space left on device: {exc}") from None
            raise SlurpError(f"write failed: {exc}") from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreFull("no space left on device") from None
            raise

    # -- reading ---------------------------------------------------------

    def _sequence(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(s.INFO_SEQUENCE, db=self._dbs[s.DB_INFO])
        return 0 if raw is None else int(s.U64.unpack(raw)[0])

    def _leaf_ids(self, txn: lmdb.Transaction, ctx: bytes) -> list[bytes]:
        raw = txn.get(ctx, db=self._dbs[s.DB_LEAVES])
        if raw is None:
            return []
        n = s.VERSION_ID_LEN
        return [bytes(raw[i : i + n]) for i in range(0, len(raw), n)]

    def _record(self, txn: lmdb.Transaction, version_id: bytes) -> VersionRecord:
        raw = txn.get(version_id, db=self._dbs[s.DB_META])
        if raw is None:
            raise Corrupt(f"version {version_id.hex()[:16]} is referenced but missing")
        return VersionRecord.unpack(version_id, bytes(raw))

    def _slot_keys(self, txn: lmdb.Transaction, version_id: bytes) -> list[bytes]:
        return [k for k, _ in _scan(txn, self._dbs[s.DB_SLOTS], version_id)]

    def _roles_at(self, txn: lmdb.Transaction, address: str) -> list[str]:
        prefix = address.encode() + b"\0"
        return [k[len(prefix) :].decode() for k, _ in _scan(txn, self._dbs[s.DB_LEAVES], prefix)]

    def _first_child(self, txn: lmdb.Transaction, address: str) -> str | None:
        prefix = s.tree_prefix(address)
        for key, _ in _scan(txn, self._dbs[s.DB_TREE], prefix):
            return key[len(prefix) :].decode()
        return None

    def leaves(self, address: str, role: str) -> list[VersionRecord]:
        """The context's leaves, head first; empty if it was never written."""
        with self._env.begin() as txn:
            return [self._record(txn, v) for v in self._leaf_ids(txn, s.context_key(address, role))]

    def head(self, address: str, role: str, *, now_ms: int | None = None) -> VersionRecord | None:
        """The context's head; with `now_ms`, None once its TTL has passed (whether or
        not a cleanup pass purged it yet)."""
        with self._env.begin() as txn:
            ctx = s.context_key(address, role)
            if now_ms is not None and self._expired(txn, ctx, now_ms):
                return None
            ids = self._leaf_ids(txn, ctx)
            return self._record(txn, ids[0]) if ids else None

    def _expired(self, txn: lmdb.Transaction, ctx: bytes, now_ms: int) -> bool:
        expiry = txn.get(ctx, db=self._dbs[s.DB_TTL_BY_CONTEXT])
        return expiry is not None and s.U64.unpack(expiry)[0] <= now_ms

    def record(self, version_id: bytes) -> VersionRecord | None:
        with self._env.begin() as txn:
            raw = txn.get(version_id, db=self._dbs[s.DB_META])
            return None if raw is None else VersionRecord.unpack(version_id, raw)

    def envelope(self, version_id: bytes) -> bytes | None:
        with self._env.begin() as txn:
            raw = txn.get(version_id, db=self._dbs[s.DB_ENVELOPES])
            return None if raw is None else bytes(raw)

    def slots(self, version_id: bytes) -> list[KeySlot]:
        with self._env.begin() as txn:
            return self._slots(txn, version_id)

    def _slots(self, txn: lmdb.Transaction, version_id: bytes) -> list[KeySlot]:
        out = []
        for key, value in _scan(txn, self._dbs[s.DB_SLOTS], version_id):
            _, role, generation = s.split_slot_key(key)
            out.append(KeySlot(role, generation, value))
        return out

    def read_version(self, version_id: bytes) -> StoredVersion | None:
        """Envelope, key slots and local fast paths of a version, in one read transaction."""
        with self._env.begin() as txn:
            return self._stored(txn, version_id)

    def read_head(
        self,
        address: str,
        role: str,
        *,
        load: Callable[[VersionRecord], bool] = lambda r: True,
        now_ms: int | None = None,
    ) -> tuple[VersionRecord, StoredVersion | None] | None:
        """The head record and (when `load` says so) its stored version, in one transaction.

        The hot read path. The stored version is None for a deletion or when `load`
        declines (the caller has the plaintext cached). With `now_ms`, None once the
        context's TTL has passed.
        """
        with self._env.begin() as txn:
            ctx = s.context_key(address, role)
            if now_ms is not None and self._expired(txn, ctx, now_ms):
                return None
            ids = self._leaf_ids(txn, ctx)
            if not ids:
                return None
            record = self._record(txn, ids[0])
            if record.deleted or not load(record):
                return record, None
            return record, self._stored(txn, ids[0])

    def _stored(self, txn: lmdb.Transaction, version_id: bytes) -> StoredVersion | None:
        raw = txn.get(version_id, db=self._dbs[s.DB_ENVELOPES])
        if raw is None:
            return None
        local = []
        for key, value in _scan(txn, self._dbs[s.DB_LOCAL_SLOTS], version_id):
            _, role, generation = s.split_slot_key(key)
            local.append(KeySlot(role, generation, value))
        tag = txn.get(version_id, db=self._dbs[s.DB_VERIFIED])
        return StoredVersion(
            bytes(raw), self._slots(txn, version_id), local, None if tag is None else bytes(tag)
        )

    def versions_sealed_to(self, role: str, generation: int) -> list[bytes]:
        """Ids of versions with a key slot for this role generation (key rotation)."""
        suffix = role.encode() + b"\0" + s.U32.pack(generation)
        with self._env.begin() as txn:
            keys = txn.cursor(db=self._dbs[s.DB_SLOTS]).iternext(values=False)
            return [
                bytes(k[: s.VERSION_ID_LEN]) for k in keys if bytes(k[s.VERSION_ID_LEN :]) == suffix
            ]

    def history(self, address: str, role: str) -> list[VersionRecord]:
        """Every version of a context (tombstones included), oldest first."""
        prefix = s.history_prefix(address, role)
        with self._env.begin() as txn:
            return [
                self._record(txn, key[-s.VERSION_ID_LEN :])
                for key, _ in _scan(txn, self._dbs[s.DB_HISTORY], prefix)
            ]

    def children(self, address: str) -> list[str]:
        """Subdirectory names of an address directory ("" is the root of authorities)."""
        prefix = s.tree_prefix(address)
        with self._env.begin() as txn:
            return [k[len(prefix) :].decode() for k, _ in _scan(txn, self._dbs[s.DB_TREE], prefix)]

    def roles_at(self, address: str) -> list[str]:
        """Roles that have ever had a version at this address."""
        with self._env.begin() as txn:
            return self._roles_at(txn, address)

    def is_dir(self, address: str) -> bool:
        parent, _, name = address.rpartition("/")
        with self._env.begin() as txn:
            return txn.get(s.tree_key(parent, name), db=self._dbs[s.DB_TREE]) is not None

    def expired(self, now_ms: int) -> list[tuple[str, str]]:
        """Contexts whose TTL has passed."""
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._dbs[s.DB_TTL])
            out = []
            for key in cur.iternext(values=False):
                if s.U64.unpack(key[:8])[0] > now_ms:
                    break
                out.append(s.split_context(bytes(key[8:])))
            return out

    def sequence(self) -> int:
        with self._env.begin() as txn:
            return self._sequence(txn)

    def changes_since(self, seq: int, limit: int = 10_000) -> tuple[int, list[VersionRecord]]:
        """Versions committed after sequence number `seq` (by any process)."""
        out: list[VersionRecord] = []
        with self._env.begin() as txn:
            last = seq
            cur = txn.cursor(db=self._dbs[s.DB_CHANGES])
            if cur.set_range(s.U64.pack(seq + 1)):
                for key, value in cur:
                    last = s.U64.unpack(key)[0]
                    raw = txn.get(bytes(value), db=self._dbs[s.DB_META])
                    if raw is not None:  # purged since
                        out.append(VersionRecord.unpack(bytes(value), raw))
                    if len(out) >= limit:
                        break
            return last, out

    def iter_contexts(self) -> Iterator[tuple[str, str, list[bytes]]]:
        """(address, role, leaf ids) for every context; a snapshot."""
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._dbs[s.DB_LEAVES])
            n = s.VERSION_ID_LEN
            items = [(bytes(k), bytes(v)) for k, v in cur]
        for key, raw in items:
            address, role = s.split_context(key)
            yield address, role, [raw[i : i + n] for i in range(0, len(raw), n)]

    def iter_records(self) -> Iterator[VersionRecord]:
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._dbs[s.DB_META])
            items = [(bytes(k), bytes(v)) for k, v in cur]
        for key, raw in items:
            yield VersionRecord.unpack(key, raw)

    def iter_history_keys(self) -> Iterator[bytes]:
        with self._env.begin() as txn:
            keys = [bytes(k) for k in txn.cursor(db=self._dbs[s.DB_HISTORY]).iternext(values=False)]
        yield from keys

    def iter_tree(self) -> Iterator[tuple[str, str]]:
        with self._env.begin() as txn:
            keys = [bytes(k) for k in txn.cursor(db=self._dbs[s.DB_TREE]).iternext(values=False)]
        for key in keys:
            parent, _, child = key.partition(b"\0")
            yield parent.decode(), child.decode()

    def statistics(self) -> StoreStatistics:
        """Counts and sizes; cheap (LMDB entry counts and running totals, no scan)."""
        with self._env.begin() as txn:
            dbs = self._dbs
            info = self._env.info()
            stat = self._env.stat()
            return StoreStatistics(
                versions=txn.stat(dbs[s.DB_META])["entries"],
                contexts=txn.stat(dbs[s.DB_LEAVES])["entries"],
                directories=txn.stat(dbs[s.DB_TREE])["entries"],
                envelope_bytes=self._counter(txn, s.INFO_ENVELOPE_BYTES),
                plaintext_bytes=self._counter(txn, s.INFO_PLAINTEXT_BYTES),
                sequence=self._sequence(txn),
                map_size=info["map_size"],
                map_used=(info["last_pgno"] + 1) * stat["psize"],
            )

    def _counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        raw = txn.get(name, db=self._dbs[s.DB_INFO])
        return 0 if raw is None else int(s.U64.unpack(raw)[0])

    def _add_to_counter(self, txn: lmdb.Transaction, name: bytes, delta: int) -> None:
        value = max(0, self._counter(txn, name) + delta)
        txn.put(name, s.U64.pack(value), db=self._dbs[s.DB_INFO])
