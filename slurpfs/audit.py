"""Append-only audit log of access decisions: a keyed chain, anchored in the store.

One JSON object per line (docs/FORMAT.md). Each entry carries the MAC of the
previous entry (`prev`) and its own (`mac`): keyed BLAKE2b-256 of the line
without `mac`, under a key derived from the node's Ed25519 seed. Nobody without
the node key can write an entry that verifies, so an entry edited, removed,
reordered, or rewritten with fresh hashes breaks the chain where it happened.

The end of the log is *anchored*: the (seq, MAC, byte offset) of a recent entry,
itself MAC'd, kept in the store (`aux:audit`). The model refreshes it at the
daemon's periodic sync and whenever it closes; a process that finds the log cut
short under it anchors its own last entry at once. `verify` fails when the log
ends before the anchored entry or holds another one where it was. Entries
appended after the newest anchor can be cut off unnoticed until the next anchor
(docs/ARCHITECTURE.md says exactly when that is).

Logs written before the chain was keyed (format 1: `hash`, plain BLAKE2b) still
verify, reported as legacy; the keyed chain continues from their last entry, so
from then on the legacy part cannot change unnoticed either. A legacy entry after
a keyed one is refused (a downgrade).

Entries name who, which role, which address and the decision; never any content.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Protocol

from slurpfs.crypto.keys import NodeIdentity
from slurpfs.errors import AuditUnavailable, Corrupt
from slurpfs.metrics import NO_EVENTS, Events
from slurpfs.store import StaleHead, Store

log = logging.getLogger(__name__)

GENESIS = "0" * 64
LOG_FORMAT = 2  # 1: unkeyed `hash` entries; 2: keyed `mac` entries and an anchor
ENTRY_DOMAIN = b"slurpfs/audit-entry/v1"
ANCHOR_DOMAIN = b"slurpfs/audit-anchor/v1"
ANCHOR_MAGIC = b"SLAA"
ANCHOR_TABLE = b"audit"  # the store's auxiliary table `aux:audit`
ANCHOR_KEY = b"anchor"
_ANCHOR_BODY = struct.Struct(">4sBQQ32s")  # magic, format, seq, offset, mac
_TAG_BYTES = 32
_ANCHOR_RETRIES = 64

# json's own string encoder (ASCII-only, as json.dumps does by default).
_quote = encode_basestring_ascii


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()


def _canonical(body: dict[str, object]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    time: float
    who: str
    action: str
    address: str
    role: str
    allowed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where the log ended when it was anchored: entry `seq` with MAC `mac` (hex)
    starts at byte `offset`. Seq 0 (MAC `GENESIS`) anchors an empty chain."""

    seq: int
    offset: int
    mac: str


class AuditKeys:
    """The node's audit subkeys: one MACs entries, one MACs the anchor.

    Each is BLAKE2b-256 keyed by the node's Ed25519 seed over a fixed domain string
    (`ENTRY_DOMAIN`, `ANCHOR_DOMAIN`); the seed itself never MACs anything.
    """

    __slots__ = ("_anchor", "_entry")

    def __init__(self, entry_key: bytes, anchor_key: bytes) -> None:
        self._entry = entry_key
        self._anchor = anchor_key

    @classmethod
    def for_node(cls, node: NodeIdentity) -> AuditKeys:
        seed = bytes(node.signing_key)
        return cls(
            hashlib.blake2b(ENTRY_DOMAIN, key=seed, digest_size=32).digest(),
            hashlib.blake2b(ANCHOR_DOMAIN, key=seed, digest_size=32).digest(),
        )

    def mac(self, text: str) -> str:
        """The MAC (hex) of an entry's line without its `mac` member."""
        return hashlib.blake2b(text.encode(), key=self._entry, digest_size=32).hexdigest()

    def _tag(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, key=self._anchor, digest_size=_TAG_BYTES).digest()

    def seal_anchor(self, anchor: Anchor) -> bytes:
        body = _ANCHOR_BODY.pack(
            ANCHOR_MAGIC, LOG_FORMAT, anchor.seq, anchor.offset, bytes.fromhex(anchor.mac)
        )
        return body + self._tag(body)

    def open_anchor(self, raw: bytes) -> Anchor:
        """The anchor in `raw`; Corrupt if it is malformed or was not made with this key."""
        size = _ANCHOR_BODY.size
        if len(raw) != size + _TAG_BYTES:
            raise Corrupt("the audit log's anchor in the store is malformed")
        body = raw[:size]
        magic, fmt, seq, offset, mac = _ANCHOR_BODY.unpack(body)
        if magic != ANCHOR_MAGIC or not hmac.compare_digest(self._tag(body), raw[size:]):
            raise Corrupt(
                "the audit log's anchor in the store does not authenticate"
                " (altered, or not made with this node's key)"
            )
        if fmt != LOG_FORMAT:
            raise Corrupt(
                f"the audit log's anchor has format {fmt}, this slurpfs reads {LOG_FORMAT}"
            )
        return Anchor(seq, offset, mac.hex())

    def __repr__(self) -> str:  # never show the keys
        return "AuditKeys()"


