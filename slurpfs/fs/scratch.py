"""Scratch files: what editors and tools create beside the files they save.

A regular file (or symlink) in an address directory whose name is not a role
name and looks temporary (`ScratchNames`) is a scratch file. It lives only in
this process's memory: never written to disk, never replicated, gone at
unmount. Its bytes count against one bound (``mount.scratch_bytes``); going
past it is `StoreFull` (``ENOSPC``). Any other new name is refused (see
`slurpfs.fs.namespace`): a file that would silently vanish at unmount is never
created.

The same module keeps the other half of the editor overlay: role names hidden
by a backup-by-rename (``rename(developer, developer~)``) until the next
version of that role is written.

Lifetime: a scratch file is *linked* while a directory entry names it. Its memory
is released once it is unlinked and no inode or open handle refers to it
(`ScratchStore.maybe_release`).
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from slurpfs.errors import StoreFull

DirKey = tuple[str, ...]
"""An address directory, as its mount parts without a temporal segment."""


# Names editors and tools give their temporary files: vim's `.developer.swp` and
# `4913`, backups `developer~`, emacs' `#developer#`, sed's `sedAbC123`, perl's
# `XXab12cd`, Python's `tmpk8tfrqk9` (its names may hold `_`), rsync's
# `.developer.Ab12Cd`, JetBrains' `___jb_tmp___`, GLib's `.goutputstream-XXXXXX`.
_TEMPORARY = re.compile(
    r"""
    \..*                                       # hidden: swap files, rsync, many more
    | .*(~|\.tmp|\.swp|\.swx|\.swo|\.bak|\.orig|\.rej|\.new|\.old|\.kate-swp)
    | \#.*\#
    | [0-9]+
    | (sed|XX|tmp)[A-Za-z0-9_]{6,8}
    | .*(\.tmp\.|___jb_tmp___|___jb_old___|\.goutputstream-).*
    """,
    re.VERBOSE | re.DOTALL,
)


class ScratchNames:
    """Which names look temporary: the built-in patterns and ``mount.scratch_names``."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.extra = tuple(extra)
        self._extra = [re.compile(fnmatch.translate(p)) for p in self.extra]

    def match(self, name: bytes) -> bool:
        # fsdecode: a name that is not UTF-8 can still end in `~` or start with `.`.
        text = os.fsdecode(name)
        if _TEMPORARY.fullmatch(text):
            return True
        return any(p.match(text) for p in self._extra)


@dataclass(eq=False)
class ScratchFile:
    """One scratch file (or symlink). Identity, not name, is what inodes refer to."""

    serial: int
    data: bytearray = field(default_factory=bytearray)
    mode: int = stat.S_IFREG | 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = 0
    target: bytes | None = None  # symlink target
    # Set by a backup-by-rename: (role, version id) it is a copy of, until modified.
    origin: tuple[str, bytes] | None = None
    linked: bool = True
    opens: int = 0
    referenced: bool = False  # an inode is bound to it
    released: bool = False

    def __post_init__(self) -> None:
        self.ctime_ns = self.ctime_ns or self.mtime_ns

    @property
    def size(self) -> int:
        return len(self.target) if self.target is not None else len(self.data)

    def touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()


# What one scratch file costs besides its bytes (its record, name, directory slot and
# inode, rounded up), charged against the bound: a flood of empty files or long
# symlink targets must hit ENOSPC too, not grow the daemon without limit.
ENTRY_BYTES = 1024


