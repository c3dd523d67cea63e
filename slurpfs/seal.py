"""The store's seal: a node-local, MAC'd record of how far the store has come.

LMDB checks nothing of what a file holds: an emptied, truncated, rolled-back
(an older copy put back) or replaced `data.mdb` opens as a smaller store, and
every command would serve it as if nothing were missing. The seal is kept beside
the store, outside `data.mdb` (`<data>/store.seal`, 0600), and names

- the store's *epoch*: 16 random bytes the store also holds (`info/epoch`), set
  when the seal is created; another store (a new, empty one included) has another
  or none;
- the store's commit *sequence* (`info/sequence`, one per stored version) when it
  was last sealed; a store behind it lost commits;
- the seq of the audit log entry the store's anchor named then (`aux:audit`),
  which moves with reads too; `fsck` reports a store whose anchor is behind it.

Each record is MAC'd (keyed BLAKE2b-256 under a subkey of the node's Ed25519
seed, domain `SEAL_DOMAIN`), so it cannot be edited or forged without the node
key. It is written after a store sync (a model's `sync`, the daemon's periodic
anchoring, and close), so it never names more than stable storage holds; it
only moves forward. The file holds two slots written in turn, so a write torn by
a power loss leaves the previous one. Opening a store refuses (`Corrupt`) a
seal that does not authenticate, another epoch, or a lower sequence; the way out
is explicit: `slurpfs fsck --accept-rollback` seals the store as it is now.
Byte layout: docs/FORMAT.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slurpfs.crypto.keys import NodeIdentity
from slurpfs.errors import Corrupt

SEAL_DOMAIN = b"slurpfs/store-seal/v1"
SEAL_MAGIC = b"SLSS"
SEAL_FORMAT = 1
EPOCH_BYTES = 16
_BODY = struct.Struct(">4sBQ16sQQ")  # magic, format, counter, epoch, sequence, anchored
_TAG_BYTES = 32
SLOT_BYTES = _BODY.size + _TAG_BYTES  # 77
FIX_HINT = (
    "restore the data directory from a backup or a peer; to go on with the store as"
    " it is, run `slurpfs fsck --accept-rollback`"
)


@dataclass(frozen=True, slots=True)
class SealState:
    """What a seal record names; `counter` numbers the records written (1 = the first)."""

    epoch: bytes
    sequence: int
    anchored: int
    counter: int = 0


class SealKey:
    """The node's seal subkey: BLAKE2b-256 keyed by the Ed25519 seed over `SEAL_DOMAIN`."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def for_node(cls, node: NodeIdentity) -> SealKey:
        seed = bytes(node.signing_key)
        return cls(hashlib.blake2b(SEAL_DOMAIN, key=seed, digest_size=32).digest())

    def tag(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, key=self._key, digest_size=_TAG_BYTES).digest()

    def __repr__(self) -> str:  # never show the key
        return "SealKey()"


def _pack(key: SealKey, state: SealState) -> bytes:
    body = _BODY.pack(
        SEAL_MAGIC, SEAL_FORMAT, state.counter, state.epoch, state.sequence, state.anchored
    )
    return body + key.tag(body)


def _unpack(key: SealKey, raw: bytes) -> SealState | None:
    """The state in one slot; None if it is empty, torn, altered or of another key."""
    if len(raw) != SLOT_BYTES:
        return None
    body = raw[: _BODY.size]
    if not hmac.compare_digest(key.tag(body), raw[_BODY.size :]):
        return None
    magic, fmt, counter, epoch, sequence, anchored = _BODY.unpack(body)
    if magic != SEAL_MAGIC or fmt != SEAL_FORMAT:
        return None
    return SealState(epoch, sequence, anchored, counter)


class StoreSeal:
    """The seal file of one data directory (`read`, `create`, `advance`, `replace`).

    Writers (a mount's daemon, command-line processes) take an exclusive `flock`
    on the file, read both slots and write the next one, so the record moves
    forward only, whatever the order in which processes get there.
    """

    def __init__(self, path: Path, key: SealKey) -> None:
        self.path = path
        self._key = key

    def read(self) -> SealState | None:
        """The newest authentic record; None if there is no seal file (a data
        directory sealed by no slurpfs yet). Corrupt if no slot authenticates."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return self._newest(raw)

    def _newest(self, raw: bytes) -> SealState:
        slots = [_unpack(self._key, raw[i * SLOT_BYTES : (i + 1) * SLOT_BYTES]) for i in (0, 1)]
        valid = [s for s in slots if s is not None]
        if not valid:
            raise Corrupt(
                f"the store's seal {self.path} does not authenticate (damaged, altered, or"
                f" not made with this node's key); {FIX_HINT}"
            )
        return max(valid, key=lambda s: s.counter)

    def create(self, state: SealState) -> SealState:
        """Write the first record (counter 1), durably (file and directory synced)."""
        first = SealState(state.epoch, state.sequence, state.anchored, 1)
        with self._locked() as fd:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _pack(self._key, first) * 2, 0)
            os.fsync(fd)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return first

    def advance(self, sequence: int, anchored: int | None) -> None:
        """Move the record forward to `sequence` and `anchored` (each only if higher).

        Call it after a store sync, with values read before that sync: the record
        must never name more than stable storage holds. Not fsynced: a record lost
        to a power loss only leaves the previous one, which is behind the store too.
        """
        with self._locked() as fd:
            current = self._newest(os.pread(fd, 2 * SLOT_BYTES, 0))
            new = SealState(
                current.epoch,
                max(current.sequence, sequence),
                max(current.anchored, anchored or 0),
                current.counter + 1,
            )
            if (new.sequence, new.anchored) == (current.sequence, current.anchored):
                return
            os.pwrite(fd, _pack(self._key, new), (new.counter % 2) * SLOT_BYTES)

    def replace(self, state: SealState) -> SealState:
        """Seal the store as it is now, even behind the record (`fsck --accept-rollback`)."""
        return self.create(state)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)


def check(seal: SealState, epoch: bytes | None, sequence: int, store_file: Path) -> None:
    """Corrupt, saying why, unless the store is the one sealed and not behind the seal."""
    if epoch is None:
        raise Corrupt(
            f"{store_file} is not the store this node sealed: it carries no epoch"
            f" (replaced by a new, empty or older store); {FIX_HINT}"
        )
    if epoch != seal.epoch:
        raise Corrupt(
            f"{store_file} is not the store this node sealed (its epoch is"
            f" {epoch.hex()}, the seal names {seal.epoch.hex()}); {FIX_HINT}"
        )
    if sequence < seal.sequence:
        raise Corrupt(
            f"{store_file} was rolled back: it has {sequence} commits, but the store had"
            f" {seal.sequence} when it was sealed (an older copy put back, or commits"
            f" lost); {FIX_HINT}"
        )
