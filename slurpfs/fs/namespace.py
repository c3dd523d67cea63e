"""Changes to the tree: mkdir, rmdir, create, unlink, symlink, rename.

The editor rules (docs/ARCHITECTURE.md, "Path layout") live here:

- ``rename(scratch, <role>)`` stores the scratch file's bytes as one new version
  (or none, if the scratch file is an unmodified copy of the current head being
  renamed back) and the moved inode becomes the role file.
- ``rename(<role>, scratch)`` (backup-by-rename) gives the scratch name a copy of
  the role file and hides the role name until its next version is written;
  stored history never moves.
- ``rename(<role>, <other role or address>)`` would move history: ``EXDEV``, so
  ``mv`` falls back to copy-and-delete, which the store records as a new version
  and a deletion.
- ``unlink(<role>)`` stores a deletion; ``unlink(<role>.conflict-<id>)`` resolves
  the conflict.
- A new file name that is neither a role's nor a temporary file's
  (`slurpfs.fs.scratch.ScratchNames`) is refused with ``EPERM`` at create,
  mknod, symlink and as a rename target: such a file would live in memory only
  and vanish at unmount, after every write to it had succeeded.

Every check happens before the first change, so a refused request changes
nothing ("never a half-created entry"). Refusals that a bare errno explains
badly are recorded for the caller's ``.slurp/refused`` (`slurpfs.fs.refused`).
"""

from __future__ import annotations

import contextlib
import os
import stat as st
from collections.abc import Awaitable, Callable

import pyfuse3

from slurpfs.errors import AccessDenied, AlreadyExists, InvalidAddress, NotEmpty, NotFound
from slurpfs.fs.access import Caller
from slurpfs.fs.errmap import (
    CrossDevice,
    IsADirectory,
    NotADirectory,
    NotPermitted,
    ReadOnly,
    Unsupported,
)
from slurpfs.fs.handles import Content, Gateway
from slurpfs.fs.inodes import DIR_KINDS, Key, Kind, Node
from slurpfs.fs.refused import IMPORT_FIX, NameRefused, Refusals
from slurpfs.fs.scratch import ScratchFile, ScratchNames
from slurpfs.fs.tree import HISTORY, Tree, check_length, decode, dir_key
from slurpfs.model import CONFLICT_NAME, VersionInfo
from slurpfs.ucxl import Address, Authority, Temporal, validate_name

Committer = Callable[[Node], Awaitable[None]]