class AnchorSlot(Protocol):
    """Where the anchor is kept: a compare-and-swap cell of bytes."""

    def load(self) -> bytes | None: ...

    def replace(self, old: bytes | None, new: bytes) -> bool:
        """Store `new` if the cell still holds `old` (None: empty); False otherwise."""
        ...


class StoreAnchorSlot:
    """The anchor in the store's auxiliary table `aux:audit` (one LMDB transaction).

    The table is opened (created if need be) here, in the opening thread: a first
    open from a worker thread could deadlock (see `slurpfs.index.sealed.open_table`).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        store.aux_write(ANCHOR_TABLE, {})

    def load(self) -> bytes | None:
        return self._store.aux_get(ANCHOR_TABLE, ANCHOR_KEY)

    def replace(self, old: bytes | None, new: bytes) -> bool:
        try:
            self._store.aux_write(ANCHOR_TABLE, {ANCHOR_KEY: new}, expect=(ANCHOR_KEY, old))
        except StaleHead:
            return False
        return True


@dataclass(frozen=True, slots=True)
class _Line:
    seq: int
    prev: str
    mac: str  # its own `mac`, or `hash` for a legacy entry
    keyed: bool
    authentic: bool  # the MAC (or legacy hash) matches the line


def _parse(raw: bytes, keys: AuditKeys) -> _Line:
    """One line, checked against its own MAC; ValueError if it is not an audit entry."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not an audit entry") from None
    if not isinstance(body, dict):
        raise ValueError("not an audit entry")
    keyed = "mac" in body
    claimed = body.pop("mac" if keyed else "hash", None)
    seq, prev = body.get("seq"), body.get("prev")
    if not (isinstance(claimed, str) and isinstance(prev, str) and type(seq) is int):
        raise ValueError("not an audit entry")
    text = _canonical(body)
    computed = keys.mac(text) if keyed else _digest(text)
    return _Line(seq, prev, claimed, keyed, hmac.compare_digest(computed, claimed))


class _Break(Exception):
    """The log on disk does not continue the chain this process knows."""


