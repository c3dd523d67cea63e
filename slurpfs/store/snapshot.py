"""A read-only view of the whole store in one LMDB read transaction.

Backups read everything through one `Snapshot`: every table as of one commit,
while other processes (a mount) keep committing. LMDB keeps the pages this
transaction sees until it ends, so a long snapshot holds the file's free pages
back (the store grows meanwhile, by what is written during it).
"""

from __future__ import annotations

from collections.abc import Iterator

import lmdb

from slurpfs.crypto.envelope import KeySlot
from slurpfs.store import schema as s
from slurpfs.store.schema import VersionRecord

__all__ = ["Snapshot", "StoredCopy"]


class StoredCopy:
    """One version as stored: record, envelope (or its stub, when the body is not
    held here: `slurpfs.crypto.envelope.STUB_MAGIC`) and key slots (no node-local data)."""

    __slots__ = ("envelope", "record", "slots")

    def __init__(self, record: VersionRecord, envelope: bytes, slots: list[KeySlot]) -> None:
        self.record = record
        self.envelope = envelope
        self.slots = slots


class Snapshot:
    """Reads of one transaction (`Store.snapshot`); valid only inside its `with`."""

    def __init__(
        self,
        txn: lmdb.Transaction,
        dbs: dict[bytes, lmdb._Database],
        aux: dict[bytes, lmdb._Database],
    ) -> None:
        self._txn = txn
        self._dbs = dbs
        self._aux = aux

    def sequence(self) -> int:
        raw = self._txn.get(s.INFO_SEQUENCE, db=self._dbs[s.DB_INFO])
        return 0 if raw is None else int(s.U64.unpack(raw)[0])

    def epoch(self) -> bytes | None:
        raw = self._txn.get(s.INFO_EPOCH, db=self._dbs[s.DB_INFO])
        return None if raw is None else bytes(raw)

    def counts(self) -> dict[str, int]:
        stat = self._txn.stat
        dbs = self._dbs
        return {
            "versions": stat(dbs[s.DB_META])["entries"],
            "contexts": stat(dbs[s.DB_LEAVES])["entries"],
            "directories": stat(dbs[s.DB_TREE])["entries"],
            "ttls": stat(dbs[s.DB_TTL_BY_CONTEXT])["entries"],
        }

    def changed(self, after: int) -> Iterator[bytes]:
        """Ids of the versions committed after sequence `after` and still stored,
        in commit order (so a version's parents come before it)."""
        cur = self._txn.cursor(db=self._dbs[s.DB_CHANGES])
        if not cur.set_range(s.U64.pack(after + 1)):
            return
        meta = self._dbs[s.DB_META]
        for _, value in cur:
            vid = bytes(value)
            if self._txn.get(vid, db=meta) is not None:  # else purged since
                yield vid

    def live_ids(self) -> Iterator[bytes]:
        """Every stored version id, in id order."""
        yield from (
            bytes(k) for k in self._txn.cursor(db=self._dbs[s.DB_META]).iternext(values=False)
        )

    def version(self, version_id: bytes) -> StoredCopy:
        txn, dbs = self._txn, self._dbs
        meta = txn.get(version_id, db=dbs[s.DB_META])
        envelope = txn.get(version_id, db=dbs[s.DB_ENVELOPES])
        if envelope is None:  # a version whose body is not held here: its stub
            envelope = txn.get(version_id, db=dbs[s.DB_STUBS])
        if meta is None or envelope is None:
            raise KeyError(version_id.hex())
        slots = []
        cur = txn.cursor(db=dbs[s.DB_SLOTS])
        if cur.set_range(version_id):
            for key, value in cur:
                if not bytes(key).startswith(version_id):
                    break
                _, role, generation = s.split_slot_key(bytes(key))
                slots.append(KeySlot(role, generation, bytes(value)))
        return StoredCopy(VersionRecord.unpack(version_id, bytes(meta)), bytes(envelope), slots)

    def tree(self) -> Iterator[bytes]:
        """Raw directory keys (``parent \\0 child``)."""
        yield from (
            bytes(k) for k in self._txn.cursor(db=self._dbs[s.DB_TREE]).iternext(values=False)
        )

    def ttls(self) -> Iterator[tuple[bytes, int]]:
        """(context key, expiry in ms) for every context with a TTL."""
        for key, value in self._txn.cursor(db=self._dbs[s.DB_TTL_BY_CONTEXT]):
            yield bytes(key), int(s.U64.unpack(value)[0])

    def aux_keys(self, name: bytes) -> Iterator[bytes]:
        db = self._aux.get(name)
        if db is not None:
            yield from (bytes(k) for k in self._txn.cursor(db=db).iternext(values=False))

    def aux_get(self, name: bytes, key: bytes) -> bytes | None:
        db = self._aux.get(name)
        raw = None if db is None else self._txn.get(key, db=db)
        return None if raw is None else bytes(raw)
