"""The path layout (docs/ARCHITECTURE.md, "Path layout"): names to nodes, listings, attributes.

This is the filesystem's view of the context model, without FUSE types::

    /                       .search/  .slurp/  ucxl/
    .search/<query>/        query results (`slurpfs.fs.search`; only the directory's
                            attributes are computed here)
    ucxl/<authority>/       address directories, nested by path component
    <dir>/<role>            the latest version for a reader role
    <dir>/.history/<role>/<n>       version n, oldest first (resolved, not listed)
    <dir>/<role>.conflict-<id>      a losing concurrent version
    ucxl/<authority>/<temporal>/... read-only time travel (resolved, not listed)
    <dir>/<anything else>   a scratch file (memory only)

`Tree` resolves a name in a directory node to a node (binding it in the inode
table with lookup count 0: the caller counts the kernel's reference), lists a
directory, and computes `Stat` for a node. Namespace changes (mkdir, unlink,
rename, ...) live in `slurpfs.fs.namespace`.
"""

from __future__ import annotations

import re
import stat as st
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from slurpfs.errors import InvalidAddress, NotFound
from slurpfs.fs.errmap import NameTooLong, NotADirectory
from slurpfs.fs.inodes import DIR_KINDS, InodeTable, Key, Kind, Node
from slurpfs.fs.scratch import DirKey, ScratchFile, ScratchStore
from slurpfs.fs.view import StoreView
from slurpfs.fs.virtual import PRIVATE_STATUS, VirtualFiles
from slurpfs.model import CONFLICT_NAME, ContextStore, VersionInfo
from slurpfs.ucxl import Address, Authority, Temporal

UCXL = "ucxl"
SLURP = ".slurp"
SEARCH = ".search"
HISTORY = ".history"
NAME_MAX = 255
MAX_STORED = 1 << 16  # directory listings kept (`Tree._stored_entries`)
XATTR_PREFIX = b"user.slurp."


@dataclass(frozen=True, slots=True)
class Stat:
    """Attributes of a node, independent of FUSE types."""

    mode: int
    size: int
    nlink: int
    mtime_ns: int
    ctime_ns: int
    uid: int
    gid: int
    # False for views that change without any event to invalidate them by
    # (temporal segments, status files): the kernel must ask every time.
    cacheable: bool = True


@dataclass(frozen=True, slots=True)
class StoredEntries:
    """What a directory listing takes from the store (see `Tree._stored_entries`)."""

    dirs: tuple[Entry, ...]
    roles: tuple[tuple[str, Entry], ...]
    conflicts: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """One readdir entry, bound to a node only when the kernel accepts it."""

    name: bytes
    key: Key
    address: Address | None = None
    info: VersionInfo | None = None
    scratch: ScratchFile | None = None
    stat: Stat | None = None  # attributes known when listing (search results)


def check_length(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"a name is at most {NAME_MAX} bytes, not {len(name)}")


