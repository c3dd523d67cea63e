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

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from slurpfs.fs.access import Caller
from slurpfs.fs.inodes import Node
from slurpfs.fs.scratch import ScratchFile
from slurpfs.fs.tree import Entry
from slurpfs.model import Context, ContextStore, VersionInfo
from slurpfs.ucxl import Address

T = TypeVar("T")
INLINE_BYTES = 256 << 10


class Content:
    """The open state of one role file: a buffer, whether it is dirty, and its base version."""

    __slots__ = ("base", "buffer", "dirty", "lock", "mtime_ns", "seq")

    def __init__(self) -> None:
        self.buffer: bytearray | None = None  # None: not loaded yet
        self.dirty = False
        # Bumped by every change: a commit clears `dirty` only if no write came
        # in while it was sealing (writes do not wait for the commit lock).
        self.seq = 0
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
        self._changed()

    def _changed(self) -> None:
        self.dirty = True
        self.seq += 1
        self.mtime_ns = time.time_ns()

    def write(self, offset: int, buf: bytes) -> None:
        assert self.buffer is not None
        if offset > len(self.buffer):
            self.buffer.extend(bytes(offset - len(self.buffer)))
        self.buffer[offset : offset + len(buf)] = buf
        self._changed()

    def truncate(self, size: int) -> None:
        assert self.buffer is not None
        if size < len(self.buffer):
            del self.buffer[size:]
        else:
            self.buffer.extend(bytes(size - len(self.buffer)))
        self._changed()


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
    entries: list[Entry] | None = None


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


class Gateway:
    """Model calls from the trio loop.

    Small contexts are sealed or opened inline: a worker-thread round trip costs
    more than the work. Big ones (and every fsync) run in worker threads under a
    `CapacityLimiter`, so the FUSE loop keeps answering meanwhile.
    """

    def __init__(self, model: ContextStore, *, inline_bytes: int = INLINE_BYTES) -> None:
        self.model = model
        self.inline_bytes = inline_bytes
        self.limiter = trio.CapacityLimiter(4)
        self.commits = 0
        self.commit_failures = 0

    async def _run(self, big: bool, fn: Callable[[], T]) -> T:
        if not big:
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self.limiter)

    async def put(self, address: Address, role: str, data: bytes) -> VersionInfo:
        try:
            info = await self._run(
                len(data) > self.inline_bytes,
                functools.partial(self.model.put, address, role, data),
            )
        except BaseException:
            self.commit_failures += 1
            raise
        self.commits += 1
        return info

    async def delete(self, address: Address, role: str) -> VersionInfo:
        info = self.model.delete(address, role)
        self.commits += 1
        return info

    async def get(self, address: Address, role: str, caller: Caller) -> Context:
        size = self.model.stat(address, role).size
        return await self._run(
            size > self.inline_bytes,
            functools.partial(self.model.get, address, role, caller.roles, who=caller.who),
        )

    async def get_version(
        self, address: Address, role: str, info: VersionInfo, caller: Caller
    ) -> Context:
        return await self._run(
            info.size > self.inline_bytes,
            functools.partial(
                self.model.get_version,
                address,
                role,
                info.version_id,
                caller.roles,
                who=caller.who,
            ),
        )

    async def sync(self) -> None:
        await trio.to_thread.run_sync(self.model.sync, limiter=self.limiter)
