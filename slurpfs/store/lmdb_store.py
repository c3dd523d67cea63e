"""The LMDB store: versions, heads, history, the address tree, TTLs, changes.

The store keeps sealed envelopes and their metadata; it never sees plaintext
or private keys. Everything one commit writes goes in one LMDB write
transaction, so a commit is all-or-nothing and survives a crash of the process
once `commit` returns. The environment is opened without a per-commit fsync;
`sync()` (called periodically by the daemon, and for every `fsync`) makes
commits survive power loss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from slurpfs.crypto import envelope as env
from slurpfs.crypto.envelope import KeySlot
from slurpfs.errors import (
    AddressTooLong,
    Corrupt,
    MalformedEnvelope,
    NotEmpty,
    NotFound,
    SlurpError,
    StoreFull,
)
from slurpfs.store import schema as s
from slurpfs.store.schema import VersionRecord
from slurpfs.store.snapshot import Snapshot

DATA_FILE = "data.mdb"
# A write that fails with EIO while less than this is free counts as a full disk.
_FULL_BELOW = 1 << 20
RESTORE_HINT = "restore the store from a backup or a peer"
# A named table's record in LMDB's main table (struct MDB_db, 64-bit): pad, flags,
# depth, branch pages, leaf pages, overflow pages, entries, root page.
_MDB_DB = struct.Struct("=IHHQQQQQ")
DROPPED_TABLE = b"dropped"  # aux: version id -> u64 ms: removed by the retention policy

# What LMDB (and decoding what it returns) raises when the file is damaged: the
# structure does not parse, a page is missing or of the wrong type, a key or value
# is not what the schema wrote. The store reports all of them as `Corrupt`.
_DAMAGE = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.BadTxnError,  # a transaction that met a damaged page cannot go on
    lmdb.BadDbiError,  # a sub-database's record in the main database changed
    lmdb.IncompatibleError,  # ... or its flags
    lmdb.CursorFullError,  # a tree deeper than LMDB allows: a page points back up
    lmdb.PageFullError,
    lmdb.PanicError,
    UnicodeDecodeError,
    struct.error,
)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "a key that should be UTF-8 text is not"
    if isinstance(exc, struct.error):
        return f"a record has the wrong length ({exc})"
    return str(exc)


def _check_not_emptied(file: Path) -> None:
    """Corrupt if `file` exists but is empty: LMDB would quietly start a new, empty
    store in it, and every command would report the loss as a clean, empty node."""
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return  # a new store
    if size == 0:
        raise Corrupt(f"{file} is empty (0 bytes): the store's contents are gone ({RESTORE_HINT})")


class StaleHead(SlurpError):
    """The context's leaves changed between reading them and committing (retry)."""


