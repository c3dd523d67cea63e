"""The pyfuse3 floor: the least a pyfuse3 file system can do per request, for comparison.

A read-write file system kept in a dict, with no encryption, no store and no access
checks, mounted with the same FUSE options and kernel cache settings as a slurpfs
mount (60 s entry and attribute timeouts, ``keep_cache``, no ``default_permissions``),
and answering the same requests: extended attributes are supported (none set), so the
kernel asks it what it asks slurpfs and gocryptfs (three per ``ls -l`` entry, one per
write).
Whatever it costs is the cost of the kernel round trip plus pyfuse3's request loop on
this machine: a bound no pyfuse3 file system can go below. The mount section runs it
as a fourth column so a ratio to gocryptfs can be read against that bound.

Run as ``python floorfs.py MOUNTPOINT``; it serves until unmounted or SIGTERM.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

TIMEOUT_S = 60.0  # as slurpfs' mount.entry_timeout / mount.attr_timeout defaults


@dataclass
class Node:
    mode: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    mtime_ns: int = field(default_factory=time.time_ns)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class FloorFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(stat.S_IFDIR | 0o755)}
        self.next_ino = pyfuse3.ROOT_INODE + 1

    # -- helpers ---------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self.nodes[ino]
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = node.mode
        a.st_nlink = 2 if node.is_dir else 1
        a.st_size = 0 if node.is_dir else len(node.data)
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT_S
        return a

    def _add(self, parent: int, name: bytes, mode: int) -> int:
        directory = self._node(parent)
        if name in directory.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        ino = self.next_ino
        self.next_ino += 1
        self.nodes[ino] = Node(mode)
        directory.children[name] = ino
        directory.mtime_ns = time.time_ns()
        return ino

    def _child(self, parent: int, name: bytes) -> int:
        ino = self._node(parent).children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return ino

    # -- the handlers ----------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._child(parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._node(inode)
        return self._attrs(inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            del node.data[attr.st_size :]
            node.data.extend(b"\0" * (attr.st_size - len(node.data)))
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        return self._attrs(inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 24
        s.f_files = s.f_ffree = s.f_favail = 1 << 24
        s.f_namemax = 255
        return s

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._add(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode)))

    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        ino = self._add(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode))
        return pyfuse3.FileInfo(fh=ino), self._attrs(ino)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        directory = self._node(parent_inode)
        ino = self._child(parent_inode, name)
        if self.nodes[ino].is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        del directory.children[name]

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        directory = self._node(parent_inode)
        ino = self._child(parent_inode, name)
        if self.nodes[ino].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del directory.children[name]

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        ino = self._child(parent_inode_old, name_old)
        target = self._node(parent_inode_new)
        replaced = target.children.get(name_new)
        if replaced is not None and self.nodes[replaced].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del self._node(parent_inode_old).children[name_old]
        target.children[name_new] = ino

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & os.O_TRUNC:
            node.data.clear()
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.nodes[fh].data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.nodes[fh]
        if off > len(node.data):
            node.data.extend(b"\0" * (off - len(node.data)))
        node.data[off : off + len(buf)] = buf
        node.mtime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._node(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self.nodes[fh].children.items())
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    # Extended attributes: supported (as in slurpfs and gocryptfs), none set. A file
    # system without getxattr would answer ENOSYS once and the kernel would stop
    # asking; one that has xattrs is asked on every `ls -l` entry (ACLs, SELinux
    # label) and every write (security.capability), so the floor is asked too.

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._node(inode)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._node(inode)
        return []


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: floorfs.py MOUNTPOINT", file=sys.stderr)
        return 2
    options = set(pyfuse3.default_options) - {"default_permissions"}
    options |= {"fsname=floorfs", "subtype=floorfs", "noatime"}
    pyfuse3.init(FloorFS(), argv[1], options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        await pyfuse3.main()  # returns on `pyfuse3.terminate()` or when unmounted
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


if __name__ == "__main__":
    sys.exit(main(sys.argv))