class AuditLog:
    """Appends entries to `path` (0600); thread-safe; resumes the chain on open.

    Several processes append to one log (the mount's daemon, `slurpfs put`, ...):
    each append holds an exclusive `flock` on the file, and a process that finds the
    file grown since its own last append first checks the new entries (chain and
    MACs) and continues after them, so the chain stays one line of entries.

    On open the log must continue the anchor: the anchored entry where the anchor
    says, then valid keyed entries. A log that does not (cut short, rewritten, or
    keyed entries while the store has no anchor) is logged as an error and still
    appended to, but this process never moves the anchor again, so `verify` keeps
    failing at the damage. A damaged last line is `Corrupt` (the chain cannot be
    extended), as before.
    """

    def __init__(self, path: Path, keys: AuditKeys, anchors: AnchorSlot) -> None:
        self._path = path
        self._keys = keys
        self._anchors = anchors
        self._lock = threading.Lock()
        self._broken: str | None = None  # why this process no longer moves the anchor
        self._failure: str | None = None  # why the last append failed (None: it worked)
        self._anchored = 0  # the highest seq known to be anchored
        self._evidence: Anchor | None = None  # to anchor at once: the log was cut under us
        self.events: Events = NO_EVENTS  # entries by outcome (a daemon's metrics)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._flock():
                self._end = os.lseek(self._fd, 0, os.SEEK_END)  # where this process's view ends
                initial = self._resume(anchors.load())
            if initial is not None:  # the first keyed chain of this log starts here
                self._advance(initial)
        except BaseException:
            os.close(self._fd)
            raise

    # -- the chain on disk ---------------------------------------------------

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _resume(self, raw: bytes | None) -> Anchor | None:
        """Set the chain's tail from the anchor and the log (under the flock).

        Returns the anchor to write when the store has none yet and the log has
        no keyed entry (a new log, or a legacy one: the keyed chain starts at its end).
        """
        if raw is None:
            self._seq, self._prev, self._start, keyed = self._tail()
            if not keyed:
                return Anchor(self._seq, self._start, self._prev)
            self._break("it holds keyed entries but the store has no anchor for it")
            return None
        try:
            anchor = self._keys.open_anchor(raw)
            self._anchored = anchor.seq
            first = anchor if anchor.seq else None
            self._seq, self._prev, self._start = self._follow(
                anchor.offset, self._end, anchor.seq, anchor.mac, first
            )
        except (Corrupt, _Break) as exc:
            self._seq, self._prev, self._start, _ = self._tail()
            self._break(str(exc))
        return None

    def _follow(
        self, offset: int, end: int, seq: int, prev: str, anchored: Anchor | None
    ) -> tuple[int, str, int]:
        """Check the bytes [offset, end) and return the tail (seq, mac, line offset).

        They must be whole lines: `anchored` (when given) first, unchanged, then keyed
        entries chaining on from (seq, prev). _Break says what does not fit.
        """
        data = os.pread(self._fd, end - offset, offset) if end > offset else b""
        if anchored is not None and not data:
            raise _Break(f"it ends before entry {anchored.seq}, which the anchor names")
        if len(data) != end - offset or (data and not data.endswith(b"\n")):
            raise _Break("it changed while being read, or its last line is incomplete")
        start = offset
        pos = offset
        for raw in data.split(b"\n")[:-1]:
            try:
                line = _parse(raw, self._keys)
            except ValueError:
                raise _Break(f"the line at byte {pos} is not an audit entry") from None
            if anchored is not None:
                if (line.seq, line.mac) != (anchored.seq, anchored.mac) or not line.authentic:
                    raise _Break(f"entry {anchored.seq}, which the anchor names, is not there")
                anchored = None
            elif not (line.keyed and line.authentic and line.prev == prev and line.seq == seq + 1):
                raise _Break(f"the entry at byte {pos} does not continue the chain")
            seq, prev, start = line.seq, line.mac, pos
            pos += len(raw) + 1
        return seq, prev, start

    def _tail(self) -> tuple[int, str, int, bool]:
        """(seq, mac, offset, keyed) of the last line, unchecked; (0, GENESIS, 0, False) if empty."""
        size = os.lseek(self._fd, 0, os.SEEK_END)
        base = max(0, size - 4096)
        lines = os.pread(self._fd, size - base, base).splitlines()
        if not lines:
            return 0, GENESIS, 0, False
        try:
            last = json.loads(lines[-1])
            keyed = "mac" in last
            return (
                int(last["seq"]),
                str(last["mac" if keyed else "hash"]),
                size - len(lines[-1]) - 1,
                keyed,
            )
        except (ValueError, KeyError, TypeError):
            # A torn last line (power loss, full disk) or an edit: refuse to extend
            # a chain that cannot be checked, with a typed error rather than a traceback.
            raise Corrupt(
                f"audit log {self._path}: the last entry is damaged (see `slurpfs audit verify`)"
            ) from None

    def _break(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
            log.error(
                "audit log %s does not continue its anchored chain: %s; the anchor is kept"
                " as evidence (see `slurpfs audit verify`)",
                self._path,
                why,
            )

    def _catch_up(self) -> None:
        """Continue after entries other processes appended (under both locks)."""
        end = os.lseek(self._fd, 0, os.SEEK_END)
        if end == self._end:
            return
        if self._broken is None:
            try:
                if end < self._end:
                    raise _Break(f"it is {self._end - end} bytes shorter than this process left it")
                self._seq, self._prev, self._start = self._follow(
                    self._end, end, self._seq, self._prev, None
                )
                self._end = end
                return
            except _Break as exc:
                if self._seq > 0:  # our own last entry is genuine: anchor it as evidence
                    self._evidence = Anchor(self._seq, self._start, self._prev)
                self._break(str(exc))
        self._seq, self._prev, self._start, _ = self._tail()
        self._end = end

    # -- appending -----------------------------------------------------------

    def record(
        self, *, who: str, action: str, address: str, role: str, allowed: bool, reason: str = ""
    ) -> None:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # not `_flock()`: this is the hot path
            try:
                self._catch_up()
                self._record(who, action, address, role, allowed, reason)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.events.count("allowed" if allowed else "denied")
            if self._evidence is not None:
                self._anchor_evidence()

    def _record(
        self, who: str, action: str, address: str, role: str, allowed: bool, reason: str
    ) -> None:
        """Append the next entry (under both locks; the chain's tail is current)."""
        q = _quote
        seq = self._seq + 1
        # The line `verify` checks: json.dumps(sort_keys=True, separators=(",", ":"))
        # of the entry, written out once here (keys in sorted order, "mac" between
        # "allowed" and "prev"), so the MAC and the line share the serialisation.
        head = (
            f'{{"action":{q(action)},"address":{q(address)},'
            f'"allowed":{"true" if allowed else "false"},'
        )
        rest = (
            f'"prev":{q(self._prev)},"reason":{q(reason)},"role":{q(role)},'
            f'"seq":{seq},"time":{round(time.time(), 6)!r},"who":{q(who)}}}'
        )
        mac = self._keys.mac(head + rest)
        line = f'{head}"mac":"{mac}",{rest}\n'.encode()
        try:
            self._append(line)
        except AuditUnavailable as exc:
            self._failure = str(exc)
            raise
        self._failure = None
        self._seq, self._prev, self._start = seq, mac, self._end
        self._end += len(line)

    def _append(self, line: bytes) -> None:
        """Append one whole line, or nothing: a torn line would break the chain for good.

        Raises `AuditUnavailable` (the caller then refuses the access it was recording)
        and leaves the file where it was, so the next entry can still extend the chain.
        """
        try:
            written = os.write(self._fd, line)
        except OSError as exc:  # nothing was written
            raise AuditUnavailable(
                f"audit log {self._path}: {exc.strerror}; access refused until it can be recorded",
                exc.errno or errno.EIO,
            ) from None
        if written < len(line):  # the disk filled up mid-line: cut the fragment off
            end = os.fstat(self._fd).st_size
            os.ftruncate(self._fd, end - written)
            raise AuditUnavailable(
                f"audit log {self._path}: only {written} of {len(line)} bytes of an entry "
                "could be written (disk full?); access refused until it can be recorded",
                errno.ENOSPC,
            )

    # -- anchoring -----------------------------------------------------------

    @property
    def unanchored(self) -> bool:
        """True if this process knows entries newer than the anchor (and may anchor them)."""
        return self._broken is None and self._seq > self._anchored

    def anchor(self) -> bool:
        """Anchor the newest entry (this process's or another's it has checked).

        The log is made durable first (fdatasync), so an anchor never names an
        entry a power loss could take back. The anchor only moves forward; this
        returns True if it moved. Nothing happens once the log was found broken.
        """
        with self._lock:
            with self._flock():
                self._catch_up()
            moved = self._anchor_evidence()
            if not self.unanchored:
                return moved
            candidate = Anchor(self._seq, self._start, self._prev)
        os.fdatasync(self._fd)  # outside the locks: appends go on meanwhile
        return self._advance(candidate)

    def _anchor_evidence(self) -> bool:
        evidence, self._evidence = self._evidence, None
        return evidence is not None and self._advance(evidence, force=True)

    def _advance(self, candidate: Anchor, *, force: bool = False) -> bool:
        """Store `candidate` unless the anchor already names a later entry.

        `force` (evidence of a cut) writes even though this process found the log broken.
        """
        for _ in range(_ANCHOR_RETRIES):
            if self._broken is not None and not force:
                return False
            raw = self._anchors.load()
            if raw is not None:
                try:
                    current = self._keys.open_anchor(raw)
                except Corrupt as exc:
                    self._break(str(exc))  # keep the damaged anchor: it is evidence too
                    return False
                if current.seq >= candidate.seq:
                    self._anchored = max(self._anchored, current.seq)
                    return False
            if self._anchors.replace(raw, self._keys.seal_anchor(candidate)):
                self._anchored = max(self._anchored, candidate.seq)
                return True
        return False  # others kept moving it: they anchored entries at least as new

    def stored_anchor(self) -> int | None:
        """The seq the store's anchor names now; None if it has none or it does not
        authenticate (the store's seal records it: `slurpfs.seal`)."""
        raw = self._anchors.load()
        if raw is None:
            return None
        try:
            return self._keys.open_anchor(raw).seq
        except Corrupt:
            return None

    def verify(self) -> Verified:
        """`verify` of this log, with this process's keys and anchor."""
        return verify(self._path, self._keys, self._anchors)

    def problem(self) -> str | None:
        """Why the trail is not sound now, as far as can be told without writing an
        entry: the last append failed, the file at the log's path is no longer the one
        this process appends to (removed or replaced), or the log was found not to
        continue its anchor. None when none of these."""
        if self._failure is not None:
            return self._failure
        if self._broken is not None:
            return self._broken
        try:
            at_path = os.stat(self._path)
        except FileNotFoundError:
            return f"audit log {self._path}: removed while in use; entries go to a deleted file"
        ours = os.fstat(self._fd)
        if (at_path.st_dev, at_path.st_ino) != (ours.st_dev, ours.st_ino):
            return f"audit log {self._path}: replaced while in use; entries go to the old file"
        return None

    def close(self) -> None:
        os.close(self._fd)


# -- verifying and reading -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verified:
    """What `verify` found: every entry checks, and the anchored one is where it was."""

    entries: int
    legacy: int  # unkeyed format-1 entries at the start (chained, not authenticated)
    anchored: int | None  # the seq the store's anchor names; None: the store has none


def verify(path: Path, keys: AuditKeys, anchors: AnchorSlot) -> Verified:
    """Check the whole log against `keys` and the anchor; Corrupt at the first problem.

    Entries appended while this runs are not looked at: the log is read up to where
    it ended when verification began (after the anchor was read, so it names an
    entry within that length).
    """
    raw_anchor = anchors.load()
    anchor = None if raw_anchor is None else keys.open_anchor(raw_anchor)
    prev, seq, legacy, keyed, count = GENESIS, 0, 0, False, 0
    for lineno, raw in enumerate(_lines(path), 1):
        count = lineno
        try:
            line = _parse(raw, keys)
        except ValueError:
            raise Corrupt(f"audit log line {lineno}: not an audit entry") from None
        if line.prev != prev:
            raise Corrupt(f"audit log line {lineno}: chain broken (entry removed or reordered)")
        if not line.authentic:
            raise Corrupt(
                f"audit log line {lineno}: entry altered"
                + (" (or not written with this node's key)" if line.keyed else "")
            )
        if line.keyed:
            if line.seq != seq + 1:
                raise Corrupt(f"audit log line {lineno}: entry {line.seq} follows entry {seq}")
            keyed = True
        elif keyed or (anchor is not None and line.seq > anchor.seq):
            # Unkeyed entries are those written before the keyed chain began, which
            # is at or before the anchor: anything else is a downgrade.
            raise Corrupt(f"audit log line {lineno}: an unkeyed entry after the keyed chain began")
        else:
            legacy += 1
        if anchor is not None and anchor.seq and line.seq == anchor.seq and line.mac != anchor.mac:
            raise Corrupt(
                f"audit log line {lineno}: entry {line.seq} is not the one the anchor names"
                " (the log was cut back and written again from there)"
            )
        prev, seq = line.mac, line.seq
    if anchor is None:
        if keyed:
            raise Corrupt(
                "the audit log has keyed entries but the store holds no anchor for it"
                " (removed: entries may have been cut off the end)"
            )
    elif anchor.seq > seq:
        raise Corrupt(
            f"the audit log ends at entry {seq} but its anchor says {anchor.seq}:"
            " entries were cut off the end"
        )
    return Verified(count, legacy, None if anchor is None else anchor.seq)


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of the log as long as it was when this began (none if it is missing)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # no append is halfway through
        size = os.fstat(f.fileno()).st_size
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        pos = 0
        for raw in f:
            pos += len(raw)
            if pos > size:  # appended since
                return
            yield raw


def has_keyed_entries(path: Path) -> bool:
    """True if the log's last line is a keyed (format 2) entry: a keyed slurpfs has
    written it, so the store must hold an anchor for it."""
    try:
        lines = _tail_lines(path, 1)
    except FileNotFoundError:
        return False
    return bool(lines) and b'"mac":' in lines[-1]


def _tail_lines(path: Path, limit: int) -> list[bytes]:
    """The last `limit` lines of a file, reading backwards in blocks."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        data = b""
        block = 64 * 1024
        while end > 0 and data.count(b"\n") <= limit:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
    return data.splitlines()[-limit:]


def read(path: Path, limit: int | None = None) -> list[AuditEntry]:
    """The last `limit` entries (all when None), oldest first; reads only the tail."""
    lines = _tail_lines(path, limit) if limit else path.read_bytes().splitlines()
    out: list[AuditEntry] = []
    for raw in lines:
        body = json.loads(raw)
        out.append(
            AuditEntry(
                body["seq"],
                body["time"],
                body["who"],
                body["action"],
                body["address"],
                body["role"],
                body["allowed"],
                body["reason"],
            )
        )
    return out
