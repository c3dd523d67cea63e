"""Open files: the life of a role or scratch file between ``open`` and ``release``.

`Operations` (the pyfuse3 adapter) hands every request on an open file here:

- ``open`` of a role file shares one `Content` per inode among its handles (a
  reader sees what a writer wrote, as POSIX expects), loaded lazily: a writer
  that empties the file first (``O_TRUNC``, ``cp``, ``>``) decrypts nothing. A
  read-only open whose version the kernel's page cache already holds loads
  nothing either (`_kernel_holds_head`). History files, conflicts and temporal
  views are immutable snapshots; scratch files are their `ScratchFile`.
- ``write`` changes the buffer (bounded by ``store.max_context_bytes``); a
  write or truncate that fails marks its handle failed, and that handle then
  stores nothing (`write_failed`).
- ``flush`` (each ``close``) of a handle that wrote commits the buffer as one
  new version (`commit`); ``fsync`` commits and syncs the store; ``release``
  commits what is still owed and closes the handle.
- A clean buffer older than the head (another process or a peer stored a
  version meanwhile) is reloaded before it is read or written (`behind`).
- `commit_all` stores every dirty buffer: the daemon's teardown calls it on
  every exit path.
- With write-behind (`slurpfs.fs.writebehind`) ``flush`` and ``release`` journal
  the save instead of committing it; everything else that commits or moves a
  file first waits for the group commit (`settle`).

Domain errors (`SlurpError`) and `OSError` leave these methods as they are: the
adapter's `handler` turns them into errno.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import pyfuse3

from slurpfs.errors import AccessDenied, NotFound, SlurpError
from slurpfs.fs.access import Caller
from slurpfs.fs.busypoll import BusyPoll
from slurpfs.fs.errmap import IsADirectory, ReadOnly, TooLarge, fail, fuse_error
from slurpfs.fs.handles import Content, FileHandle, Gateway, HandleTable
from slurpfs.fs.inodes import DIR_KINDS, InodeTable, Kind, Node
from slurpfs.fs.namespace import Namespace
from slurpfs.fs.scratch import ScratchStore
from slurpfs.fs.tree import dir_key
from slurpfs.fs.view import StoreView
from slurpfs.fs.writebehind import Pending, WriteBehind
from slurpfs.model import Saved
from slurpfs.ucxl import Address

log = logging.getLogger("slurpfs.fs")


class OpenFiles:
    """Opens, reads, writes, commits and closes files for `Operations` (module docstring)."""

    def __init__(
        self,
        *,
        handles: HandleTable,
        inodes: InodeTable,
        scratch: ScratchStore,
        gateway: Gateway,
        view: StoreView,
        namespace: Namespace,
        busy: BusyPoll,
        max_bytes: int,
    ) -> None:
        self.handles = handles
        self.inodes = inodes
        self.scratch = scratch
        self.gateway = gateway
        self.view = view
        self.namespace = namespace
        self.busy = busy
        self.max_bytes = max_bytes
        self.writebehind: WriteBehind | None = None  # set by the daemon when enabled

    # -- open ----------------------------------------------------------------------------

    async def open(
        self,
        node: Node,
        handle: FileHandle,
        caller: Caller,
        fi: pyfuse3.FileInfo,
        *,
        truncate: bool,
    ) -> pyfuse3.FileInfo:
        """Open a scratch file, a stored (role, history, conflict) file or a temporal view."""
        if node.kind is Kind.SCRATCH:
            assert node.scratch is not None
            if not self.namespace.owns_scratch(caller, node.scratch):
                raise AccessDenied(
                    f"uid {caller.uid} may not open a scratch file of uid {node.scratch.uid}"
                )
            handle.scratch = node.scratch
            node.scratch.opens += 1
            if truncate and handle.writable:
                self.scratch.truncate(node.scratch, 0)
            return fi
        address = node.address
        if node.key is None or address is None:
            raise NotFound(f"{node.name!r} was removed")
        role = node.key.role
        if node.kind in (Kind.HISTORY_FILE, Kind.CONFLICT):
            assert node.info is not None
            ctx = await self.gateway.get_version(address, role, node.info, caller)
            handle.snapshot = ctx.data
            fi.keep_cache = node.cached_version == ctx.info.version_id
            node.cached_version = ctx.info.version_id
            return fi
        if node.readonly:  # a role file under a temporal segment
            ctx = await self.gateway.get(address, role, caller)
            handle.snapshot = ctx.data
            return fi
        content = node.content
        if content is None:
            if handle.readable and not handle.writable and self._kernel_holds_head(node, caller):
                # The kernel's page cache holds this very version: nothing to decrypt.
                # A read that misses the cache loads the content then (`read`).
                handle.content = node.content = Content()
                fi.keep_cache = True
                return fi
            content = node.content = Content()
        handle.content = content
        if truncate and handle.writable:
            # libfuse passes O_TRUNC to open (atomic_o_trunc): no separate truncate
            # follows, and nothing needs decrypting for a writer that replaces it all.
            self.namespace.require_role(caller, role, address, "write")
            content.start_empty()
            handle.emptied = True
        elif handle.readable:
            await self.load(node, content, caller, force=True)
        else:
            self.namespace.require_role(caller, role, address, "write")
        fi.keep_cache = (
            not content.dirty and content.base is not None and node.cached_version == content.base
        )
        node.cached_version = None if content.dirty else content.base
        return fi

    def created(self, node: Node, handle: FileHandle) -> None:
        """`handle` was opened by the ``create`` of `node` (a new role or scratch file)."""
        if node.scratch is not None:
            handle.scratch = node.scratch
            node.scratch.opens += 1
        else:
            handle.content = node.content
            handle.emptied = True

    # -- read and write --------------------------------------------------------------------

    async def read(self, handle: FileHandle, off: int, size: int) -> bytes:
        if handle.snapshot is not None:
            return handle.snapshot[off : off + size]
        if handle.scratch is not None:
            return bytes(handle.scratch.data[off : off + size])
        buffer = await self._current(handle)
        return bytes(buffer[off : off + size])

    async def _current(self, handle: FileHandle) -> bytearray:
        """The buffer of a role file's handle: loaded if it was not, reloaded if a
        newer version was stored meanwhile and this one holds no changes (`behind`)."""
        content = handle.content
        assert content is not None
        if content.buffer is None:
            await self.load(handle.node, content, handle.caller)
        elif self.behind(handle.node, content):
            await self.load(handle.node, content, handle.caller, force=True)
        assert content.buffer is not None
        return content.buffer

    async def write(self, handle: FileHandle, off: int, buf: bytes) -> int:
        if not handle.writable:
            raise fail(errno.EBADF)
        if handle.scratch is not None:
            return self.scratch.write(handle.scratch, off, buf)
        if handle.failed:
            raise fail(handle.failed)
        try:
            return await self._write_content(handle, off, buf)
        except (SlurpError, OSError) as exc:
            self.write_failed(handle, exc)
            raise

    # -- close -----------------------------------------------------------------------------

    async def flush(self, handle: FileHandle) -> None:
        """``close`` of a descriptor: commit what this handle wrote, as one version.

        The kernel flushes at every ``close`` of every duplicate of a descriptor (a
        shell's ``> file`` opens, duplicates and closes before anything is written),
        and pyfuse3 does not say which process closes. So a flush commits only if
        this handle wrote: a reader's ``close`` never stores another handle's
        half-written buffer, and an emptying at open (O_TRUNC, a new file) with
        nothing written yet waits for the next flush that follows a write, or for
        `release`.
        """
        if handle.failed:
            raise fail(handle.failed)  # its save did not go through: say so again
        if handle.wrote:
            if self.writebehind is not None and self.writebehind.failure is not None:
                await self.writebehind.drain()  # a failing group commit: say why
            before = handle.node.written
            # A close that waits for peers (write_quorum) needs its version now.
            try:
                await self.commit_own(handle, behind=self.gateway.replicated is None)
            except (SlurpError, OSError) as exc:
                if self.journaled(handle.node):
                    # At once, not at release (the kernel sends that later): a
                    # read right after this close gets the journaled save.
                    self.write_failed(handle, exc)
                raise
            await self._replicated(handle, before)

    async def fsync(self, handle: FileHandle) -> None:
        if handle.failed:
            raise fail(handle.failed)
        before = handle.node.written
        await self.commit_own(handle)  # waits for the group commit first (`settle`)
        await self.settle()
        await self.gateway.sync()
        await self._replicated(handle, before)

    async def _replicated(self, handle: FileHandle, before: object) -> None:
        """With ``replication.write_quorum``: wait for the peers to hold what this
        fsync or close stored (EIO when they do not in time)."""
        written = handle.node.written
        if self.gateway.replicated is None or written is None or written == before:
            return
        try:
            await self.gateway.replicated([written[0]])
        except OSError as exc:  # (its own log line says why)
            raise fail(exc.errno or errno.EIO) from None

    async def release(self, handle: FileHandle) -> None:
        """The last descriptor of `handle` is gone: store what it still owes, close it."""
        try:
            if handle.owes_commit:
                await self.commit(handle.node, behind=True)
        except (SlurpError, OSError) as exc:
            log.error("could not store %r at release: %s", os.fsdecode(handle.node.name), exc)
            raise fuse_error(exc) from None
        finally:
            self.close(handle)

    # -- the rest of the life cycle --------------------------------------------------------

    async def truncate(self, node: Node, size: int, fh: int | None, caller: Caller) -> None:
        if node.kind in DIR_KINDS:
            raise IsADirectory("cannot truncate a directory")
        if node.kind is Kind.SCRATCH:
            assert node.scratch is not None
            self.scratch.truncate(node.scratch, size)
            return
        if node.kind is not Kind.ROLE or node.readonly:
            raise ReadOnly(f"{node.name!r} is read-only")
        handle = self.handles.files.get(fh) if fh is not None else None
        if handle is None:
            await self._truncate_role(node, size, None, caller)
            return
        if handle.failed:
            raise fail(handle.failed)
        try:
            await self._truncate_role(node, size, handle, caller)
        except (SlurpError, OSError) as exc:
            self.write_failed(handle, exc)
            raise

    async def _truncate_role(
        self, node: Node, size: int, handle: FileHandle | None, caller: Caller
    ) -> None:
        self.check_size(size)
        assert node.key is not None
        assert node.address is not None
        content = handle.content if handle is not None else node.content
        if content is None:
            # truncate(1) by path with nobody holding the file open: commit now.
            self.namespace.require_role(caller, node.key.role, node.address, "write")
            data = b""
            if size:
                ctx = await self.gateway.get(node.address, node.key.role, caller)
                data = ctx.data[:size].ljust(size, b"\0")
            saved = await self.gateway.put(node.address, node.key.role, data)
            node.info = saved.info
            if saved.stored:  # an identical save keeps the head's time
                node.written = (saved.info.version_id, time.time_ns())
            node.cached_version = None
            self.scratch.unhide(dir_key(node.address), node.key.role)
            return
        if size == 0:
            content.start_empty()
        else:
            await self.load(node, content, handle.caller if handle else caller)
            content.truncate(size)
        if handle is None:
            await self.commit(node)
        else:
            handle.wrote = True

    def check_size(self, size: int) -> None:
        limit = self.max_bytes
        if size > limit:
            raise TooLarge(f"{size} bytes is over store.max_context_bytes ({limit})")

    def _kernel_holds_head(self, node: Node, caller: Caller) -> bool:
        """Whether the page cache holds the head version of `node`, and the caller may read it.

        `cached_version` is the version the kernel was last handed (with
        ``keep_cache``) and is cleared whenever this mount changes the file; the
        view, refreshed here, says whether another process committed since.
        Access is decided (and audited) as for any read; a denial raises.
        """
        cached = node.cached_version
        if cached is None or node.key is None or node.address is None:
            return False
        self.view.refresh()
        try:
            head = self.view.stat(node.address, node.key.role)
        except NotFound:
            return False
        if head.version_id != cached:
            return False
        self.gateway.authorise_read(node.address, node.key.role, caller)
        return True

    async def load(
        self, node: Node, content: Content, caller: Caller, *, force: bool = False
    ) -> None:
        """Fill `content` from the store (once; `force` re-checks access and freshness)."""
        async with content.locked():
            journaled = self.journaled(node)
            if content.loaded and (content.dirty or not force or journaled):
                if force:  # a new opener: access is still checked (and audited)
                    assert node.key is not None
                    assert node.address is not None
                    if journaled:  # (maybe nothing stored yet)
                        self.gateway.authorise_read(node.address, node.key.role, caller)
                    else:
                        await self.gateway.get(node.address, node.key.role, caller)
                return
            assert node.key is not None
            assert node.address is not None
            try:
                ctx = await self.gateway.get(node.address, node.key.role, caller)
            except NotFound:
                if not content.loaded:
                    if force:
                        # An open of a file whose context is gone (purged by its TTL,
                        # removed elsewhere) while the kernel still held its entry.
                        raise
                    content.set(b"", None)
                return
            if content.dirty:  # written while we were decrypting: the writes win
                return
            content.set(ctx.data, ctx.info.version_id)
            node.info = ctx.info

    def behind(self, node: Node, content: Content) -> bool:
        """Whether a clean buffer holds an older version than the head: another process
        (`slurpfs put`) or a peer stored one while this file stayed open. Reads and
        writes then start from the new head, or an append would silently build on the
        old version and a reader would get fewer bytes than the size it was told."""
        if content.buffer is None or content.dirty or content.base is None:
            return False
        if self.journaled(node):
            return False  # its journaled save is newer than any head
        if node.key is None or node.address is None:
            return False  # unlinked or renamed over while open: it keeps what it held
        self.view.refresh()
        try:
            return self.view.stat(node.address, node.key.role).version_id != content.base
        except NotFound:
            return False  # deleted meanwhile: this open file keeps what it held

    async def _write_content(self, handle: FileHandle, off: int, buf: bytes) -> int:
        buffer = await self._current(handle)
        content = handle.content
        assert content is not None
        if handle.append:
            # Without the writeback cache the kernel sends an O_APPEND write at the
            # size it last saw; the end is here (another process may have committed).
            off = len(buffer)
        self.check_size(off + len(buf))
        content.write(off, buf)
        handle.wrote = True
        return len(buf)

    def write_failed(self, handle: FileHandle, exc: SlurpError | OSError) -> None:
        """A write (or truncate) through `handle` failed: it stores nothing from now on.

        Its later writes and its ``close`` fail with the same errno (a save that
        did not go through is never stored in part: a 20 MiB copy against an 8 MiB
        limit leaves the file as it was). The file's unsaved changes are dropped
        (back to its newest journaled save, with write-behind), unless another
        descriptor also changed the file: its close stores them.
        """
        handle.failed = exc.errno or errno.EIO
        handle.wrote = handle.emptied = False
        content = handle.content
        others = (h for h in self.handles.files.values() if h.node is handle.node)
        if content is not None and not any(h.owes_commit for h in others):
            if self.journaled(handle.node):  # its newest save is in the journal
                assert self.writebehind is not None
                content.set(self.writebehind.newest(content), content.base)
            else:
                content.discard()

    async def commit_own(self, handle: FileHandle, *, behind: bool = False) -> None:
        if handle.owes_commit:
            await self.commit(handle.node, behind=behind)
        handle.wrote = handle.emptied = False

    def close(self, handle: FileHandle) -> None:
        self.handles.close_file(handle.fh)
        node = handle.node
        if handle.scratch is not None:
            handle.scratch.opens -= 1
            self.scratch.maybe_release(handle.scratch)
        if node.opens == 0:
            node.content = None
        elif self._unsaved_behind_journal(node):
            assert self.writebehind is not None
            assert node.content is not None
            # Held open for its journaled save only: that save is the file until it
            # is stored; changes no close could store go, as at any last close.
            content = node.content
            content.set(self.writebehind.newest(content), content.base)
        self.inodes.maybe_purge(node)

    def _unsaved_behind_journal(self, node: Node) -> bool:
        content = node.content
        if content is None or not content.dirty or not self.journaled(node):
            return False
        return not any(h.node is node for h in self.handles.files.values())

    async def commit(self, node: Node, *, behind: bool = False) -> None:
        """Store an open role file's dirty buffer as one new version; with `behind`
        and write-behind on, journal it for the group commit instead."""
        self.busy.hold()
        wb = self.writebehind
        if wb is not None and not behind:
            await wb.drain()  # saves are stored in the order they were acknowledged
        content = node.content
        if content is None:
            return
        async with content.locked():
            if not content.dirty:
                return
            if node.kind is not Kind.ROLE or node.key is None or node.readonly:
                content.dirty = False  # removed or renamed away: writes go nowhere
                return
            address = node.address
            assert address is not None
            assert content.buffer is not None
            seq = content.seq
            if behind and wb is not None:
                wb.save(node, content, address, node.key.role)
                content.dirty = False  # (no await since `seq` was read)
                node.cached_version = None
                return
            saved = await self.gateway.put(address, node.key.role, bytes(content.buffer))
            if content.seq == seq:
                content.dirty = False
            self._saved(node, content, address, node.key.role, saved)

    def _saved(
        self, node: Node, content: Content, address: Address, role: str, saved: Saved
    ) -> None:
        info = saved.info
        content.base = info.version_id
        node.info = info
        if saved.stored:  # an identical save keeps the head's time
            node.written = (info.version_id, content.mtime_ns)
        node.cached_version = None
        self.scratch.unhide(dir_key(address), role)

    def stored(self, pending: Pending, saved: Saved) -> None:
        """The group commit stored `pending`: the bookkeeping of a commit, and the
        node is no longer held open for it."""
        node = pending.node
        pending.content.journaled -= 1
        if node.content is pending.content:
            self._saved(node, pending.content, pending.address, pending.role, saved)
        node.opens -= 1
        if node.opens == 0:
            node.content = None
        self.inodes.maybe_purge(node)

    def journaled(self, node: Node) -> bool:
        """Whether `node` has a journaled save not yet stored: its buffer is the newest."""
        return node.content is not None and node.content.journaled > 0

    async def settle(self) -> None:
        """Wait until every journaled save is a version (no-op without write-behind)."""
        if self.writebehind is not None:
            await self.writebehind.drain()

    async def commit_all(self) -> int:
        """Commit every dirty buffer (graceful shutdown). Returns how many failed."""
        failed = 0
        stuck = False
        try:
            await self.settle()
        except (SlurpError, OSError) as exc:
            assert self.writebehind is not None
            stuck = True  # the rest is journaled too, for the replay at the next mount
            log.error("%d journaled saves stay in the journal: %s", len(self.writebehind), exc)
        for handle in self.handles.dirty():
            try:
                await self.commit(handle.node, behind=stuck)
            except (SlurpError, OSError) as exc:
                failed += 1
                log.error("could not store %r at shutdown: %s", os.fsdecode(handle.node.name), exc)
        return failed
