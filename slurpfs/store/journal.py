"""The write-behind journal: saves a mount acknowledged before sealing them into versions.

With ``durability.write_behind`` a mount answers ``close`` once the new content
is appended here, and a group commit (`slurpfs.fs.writebehind`) seals it into a
version shortly after. Each save is one entry, encrypted with XChaCha20-Poly1305
under a key derived from the node's signing seed (nothing of the content is on
disk in plaintext), framed with its length so that a torn or damaged entry is
found, reported and skipped while the intact ones around it are replayed.

Layout (docs/FORMAT.md, "Write-behind journal")::

    header  = "SLURPJ1\\0" (8) | journal id (16 random bytes)
    entry   = length u32 BE | nonce (24) | ciphertext (length - 24 bytes, tag included)
    AD      = header | length u32 BE
    payload = seq u64 | mtime_ns u64 | address_len u16 | address | role_len u8 | role
              | based_on (1 + 0 or 32) | data
    based_on = 0 (no head: a new context) | 1, version id (32) | 2 (the version of
               this context's previous entry)

Entries are appended without an fsync each; `sync` (the daemon's periodic sync,
an ``fsync`` of a file) makes them durable. The store records the (journal id,
seq) of the newest entry it committed in the same LMDB transaction as that
version (`Store.commit`), so a replay after a crash applies every entry exactly
once: the ones at or below that mark are already versions.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings as sodium
from nacl.exceptions import CryptoError
from nacl.utils import random as random_bytes

from slurpfs.crypto.keys import NodeIdentity

MAGIC = b"SLURPJ1\0"
ID_BYTES = 16
HEADER_BYTES = len(MAGIC) + ID_BYTES
NONCE_BYTES = 24
TAG_BYTES = 16
KEY_DOMAIN = b"slurpfs/journal/v1"
FILE_NAME = "journal"
DAMAGED_SUFFIX = ".damaged"
MARK_BYTES = ID_BYTES + 8  # what the store keeps: journal id | seq u64 BE

_LENGTH = struct.Struct(">I")
_FIXED = struct.Struct(">QQH")  # seq, mtime_ns, address length
_SEQ = struct.Struct(">Q")
VERSION_ID_BYTES = 32
CHAINED = b"chained"  # `Entry.based_on`: the previous entry of the same context
_NO_HEAD, _HEAD, _CHAINED = 0, 1, 2


def journal_key(node: NodeIdentity) -> bytes:
    """The journal's AEAD key: BLAKE2b-256 keyed with the node's signing seed."""
    return hashlib.blake2b(KEY_DOMAIN, key=bytes(node.signing_key), digest_size=32).digest()


def mark(journal_id: bytes, seq: int) -> bytes:
    """The store's record that entries up to `seq` of journal `journal_id` are versions."""
    return journal_id + _SEQ.pack(seq)


@dataclass(frozen=True)
class Entry:
    """One journaled save."""

    seq: int
    address: str
    role: str
    data: bytes
    mtime_ns: int
    # The head the save was acknowledged on: a version id, None for none, or
    # CHAINED for "the version this context's previous entry makes".
    based_on: bytes | None = None


