"""Open handles and the write buffers behind them.

A role file's content while it is open lives in one `Content` per inode, shared
by every handle on it (so a reader sees what a writer wrote, as POSIX expects).
It is loaded lazily: a writer that truncates first (``open(O_TRUNC)``, ``cp``,
``>``) never needs to decrypt the old version. `flush` (each ``close``) of a handle
that wrote commits the buffer as exactly one new version in one store transaction;
a handle that only read commits nothing, and a handle whose only change is the
emptying at open commits at `release` (see `Operations.flush`); `fsync`
commits and then syncs the store to stable storage (one sync covers every store
write this process made before it began, so an editor's ``fsync`` of a scratch
file and then of the directory syncs once).

Handles on read-only entries (history, conflicts, temporal views, status files)
carry their own immutable snapshot. Handles on scratch files point at the
scratch file.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from slurpfs.errors import NotFound, SlurpError
from slurpfs.fs.access import Caller
from slurpfs.fs.inodes import Node
from slurpfs.fs.scratch import ScratchFile
from slurpfs.fs.tree import Entry
from slurpfs.fs.view import StoreView
from slurpfs.model import Context, ContextStore, JournaledSave, Saved, VersionInfo, WriterBusy
from slurpfs.store.journal import Journal
from slurpfs.ucxl import Address

T = TypeVar("T")
W = TypeVar("W", VersionInfo, Saved)
INLINE_BYTES = 256 << 10
OWN_LIMIT = 1 << 16


class Content:
    """The open state of one role file: a buffer, whether it is dirty, and its base version."""

    __slots__ = ("base", "buffer", "dirty", "journaled", "lock", "mtime_ns", "seq")

    def __init__(self) -> None:
        self.buffer: bytearray | None = None  # None: not loaded yet
        self.dirty = False
        # Bumped by every change: a commit clears `dirty` only if no write came
        # in while it was sealing (writes do not wait for the commit lock).
        self.seq = 0
        self.base: bytes | None = None  # version id the buffer started from
        # Saves of this buffer in the write-behind journal, not yet stored: until
        # then the buffer, not the head, is the file (`slurpfs.fs.writebehind`).
        self.journaled = 0
        self.mtime_ns = time.time_ns()
        # Guards load and commit: each is a read-modify-write across an await.
        self.lock = trio.Lock()

    def locked(self) -> Held:
        """``async with content.locked():`` holds `lock` (see `Held`)."""
        return Held(self.lock)

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

    def discard(self) -> None:
        """Drop unsaved changes: the next read or write loads the stored version."""
        self.buffer = None
        self.base = None
        self.dirty = False
        self.seq += 1


class Held:
    """Holds a `trio.Lock` for an ``async with`` block; a free lock is taken at once.

    ``async with lock`` is a schedule point even when the lock is free: a full turn
    of the trio loop in the middle of every open and commit. A contended lock is
    still waited for in turn.
    """

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


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
    append: bool = False  # O_APPEND: every write goes to the end, whatever its offset
    # What this handle changed and has not committed yet: written bytes (or an
    # ftruncate), and the emptying at open (O_TRUNC, or a new file). See `Operations.flush`.
    wrote: bool = False
    emptied: bool = False
    # The errno of a write or truncate that failed: this handle stores nothing, and
    # its later writes and its close fail with it (`Operations._write_failed`).
    failed: int = 0

    @property
    def owes_commit(self) -> bool:
        """Whether the shared buffer holds changes made through this handle."""
        return (self.wrote or self.emptied) and self.content is not None and self.content.dirty


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
    more than the work. Big ones (and every sync) run in worker threads under a
    `CapacityLimiter`, so the FUSE loop keeps answering meanwhile. Every change
    made here drops the `StoreView` memo.
    """

    def __init__(
        self, model: ContextStore, view: StoreView, *, inline_bytes: int = INLINE_BYTES
    ) -> None:
        self.model = model
        self.view = view
        self.inline_bytes = inline_bytes
        self.limiter = trio.CapacityLimiter(4)
        self.commits = 0
        self.commit_failures = 0
        self.syncs = 0
        # Store writes of this process (commits, directories), and how many of them
        # are known to be on stable storage: a sync that began after the n-th write
        # returned covers it and every one before.
        self._writes = 0
        self._durable = 0
        # Versions this mount committed, whose nodes it updated itself: the
        # invalidator (which reads them back from the change log) skips them.
        self.own_versions: set[bytes] = set()
        # ``replication.write_quorum``: waits until enough peers hold these versions
        # (`OSError` if they do not in time); None without replication.
        self.replicated: Callable[[Sequence[bytes]], Awaitable[None]] | None = None
        # The write-behind journal (`slurpfs.fs.writebehind`): synced with the store.
        self.journal: Journal | None = None

    async def _run(self, big: bool, fn: Callable[[], T]) -> T:
        if not big:
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self.limiter)

    async def _write(self, big: bool, write: Callable[..., W]) -> W:
        """Run `write(wait=...)`: small ones inline unless another writer (another
        process's `slurpfs import`, say) holds the store's writer lock; waiting for it
        is done in a worker thread, never on the FUSE loop."""
        if not big:
            try:
                return write(wait=False)
            except WriterBusy:
                pass
        return await trio.to_thread.run_sync(
            functools.partial(write, wait=True), limiter=self.limiter
        )

    async def put(self, address: Address, role: str, data: bytes) -> Saved:
        """`ContextStore.save`: bytes equal to the head's store nothing (``stored`` false)."""
        try:
            saved = await self._write(
                len(data) > self.inline_bytes,
                functools.partial(self.model.save, address, role, data),
            )
        except BaseException:
            self.commit_failures += 1
            raise
        finally:
            self._changed()
        if saved.stored:
            self.commits += 1
            self._own(saved.info)
        return saved

    async def delete(self, address: Address, role: str) -> VersionInfo:
        try:
            info = await self._write(False, functools.partial(self.model.delete, address, role))
        finally:
            self._changed()
        self.commits += 1
        self._own(info)
        return info

    def journaled(self) -> None:
        """A save went to the write-behind journal: the next `sync` covers it."""
        self._writes += 1

    async def store_journaled(
        self,
        items: list[tuple[Address, str, bytes, tuple[bytes, ...] | None]],
        marks: list[bytes],
    ) -> tuple[list[Saved], SlurpError | OSError | None]:
        """Store journaled saves in order, in a worker thread (the group commit): what
        was stored, and the error that stopped the rest (None if all were).

        All in one transaction (`ContextStore.save_journaled`); if that fails, one by
        one, so the saves before the one that fails are stored and it is named."""

        def store() -> tuple[list[Saved], SlurpError | OSError | None]:
            saves = [JournaledSave(*item) for item in items]
            with contextlib.suppress(SlurpError, OSError):
                return self.model.save_journaled(saves, marks[-1]), None
            done: list[Saved] = []
            for (address, role, data, based_on), mark in zip(items, marks, strict=True):
                try:
                    done.append(
                        self.model.save(address, role, data, journal=mark, based_on=based_on)
                    )
                except (SlurpError, OSError) as exc:
                    return done, exc
            return done, None

        try:
            done, error = await trio.to_thread.run_sync(store, limiter=self.limiter)
        finally:
            self._changed()
        self.commit_failures += error is not None
        for saved in done:
            if saved.stored:
                self.commits += 1
                self._own(saved.info)
        return done, error

    def stored_elsewhere(self, done: Sequence[Saved], data: Sequence[bytes]) -> None:
        """Journaled saves (`data`) another process stored for this mount (the commit
        worker): the bookkeeping of `store_journaled`, and the model's subscribers."""
        self._changed()
        stored = [(s.info, d) for s, d in zip(done, data, strict=True) if s.stored]
        self.model.committed(
            [info for info, _ in stored], [d for _, d in stored], write_through=True
        )
        for info, _ in stored:
            self.commits += 1
            self._own(info)

    def _own(self, info: VersionInfo) -> None:
        if len(self.own_versions) >= OWN_LIMIT:
            self.own_versions.clear()  # nobody reads them back (no invalidator): start over
        self.own_versions.add(info.version_id)

    def resolve_conflict(self, address: Address, role: str, version_id: bytes) -> VersionInfo:
        try:
            info = self.model.resolve_conflict(address, role, version_id)
        finally:
            self._changed()
        self.commits += 1
        return info

    def mkdir(self, address: Address) -> None:
        self._dir_write(self.model.mkdir, address)
        self.view.added_dir(address)

    def rmdir(self, address: Address) -> None:
        self._dir_write(self.model.rmdir, address)
        self.view.removed_dir(address)

    def _dir_write(self, write: Callable[[Address], None], address: Address) -> None:
        """A directory write: the caller corrects the view; a failure drops it."""
        try:
            write(address)
        except BaseException:
            self._forget()
            raise
        self._writes += 1

    def expired(self) -> None:
        """The TTL cleanup purged contexts (in a worker thread)."""
        self._forget()

    def _forget(self) -> None:
        """The store changed in a way no change record tells: the view forgets it all."""
        self._writes += 1
        self.view.changed()

    def _changed(self) -> None:
        self._writes += 1
        self.view.committed()

    async def get(self, address: Address, role: str, caller: Caller) -> Context:
        try:
            info = self.view.stat(address, role)
            # a body held only by other members is fetched, in a worker thread
            big = info.size > self.inline_bytes or not self.model.is_local(info.version_id)
        except NotFound:
            big = False  # the model says what is there (and audits the attempt)
        return await self._run(
            big,
            functools.partial(self.model.get, address, role, caller.roles, who=caller.who),
        )

    def authorise_read(self, address: Address, role: str, caller: Caller) -> None:
        self.model.authorise_read(address, role, caller.roles, who=caller.who)

    async def get_version(
        self, address: Address, role: str, info: VersionInfo, caller: Caller
    ) -> Context:
        return await self._run(
            info.size > self.inline_bytes or not self.model.is_local(info.version_id),
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
        """Bring every store write this process made so far to stable storage.

        A sync that starts after the last of them returned covers them all, so
        back-to-back requests (``fsync`` of a file, then of its directory) sync
        once: the second finds nothing new and returns at once.
        """
        target = self._writes
        if self._durable >= target:
            return
        await trio.to_thread.run_sync(self._sync, limiter=self.limiter)
        self.syncs += 1
        self._durable = max(self._durable, target)

    def _sync(self) -> None:
        self.model.sync()
        if self.journal is not None:
            self.journal.sync()

    async def anchor_audit(self) -> None:
        """Anchor the audit log's newest entries (in a worker thread: it fsyncs)."""
        if self.model.audit_unanchored:
            await trio.to_thread.run_sync(self.model.anchor_audit, limiter=self.limiter)