class ScratchStore:
    """All scratch files of a mount, by directory and name, with one memory bound.

    The bound counts each file's bytes (a symlink's target) plus `ENTRY_BYTES`.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._serials = itertools.count(1)
        self._dirs: dict[DirKey, dict[bytes, ScratchFile]] = {}
        self._hidden: dict[DirKey, set[str]] = {}

    # -- names ---------------------------------------------------------------

    def get(self, where: DirKey, name: bytes) -> ScratchFile | None:
        return self._dirs.get(where, {}).get(name)

    def names(self, where: DirKey) -> list[tuple[bytes, ScratchFile]]:
        return sorted(self._dirs.get(where, {}).items())

    def has_any(self, where: DirKey) -> bool:
        return bool(self._dirs.get(where))

    def create(
        self, where: DirKey, name: bytes, mode: int, uid: int = 0, gid: int = 0
    ) -> ScratchFile:
        """A new empty scratch file named `name` (replacing any scratch file of that name)."""
        self._reserve(ENTRY_BYTES)
        sf = ScratchFile(next(self._serials), mode=mode, uid=uid, gid=gid)
        self.link(where, name, sf)
        return sf

    def link(self, where: DirKey, name: bytes, sf: ScratchFile) -> ScratchFile | None:
        """Name `sf` in `where`; returns the scratch file that name displaced, if any."""
        entries = self._dirs.setdefault(where, {})
        old = entries.get(name)
        entries[name] = sf
        sf.linked = True
        if old is not None and old is not sf:
            old.linked = False
            self.maybe_release(old)
            return old
        return None

    def unlink(self, where: DirKey, name: bytes) -> ScratchFile | None:
        """Remove the name; the file's memory goes once nothing refers to it."""
        entries = self._dirs.get(where)
        if entries is None or name not in entries:
            return None
        sf = entries.pop(name)
        if not entries:
            del self._dirs[where]
        sf.linked = False
        self.maybe_release(sf)
        return sf

    def maybe_release(self, sf: ScratchFile) -> None:
        """Free `sf`'s memory if no name, inode or handle refers to it any more."""
        if sf.linked or sf.referenced or sf.opens or sf.released:
            return
        sf.released = True
        self.used -= ENTRY_BYTES + len(sf.data) + len(sf.target or b"")
        sf.data = bytearray()

    def copy_of(self, data: bytes, mode: int, origin: tuple[str, bytes] | None) -> ScratchFile:
        """An unlinked scratch file holding `data` (accounted; link it with `link`)."""
        self._reserve(ENTRY_BYTES + len(data))
        sf = ScratchFile(next(self._serials), data=bytearray(data), mode=mode, origin=origin)
        sf.linked = False
        return sf

    def symlink(self, target: bytes, uid: int, gid: int) -> ScratchFile:
        """An unlinked symbolic link to `target` (accounted; link it with `link`)."""
        self._reserve(ENTRY_BYTES + len(target))
        sf = ScratchFile(next(self._serials), mode=stat.S_IFLNK | 0o777, uid=uid, gid=gid)
        sf.target = target
        sf.linked = False
        return sf

    # -- content -------------------------------------------------------------

    def write(self, sf: ScratchFile, offset: int, buf: bytes) -> int:
        end = offset + len(buf)
        grow = max(0, end - len(sf.data))
        self._reserve(grow)
        if offset > len(sf.data):
            sf.data.extend(bytes(offset - len(sf.data)))
        sf.data[offset:end] = buf
        sf.origin = None
        sf.touch()
        return len(buf)

    def truncate(self, sf: ScratchFile, size: int) -> None:
        delta = size - len(sf.data)
        if delta > 0:
            self._reserve(delta)
            sf.data.extend(bytes(delta))
        elif delta < 0:
            del sf.data[size:]
            self.used += delta
        if delta:
            sf.origin = None
        sf.touch()

    def _reserve(self, n: int) -> None:
        if n <= 0:
            return
        if self.used + n > self.limit:
            raise StoreFull(
                f"scratch memory is full ({self.used} of {self.limit} bytes in use;"
                " raise mount.scratch_bytes)"
            )
        self.used += n

    # -- hidden role names (backup-by-rename) -----------------------------------

    def hide(self, where: DirKey, role: str) -> None:
        self._hidden.setdefault(where, set()).add(role)

    def unhide(self, where: DirKey, role: str) -> None:
        hidden = self._hidden.get(where)
        if hidden is not None:
            hidden.discard(role)
            if not hidden:
                del self._hidden[where]

    def hides_any(self) -> bool:
        """Whether any role name is hidden (by a backup-by-rename) anywhere."""
        return bool(self._hidden)

    def is_hidden(self, where: DirKey, role: str) -> bool:
        return role in self._hidden.get(where, ())

    def count(self) -> int:
        return sum(len(entries) for entries in self._dirs.values())
