"""The `pyfuse3.Operations` subclass: a thin adapter over `Tree` and `Namespace`.

Each handler translates inode numbers to nodes, calls the layer below, and
turns `Stat` into `EntryAttributes`. Every handler is decorated with `handler`,
which runs it inside `errmap` (domain errors become errno there, nowhere else):
only `FUSEError` leaves a handler, and a bug in one fails that request with
`EIO`, never the mount.

Kernel caching: entries and attributes are cached for ``mount.entry_timeout`` /
``mount.attr_timeout``, except views that change without an event (temporal
segments, status files, search results), which are never cached. ``open`` keeps
the kernel's page cache (``keep_cache``) when the version it holds is still the
one served. ``.search/`` is resolved by `slurpfs.fs.search`, which runs queries
in worker threads for the caller's roles.
When a context changes underneath (another process, replication),
`slurpfs.fs.invalidate` tells the kernel, from a task outside every handler.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as st
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyfuse3

from slurpfs.config import Config
from slurpfs.errors import AccessDenied, NotFound
from slurpfs.fs import virtual
from slurpfs.fs.access import Caller, RoleMap
from slurpfs.fs.busypoll import BusyPoll
from slurpfs.fs.errmap import (
    IsADirectory,
    NotPermitted,
    ReadOnly,
    fail,
    handler,
)
from slurpfs.fs.files import OpenFiles
from slurpfs.fs.handles import FileHandle, Gateway, HandleTable
from slurpfs.fs.inodes import DIR_KINDS, InodeTable, Kind, Node
from slurpfs.fs.namespace import Namespace
from slurpfs.fs.refused import Refusals
from slurpfs.fs.scratch import ScratchNames, ScratchStore
from slurpfs.fs.search import SearchTree
from slurpfs.fs.tree import XATTR_PREFIX, Stat, Tree
from slurpfs.fs.virtual import PRIVATE_STATUS, FsStatistics, VirtualFiles
from slurpfs.health import Health
from slurpfs.metrics import Metrics
from slurpfs.model import ContextStore, VersionInfo, data_paths
from slurpfs.ucxl import Temporal

log = logging.getLogger("slurpfs.fs")

_BLOCK = 4096
_SEARCH_KINDS = frozenset({Kind.SEARCH, Kind.QUERY, Kind.QUERY_FILE, Kind.QUERY_LINK})
_KEPT_KINDS = frozenset({Kind.DIR, Kind.ROLE})  # attributes kept on the node (`tree_attrs`)
_HISTORY_KINDS = frozenset({Kind.HISTORY, Kind.HISTORY_ROLE})  # list stored versions only


def _stored_versions_only(parent: Node, name: bytes) -> bool:
    """Whether the lookup of `name` in `parent` answers from stored versions only:
    history, and temporal views (a segment such as ``~~1`` or a time, and everything
    under one), which count versions, not saves still in the write-behind journal."""
    if parent.kind in _HISTORY_KINDS:
        return True
    address = parent.address
    if address is None:
        return False
    if address.temporal is not None:
        return True
    return not address.path and Temporal.is_temporal(os.fsdecode(name))


class Operations(pyfuse3.Operations):
    """The slurpfs request handlers (see module docstring)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        model: ContextStore,
        config: Config,
        *,
        owner_uid: int,
        owner_gid: int,
        virtual: VirtualFiles | None = None,
        root_xattrs: Mapping[bytes, bytes] | None = None,
        status_info: Mapping[str, object] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        # The daemon's registry (a registry of its own without one, for tests): every
        # handler's latency and failures (`handler`), the model's, the statistics.
        self.metrics = metrics or Metrics(process=False)
        self.latency = self.metrics.fuse
        self.errors = self.metrics.errors
        model.instrument(self.metrics)
        self.scratch = ScratchStore(config.mount.scratch_bytes)
        self.inodes = InodeTable(on_purge=self._purged)
        self.virtual = virtual or VirtualFiles()
        self.tree = Tree(
            model, self.inodes, self.scratch, self.virtual, owner_uid=owner_uid, owner_gid=owner_gid
        )
        self.search = SearchTree(self.inodes, owner_uid=owner_uid, owner_gid=owner_gid)
        self.search.latency = self.metrics.search
        self.view = self.tree.view
        self.gateway = Gateway(model, self.view)
        self.refusals = Refusals()
        self.namespace = Namespace(
            self.tree,
            self.gateway,
            lambda node: self.files.commit(node),
            refusals=self.refusals,
            scratch_names=ScratchNames(config.mount.scratch_names),
        )
        self.handles = HandleTable()
        self.roles = RoleMap(config.roles, model.held_roles(), owner_uid)
        self.owner_uid = owner_uid
        self.root_xattrs = dict(root_xattrs or {})
        self.invalidations = 0
        # Requests on the tree (not on .search/): the indexer leaves the
        # interpreter to them while this keeps moving.
        self.activity = 0
        # Keeps the loop polling between the requests of a burst (the daemon runs it).
        self.busy = BusyPoll(config.mount.busy_poll)
        self.files = OpenFiles(
            handles=self.handles,
            inodes=self.inodes,
            scratch=self.scratch,
            gateway=self.gateway,
            view=self.view,
            namespace=self.namespace,
            busy=self.busy,
            max_bytes=config.store.max_context_bytes,
        )
        self.stopping = False
        # What .slurp/status says first (pid, mountpoint, the HTTP address): the daemon's.
        self.status_info: dict[str, object] = dict(status_info or {})
        # Counters of other components for .slurp/status and metrics (the daemon adds its own).
        self.stat_sources: list[Callable[[], Mapping[str, Any]]] = [self.search.status]
        self.health = Health(model, search=self.search.check, stopping=lambda: self.stopping)
        self._register_status_files()
        # Replaceable for tests that call readdir without a kernel.
        self.readdir_reply = pyfuse3.readdir_reply

    # -- helpers ---------------------------------------------------------------------

    def _purged(self, node: Node) -> None:
        sf = node.scratch
        if sf is not None:
            sf.referenced = False
            self.scratch.maybe_release(sf)

    def caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        return self.roles.caller(ctx.uid, ctx.gid, ctx.pid)

    def node(self, ino: int) -> Node:
        self.busy.poke()
        node = self.inodes.get(ino)
        if node is None:
            raise fail(errno.ESTALE)
        if node.kind not in _SEARCH_KINDS:
            self.activity += 1
        return node

    def attrs(self, node: Node, s: Stat) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        mount = self.config.mount
        a.entry_timeout = mount.entry_timeout if s.cacheable else 0
        a.attr_timeout = mount.attr_timeout if s.cacheable else 0
        a.st_mode = s.mode
        a.st_nlink = s.nlink
        a.st_uid = s.uid
        a.st_gid = s.gid
        a.st_rdev = 0
        a.st_size = s.size
        a.st_blksize = _BLOCK
        a.st_blocks = (s.size + 511) // 512
        a.st_atime_ns = s.mtime_ns
        a.st_mtime_ns = s.mtime_ns
        a.st_ctime_ns = s.ctime_ns
        return a

    def tree_attrs(
        self, node: Node, known: VersionInfo | None = None, *, uid: int = 0
    ) -> pyfuse3.EntryAttributes:
        """`attrs` of a directory or role file, kept on the node while the view stands.

        A walk asks for the same attributes over and over (readdirplus, getattr).
        They change only with the store (`StoreView.current`: until a change at
        its address) or while the file is open (its buffer is then what counts). `uid` is the caller's (a
        per-user status file is sized for them).
        """
        epoch = self.view.epoch
        content = node.content
        # Open but not yet loaded or written (a read served from the page cache):
        # the attributes are still the stored version's.
        stored = content is None or (content.buffer is None and not content.dirty)
        kept, address = node.attrs, node.address
        if (
            kept is not None
            and stored
            and address is not None
            and self.view.current(address.key, kept[0])
        ):
            return kept[1]
        s = self.tree.stat(node, known, uid=uid)
        attrs = self.attrs(node, s)
        if s.cacheable and node.kind in _KEPT_KINDS and stored and node.key is not None:
            node.attrs = (epoch, attrs)
        return attrs

    def _entry(self, node: Node, s: Stat | None = None, *, uid: int = 0) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands `node` to the kernel; counts the lookup."""
        try:
            attrs = self.attrs(node, s) if s is not None else self.tree_attrs(node, uid=uid)
        except BaseException:
            self.inodes.maybe_purge(node)
            raise
        self.inodes.ref(node)
        return attrs

    # -- lookups and attributes --------------------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.node(parent_inode)
        if self.files.writebehind is not None and _stored_versions_only(parent, name):
            await self.files.settle()  # journaled saves become versions first
        self.view.refresh()
        if self.search.resolves(parent, name):
            node, s = await self.search.child(parent, name, self.caller(ctx))
            return self._entry(node, s)
        return self._entry(self.tree.child(parent, name), uid=ctx.uid)

    @handler
    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    @handler
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.view.refresh()
        node = self.node(inode)
        if self.search.owns(node):
            return self.attrs(node, await self.search.stat(node, self.caller(ctx)))
        return self.tree_attrs(node, uid=ctx.uid)

    @handler
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self.view.refresh()
        node = self.node(inode)
        caller = self.caller(ctx)
        if self.search.owns(node):
            raise ReadOnly("search results are read-only")
        sf = node.scratch
        if sf is not None:
            self.namespace.require_scratch_owner(caller, sf, "change")
            if fields.update_uid and attr.st_uid != sf.uid and caller.uid != 0:
                raise NotPermitted("only root gives a scratch file away")
        if fields.update_size:
            await self.files.truncate(node, attr.st_size, fh, caller)
        if sf is not None:
            if fields.update_mode:
                sf.mode = st.S_IFMT(sf.mode) | (attr.st_mode & 0o7777)
            if fields.update_uid:
                sf.uid = attr.st_uid
            if fields.update_gid:
                sf.gid = attr.st_gid
            if fields.update_mtime:
                sf.mtime_ns = attr.st_mtime_ns
        # Mode, owner and times of stored entries come from the store: accepted, not kept.
        return self.attrs(node, self.tree.stat(node, uid=ctx.uid))

    @handler
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.node(inode)
        if self.search.owns(node):
            return await self.search.readlink(node, self.caller(ctx))
        if node.scratch is None or node.scratch.target is None:
            raise fail(errno.EINVAL)
        return node.scratch.target

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.config.data_dir)
        out = pyfuse3.StatvfsData()
        out.f_bsize = sv.f_bsize
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        out.f_namemax = 255
        return out

    @handler
    async def access(self, inode: pyfuse3.InodeT, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        node = self.node(inode)
        caller = self.caller(ctx)
        if node.kind in DIR_KINDS:
            if mode & os.W_OK:
                writable = node.kind in (Kind.UCXL, Kind.DIR) and not node.readonly
                return writable and bool(caller.roles)
            return True
        if mode & os.X_OK:
            return False
        if node.kind is Kind.SCRATCH:
            assert node.scratch is not None
            return self.namespace.owns_scratch(caller, node.scratch)
        if node.kind is Kind.VIRTUAL:
            return not mode & os.W_OK and self._may_read_status(node, caller)
        if self.search.owns(node):
            return not mode & os.W_OK
        if mode & os.W_OK and node.readonly:
            return False
        if mode & (os.R_OK | os.W_OK):
            role = node.info.role if node.info is not None else (node.key.role if node.key else "")
            return role in self.model.readable_roles(caller.roles)
        return True

    # -- namespace -----------------------------------------------------------------------

    @handler
    async def mkdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.busy.hold()
        self.view.refresh()
        node = self.namespace.mkdir(self.node(parent_inode), name, self.caller(ctx))
        return self._entry(node)

    @handler
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.files.settle()  # journaled saves first (`slurpfs.fs.writebehind`)
        self.view.refresh()
        self.namespace.rmdir(self.node(parent_inode), name, self.caller(ctx))

    @handler
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.files.settle()
        self.view.refresh()
        await self.namespace.unlink(self.node(parent_inode), name, self.caller(ctx))

    @handler
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.files.settle()
        self.view.refresh()
        await self.namespace.rename(
            self.node(parent_inode_old),
            name_old,
            self.node(parent_inode_new),
            name_new,
            flags,
            self.caller(ctx),
        )

    @handler
    async def symlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.view.refresh()
        node = self.namespace.symlink(self.node(parent_inode), name, target, self.caller(ctx))
        return self._entry(node)

    @handler
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        parent = self.node(new_parent_inode)
        with self.namespace.watch(self.caller(ctx), "link", parent, new_name):
            raise NotPermitted(
                "hard links are not supported: each name in an address directory is"
                " a role file or an editor's temporary file; copy the file instead"
            )

    @handler
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self.view.refresh()
        if not st.S_ISREG(mode):
            raise NotPermitted("only regular files can be created here")
        node = self.namespace.create(
            self.node(parent_inode), name, mode, self.caller(ctx), exclusive=True
        )
        if node.content is not None:  # a role file: nothing will close it, commit now
            node.opens += 1
            try:
                await self.files.commit(node)
            finally:
                node.opens -= 1
                node.content = None
        return self._entry(node)

    @handler
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.busy.hold()
        self.view.refresh()
        caller = self.caller(ctx)
        node = self.namespace.create(
            self.node(parent_inode), name, mode, caller, exclusive=bool(flags & os.O_EXCL)
        )
        handle = self.handles.open_file(node, caller, readable=True, writable=True)
        handle.append = bool(flags & os.O_APPEND)
        self.files.created(node, handle)
        return pyfuse3.FileInfo(fh=handle.fh), self._entry(node)

    # -- files ---------------------------------------------------------------------------

    @handler
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        # The view is refreshed only where open trusts it (`OpenFiles._kernel_holds_head`);
        # otherwise what open serves comes from the model itself (`get`).
        node = self.node(inode)
        caller = self.caller(ctx)
        mode = flags & os.O_ACCMODE
        readable = mode in (os.O_RDONLY, os.O_RDWR)
        writable = mode in (os.O_WRONLY, os.O_RDWR)
        if node.kind in DIR_KINDS:
            raise IsADirectory(f"{node.name!r} is a directory")
        if writable and node.readonly:
            raise ReadOnly(f"{node.name!r} is read-only")
        handle = self.handles.open_file(node, caller, readable=readable, writable=writable)
        handle.append = writable and bool(flags & os.O_APPEND)
        try:
            with self.refusals.watch(caller.uid, "open", lambda: self.namespace.path(node)):
                return await self._open(node, handle, caller, truncate=bool(flags & os.O_TRUNC))
        except BaseException:
            self.files.close(handle)
            raise

    async def _open(
        self, node: Node, handle: FileHandle, caller: Caller, *, truncate: bool
    ) -> pyfuse3.FileInfo:
        fi = pyfuse3.FileInfo(fh=handle.fh)
        if node.kind is Kind.VIRTUAL:
            assert node.key is not None
            if not self._may_read_status(node, caller):
                raise AccessDenied(f"only the mount's owner reads .slurp/{node.key.extra}")
            # The rendering getattr just sized (if recent), so size and bytes agree.
            handle.snapshot = self.virtual.render(node.key.extra, uid=caller.uid)
            fi.direct_io = True
            return fi
        if self.search.owns(node):
            # Per caller and short-lived: never from (or into) the kernel's page cache.
            handle.snapshot = await self.search.read(node, caller)
            fi.direct_io = True
            return fi
        return await self.files.open(node, handle, caller, fi, truncate=truncate)

    def _may_read_status(self, node: Node, caller: Caller) -> bool:
        """The audit trail names every user's accesses: for the mount's owner (and root)."""
        name = node.key.extra if node.key is not None else ""
        return name not in PRIVATE_STATUS or caller.uid in (0, self.owner_uid)

    @handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        self.busy.poke()
        return await self.files.read(self.handles.file(fh), off, size)

    @handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        self.busy.hold()
        return await self.files.write(self.handles.file(fh), off, buf)

    @handler
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        """``close`` of a descriptor: commit what this handle wrote (`OpenFiles.flush`)."""
        self.busy.poke()
        await self.files.flush(self.handles.file(fh))

    @handler
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.files.fsync(self.handles.file(fh))

    @handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.busy.poke()
        handle = self.handles.files.get(fh)
        if handle is not None:
            await self.files.release(handle)

    # -- directories ------------------------------------------------------------------

    @handler
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = self.node(inode)
        if node.kind not in DIR_KINDS:
            raise fail(errno.ENOTDIR)
        if node.kind in _HISTORY_KINDS:
            await self.files.settle()
        return self.handles.open_dir(node, self.caller(ctx)).fh

    @handler
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        self.busy.poke()
        handle = self.handles.dir(fh)
        parent = handle.node
        if start_id == 0 or handle.entries is None:
            # Later calls continue the listing (and attributes) this one reads.
            self.view.refresh()
            if parent.kind is Kind.QUERY:
                handle.entries = await self.search.entries(parent, handle.caller)
            else:
                handle.entries = self.tree.entries(parent)
        for i in range(start_id, len(handle.entries)):
            entry = handle.entries[i]
            node = self.tree.bind_entry(parent, entry)
            try:
                if entry.stat is not None:
                    attrs = self.attrs(node, entry.stat)
                else:
                    attrs = self.tree_attrs(node, entry.info, uid=handle.caller.uid)
            except NotFound:
                self.inodes.maybe_purge(node)
                continue
            if not self.readdir_reply(token, entry.name, attrs, i + 1):
                self.inodes.maybe_purge(node)
                return
            self.inodes.ref(node)

    @handler
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self.handles.close_dir(fh)
        self.inodes.maybe_purge(handle.node)

    @handler
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        # As a file's: journaled saves become versions first (the group commit).
        await self.files.settle()
        await self.gateway.sync()

    # -- extended attributes ----------------------------------------------------------

    @handler
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if not name.startswith(XATTR_PREFIX):
            # ls -l asks every file for ACLs, the kernel for security.capability on writes.
            raise fail(pyfuse3.ENOATTR)
        value = self.tree.xattrs(self.node(inode), self.root_xattrs).get(name)
        if value is None:
            raise fail(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[bytes]:
        return sorted(self.tree.xattrs(self.node(inode), self.root_xattrs))

    @handler
    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._own_xattr(inode, name)

    @handler
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._own_xattr(inode, name)

    def _own_xattr(self, inode: int, name: bytes) -> None:
        """`user.slurp.*` describes the stored version: `cp --preserve=xattr` and
        ``rsync -aX`` out of another mount set it, and are answered with success and
        nothing kept, like mode and times. No other attribute can be stored."""
        if not name.startswith(XATTR_PREFIX):
            raise fail(errno.ENOTSUP)
        self.node(inode)

    # -- state -------------------------------------------------------------------------

    def statistics(self) -> FsStatistics:
        return FsStatistics(
            inodes=len(self.inodes),
            open_files=len(self.handles.files),
            open_dirs=len(self.handles.dirs),
            scratch_files=self.scratch.count(),
            scratch_bytes=self.scratch.used,
            scratch_limit=self.scratch.limit,
            commits=self.gateway.commits,
            commit_failures=self.gateway.commit_failures,
            syncs=self.gateway.syncs,
            invalidations=self.invalidations,
            view_hits=self.view.hits,
            view_misses=self.view.misses,
            busy_poll_windows=self.busy.windows,
        )

    def _register_status_files(self) -> None:
        virtual.register_defaults(
            self.virtual,
            self.model,
            data_paths(self.config.data_dir)["audit"],
            info=lambda: self.status_info,
            fs_stats=self.statistics,
            checks=self.health.checks,
            metrics=self.metrics,
            extra_stats=self._extra_stats,
        )
        self.virtual.register_per_user("refused", self.refusals.render)

    def _extra_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for source in self.stat_sources:
            out.update(source())
        return out
