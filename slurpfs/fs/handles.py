"""Open handles and the write buffers behind them.

A role file's content while it is open lives in one `Content` per inode, shared
by every handle on it (so a reader sees what a writer wrote, as POSIX expects).
It is loaded lazily: a writer that truncates first (``open(O_TRUNC)``, ``cp``,
``>``) never needs to decrypt the old version. `flush` of a dirty buffer (each
``close``) commits exactly one new version in one store transaction; `fsync`
commits and then syncs the store to stable storage.

Handles on read-only entries (history, conflicts, temporal views, status files)
carry their own immutable snapshot. Handles on scratch files point at the
scratch file.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import trio

from slurpfs.fs.access import Caller
from slurpfs.fs.inodes import Node
from slurpfs.fs.scratch import ScratchFile


class Content:
    """The open state of one role file: a buffer, whether it is dirty, and its base version."""

    __slots__ = ("base", "buffer", "dirty", "lock", "mtime_ns")

    def __init__(self) -> None:
        self.buffer: bytearray | None = None  # None: not loaded yet
        self.dirty = False
        self.base: bytes | None = None  # version id the buffer started from
        self.mtime_ns = time.time_ns()
        # Guards load and commit: each is a read-modify-write across an await.
        self.lock = trio.Lock()

    @property
    def loaded(self) -> bool:
        return self.buffer is not None

    def set(self, data: bytes, base: bytes | None) -> None:
        self.buffer = bytearray(data)
        self.base = base
        self.dirty = False

    def start_empty(self) -> None:
        """A new (or truncated-to-zero) file: nothing to load, something to commit."""
        self.buffer = bytearray()
        self.dirty = True
        self.mtime_ns = time.time_ns()

    def write(self, offset: int, buf: bytes) -> None:
        assert self.buffer is not None
        if offset > len(self.buffer):
            self.buffer.extend(bytes(offset - len(self.buffer)))
        self.buffer[offset : offset + len(buf)] = buf
        self.dirty = True
        self.mtime_ns = time.time_ns()

    def truncate(self, size: int) -> None:
        assert self.buffer is not None
        if size < len(self.buffer):
            del self.buffer[size:]
        else:
            self.buffer.extend(bytes(size - len(self.buffer)))
        self.dirty = True
        self.mtime_ns = time.time_ns()


@dataclass(eq=False)
class FileHandle:
    """One open file. Exactly one of `content`, `snapshot` or `scratch` is the data."""

    fh: int
    node: Node
    caller: Caller
    readable: bool
    writable: bool
    content: Content | None = None
    snapshot: bytes | None = None
    scratch: ScratchFile | None = None


@dataclass(eq=False)
class DirHandle:
    """One open directory; `entries` is the listing served to readdir (by offset)."""

    fh: int
    node: Node
    caller: Caller
    entries: list[tuple[bytes, Node]] | None = None
    served: int = 0


@dataclass
class HandleTable:
    """Open file and directory handles, by number."""

    files: dict[int, FileHandle] = field(default_factory=dict)
    dirs: dict[int, DirHandle] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def open_file(
        self,
        node: Node,
        caller: Caller,
        *,
        readable: bool,
        writable: bool,
    ) -> FileHandle:
        handle = FileHandle(next(self._numbers), node, caller, readable, writable)
        node.opens += 1
        self.files[handle.fh] = handle
        return handle

    def open_dir(self, node: Node, caller: Caller) -> DirHandle:
        handle = DirHandle(next(self._numbers), node, caller)
        node.opens += 1
        self.dirs[handle.fh] = handle
        return handle

    def file(self, fh: int) -> FileHandle:
        return self.files[fh]

    def dir(self, fh: int) -> DirHandle:
        return self.dirs[fh]

    def close_file(self, fh: int) -> FileHandle:
        handle = self.files.pop(fh)
        handle.node.opens -= 1
        return handle

    def close_dir(self, fh: int) -> DirHandle:
        handle = self.dirs.pop(fh)
        handle.node.opens -= 1
        return handle

    def dirty(self) -> list[FileHandle]:
        """Handles whose role-file buffer has uncommitted writes (one per inode)."""
        seen: set[int] = set()
        out: list[FileHandle] = []
        for handle in self.files.values():
            c = handle.content
            if c is not None and c.dirty and handle.node.ino not in seen:
                seen.add(handle.node.ino)
                out.append(handle)
        return out