@dataclass(frozen=True, slots=True)
class Commit:
    """One version to store. `expected_leaves` (when given) must still be the leaves.
    With `stub`, `envelope` is the version's stub (`slurpfs.crypto.envelope.Stub`):
    its metadata is stored, its body is not held here."""

    record: VersionRecord
    envelope: bytes
    slots: Sequence[KeySlot]
    expected_leaves: tuple[bytes, ...] | None = None
    expires_ms: int | None = None
    local_slots: Sequence[KeySlot] = ()
    verified: bytes | None = None
    stub: bool = False


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
        self._path = path
        self._file = path / DATA_FILE
        self._readonly = readonly
        _check_not_emptied(self._file)
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
        except _DAMAGE as exc:
            raise Corrupt(f"{self._file} is not a readable LMDB file ({_reason(exc)})") from None
        except lmdb.Error as exc:
            raise SlurpError(f"cannot open store at {path}: {exc}") from exc
        try:
            self._check_length()
            with self._txn(write=not readonly) as txn:
                self._dbs = {
                    name: self._env.open_db(name, txn=txn, create=not readonly)
                    for name in s.ALL_DBS
                }
            self.writer = WriterLock(path / "writers.lock")
        except BaseException:
            self._env.close()
            raise
        self._counters = _Counters()
        self._lock = threading.Lock()
        self._aux: dict[bytes, lmdb._Database] = {}
        if not readonly:
            with self._txn(write=True) as txn:
                stored = txn.get(s.INFO_FORMAT, db=self._dbs[s.DB_INFO])
                if stored is None:
                    txn.put(s.INFO_FORMAT, s.U32.pack(s.FORMAT_VERSION), db=self._dbs[s.DB_INFO])
                elif s.U32.unpack(stored)[0] > s.FORMAT_VERSION:
                    raise SlurpError(f"store at {path} has a newer format than this slurpfs")

    def _check_length(self) -> None:
        """Corrupt if the file ends before the last page its meta page names: LMDB
        would read the missing pages through its memory map and the process would
        be killed (SIGBUS) instead of being told."""
        needed = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
        size = self._file.stat().st_size
        if size < needed:
            raise Corrupt(
                f"{self._file} is truncated: {size} bytes, but its pages reach byte {needed}"
                f" ({RESTORE_HINT})"
            )

    @contextlib.contextmanager
    def _txn(self, *, write: bool = False) -> Iterator[lmdb.Transaction]:
        """A transaction whose damage-caused failures are `Corrupt`, naming the file."""
        try:
            with self._env.begin(write=write) as txn:
                yield txn
        except _DAMAGE as exc:
            raise self.damaged(_reason(exc)) from None

    def damaged(self, reason: str) -> Corrupt:
        """The error for damage found in this store's file."""
        return Corrupt(
            f"{self._file} is damaged: {reason} ({RESTORE_HINT}; `slurpfs fsck` lists the damage)"
        )

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        if not self._readonly:
            self.sync()
        self._env.close()
        self.writer.close()

    def sync(self) -> None:
        """Flush committed transactions to stable storage (`StoreFull` on a full disk)."""
        try:
            self._env.sync(True)
        except (lmdb.Error, OSError) as exc:
            raise self._failure(exc, "sync") from None

    def _failure(self, exc: lmdb.Error | OSError, doing: str) -> SlurpError:
        """The error for a failed write or sync: `StoreFull` when the map or the
        disk is full, `AddressTooLong` for an oversized key, else `SlurpError`."""
        if isinstance(exc, lmdb.MapFullError):
            return StoreFull("the store's map is full (raise store.map_size)")
        if isinstance(exc, lmdb.BadValsizeError):
            # `ucxl` keeps addresses short enough; this is the store's own guard.
            return AddressTooLong("an address is too long for the store's keys")
        if self._out_of_space(exc):
            return StoreFull(f"{doing} failed: No space left on device (the store {self._file})")
        return SlurpError(f"{doing} failed: {exc}")

    def _out_of_space(self, exc: lmdb.Error | OSError) -> bool:
        """True for ENOSPC, and for EIO on a file system with (almost) no room left:
        LMDB reports a write the full disk cut short as EIO (it cannot tell why)."""
        if isinstance(exc, lmdb.DiskError) or getattr(exc, "errno", None) == errno.ENOSPC:
            return True
        text = str(exc)
        if "No space left" in text:
            return True
        if not (getattr(exc, "errno", None) == errno.EIO or "Input/output error" in text):
            return False
        try:
            fs = os.statvfs(self._path)
        except OSError:
            return False
        free = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
        return free * fs.f_frsize < _FULL_BELOW

    def problem(self) -> str | None:
        """Why a read transaction fails now; None when the store answers (health check)."""
        try:
            with self._txn() as txn:
                txn.stat(self._dbs[s.DB_META])
        except (lmdb.Error, SlurpError) as exc:
            return str(exc)
        return None

    # -- writing ---------------------------------------------------------

    def commit(self, commits: Sequence[Commit], *, journal: bytes | None = None) -> int:
        """Store versions in one transaction; returns the new change sequence.

        `journal` (a `slurpfs.store.journal.mark`) records in the same transaction
        that the write-behind journal's entries up to it are stored.
        Raises `StaleHead` if a commit's `expected_leaves` no longer match (nothing
        is written then), `StoreFull` when the map or the disk is full.
        """
        try:
            with self._txn(write=True) as txn:
                seq = self._sequence(txn)
                for c in commits:
                    seq += 1
                    self._commit_one(txn, c, seq)
                txn.put(s.INFO_SEQUENCE, s.U64.pack(seq), db=self._dbs[s.DB_INFO])
                if journal is not None:
                    txn.put(s.INFO_JOURNAL, journal, db=self._dbs[s.DB_INFO])
        except (lmdb.Error, OSError) as exc:
            self._counters.commit_failures += 1
            raise self._failure(exc, "commit") from None
        self._counters.commits += len(commits)
        return seq

    def _commit_one(self, txn: lmdb.Transaction, c: Commit, seq: int) -> None:
        rec = c.record
        ctx = s.context_key(rec.address, rec.role)
        dbs = self._dbs
        current = self._leaf_ids(txn, ctx)
        if c.expected_leaves is not None and set(current) != set(c.expected_leaves):
            raise StaleHead(f"{rec.address} [{rec.role}] changed concurrently")
        if not txn.put(rec.version_id, rec.pack(), db=dbs[s.DB_META], overwrite=False):
            return  # content-addressed: already stored, nothing else to do
        if c.stub:
            txn.put(rec.version_id, c.envelope, db=dbs[s.DB_STUBS])
        else:
            txn.put(rec.version_id, c.envelope, db=dbs[s.DB_ENVELOPES])
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
            with self._txn(write=True) as txn:
                self._ensure_dirs(txn, address)
        except lmdb.BadValsizeError:
            raise AddressTooLong(
                f"address {address[:80]!r}... is too long for the store's keys"
            ) from None

    def rmdir(self, address: str) -> None:
        """Remove an empty address directory; its stored history stays."""
        with self._txn(write=True) as txn:
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
        with self._txn(write=True) as txn:
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
                txn.delete(vid, db=self._dbs[s.DB_STUBS])
                txn.delete(vid, db=self._dbs[s.DB_CACHED])
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
    ) -> int:
        """Key rotation: add re-wrapped slots and drop old-generation ones, atomically.

        Local slots of the removed generations go too; `add_local` replaces them.
        A change of the shared slots (`add`, `remove`) is a change: the version is
        numbered again in the change log, so replication carries it again with its
        current slots. Returns the change sequence after the write.
        """
        with self._txn(write=True) as txn:
            seq = self._sequence(txn)
            if add or remove:
                seq += 1
                txn.put(s.U64.pack(seq), version_id, db=self._dbs[s.DB_CHANGES])
                txn.put(s.INFO_SEQUENCE, s.U64.pack(seq), db=self._dbs[s.DB_INFO])
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
        return seq

    def drop_versions(self, version_ids: Sequence[bytes], when_ms: int) -> int:
        """Remove versions (the retention policy), in one transaction, skipping any
        that is a leaf by now;
        each id is kept in `aux:dropped` (`was_dropped`), so a child naming it as a
        parent is not taken for damage. Returns how many were removed."""
        dropped = self._aux_db(DROPPED_TABLE, create=True)
        removed = 0
        try:
            with self._txn(write=True) as txn:
                for vid in version_ids:
                    raw = txn.get(vid, db=self._dbs[s.DB_META])
                    if raw is None:
                        continue
                    rec = VersionRecord.unpack(vid, bytes(raw))
                    ctx = s.context_key(rec.address, rec.role)
                    if vid in self._leaf_ids(txn, ctx):
                        continue  # a leaf again (a concurrent version on it): never dropped
                    key = s.history_key(rec.address, rec.role, rec.hlc, rec.author, vid)
                    txn.delete(key, db=self._dbs[s.DB_HISTORY])
                    self._remove_body(txn, vid, rec)
                    txn.put(vid, s.U64.pack(when_ms), db=dropped)
                    removed += 1
        except (lmdb.Error, OSError) as exc:
            raise self._failure(exc, "write") from None
        return removed

    def _remove_body(self, txn: lmdb.Transaction, vid: bytes, rec: VersionRecord) -> None:
        envelope = txn.get(vid, db=self._dbs[s.DB_ENVELOPES])
        if envelope is not None:
            self._add_to_counter(txn, s.INFO_ENVELOPE_BYTES, -len(envelope))
            self._add_to_counter(txn, s.INFO_PLAINTEXT_BYTES, -rec.size)
        txn.delete(vid, db=self._dbs[s.DB_ENVELOPES])
        txn.delete(vid, db=self._dbs[s.DB_STUBS])
        txn.delete(vid, db=self._dbs[s.DB_CACHED])
        txn.delete(vid, db=self._dbs[s.DB_META])
        for slot_key in self._slot_keys(txn, vid):
            txn.delete(slot_key, db=self._dbs[s.DB_SLOTS])
        for slot_key, _ in list(_scan(txn, self._dbs[s.DB_LOCAL_SLOTS], vid)):
            txn.delete(slot_key, db=self._dbs[s.DB_LOCAL_SLOTS])
        txn.delete(vid, db=self._dbs[s.DB_VERIFIED])

    # -- bodies (placement: a version's body only on the holders of its address) --

    def put_body(self, version_id: bytes, envelope: bytes, *, cache: bool) -> bool:
        """Hold the body of a version stored as a stub; True if it was not held.

        The body must be the stub's: the same signed header, length and signature,
        a ciphertext that hashes to the header's ``ct_hash`` and an envelope that
        hashes to the id (`Corrupt` otherwise; nothing changes). `cache`: a body
        fetched for a read, kept as a cache (never counted as a copy; `drop_body`
        evicts it); a copy put over a cache makes it a copy. `NotFound` for a
        version the store has no record of.
        """
        try:
            body = env.Envelope.decode(envelope)
        except MalformedEnvelope as exc:
            raise Corrupt(
                f"version {version_id.hex()[:16]}: a body that does not parse: {exc}"
            ) from None
        try:
            with self._txn(write=True) as txn:
                return self._put_body(txn, version_id, body, cache=cache)
        except (lmdb.Error, OSError) as exc:
            raise self._failure(exc, "write") from None

    def _put_body(
        self, txn: lmdb.Transaction, vid: bytes, body: env.Envelope, *, cache: bool
    ) -> bool:
        dbs = self._dbs
        if txn.get(vid, db=dbs[s.DB_ENVELOPES]) is not None:
            if not cache:
                txn.delete(vid, db=dbs[s.DB_CACHED])  # a copy now
            return False
        raw = txn.get(vid, db=dbs[s.DB_STUBS])
        if raw is None:
            raise NotFound(f"no version {vid.hex()[:16]} in the store")
        if not env.Stub.decode(bytes(raw)).matches(body, vid):
            raise Corrupt(f"version {vid.hex()[:16]}: a body that is not the version's")
        encoded = body.encode()
        txn.put(vid, encoded, db=dbs[s.DB_ENVELOPES])
        txn.delete(vid, db=dbs[s.DB_STUBS])
        if cache:
            txn.put(vid, s.U64.pack(int(time.time() * 1000)), db=dbs[s.DB_CACHED])
        self._add_to_counter(txn, s.INFO_ENVELOPE_BYTES, len(encoded))
        self._add_to_counter(txn, s.INFO_PLAINTEXT_BYTES, self._record(txn, vid).size)
        return True

    def drop_body(self, version_id: bytes) -> bool:
        """Keep only the stub of a version (the caller checked that R holders have
        its body); True if a body (copy or cache) was dropped."""
        dbs = self._dbs
        try:
            with self._txn(write=True) as txn:
                raw = txn.get(version_id, db=dbs[s.DB_ENVELOPES])
                if raw is None:
                    return False
                envelope = bytes(raw)
                try:
                    stub = env.stub_bytes(envelope)
                except MalformedEnvelope as exc:
                    raise self.damaged(f"version {version_id.hex()[:16]}: {exc}") from None
                txn.put(version_id, stub, db=dbs[s.DB_STUBS])
                txn.delete(version_id, db=dbs[s.DB_ENVELOPES])
                txn.delete(version_id, db=dbs[s.DB_CACHED])
                self._add_to_counter(txn, s.INFO_ENVELOPE_BYTES, -len(envelope))
                self._add_to_counter(
                    txn, s.INFO_PLAINTEXT_BYTES, -self._record(txn, version_id).size
                )
        except (lmdb.Error, OSError) as exc:
            raise self._failure(exc, "write") from None
        return True

    def evict_caches(self, keep: int) -> int:
        """Drop the oldest fetched bodies (caches) until at most `keep` are left;
        returns how many were dropped (their versions keep their stubs)."""
        with self._txn() as txn:
            cached = [(bytes(v), bytes(k)) for k, v in txn.cursor(db=self._dbs[s.DB_CACHED])]
        cached.sort()
        return sum(self.drop_body(vid) for _, vid in cached[: max(0, len(cached) - keep)])

    def has_body(self, version_id: bytes) -> bool:
        """True if the body of the version is held here (a copy or a cache)."""
        with self._txn() as txn:
            return txn.get(version_id, db=self._dbs[s.DB_ENVELOPES]) is not None

    def is_cached(self, version_id: bytes) -> bool:
        """True if the body held is a cache (fetched for a read), not a copy."""
        with self._txn() as txn:
            return txn.get(version_id, db=self._dbs[s.DB_CACHED]) is not None

    def stub(self, version_id: bytes) -> bytes | None:
        """The version's stub: the one stored, or made from the body held."""
        with self._txn() as txn:
            raw = txn.get(version_id, db=self._dbs[s.DB_STUBS])
            if raw is not None:
                return bytes(raw)
            body = txn.get(version_id, db=self._dbs[s.DB_ENVELOPES])
        return None if body is None else env.stub_bytes(bytes(body))

    def body_ids(self, *, copies_only: bool = True) -> Iterator[bytes]:
        """Ids of the versions whose body is held here (with `copies_only`, caches
        left out); a snapshot."""
        with self._txn() as txn:
            ids = [
                bytes(k) for k in txn.cursor(db=self._dbs[s.DB_ENVELOPES]).iternext(values=False)
            ]
            cached = txn.cursor(db=self._dbs[s.DB_CACHED])
            out = [v for v in ids if not (copies_only and cached.set_key(v))]
        yield from out

    def stub_ids(self) -> Iterator[bytes]:
        """Ids of the versions stored without their body; a snapshot."""
        with self._txn() as txn:
            ids = [bytes(k) for k in txn.cursor(db=self._dbs[s.DB_STUBS]).iternext(values=False)]
        yield from ids

    def body_count(self) -> tuple[int, int]:
        """(copies, caches): bodies held here (LMDB entry counts, no scan)."""
        with self._txn() as txn:
            bodies = int(txn.stat(self._dbs[s.DB_ENVELOPES])["entries"])
            caches = int(txn.stat(self._dbs[s.DB_CACHED])["entries"])
        return bodies - caches, caches

    def was_dropped(self, version_id: bytes) -> bool:
        """True if the retention policy removed this version (`drop_versions`)."""
        return self.aux_get(DROPPED_TABLE, version_id) is not None

    def space(self) -> tuple[int, int, int]:
        """(page size, pages in the file, pages in use by any table): the rest are free
        pages a compacting copy would give back."""
        with self._txn() as txn:
            stat = self._env.stat()
            used = 2 + stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
            for _, value in txn.cursor():  # the main table: one MDB_db record per table
                if len(value) == _MDB_DB.size:
                    _, _, _, branch, leaf, overflow, _, _ = _MDB_DB.unpack(value)
                    used += branch + leaf + overflow
            return stat["psize"], self._env.info()["last_pgno"] + 1, used

    def compact_to(self, directory: Path) -> None:
        """Write a compacting copy of the environment to `directory`/data.mdb (LMDB's
        own copy: free pages left out, tables rewritten in order)."""
        directory.mkdir(mode=0o700)
        try:
            self._env.copy(str(directory), compact=True)
        except (lmdb.Error, OSError) as exc:
            raise self._failure(exc, "compacting copy") from None

    def set_ttls(self, ttls: Iterable[tuple[bytes, int]]) -> None:
        """Give contexts their expiry times (ms), in one transaction (a restore)."""
        try:
            with self._txn(write=True) as txn:
                for ctx, expires_ms in ttls:
                    self._set_ttl(txn, ctx, expires_ms)
        except (lmdb.Error, OSError) as exc:
            raise self._failure(exc, "write") from None

    @contextlib.contextmanager
    def snapshot(self, aux: Iterable[bytes] = ()) -> Iterator[Snapshot]:
        """Every table as of one commit, in one read transaction (`Snapshot`);
        `aux` names the auxiliary tables it may read too."""
        tables = {name: self._aux_db(name, create=False) for name in aux}
        with self._txn() as txn:
            yield Snapshot(txn, self._dbs, {k: v for k, v in tables.items() if v is not None})

    # -- auxiliary sub-databases ---------------------------------------------
    # Other components keep their own (already sealed) records here, e.g. the
    # search index; the store neither reads nor interprets them. `name` is
    # prefixed with "aux:" so it can never collide with the store's own tables.

    def _aux_db(self, name: bytes, *, create: bool) -> lmdb._Database | None:
        """The handle of auxiliary table `name` (None: there is none and not `create`).

        Opened in a write transaction of our own: ``open_db`` without one begins
        its write transaction while holding the interpreter lock, so while another
        thread's write transaction waited for that lock (between two puts), both
        waited forever. That froze a replication worker whose store was new (its
        cursor table did not exist yet, so each look from the event loop opened it
        again) while its ingest threads committed. `lmdb.Environment.begin` waits
        for the writer lock without the interpreter lock. (A handle opened in a read
        transaction is not valid after it; a read-only store has no writer.)
        """
        with self._lock:
            db = self._aux.get(name)
            if db is None:
                try:
                    db = self._open_aux(b"aux:" + name, create=create)
                except lmdb.NotFoundError:
                    return None
                except _DAMAGE as exc:
                    raise self.damaged(_reason(exc)) from None
                self._aux[name] = db
            return db

    def _open_aux(self, name: bytes, *, create: bool) -> lmdb._Database:
        if self._readonly:
            return self._env.open_db(name, create=False)
        with self._env.begin(write=True) as txn:
            return self._env.open_db(name, txn=txn, create=create)

    def aux_get(self, name: bytes, key: bytes) -> bytes | None:
        """The value under `key` in auxiliary table `name`, or None."""
        db = self._aux_db(name, create=False)
        if db is None:
            return None
        with self._txn() as txn:
            raw = txn.get(key, db=db)
            return None if raw is None else bytes(raw)

    def aux_scan(self, name: bytes, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of auxiliary table `name` whose key starts with `prefix`."""
        db = self._aux_db(name, create=False)
        if db is None:
            return []
        with self._txn() as txn:
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
            with self._txn(write=True) as txn:
                if expect is not None:
                    current = txn.get(expect[0], db=db)
                    if (None if current is None else bytes(current)) != expect[1]:
                        raise StaleHead(f"auxiliary record {expect[0]!r} changed concurrently")
                for key in deletes:
                    txn.delete(key, db=db)
                for key, value in puts.items():
                    txn.put(key, value, db=db)
        except (lmdb.Error, OSError) as exc:
            raise self._failure(exc, "write") from None

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
        with self._txn() as txn:
            return [self._record(txn, v) for v in self._leaf_ids(txn, s.context_key(address, role))]

    def head(self, address: str, role: str, *, now_ms: int | None = None) -> VersionRecord | None:
        """The context's head; with `now_ms`, None once its TTL has passed (whether or
        not a cleanup pass purged it yet)."""
        with self._txn() as txn:
            ctx = s.context_key(address, role)
            if now_ms is not None and self._expired(txn, ctx, now_ms):
                return None
            ids = self._leaf_ids(txn, ctx)
            return self._head(txn, ctx, ids) if ids else None

    def _expired(self, txn: lmdb.Transaction, ctx: bytes, now_ms: int) -> bool:
        expiry = txn.get(ctx, db=self._dbs[s.DB_TTL_BY_CONTEXT])
        return expiry is not None and s.U64.unpack(expiry)[0] <= now_ms

    def record(self, version_id: bytes) -> VersionRecord | None:
        with self._txn() as txn:
            raw = txn.get(version_id, db=self._dbs[s.DB_META])
            return None if raw is None else VersionRecord.unpack(version_id, bytes(raw))

    def envelope(self, version_id: bytes) -> bytes | None:
        with self._txn() as txn:
            raw = txn.get(version_id, db=self._dbs[s.DB_ENVELOPES])
            return None if raw is None else bytes(raw)

    def slots(self, version_id: bytes) -> list[KeySlot]:
        with self._txn() as txn:
            return self._slots(txn, version_id)

    def _slots(self, txn: lmdb.Transaction, version_id: bytes) -> list[KeySlot]:
        out = []
        for key, value in _scan(txn, self._dbs[s.DB_SLOTS], version_id):
            _, role, generation = s.split_slot_key(key)
            out.append(KeySlot(role, generation, value))
        return out

    def read_version(self, version_id: bytes) -> StoredVersion | None:
        """Envelope, key slots and local fast paths of a version, in one read transaction."""
        with self._txn() as txn:
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
        with self._txn() as txn:
            ctx = s.context_key(address, role)
            if now_ms is not None and self._expired(txn, ctx, now_ms):
                return None
            ids = self._leaf_ids(txn, ctx)
            if not ids:
                return None
            record = self._head(txn, ctx, ids)
            if record.deleted or not load(record):
                return record, None
            return record, self._stored(txn, ids[0])

    def _head(self, txn: lmdb.Transaction, ctx: bytes, leaf_ids: list[bytes]) -> VersionRecord:
        """The head's record (the first leaf), checked to be the context's newest version.

        A version's children always order after it (greater HLC), so the newest
        entry in the history index is a leaf, and the head. A head that is not
        means the leaves record was altered (a head moved back to an older version,
        say): Corrupt, rather than serving old content as current. (A head filed under
        another context, or whose metadata was relabelled, is the model's to refuse:
        it audits that.)
        """
        record = self._record(txn, leaf_ids[0])
        own = s.history_key(
            record.address, record.role, record.hlc, record.author, record.version_id
        )
        if (
            s.context_key(record.address, record.role) != ctx
            or txn.get(own, db=self._dbs[s.DB_HISTORY]) is None
        ):
            return record  # misfiled or relabelled: the model's checks refuse it
        prefix = ctx + b"\0"
        cur = txn.cursor(db=self._dbs[s.DB_HISTORY])
        found = cur.prev() if cur.set_range(ctx + b"\1") else cur.last()
        newest = bytes(cur.key()) if found else b""
        if newest.startswith(prefix) and newest[-s.VERSION_ID_LEN :] != leaf_ids[0]:
            address, role = s.split_context(ctx)
            raise self.damaged(
                f"the head of {address} [{role}] is {leaf_ids[0].hex()[:16]}, not its newest"
                f" version {newest[-s.VERSION_ID_LEN :].hex()[:16]} (its leaves record was altered)"
            )
        return record

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
        with self._txn() as txn:
            keys = txn.cursor(db=self._dbs[s.DB_SLOTS]).iternext(values=False)
            return [
                bytes(k[: s.VERSION_ID_LEN]) for k in keys if bytes(k[s.VERSION_ID_LEN :]) == suffix
            ]

    def history(self, address: str, role: str) -> list[VersionRecord]:
        """Every version of a context (tombstones included), oldest first."""
        prefix = s.history_prefix(address, role)
        with self._txn() as txn:
            return [
                self._record(txn, key[-s.VERSION_ID_LEN :])
                for key, _ in _scan(txn, self._dbs[s.DB_HISTORY], prefix)
            ]

    def children(self, address: str) -> list[str]:
        """Subdirectory names of an address directory ("" is the root of authorities)."""
        prefix = s.tree_prefix(address)
        with self._txn() as txn:
            return [k[len(prefix) :].decode() for k, _ in _scan(txn, self._dbs[s.DB_TREE], prefix)]

    def roles_at(self, address: str) -> list[str]:
        """Roles that have ever had a version at this address."""
        with self._txn() as txn:
            return self._roles_at(txn, address)

    def is_dir(self, address: str) -> bool:
        parent, _, name = address.rpartition("/")
        with self._txn() as txn:
            return txn.get(s.tree_key(parent, name), db=self._dbs[s.DB_TREE]) is not None

    def expired(self, now_ms: int) -> list[tuple[str, str]]:
        """Contexts whose TTL has passed."""
        with self._txn() as txn:
            cur = txn.cursor(db=self._dbs[s.DB_TTL])
            out = []
            for key in cur.iternext(values=False):
                if s.U64.unpack(key[:8])[0] > now_ms:
                    break
                out.append(s.split_context(bytes(key[8:])))
            return out

    def expiry(self, address: str, role: str) -> int | None:
        """When the context's TTL ends (ms since the epoch), or None if it has none."""
        with self._txn() as txn:
            raw = txn.get(s.context_key(address, role), db=self._dbs[s.DB_TTL_BY_CONTEXT])
            return None if raw is None else int(s.U64.unpack(raw)[0])

    def sequence(self) -> int:
        with self._txn() as txn:
            return self._sequence(txn)

    def journal_mark(self) -> bytes | None:
        """The write-behind journal's newest stored entry (`commit`), if any."""
        with self._txn() as txn:
            raw = txn.get(s.INFO_JOURNAL, db=self._dbs[s.DB_INFO])
            return None if raw is None else bytes(raw)

    def epoch(self) -> bytes | None:
        """The store's epoch (`slurpfs.seal`); None if it has none yet."""
        with self._txn() as txn:
            raw = txn.get(s.INFO_EPOCH, db=self._dbs[s.DB_INFO])
            return None if raw is None else bytes(raw)

    def set_epoch(self, epoch: bytes) -> None:
        """Give the store its epoch, durably (`StoreFull` if there is no room)."""
        try:
            with self._txn(write=True) as txn:
                txn.put(s.INFO_EPOCH, epoch, db=self._dbs[s.DB_INFO])
        except (lmdb.Error, OSError) as exc:
            raise self._failure(exc, "write") from None
        self.sync()

    def changes_since(self, seq: int, limit: int = 10_000) -> tuple[int, list[VersionRecord]]:
        """Versions committed after sequence number `seq` (by any process)."""
        last, entries = self.numbered_changes(seq, limit)
        return last, [record for _, record in entries]

    def numbered_changes(
        self, seq: int, limit: int = 10_000
    ) -> tuple[int, list[tuple[int, VersionRecord]]]:
        """As `changes_since`, each version with the sequence number of its commit."""
        out: list[tuple[int, VersionRecord]] = []
        with self._txn() as txn:
            last = seq
            cur = txn.cursor(db=self._dbs[s.DB_CHANGES])
            if cur.set_range(s.U64.pack(seq + 1)):
                for key, value in cur:
                    last = s.U64.unpack(key)[0]
                    raw = txn.get(bytes(value), db=self._dbs[s.DB_META])
                    if raw is not None:  # purged since
                        out.append((last, VersionRecord.unpack(bytes(value), bytes(raw))))
                    if len(out) >= limit:
                        break
            return last, out

    def iter_contexts(self) -> Iterator[tuple[str, str, list[bytes]]]:
        """(address, role, leaf ids) for every context; a snapshot."""
        with self._txn() as txn:
            cur = txn.cursor(db=self._dbs[s.DB_LEAVES])
            n = s.VERSION_ID_LEN
            items = [(bytes(k), bytes(v)) for k, v in cur]
        for key, raw in items:
            try:
                address, role = s.split_context(key)
            except UnicodeDecodeError:
                raise self.damaged(f"context key {key.hex()} is not UTF-8 text") from None
            yield address, role, [raw[i : i + n] for i in range(0, len(raw), n)]

    def iter_records(self) -> Iterator[VersionRecord]:
        with self._txn() as txn:
            cur = txn.cursor(db=self._dbs[s.DB_META])
            items = [(bytes(k), bytes(v)) for k, v in cur]
        for key, raw in items:
            yield VersionRecord.unpack(key, raw)

    def iter_history_keys(self) -> Iterator[bytes]:
        with self._txn() as txn:
            keys = [bytes(k) for k in txn.cursor(db=self._dbs[s.DB_HISTORY]).iternext(values=False)]
        yield from keys

    def iter_tree(self) -> Iterator[tuple[str, str]]:
        with self._txn() as txn:
            keys = [bytes(k) for k in txn.cursor(db=self._dbs[s.DB_TREE]).iternext(values=False)]
        for key in keys:
            parent, _, child = key.partition(b"\0")
            try:
                yield parent.decode(), child.decode()
            except UnicodeDecodeError:
                raise self.damaged(f"directory key {key.hex()} is not UTF-8 text") from None

    def statistics(self) -> StoreStatistics:
        """Counts and sizes; cheap (LMDB entry counts and running totals, no scan)."""
        with self._txn() as txn:
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
