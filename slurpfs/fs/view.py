"""The model reads of lookup, getattr and readdir, memoised while the store is unchanged.

``find``, ``ls -lR`` and ``grep -r`` ask for the same few things again and again:
each directory's listing, each subdirectory's listing (for its ``st_nlink``), each
role file's head (for its size and mtime), whether a name is a directory. Each is
an LMDB read transaction plus decoding in the model. `StoreView` keeps the answers
until the store changes, so a warm tree walk costs dictionary lookups.

When (and what of) the memo is dropped:

- `refresh` (at the start of every handler that reads through the view) reads the
  store's change sequence, which every commit of every process increments. If it
  moved, the change records since (`changes_since`: address and role of each new
  version, by any process) say what to drop: the head of each (address, role),
  the listing of its address (roles, conflicts), and up its ancestors the
  ``is_dir`` answers that were not yes and the listings that lack the next name
  down (a commit creates the directories it needs; it never removes one). The
  rest stays: a replication catch-up streaming thousands of versions into other
  directories keeps a tree walk's memo. More than `TARGETED_LIMIT` records, a
  damaged one, or a sequence that went backwards (a store restored) drop
  everything. So a
  ``slurpfs put`` from another process, or a peer's version, is seen by the next
  request, exactly as without the memo.
- `committed` does the same at once after a commit of this process (the next
  request need not find it).
- `changed` drops everything: for changes that leave no change record (TTL purges:
  only this daemon makes those). Its own ``mkdir`` and ``rmdir`` (which do not
  move the sequence either) correct the memo instead (`added_dir`, `removed_dir`).

`epoch` moves with every drop and every commit of this process. What callers
derive from the view about an address (a directory's attributes and entries, a
role file's attributes) they keep while `current` says so: until a drop touches
that address (or its listing), and until a full drop, a commit of this process
or a ``mkdir``/``rmdir`` here (these void everything callers keep, as before).

Only the head of an address without a temporal segment is memoised; temporal
views, history and conflicts always ask the model. Errors other than `NotFound`
are never memoised: they are raised (and audited by the model) every time.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import TypeVar

from slurpfs.errors import Corrupt, NotFound
from slurpfs.model import ContextStore, Listing, VersionInfo
from slurpfs.store.schema import VersionRecord
from slurpfs.ucxl import Address

K = TypeVar("K")
V = TypeVar("V")

MAX_ENTRIES = 1 << 17  # per memo; past it the memo starts over (a walk of a huge tree)
# Change records read to drop their entries one by one; past it, everything goes
# (reading and walking more would cost more than listing again).
TARGETED_LIMIT = 4096


class StoreView:
    """`list_dir`, `stat` and `is_dir` of a `ContextStore`, memoised (see module docstring)."""

    def __init__(self, model: ContextStore) -> None:
        self.model = model
        self._seq = -1
        self._listings: dict[str, Listing] = {}
        self._heads: dict[tuple[str, str], VersionInfo | None] = {}
        self._dirs: dict[str, bool] = {}
        # Moves whenever anything memoised here may have changed (see `current`).
        self.epoch = 0
        self._void = 0  # what callers derived before this epoch is void
        self._touched: dict[str, int] = {}  # address key -> epoch of its last drop
        self.hits = 0
        self.misses = 0

    def current(self, key: str, epoch: int) -> bool:
        """Whether what a caller derived from the view at `epoch` about the address
        `key` (without temporal segment; "" for the authorities) still stands."""
        return epoch >= self._void and self._touched.get(key, 0) <= epoch

    def _void_all(self) -> None:
        """Nothing callers derived before now stands."""
        self.epoch += 1
        self._void = self.epoch
        self._touched.clear()

    def refresh(self) -> None:
        """Drop what any process committed since the memo was filled (module docstring)."""
        seq = self.model.store.sequence()
        if seq != self._seq:
            self._catch_up(seq)

    def committed(self) -> None:
        """This process committed (or tried to): drop what its commit changed.

        The epoch moves even if nothing was stored (a save of the head's very bytes):
        the caller's own state (a file's buffer, its time) may have changed with it.
        """
        self._void_all()
        self.refresh()

    def changed(self) -> None:
        """The store changed in a way no change record tells: forget everything."""
        self._void_all()
        self._listings.clear()
        self._heads.clear()
        self._dirs.clear()

    def follow(self, before: int, seq: int, records: Sequence[VersionRecord]) -> None:
        """The change records from `before` to `seq`, read by someone else (the
        invalidator): taken as `refresh` would read them, if the memo is at `before`."""
        if self._seq != before or self._seq < 0 or len(records) >= TARGETED_LIMIT:
            return  # ahead (a request refreshed first), or not started: `refresh` reads
        self._drop_all_of(records)
        self._seq = seq

    def _catch_up(self, seq: int) -> None:
        """The sequence moved to `seq`: drop what the records since the memo's say."""
        if self._seq < 0 or seq < self._seq:
            self._start_over(seq)  # first use, or a store put back to an older state
            return
        try:
            last, records = self.model.store.changes_since(self._seq, limit=TARGETED_LIMIT)
        except Corrupt:
            # A damaged record: the invalidator reports it; requests go on.
            self._start_over(seq)
            return
        if len(records) >= TARGETED_LIMIT:
            self._start_over(seq)  # more may follow: the whole memo costs less to refill
            return
        self._drop_all_of(records)
        # Records past `seq` (committed since it was read) were dropped too.
        self._seq = max(seq, last)

    def _start_over(self, seq: int) -> None:
        self.changed()
        self._seq = seq

    def _drop_all_of(self, records: Sequence[VersionRecord]) -> None:
        if not records:
            return
        self.epoch += 1
        if len(self._touched) >= MAX_ENTRIES:
            self._void_all()  # (bounded: voiding everything is always right)
        for record in records:
            self._drop(record.address, record.role)

    def _drop(self, key: str, role: str) -> None:
        """A version of (`key`, `role`) was committed: drop what it may have changed."""
        self._heads.pop((key, role), None)
        self._listings.pop(key, None)  # its roles and conflicts
        touched = self._touched
        touched[key] = self.epoch
        while key:
            # The commit made `key` a directory if it was not one: an answer of yes
            # stands, and so does a parent's listing that already names it.
            if self._dirs.get(key) is not True:
                self._dirs.pop(key, None)
            parent, _, name = key.rpartition("/")
            listing = self._listings.get(parent)
            if listing is None or not _names(listing.dirs, name):
                # (not memoised: a caller may have derived from an older listing)
                self._listings.pop(parent, None)
                touched[parent] = self.epoch
            key = parent

    def added_dir(self, address: Address) -> None:
        """This process created the directory `address` in an existing parent.

        A directory does not move the change sequence, so the memo is corrected
        rather than dropped: a ``mkdir`` loop must not list its parent again and
        again (each ``getattr`` of the parent counts its subdirectories).
        """
        self._void_all()
        self._edit_parent(address, add=True)
        self._dirs[address.key] = True

    def removed_dir(self, address: Address) -> None:
        """This process removed the (empty) directory `address`."""
        self._void_all()
        self._edit_parent(address, add=False)
        self._dirs[address.key] = False
        self._listings.pop(address.key, None)

    def _edit_parent(self, address: Address, *, add: bool) -> None:
        parent = address.parent()
        key = "" if parent is None else parent.key
        listing = self._listings.get(key)
        if listing is None:
            return
        name = address.path[-1] if address.path else str(address.authority)
        # The store lists children in the order of their UTF-8 bytes (code point
        # order), so the name goes in (or out) by bisection: a mkdir loop in one
        # parent must not sort a growing listing again and again.
        dirs = listing.dirs
        at = bisect.bisect_left(dirs, name)
        present = at < len(dirs) and dirs[at] == name
        if add and not present:
            dirs = (*dirs[:at], name, *dirs[at:])
        elif not add and present:
            dirs = dirs[:at] + dirs[at + 1 :]
        else:
            return
        self._listings[key] = dataclasses.replace(listing, dirs=dirs)

    def list_dir(self, address: Address | None) -> Listing:
        """`ContextStore.list_dir` of `address` (its temporal segment is ignored)."""
        key = "" if address is None else address.key
        listing = self._listings.get(key)
        if listing is not None:
            self.hits += 1
            return listing
        self.misses += 1
        listing = self.model.list_dir(None if address is None else address.without_temporal())
        _bounded(self._listings)[key] = listing
        return listing

    def stat(self, address: Address, role: str) -> VersionInfo:
        """`ContextStore.stat`: the version `address` selects (NotFound if none)."""
        if address.temporal is not None:
            return self.model.stat(address, role)
        key = (address.key, role)
        try:
            info = self._heads[key]
        except KeyError:
            self.misses += 1
            try:
                info = self.model.stat(address, role)
            except NotFound:
                _bounded(self._heads)[key] = None
                raise
            _bounded(self._heads)[key] = info
            return info
        self.hits += 1
        if info is None:
            raise NotFound(f"no context at {address} for role {role!r}")
        return info

    def is_dir(self, address: Address) -> bool:
        """Whether `address` (without its temporal segment) is an address directory."""
        key = address.key
        found = self._dirs.get(key)
        if found is None:
            self.misses += 1
            found = _bounded(self._dirs)[key] = self.model.is_dir(address.without_temporal())
        else:
            self.hits += 1
        return found


def _names(ordered: tuple[str, ...], name: str) -> bool:
    """Whether `name` is in `ordered` (a listing's names, in the store's order)."""
    at = bisect.bisect_left(ordered, name)
    return at < len(ordered) and ordered[at] == name


def _bounded(memo: dict[K, V]) -> dict[K, V]:
    if len(memo) >= MAX_ENTRIES:
        memo.clear()
    return memo
