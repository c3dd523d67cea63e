"""The inode table: one node per entry the kernel knows, with its lookup count.

Rules (pyfuse3's lookup-count contract):

- Every reply that hands the kernel an entry (lookup, create, mkdir, mknod,
  symlink, and each accepted readdirplus entry) adds one to the node's lookup
  count (`InodeTable.ref`); `forget` subtracts. Both happen without an
  ``await`` between deciding on the node and counting, so concurrent handlers on
  the trio loop never see a half-updated table.
- A node is purged when its lookup count and its open-handle count are both
  zero. `forget_all` ends every node at unmount.
- Inode numbers derive from a hash of the node's *key* (what the entry is: kind,
  mount path, role, version), so they are stable for the whole mount and even
  across mounts; a collision with a live node of another key probes onward.
- A node's key can change: a rename moves the kernel's dentry, so the moved node
  takes the key of what it now is (`rekey`); a node whose entry is gone (unlink,
  replaced by a rename) is *detached*: the kernel may still use it until it
  forgets it, but no name resolves to it any more.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import pyfuse3

from slurpfs.store import VersionRecord as VersionInfo
from slurpfs.ucxl import Address

if TYPE_CHECKING:
    from slurpfs.fs.handles import Content
    from slurpfs.fs.scratch import ScratchFile

ROOT_INODE: int = pyfuse3.ROOT_INODE
_INO_MASK = (1 << 63) - 1
_FIRST_INO = ROOT_INODE + 1


class Kind(enum.Enum):
    ROOT = "root"
    UCXL = "ucxl"  # ucxl/: the authorities
    SLURP = "slurp"  # .slurp/
    SEARCH = "search"  # .search/
    VIRTUAL = "virtual"  # .slurp/<name>
    DIR = "dir"  # an authority or address directory (maybe under a temporal segment)
    ROLE = "role"  # <dir>/<role> (read-only under a temporal segment)
    HISTORY = "history"  # <dir>/.history
    HISTORY_ROLE = "history_role"  # <dir>/.history/<role>
    HISTORY_FILE = "history_file"  # <dir>/.history/<role>/<n>
    CONFLICT = "conflict"  # <dir>/<role>.conflict-<id>
    SCRATCH = "scratch"  # a memory-only file or symlink
    QUERY = "query"  # .search/<query> (one per caller role set)
    QUERY_FILE = "query_file"  # .search/<query>/.results, .facets, .error
    QUERY_LINK = "query_link"  # .search/<query>/<rank>-<name>-<role>: a symlink to a hit

    # Members are singletons: identity hashing (in C) instead of Enum's hash of the name.
    __hash__ = object.__hash__


DIR_KINDS = frozenset(
    {
        Kind.ROOT,
        Kind.UCXL,
        Kind.SLURP,
        Kind.SEARCH,
        Kind.QUERY,
        Kind.DIR,
        Kind.HISTORY,
        Kind.HISTORY_ROLE,
    }
)


class Key(NamedTuple):
    """What an entry is. `parts` are mount parts (with any temporal segment).

    A tuple (hashed and compared in C): every request looks nodes up by key.
    """

    kind: Kind
    parts: tuple[str, ...] = ()
    role: str = ""
    # history number, conflict version id, scratch serial, virtual name, a query's role set
    extra: str = ""

    def digest(self) -> int:
        text = "\0".join((self.kind.value, *self.parts, "\1", self.role, self.extra))
        raw = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(raw, "big") & _INO_MASK


class Node:
    """One inode. Mutable; only the ops layer and this table change it."""

    __slots__ = (
        "address",
        "attrs",
        "cached_version",
        "info",
        "content",
        "ino",
        "key",
        "kind",
        "lookups",
        "name",
        "opens",
        "parent",
        "scratch",
        "written",
    )

    def __init__(
        self, ino: int, key: Key, parent: int, name: bytes, address: Address | None
    ) -> None:
        self.ino = ino
        self.key: Key | None = key
        self.kind = key.kind
        self.parent = parent
        self.name = name
        self.address = address
        self.lookups = 0
        self.opens = 0
        # ROLE: the version last reported to the kernel; HISTORY_FILE/CONFLICT: theirs.
        self.info: VersionInfo | None = None
        # The version whose pages the kernel may still cache (for keep_cache).
        self.cached_version: bytes | None = None
        # (view epoch, the attributes the ops layer computed then): valid while
        # the epoch stands and nothing of the node is open for writing.
        self.attrs: tuple[int, pyfuse3.EntryAttributes] | None = None
        self.content: Content | None = None
        self.scratch: ScratchFile | None = None
        # (version id, mtime) of the last version written through this node: its
        # mtime stays the time of the last write(), not of the commit at close,
        # so tools that fstat before close (emacs) see no change afterwards.
        self.written: tuple[bytes, int] | None = None

    @property
    def readonly(self) -> bool:
        """Entries under a temporal segment, history, conflicts, status files and search results."""
        if self.kind in (
            Kind.HISTORY_FILE,
            Kind.CONFLICT,
            Kind.VIRTUAL,
            Kind.QUERY_FILE,
            Kind.QUERY_LINK,
        ):
            return True
        return self.address is not None and self.address.temporal is not None

    @property
    def detached(self) -> bool:
        return self.key is None

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.kind.value} {self.key} lookups={self.lookups}>"


class InodeTable:
    """All nodes, by inode number and by key."""

    def __init__(self, on_purge: Callable[[Node], None] | None = None) -> None:
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[Key, int] = {}
        self._by_address: dict[str, set[int]] = {}
        # Nodes bound while resolving a request but not (yet) handed to the kernel.
        self._pending: set[int] = set()
        self._on_purge = on_purge
        root = Node(ROOT_INODE, Key(Kind.ROOT), ROOT_INODE, b"", None)
        root.lookups = 1  # the kernel never forgets the root
        self._nodes[ROOT_INODE] = root
        self._by_key[root.key] = ROOT_INODE  # type: ignore[index]

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def __getitem__(self, ino: int) -> Node:
        return self._nodes[ino]

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    @property
    def root(self) -> Node:
        return self._nodes[ROOT_INODE]

    def find(self, key: Key) -> Node | None:
        ino = self._by_key.get(key)
        return None if ino is None else self._nodes[ino]

    def at_address(self, address_key: str) -> list[Node]:
        """Live nodes whose address (any temporal) has this store key."""
        return [self._nodes[i] for i in self._by_address.get(address_key, ())]

    def bind(
        self,
        key: Key,
        parent: int,
        name: bytes,
        address: Address | None = None,
        *,
        fresh: bool = False,
    ) -> Node:
        """The node for `key`, created if needed (with lookup count 0).

        `fresh` detaches any node bound to `key` first: used when the entry is a
        new file (create) rather than the one the kernel may still hold.
        """
        existing = self.find(key)
        if existing is not None:
            if not fresh:
                existing.parent, existing.name = parent, name
                return existing
            self.detach(existing)
        node = Node(self._allocate(key), key, parent, name, address)
        self._nodes[node.ino] = node
        self._by_key[key] = node.ino
        self._pending.add(node.ino)
        if address is not None:
            self._by_address.setdefault(address.key, set()).add(node.ino)
        return node

    def _allocate(self, key: Key) -> int:
        ino = max(key.digest(), _FIRST_INO)
        while ino in self._nodes:
            ino = ino + 1 if ino < _INO_MASK else _FIRST_INO
        return ino

    def ref(self, node: Node, n: int = 1) -> None:
        node.lookups += n
        self._pending.discard(node.ino)

    def sweep(self) -> None:
        """Purge nodes a request resolved but never handed to the kernel (end of a handler)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, set()
        for ino in pending:
            node = self._nodes.get(ino)
            if node is not None:
                self.maybe_purge(node)

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - n)
        self.maybe_purge(node)

    def maybe_purge(self, node: Node) -> None:
        """Drop `node` once the kernel has forgotten it and no handle holds it."""
        if node.lookups > 0 or node.opens > 0 or node.ino == ROOT_INODE:
            return
        if self._nodes.get(node.ino) is not node:
            return
        del self._nodes[node.ino]
        self._pending.discard(node.ino)
        self._unbind(node)
        if node.address is not None:
            inos = self._by_address.get(node.address.key)
            if inos is not None:
                inos.discard(node.ino)
                if not inos:
                    del self._by_address[node.address.key]
        if self._on_purge is not None:
            self._on_purge(node)

    def _unbind(self, node: Node) -> None:
        if node.key is not None and self._by_key.get(node.key) == node.ino:
            del self._by_key[node.key]

    def detach(self, node: Node) -> None:
        """No name resolves to `node` any more; it lives on until forgotten and closed."""
        self._unbind(node)
        node.key = None
        self.maybe_purge(node)

    def rekey(
        self, node: Node, key: Key, parent: int, name: bytes, address: Address | None
    ) -> None:
        """`node` now is the entry `key` (a rename moved it); whatever was `key` is detached."""
        displaced = self.find(key)
        if displaced is not None and displaced is not node:
            self.detach(displaced)
        self._unbind(node)
        if node.address is not None:
            self._by_address.get(node.address.key, set()).discard(node.ino)
        node.key, node.kind, node.parent, node.name = key, key.kind, parent, name
        node.address = address
        self._by_key[key] = node.ino
        if address is not None:
            self._by_address.setdefault(address.key, set()).add(node.ino)

    def forget_all(self) -> None:
        """At unmount: the kernel forgets everything."""
        for node in list(self._nodes.values()):
            if node.ino != ROOT_INODE:
                node.lookups = 0
                self.maybe_purge(node)