@dataclass
class Scan:
    """What a journal file holds: its id, the intact entries, and what could not be read."""

    journal_id: bytes | None
    entries: list[Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def encode_payload(entry: Entry) -> bytes:
    address, role = entry.address.encode(), entry.role.encode()
    return b"".join(
        (
            _FIXED.pack(entry.seq, entry.mtime_ns, len(address)),
            address,
            bytes((len(role),)),
            role,
            _encode_base(entry.based_on),
            entry.data,
        )
    )


def _encode_base(based_on: bytes | None) -> bytes:
    if based_on is None:
        return bytes((_NO_HEAD,))
    if based_on == CHAINED:
        return bytes((_CHAINED,))
    if len(based_on) != VERSION_ID_BYTES:
        raise ValueError("a version id is 32 bytes")
    return bytes((_HEAD,)) + based_on


def decode_payload(payload: bytes) -> Entry:
    """The entry of an authenticated payload (ValueError if it is malformed)."""
    seq, mtime_ns, address_len = _FIXED.unpack_from(payload)
    at = _FIXED.size
    address = payload[at : at + address_len].decode()
    at += address_len
    if at >= len(payload):
        raise ValueError("payload cut short")
    role_len = payload[at]
    role = payload[at + 1 : at + 1 + role_len].decode()
    at += 1 + role_len
    if at >= len(payload) or not address or not role:
        raise ValueError("payload cut short")
    kind = payload[at]
    at += 1
    based_on: bytes | None = None
    if kind == _HEAD:
        based_on = payload[at : at + VERSION_ID_BYTES]
        at += VERSION_ID_BYTES
        if at > len(payload):
            raise ValueError("payload cut short")
    elif kind == _CHAINED:
        based_on = CHAINED
    elif kind != _NO_HEAD:
        raise ValueError(f"unknown head kind {kind}")
    return Entry(seq, address, role, payload[at:], mtime_ns, based_on)


def scan(path: Path, key: bytes, start: int = HEADER_BYTES) -> Scan:
    """Read every entry of the journal at `path` (an empty `Scan` if there is none),
    or those from byte `start` on (where an entry begins: `Journal.end` before it).

    An entry whose tag does not verify is reported and skipped (its length says
    where the next one starts); a length that runs past the end of the file is a
    torn append, reported with the bytes it leaves unread.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Scan(None)
    if len(raw) < HEADER_BYTES or raw[: len(MAGIC)] != MAGIC:
        return Scan(None, problems=[f"{path}: not a journal (no header): {len(raw)} bytes unread"])
    header = raw[:HEADER_BYTES]
    found = Scan(header[len(MAGIC) :])
    at = max(start, HEADER_BYTES)
    while at < len(raw):
        if at + _LENGTH.size > len(raw):
            found.problems.append(f"{path}: torn entry at byte {at}: {len(raw) - at} bytes unread")
            break
        (length,) = _LENGTH.unpack_from(raw, at)
        end = at + _LENGTH.size + length
        if length < NONCE_BYTES + TAG_BYTES or end > len(raw):
            found.problems.append(
                f"{path}: torn or damaged entry at byte {at}: {len(raw) - at} bytes unread"
            )
            break
        body = raw[at + _LENGTH.size : end]
        try:
            payload = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                body[NONCE_BYTES:], header + raw[at : at + _LENGTH.size], body[:NONCE_BYTES], key
            )
            found.entries.append(decode_payload(payload))
        except (CryptoError, ValueError, UnicodeDecodeError, struct.error):
            found.problems.append(
                f"{path}: damaged entry at byte {at} ({length} bytes): it failed authentication"
            )
        at = end
    return found


class Journal:
    """The open journal of one mount: appends entries, syncs, starts over when drained."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._key = key
        self.journal_id = random_bytes(ID_BYTES)
        self.seq = 0
        self.appended = 0
        self.bytes = 0
        self._header = MAGIC + self.journal_id
        tmp = path.with_name(path.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self._header)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._size = HEADER_BYTES
        self._unsynced = False  # appended since the last `sync`

    def append(
        self, address: str, role: str, data: bytes, mtime_ns: int, based_on: bytes | None
    ) -> int:
        """Append one save; returns its seq. OSError (ENOSPC…) leaves the file as it was."""
        seq = self.seq + 1
        payload = encode_payload(Entry(seq, address, role, data, mtime_ns, based_on))
        length = NONCE_BYTES + len(payload) + TAG_BYTES
        prefix = _LENGTH.pack(length)
        nonce = random_bytes(NONCE_BYTES)
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            payload, self._header + prefix, nonce, self._key
        )
        frame = prefix + nonce + sealed
        try:
            written = os.write(self._fd, frame)
            while written < len(frame):
                written += os.write(self._fd, frame[written:])
        except OSError:
            os.ftruncate(self._fd, self._size)  # no torn entry left behind
            raise
        self._size += len(frame)
        self._unsynced = True
        self.seq = seq
        self.appended += 1
        self.bytes += len(frame)
        return seq

    def mark(self, seq: int) -> bytes:
        return mark(self.journal_id, seq)

    @property
    def end(self) -> int:
        """Where the next entry will start (`scan`'s `start`)."""
        return self._size

    def sync(self) -> None:
        """Make every entry appended so far durable (any thread; nothing to do, no fsync).

        A cut back to the header needs no fsync: the entries it drops are versions
        already (replayed again, or skipped by the store's mark, if the cut is
        lost), and those the store has not synced yet are saves since the last
        sync, which a power loss may take in any case."""
        if not self._unsynced:
            return
        self._unsynced = False  # (before: an append from now on is synced next time)
        os.fsync(self._fd)

    def truncate(self) -> None:
        """Drop every entry (all are versions now); ids and seqs go on."""
        os.ftruncate(self._fd, HEADER_BYTES)
        self._size = HEADER_BYTES

    def close(self) -> None:
        os.close(self._fd)


def pending(found: Scan, applied: bytes | None) -> list[Entry]:
    """The entries of `found` that the store's mark `applied` does not cover."""
    if found.journal_id is None:
        return []
    done = 0
    if (
        applied is not None
        and len(applied) == MARK_BYTES
        and applied[:ID_BYTES] == found.journal_id
    ):
        (done,) = _SEQ.unpack_from(applied, ID_BYTES)
    return [e for e in found.entries if e.seq > done]


def damaged_files(directory: Path) -> list[Path]:
    """Journals kept because some of their entries could not be replayed."""
    return sorted(directory.glob(FILE_NAME + DAMAGED_SUFFIX + "*"))