def decode(name: bytes) -> str | None:
    """A name as text, or None if it is not UTF-8 (then it can only be a scratch file)."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return None


def dir_key(address: Address) -> DirKey:
    """Where scratch files of an address directory are kept (temporal views have none)."""
    return address.without_temporal().to_mount_parts()


def conflict_name(role: str, info: VersionInfo) -> str:
    return f"{role}.conflict-{info.short_id}"


class Tree:
    """Resolution, listing and attributes over one `ContextStore`."""

    def __init__(
        self,
        model: ContextStore,
        inodes: InodeTable,
        scratch: ScratchStore,
        virtual: VirtualFiles,
        *,
        owner_uid: int,
        owner_gid: int,
    ) -> None:
        self.model = model
        # Heads, listings and directories are read through the memo; history,
        # conflicts and temporal views straight from the model.
        self.view = StoreView(model)
        self.inodes = inodes
        self.scratch = scratch
        self.virtual = virtual
        self.roles = frozenset(model.role_names)
        self.sorted_roles = tuple(sorted(self.roles))
        self._stored: dict[str, tuple[int, StoredEntries]] = {}  # with the view's epoch
        self.uid = owner_uid
        self.gid = owner_gid
        self.started_ns = time.time_ns()

    # -- resolution ------------------------------------------------------------

    def child(self, parent: Node, name: bytes) -> Node:
        """The node `name` names in directory `parent` (NotFound if nothing does)."""
        if parent.kind not in DIR_KINDS:
            raise NotADirectory(f"{parent.name!r} is not a directory")
        check_length(name)
        if name == b".":
            return parent
        if name == b"..":
            return self.inodes.get(parent.parent) or self.inodes.root
        text = decode(name)
        if parent.kind is Kind.ROOT:
            kinds = {UCXL: Kind.UCXL, SLURP: Kind.SLURP, SEARCH: Kind.SEARCH}
            if text not in kinds:
                raise NotFound(f"no {name!r} at the root")
            return self.inodes.bind(Key(kinds[text]), parent.ino, name)
        if parent.kind is Kind.SLURP:
            if text is None or text not in self.virtual:
                raise NotFound(f"no status file {name!r}")
            return self.inodes.bind(Key(Kind.VIRTUAL, extra=text), parent.ino, name)
        if parent.kind in (Kind.SEARCH, Kind.QUERY):
            raise NotFound("queries are resolved by slurpfs.fs.search")
        if parent.kind is Kind.UCXL:
            return self._authority(parent, name, text)
        address = parent.address
        assert address is not None
        if parent.kind is Kind.DIR:
            return self._dir_child(parent, address, name, text)
        if parent.kind is Kind.HISTORY:
            if text not in self.roles or not self.model.history(address, text):
                raise NotFound(f"no history for {name!r}")
            key = Key(Kind.HISTORY_ROLE, address.to_mount_parts(), text)
            return self.inodes.bind(key, parent.ino, name, address)
        # HISTORY_ROLE: <n>
        role = parent.key.role if parent.key is not None else ""
        if text is None or not re.fullmatch(r"[1-9][0-9]{0,9}", text):
            raise NotFound(f"no version {name!r}")
        versions = self.model.history(address, role)
        n = int(text)
        if n > len(versions):
            raise NotFound(f"{role} has {len(versions)} versions")
        node = self.inodes.bind(
            Key(Kind.HISTORY_FILE, address.to_mount_parts(), role, text), parent.ino, name, address
        )
        node.info = versions[n - 1]
        return node

    def _authority(self, parent: Node, name: bytes, text: str | None) -> Node:
        if text is None:
            raise NotFound(f"no authority {name!r}")
        try:
            address = Address(Authority.parse(text))
        except InvalidAddress:
            raise NotFound(f"no authority {text!r}") from None
        if not self.view.is_dir(address):
            raise NotFound(f"no authority {text!r}")
        return self.inodes.bind(Key(Kind.DIR, address.to_mount_parts()), parent.ino, name, address)

    def _dir_child(self, parent: Node, address: Address, name: bytes, text: str | None) -> Node:
        temporal = address.temporal is not None
        if text in self.roles:
            assert text is not None
            return self.role(parent, address, text)
        if not temporal:
            sf = self.scratch.get(dir_key(address), name)
            if sf is not None:
                return self.scratch_node(parent, name, sf)
        if text is None:
            raise NotFound(f"no {name!r}")
        if text == HISTORY and not temporal:
            key = Key(Kind.HISTORY, address.to_mount_parts())
            return self.inodes.bind(key, parent.ino, name, address)
        match = CONFLICT_NAME.fullmatch(text)
        if match is not None and not temporal and match["role"] in self.roles:
            for info in self.model.conflicts(address, match["role"]):
                if info.short_id == match["id"]:
                    key = Key(Kind.CONFLICT, address.to_mount_parts(), match["role"], info.short_id)
                    node = self.inodes.bind(key, parent.ino, name, address)
                    node.info = info
                    return node
            raise NotFound(f"no conflict {text!r}")
        if not address.path and not temporal and Temporal.is_temporal(text):
            view = address.with_temporal(Temporal.parse(text))
            return self.inodes.bind(Key(Kind.DIR, view.to_mount_parts()), parent.ino, name, view)
        try:
            child = address.child(text)
        except InvalidAddress:
            raise NotFound(f"no {text!r}") from None
        if not self.view.is_dir(child):
            raise NotFound(f"no directory {child}")
        return self.inodes.bind(Key(Kind.DIR, child.to_mount_parts()), parent.ino, name, child)

    def role(self, parent: Node, address: Address, role: str) -> Node:
        """The role file `role` in directory `address` (NotFound unless it exists)."""
        key = Key(Kind.ROLE, address.to_mount_parts(), role)
        bound = self.inodes.find(key)
        if bound is not None and bound.content is not None:
            return bound  # open (perhaps just created, not committed yet)
        if address.temporal is None and self.scratch.is_hidden(dir_key(address), role):
            raise NotFound(f"{role} was renamed away; it returns with its next version")
        info = self.view.stat(address, role)
        node = self.inodes.bind(key, parent.ino, role.encode(), address)
        node.info = info
        return node

    def scratch_node(self, parent: Node, name: bytes, sf: ScratchFile) -> Node:
        node = self.inodes.bind(Key(Kind.SCRATCH, extra=str(sf.serial)), parent.ino, name)
        node.scratch = sf
        sf.referenced = True
        return node

    def bind_entry(self, parent: Node, entry: Entry) -> Node:
        """Bind a readdir entry's node (when the kernel accepts the entry)."""
        if entry.scratch is not None:
            return self.scratch_node(parent, entry.name, entry.scratch)
        node = self.inodes.bind(entry.key, parent.ino, entry.name, entry.address)
        if entry.info is not None and node.content is None:
            node.info = entry.info
        return node

    # -- listing ---------------------------------------------------------------

    def entries(self, node: Node) -> list[Entry]:
        """What readdir shows. Temporal segments and ``.history`` are resolved, not listed."""
        if node.kind is Kind.ROOT:
            return [Entry(n.encode(), Key(k)) for n, k in self._top()]
        if node.kind is Kind.SLURP:
            return [Entry(n.encode(), Key(Kind.VIRTUAL, extra=n)) for n in self.virtual.names()]
        if node.kind is Kind.SEARCH:
            return []
        if node.kind is Kind.UCXL:
            out = []
            for text in self.view.list_dir(None).dirs:
                authority = Address(Authority.parse(text))
                key = Key(Kind.DIR, authority.to_mount_parts())
                out.append(Entry(text.encode(), key, authority))
            return out
        address = node.address
        assert address is not None
        if node.kind is Kind.DIR:
            return self._dir_entries(node, address)
        if node.kind is Kind.HISTORY:
            parts = address.to_mount_parts()
            return [
                Entry(role.encode(), Key(Kind.HISTORY_ROLE, parts, role), address)
                for role in self._roles_with_history(address)
            ]
        if node.kind is Kind.HISTORY_ROLE:
            role = node.key.role if node.key is not None else ""
            parts = address.to_mount_parts()
            return [
                Entry(str(n).encode(), Key(Kind.HISTORY_FILE, parts, role, str(n)), address, info)
                for n, info in enumerate(self.model.history(address, role), 1)
            ]
        raise NotADirectory(f"{node.name!r} is not a directory")

    @staticmethod
    def _top() -> Iterable[tuple[str, Kind]]:
        return ((SEARCH, Kind.SEARCH), (SLURP, Kind.SLURP), (UCXL, Kind.UCXL))

    def _dir_entries(self, node: Node, address: Address) -> list[Entry]:
        stored = self._stored_entries(address)
        out = list(stored.dirs)
        if address.temporal is not None:
            out.extend(entry for _, entry in stored.roles)
            return out
        parts = address.to_mount_parts()
        where = dir_key(address)
        shown: set[str] = set()
        for role, entry in stored.roles:
            if self.scratch.is_hidden(where, role):
                bound = self.inodes.find(Key(Kind.ROLE, parts, role))
                if bound is None or bound.content is None:
                    continue
            shown.add(role)
            out.append(entry)
        for role in self.sorted_roles:
            if role in shown:
                continue
            bound = self.inodes.find(Key(Kind.ROLE, parts, role))
            if bound is not None and bound.content is not None:  # created, not committed yet
                out.append(Entry(role.encode(), Key(Kind.ROLE, parts, role), address))
        out.extend(stored.conflicts)
        for raw, sf in self.scratch.names(where):
            out.append(Entry(raw, Key(Kind.SCRATCH, extra=str(sf.serial)), scratch=sf))
        return out

    def _stored_entries(self, address: Address) -> StoredEntries:
        """The part of a listing that comes from the store, kept while the view stands."""
        epoch = self.view.epoch
        if len(self._stored) >= MAX_STORED:
            self._stored.clear()
        key = str(address)  # temporal views list differently
        kept = self._stored.get(key)
        if kept is not None and self.view.current(address.key, kept[0]):
            return kept[1]
        listing = self.view.list_dir(address)
        dirs = []
        for name in listing.dirs:
            child = address.child(name)
            dirs.append(Entry(name.encode(), Key(Kind.DIR, child.to_mount_parts()), child))
        parts = address.to_mount_parts()
        roles = []
        # Under a temporal segment every role is tried: the view may hold a version
        # of a role whose latest is deleted.
        candidates = self.sorted_roles if address.temporal is not None else listing.roles
        for role in candidates:
            try:
                info = self.view.stat(address, role)
            except NotFound:
                continue
            roles.append((role, Entry(role.encode(), Key(Kind.ROLE, parts, role), address, info)))
        conflicts = (
            ()
            if address.temporal is not None
            else tuple(
                Entry(
                    conflict_name(role, info).encode(),
                    Key(Kind.CONFLICT, parts, role, info.short_id),
                    address,
                    info,
                )
                for role, info in listing.conflicts
            )
        )
        stored = StoredEntries(tuple(dirs), tuple(roles), conflicts)
        self._stored[key] = (epoch, stored)
        return stored

    def _roles_with_history(self, address: Address) -> list[str]:
        return [r for r in self.sorted_roles if self.model.history(address, r)]

    # -- attributes --------------------------------------------------------------

    def stat(self, node: Node, known: VersionInfo | None = None, *, uid: int = 0) -> Stat:
        """Attributes of `node` now (NotFound if what it names is gone).

        `known` is the version a listing just read, saving a second store lookup;
        `uid` is the caller's (a per-user status file has its size for them).
        """
        kind = node.kind
        if kind in DIR_KINDS:
            return self._dir_stat(node)
        if kind is Kind.VIRTUAL:
            name = node.key.extra if node.key is not None else ""
            size = len(self.virtual.render(name, uid=uid)) if name in self.virtual else 0
            now = time.time_ns()
            perm = 0o400 if name in PRIVATE_STATUS else 0o444
            return self._file(perm, size, now, cacheable=False)
        if kind is Kind.SCRATCH:
            sf = node.scratch
            assert sf is not None
            links = 1 if sf.linked else 0  # unlinked while open: fstat says 0, as POSIX does
            return Stat(sf.mode, sf.size, links, sf.mtime_ns, sf.ctime_ns, sf.uid, sf.gid)
        if kind is Kind.ROLE:
            return self._role_stat(node, known)
        # HISTORY_FILE, CONFLICT: immutable versions
        info = node.info
        if info is None:
            raise NotFound(f"{node.name!r} is gone")
        return self._file(0o444, info.size, _ns(info.mtime))

    def _role_stat(self, node: Node, known: VersionInfo | None) -> Stat:
        content = node.content
        buffer = content.buffer if content is not None else None
        if node.detached and content is not None and buffer is not None:
            # Unlinked (or renamed over) while open: fstat still works and says so.
            return replace(self._file(0o644, len(buffer), content.mtime_ns), nlink=0)
        if content is not None and buffer is not None and (content.dirty or content.journaled):
            # Not cached by the kernel: a save of the head's very bytes stores nothing
            # and the file keeps the head's time, which the next getattr must see.
            return self._file(0o644, len(buffer), content.mtime_ns, cacheable=False)
        address = node.address
        if known is not None and node.key is not None and content is None:
            node.info = info = known
        elif node.key is None or address is None:
            if node.info is None:
                raise NotFound(f"{node.name!r} is gone")
            info = node.info
        else:
            try:
                info = self.view.stat(address, node.key.role)
            except NotFound:
                if content is not None and buffer is not None:
                    return self._file(0o644, len(buffer), content.mtime_ns)
                raise
            node.info = info
        temporal = address is not None and address.temporal is not None
        mode = 0o444 if temporal else 0o644
        mtime = _ns(info.mtime)
        if node.written is not None and node.written[0] == info.version_id:
            mtime = node.written[1]
        return self._file(mode, info.size, mtime, cacheable=not temporal)

    def _file(self, perm: int, size: int, mtime_ns: int, *, cacheable: bool = True) -> Stat:
        return Stat(st.S_IFREG | perm, size, 1, mtime_ns, mtime_ns, self.uid, self.gid, cacheable)

    def _dir_stat(self, node: Node) -> Stat:
        kind = node.kind
        subdirs = 0
        writable = kind in (Kind.UCXL, Kind.DIR)
        cacheable = True
        if kind is Kind.ROOT:
            subdirs = 3
        elif kind is Kind.UCXL:
            subdirs = len(self.view.list_dir(None).dirs)
        elif kind is Kind.DIR:
            assert node.address is not None
            subdirs = len(self.view.list_dir(node.address).dirs)
            if node.address.temporal is not None:
                writable, cacheable = False, False
        elif kind is Kind.HISTORY:
            assert node.address is not None
            subdirs = len(self._roles_with_history(node.address))
        elif kind is Kind.QUERY:
            cacheable = False  # its content changes with every commit and every caller
        perm = 0o755 if writable else 0o555
        t = self.started_ns
        return Stat(st.S_IFDIR | perm, 0, 2 + subdirs, t, t, self.uid, self.gid, cacheable)

    # -- extended attributes -------------------------------------------------------

    def xattrs(self, node: Node, root: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """``user.slurp.*`` metadata, read without decrypting anything."""
        if node.kind is Kind.ROOT:
            return dict(root)
        if node.kind is Kind.DIR and node.address is not None:
            return {XATTR_PREFIX + b"address": str(node.address).encode()}
        if node.kind not in (Kind.ROLE, Kind.HISTORY_FILE, Kind.CONFLICT):
            return {}
        info = node.info
        if node.kind is Kind.ROLE and node.key is not None and node.address is not None:
            try:
                info = node.info = self.model.stat(node.address, node.key.role)
            except NotFound:
                return {}
        if info is None:
            return {}
        return {
            XATTR_PREFIX + b"address": f"ucxl://{info.address}".encode(),
            XATTR_PREFIX + b"version": info.version_id.hex().encode(),
            XATTR_PREFIX + b"author": info.author.hex().encode(),
            XATTR_PREFIX + b"hlc": str(info.hlc).encode(),
        }


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)