class Namespace:
    """Namespace changes over a `Tree`; `commit` flushes an open role file's buffer."""

    def __init__(
        self,
        tree: Tree,
        gateway: Gateway,
        commit: Committer,
        *,
        refusals: Refusals,
        scratch_names: ScratchNames,
    ) -> None:
        self.tree = tree
        self.model = tree.model
        self.inodes = tree.inodes
        self.scratch = tree.scratch
        self.gateway = gateway
        self._commit = commit
        self.refusals = refusals
        self.scratch_names = scratch_names

    # -- refusals ----------------------------------------------------------------

    def path(self, parent: Node, name: bytes | None = None) -> str:
        """The path of `parent` (and `name` in it) under the mount, for `.slurp/refused`."""
        parts = [] if name is None else [os.fsdecode(name)]
        node: Node | None = parent
        while node is not None and node.ino != pyfuse3.ROOT_INODE and len(parts) < 256:
            parts.append(os.fsdecode(node.name))
            node = self.inodes.get(node.parent)
        return "/".join(reversed(parts))

    def watch(
        self, caller: Caller, op: str, parent: Node, name: bytes
    ) -> contextlib.AbstractContextManager[None]:
        """Record what the block refuses for the caller's ``.slurp/refused``."""
        return self.refusals.watch(caller.uid, op, lambda: self.path(parent, name))

    # -- checks ------------------------------------------------------------------

    def require_role(self, caller: Caller, role: str, address: Address, action: str) -> None:
        """AccessDenied unless the caller may read (and so change) `role` files here.

        Allowed or not, the decision goes into the audit log as `action` on `address`.
        """
        self.model.authorise_change(address.key, role, caller.roles, who=caller.who, action=action)

    @staticmethod
    def owns_scratch(caller: Caller, sf: ScratchFile) -> bool:
        """Scratch files are their creator's (and root's) alone: an editor's swap,
        backup and temporary files hold a role's plaintext, and a scratch file renamed
        over a role file becomes its next version."""
        return caller.uid in (0, sf.uid)

    def require_scratch_owner(self, caller: Caller, sf: ScratchFile, what: str) -> None:
        """NotPermitted (EPERM, as in a sticky directory) unless `owns_scratch`."""
        if not self.owns_scratch(caller, sf):
            raise NotPermitted(f"uid {caller.uid} may not {what} a scratch file of uid {sf.uid}")

    @staticmethod
    def require_some_role(caller: Caller) -> None:
        if not caller.roles:
            raise AccessDenied(f"uid {caller.uid} holds no role and cannot change the tree")

    @staticmethod
    def writable_dir(parent: Node) -> Address:
        """The address of a directory that can hold role and scratch files."""
        if parent.kind is Kind.DIR:
            assert parent.address is not None
            if parent.address.temporal is not None:
                raise ReadOnly("a temporal view is read-only")
            return parent.address
        if parent.kind is Kind.UCXL:
            raise InvalidAddress("ucxl/ holds only authority directories (agent:role@project:task)")
        if parent.kind is Kind.ROOT:
            raise NotPermitted("the root holds only ucxl/, .slurp/ and .search/")
        if parent.kind in DIR_KINDS:
            raise ReadOnly(f"{parent.name!r} is read-only")
        raise NotADirectory(f"{parent.name!r} is not a directory")

    def check_scratch_name(self, address: Address, name: bytes, text: str | None) -> None:
        """InvalidAddress/AlreadyExists unless `name` may name a scratch file here."""
        if text is None:
            return
        if text == HISTORY or CONFLICT_NAME.fullmatch(text):
            raise InvalidAddress(f"{text!r} is a reserved name in an address directory")
        if not address.path and Temporal.is_temporal(text):
            raise InvalidAddress(f"{text!r} is a temporal segment, not a file name")
        try:
            child = address.child(text)
        except InvalidAddress:
            return  # not a directory name either: a plain scratch name
        if self.model.is_dir(child):
            raise AlreadyExists(f"{child} is a directory")

    def check_new_file(
        self, address: Address, name: bytes, text: str | None, caller: Caller
    ) -> None:
        """InvalidAddress/AlreadyExists/NameRefused unless a new scratch file may be
        named `name` here: a name of visible characters that looks temporary."""
        if text is not None:
            validate_name(text)
        self.check_scratch_name(address, name, text)
        if self.scratch_names.match(name):
            return
        roles = sorted(self.model.readable_roles(caller.roles))
        named = ", ".join(roles) if roles else "(you hold no role that writes here)"
        raise NameRefused(
            f"{os.fsdecode(name)!r} is neither a role name nor a temporary file's name:"
            " an address directory stores role files only, and a file so named would"
            " be lost at unmount",
            f"name the file after a role you may write here: {named}; or {IMPORT_FIX}",
        )

    # -- directories ---------------------------------------------------------------

    def mkdir(self, parent: Node, name: bytes, caller: Caller) -> Node:
        with self.watch(caller, "mkdir", parent, name):
            return self._mkdir(parent, name, caller)

    def _mkdir(self, parent: Node, name: bytes, caller: Caller) -> Node:
        check_length(name)
        self.require_some_role(caller)
        text = decode(name)
        if parent.kind is Kind.UCXL:
            if text is None:
                raise InvalidAddress(f"authority {name!r} is not UTF-8")
            address = Address(Authority.parse(text))
        else:
            base = self.writable_dir(parent)
            if text is None:
                raise InvalidAddress(f"path component {name!r} is not UTF-8")
            self.model.check_component(text)
            if self.scratch.get(dir_key(base), name) is not None:
                raise AlreadyExists(f"a file named {text!r} exists")
            address = base.child(text)
        self.gateway.mkdir(address)
        return self.inodes.bind(
            Key(Kind.DIR, address.to_mount_parts()), parent.ino, name, address, fresh=True
        )

    def rmdir(self, parent: Node, name: bytes, caller: Caller) -> None:
        with self.watch(caller, "rmdir", parent, name):
            self._rmdir(parent, name, caller)

    def _rmdir(self, parent: Node, name: bytes, caller: Caller) -> None:
        self.require_some_role(caller)
        if parent.kind is not Kind.UCXL:
            self.writable_dir(parent)
        node = self.tree.child(parent, name)
        if node.kind is not Kind.DIR:
            if node.kind in DIR_KINDS:
                raise ReadOnly(f"{name!r} cannot be removed")
            raise NotADirectory(f"{name!r} is not a directory")
        assert node.address is not None
        if node.address.temporal is not None:
            raise ReadOnly("a temporal view cannot be removed")
        if self.scratch.has_any(dir_key(node.address)):
            raise NotEmpty(f"{node.address} holds scratch files")
        self.gateway.rmdir(node.address)
        self.inodes.detach(node)

    # -- files ---------------------------------------------------------------------

    def create(
        self, parent: Node, name: bytes, mode: int, caller: Caller, *, exclusive: bool
    ) -> Node:
        """A new empty file: a role file (committed at close) or a scratch file."""
        with self.watch(caller, "create", parent, name):
            return self._create(parent, name, mode, caller, exclusive=exclusive)

    def _create(
        self, parent: Node, name: bytes, mode: int, caller: Caller, *, exclusive: bool
    ) -> Node:
        check_length(name)
        address = self.writable_dir(parent)
        where = dir_key(address)
        text = decode(name)
        if text in self.tree.roles:
            assert text is not None
            self.require_role(caller, text, address, "write")
            if exclusive and self._role_exists(parent, address, text):
                raise AlreadyExists(f"{text} exists at {address}")
            key = Key(Kind.ROLE, address.to_mount_parts(), text)
            node = self.inodes.bind(key, parent.ino, name, address, fresh=True)
            node.content = Content()
            node.content.start_empty()
            return node
        self.require_some_role(caller)
        self.check_new_file(address, name, text, caller)
        old = self.scratch.get(where, name)
        if old is not None:
            if exclusive:
                raise AlreadyExists(f"{name!r} exists")
            self.require_scratch_owner(caller, old, "replace")
            self._detach_scratch(old)
        sf = self.scratch.create(where, name, st.S_IFREG | (mode & 0o7777), caller.uid, caller.gid)
        return self.tree.scratch_node(parent, name, sf)

    def _role_exists(self, parent: Node, address: Address, role: str) -> bool:
        try:
            self.tree.role(parent, address, role)
        except NotFound:
            return False
        return True

    def symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller) -> Node:
        with self.watch(caller, "symlink", parent, name):
            return self._symlink(parent, name, target, caller)

    def _symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller) -> Node:
        check_length(name)
        address = self.writable_dir(parent)
        text = decode(name)
        if text in self.tree.roles:
            raise InvalidAddress(f"{text!r} is a role name; role files are regular files")
        self.require_some_role(caller)
        self.check_new_file(address, name, text, caller)
        where = dir_key(address)
        if self.scratch.get(where, name) is not None:
            raise AlreadyExists(f"{name!r} exists")
        sf = self.scratch.symlink(target, caller.uid, caller.gid)
        self.scratch.link(where, name, sf)
        return self.tree.scratch_node(parent, name, sf)

    async def unlink(self, parent: Node, name: bytes, caller: Caller) -> None:
        with self.watch(caller, "unlink", parent, name):
            await self._unlink(parent, name, caller)

    async def _unlink(self, parent: Node, name: bytes, caller: Caller) -> None:
        address = self.writable_dir(parent)
        node = self.tree.child(parent, name)
        if node.kind is Kind.SCRATCH:
            self.require_some_role(caller)
            assert node.scratch is not None
            self.require_scratch_owner(caller, node.scratch, "remove")
            self.scratch.unlink(dir_key(address), name)
            self.inodes.detach(node)
        elif node.kind is Kind.ROLE:
            assert node.key is not None
            role = node.key.role
            self.require_role(caller, role, address, "delete")
            if node.content is not None:
                node.content.dirty = False  # writes to a removed file go nowhere
            try:
                self.model.stat(address, role)
            except NotFound:
                pass  # created but never committed: nothing stored to delete
            else:
                await self.gateway.delete(address, role)
            self.inodes.detach(node)
        elif node.kind is Kind.CONFLICT:
            assert node.key is not None
            assert node.info is not None
            self.require_role(caller, node.key.role, address, "resolve")
            self.gateway.resolve_conflict(address, node.key.role, node.info.version_id)
            self.inodes.detach(node)
        elif node.kind is Kind.DIR:
            raise IsADirectory(f"{name!r} is a directory")
        else:
            raise ReadOnly(f"{name!r} cannot be removed")

    def _detach_scratch(self, sf: ScratchFile) -> None:
        bound = self.inodes.find(Key(Kind.SCRATCH, extra=str(sf.serial)))
        if bound is not None:
            self.inodes.detach(bound)

    # -- rename --------------------------------------------------------------------

    async def rename(
        self,
        old_parent: Node,
        old_name: bytes,
        new_parent: Node,
        new_name: bytes,
        flags: int,
        caller: Caller,
    ) -> None:
        with self.watch(caller, "rename", new_parent, new_name):
            await self._rename(old_parent, old_name, new_parent, new_name, flags, caller)

    async def _rename(
        self,
        old_parent: Node,
        old_name: bytes,
        new_parent: Node,
        new_name: bytes,
        flags: int,
        caller: Caller,
    ) -> None:
        check_length(new_name)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise Unsupported("RENAME_EXCHANGE is not supported")
        if old_parent.kind is Kind.UCXL or new_parent.kind is Kind.UCXL:
            raise CrossDevice("authority directories are not renamed; copy them instead")
        src_dir = self.writable_dir(old_parent)
        dst_dir = self.writable_dir(new_parent)
        src = self.tree.child(old_parent, old_name)
        try:
            dst: Node | None = self.tree.child(new_parent, new_name)
        except NotFound:
            dst = None
        if dst is src:
            return
        if dst is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise AlreadyExists(f"{new_name!r} exists")
            if dst.kind in DIR_KINDS:
                raise IsADirectory(f"{new_name!r} is a directory")
            if dst.kind not in (Kind.ROLE, Kind.SCRATCH):
                raise ReadOnly(f"{new_name!r} cannot be replaced")
            if dst.scratch is not None:
                self.require_scratch_owner(caller, dst.scratch, "replace")
        if src.kind is Kind.DIR:
            raise CrossDevice("address directories are not renamed; copy them instead")
        dst_text = decode(new_name)
        if src.kind is Kind.SCRATCH:
            assert src.scratch is not None
            self.require_scratch_owner(caller, src.scratch, "rename")
            if dst_text in self.tree.roles:
                assert dst_text is not None
                await self._scratch_to_role(
                    src, src.scratch, src_dir, old_name, new_parent, dst_dir, dst_text, caller
                )
            else:
                self.check_new_file(dst_dir, new_name, dst_text, caller)
                self._scratch_to_scratch(src, src_dir, old_name, new_parent, dst_dir, new_name, dst)
        elif src.kind is Kind.ROLE:
            assert src.key is not None
            if dst_text in self.tree.roles:
                raise CrossDevice("a role file's history stays where it is; copy it instead")
            await self._role_to_scratch(
                src, src.key.role, src_dir, new_parent, dst_dir, new_name, dst, caller
            )
        else:
            raise ReadOnly(f"{old_name!r} cannot be renamed")

    async def _scratch_to_role(
        self,
        src: Node,
        sf: ScratchFile,
        src_dir: Address,
        old_name: bytes,
        new_parent: Node,
        dst_dir: Address,
        role: str,
        caller: Caller,
    ) -> None:
        self.require_role(caller, role, dst_dir, "write")
        if sf.target is not None:
            raise InvalidAddress(f"a symlink cannot become the role file {role!r}")
        try:
            head: VersionInfo | None = self.model.stat(dst_dir, role)
        except NotFound:
            head = None
        unchanged = (
            head is not None
            and sf.origin == (role, head.version_id)
            and dir_key(src_dir) == dir_key(dst_dir)
        )
        if unchanged:
            assert head is not None
            info, stored = head, False
        else:
            saved = await self.gateway.put(dst_dir, role, bytes(sf.data))
            info, stored = saved.info, saved.stored
        where = dir_key(dst_dir)
        self.scratch.unhide(where, role)
        self.scratch.unlink(dir_key(src_dir), old_name)
        src.scratch = None
        sf.referenced = False
        self.scratch.maybe_release(sf)
        key = Key(Kind.ROLE, dst_dir.to_mount_parts(), role)
        displaced = self.inodes.find(key)
        kept = displaced.written if displaced is not None else None
        self.inodes.rekey(src, key, new_parent.ino, role.encode(), dst_dir)
        src.info = info
        if stored:
            src.written = (info.version_id, sf.mtime_ns)
        elif kept is not None and kept[0] == info.version_id:
            src.written = kept  # an identical save keeps the head's time, as shown before
        src.cached_version = None

    def _scratch_to_scratch(
        self,
        src: Node,
        src_dir: Address,
        old_name: bytes,
        new_parent: Node,
        dst_dir: Address,
        new_name: bytes,
        dst: Node | None,
    ) -> None:
        sf = self.scratch.unlink(dir_key(src_dir), old_name)
        assert sf is not None
        if dst is not None:
            self.inodes.detach(dst)
        self.scratch.link(dir_key(dst_dir), new_name, sf)
        src.parent, src.name = new_parent.ino, new_name

    async def _role_to_scratch(
        self,
        src: Node,
        role: str,
        src_dir: Address,
        new_parent: Node,
        dst_dir: Address,
        new_name: bytes,
        dst: Node | None,
        caller: Caller,
    ) -> None:
        self.require_role(caller, role, src_dir, "rename")
        self.check_new_file(dst_dir, new_name, decode(new_name), caller)
        content = src.content
        if content is not None and content.dirty:
            await self._commit(src)
        if content is not None and content.buffer is not None and not content.dirty:
            data = bytes(content.buffer)
            origin = (role, content.base) if content.base is not None else None
        else:
            ctx = await self.gateway.get(src_dir, role, caller)
            data, origin = ctx.data, (role, ctx.info.version_id)
        sf = self.scratch.copy_of(data, st.S_IFREG | 0o644, origin)
        sf.uid, sf.gid = caller.uid, caller.gid
        if dst is not None:
            self.inodes.detach(dst)
        self.scratch.link(dir_key(dst_dir), new_name, sf)
        self.scratch.hide(dir_key(src_dir), role)
        # The kernel moved its dentry: this inode now is the scratch file.
        self.inodes.rekey(
            src, Key(Kind.SCRATCH, extra=str(sf.serial)), new_parent.ino, new_name, None
        )
        src.scratch = sf
        sf.referenced = True
