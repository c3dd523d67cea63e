"""Append-only, hash-chained audit log of access decisions.

One JSON object per line. Each entry carries the BLAKE2b hash of the previous
entry's line (`prev`) and its own hash (`hash`, over the line without it), so a
removed, reordered or edited entry breaks the chain at that point and
`verify()` says where. Entries name who, which role, which address and the
decision; never any content.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path

from slurpfs.errors import AuditUnavailable, Corrupt

GENESIS = "0" * 64

# json's own string encoder (ASCII-only, as json.dumps does by default).
_quote = encode_basestring_ascii


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()


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


class AuditLog:
    """Appends entries to `path` (0600); thread-safe; resumes the chain on open.

    Several processes append to one log (the mount's daemon, `slurpfs put`, ...):
    each append holds an exclusive `flock` on the file, and a process that finds the
    file grown since its own last append reads the new tail first, so the chain
    stays one line of entries.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._failure: str | None = None  # why the last append failed (None: it worked)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._seq, self._prev = self._tail()
            self._end = os.lseek(self._fd, 0, os.SEEK_END)  # where this process's view ends
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _tail(self) -> tuple[int, str]:
        try:
            with self._path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 4096))
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0, GENESIS
        if not lines:
            return 0, GENESIS
        try:
            last = json.loads(lines[-1])
            return int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError):
            # A torn last line (power loss, full disk) or an edit: refuse to extend
            # a chain that cannot be checked, with a typed error rather than a traceback.
            raise Corrupt(
                f"audit log {self._path}: the last entry is damaged (see `slurpfs audit verify`)"
            ) from None

    def record(
        self, *, who: str, action: str, address: str, role: str, allowed: bool, reason: str = ""
    ) -> None:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                end = os.lseek(self._fd, 0, os.SEEK_END)
                if end != self._end:  # another process appended meanwhile
                    self._seq, self._prev = self._tail()
                    self._end = end
                self._record(who, action, address, role, allowed, reason)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _record(
        self, who: str, action: str, address: str, role: str, allowed: bool, reason: str
    ) -> None:
        """Append the next entry (under both locks; the chain's tail is current)."""
        q = _quote
        seq = self._seq + 1
        # The line `verify` checks: json.dumps(sort_keys=True, separators=(",", ":"))
        # of the entry, written out once here (keys in sorted order, "hash" between
        # "allowed" and "prev"), so the hash and the line share the serialisation.
        head = (
            f'{{"action":{q(action)},"address":{q(address)},'
            f'"allowed":{"true" if allowed else "false"},'
        )
        rest = (
            f'"prev":{q(self._prev)},"reason":{q(reason)},"role":{q(role)},'
            f'"seq":{seq},"time":{round(time.time(), 6)!r},"who":{q(who)}}}'
        )
        entry_hash = _digest(head + rest)
        line = f'{head}"hash":"{entry_hash}",{rest}\n'.encode()
        try:
            self._append(line)
        except AuditUnavailable as exc:
            self._failure = str(exc)
            raise
        self._failure = None
        self._seq, self._prev = seq, entry_hash
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

    def problem(self) -> str | None:
        """Why entries cannot be recorded now, as far as can be told without writing one:
        the last append failed, or the file at the log's path is no longer the one
        this process appends to (removed or replaced). None when neither."""
        if self._failure is not None:
            return self._failure
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


def verify(path: Path) -> int:
    """Check the whole chain; returns the number of entries. Raises Corrupt at the first break."""
    prev = GENESIS
    count = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                body = json.loads(raw)
                claimed = body.pop("hash")
            except (ValueError, KeyError, AttributeError):
                raise Corrupt(f"audit log line {lineno}: not an audit entry") from None
            if body.get("prev") != prev:
                raise Corrupt(f"audit log line {lineno}: chain broken (entry removed or reordered)")
            if _digest(json.dumps(body, sort_keys=True, separators=(",", ":"))) != claimed:
                raise Corrupt(f"audit log line {lineno}: entry altered")
            prev = claimed
            count += 1
    return count


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
