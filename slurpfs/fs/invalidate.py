"""Keep the kernel's caches honest when contexts change underneath the mount.

The kernel caches entries, attributes and pages for ``mount.*_timeout``. A change
that does not come through this mount (a ``slurpfs put`` from another process,
later replication) must be pushed to the kernel, or ``cat`` would show the old
version for up to a minute. The `Invalidator` task polls the store's change feed
(`ContextStore.changes_since`, which sees every process's commits), compares each
changed context with what the kernel was last told, and invalidates what
differs: the inode's attributes and pages, or the dentry of a deleted file.

Invalidation never runs inside a request handler: it blocks until related
requests finish, which would deadlock a handler waiting on itself. It runs here,
in a worker thread, so the FUSE loop keeps serving meanwhile.

`poke` runs a cycle now and returns once it is done: the daemon's control socket
uses it so that a CLI writer returns only after the kernel has forgotten the old
version ("``cat`` never shows a stale version after the writer returned").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import pyfuse3
import trio

from slurpfs.errors import InvalidAddress, NotFound
from slurpfs.fs.inodes import Kind
from slurpfs.fs.ops import Operations
from slurpfs.fs.tree import dir_key
from slurpfs.ucxl import Address

log = logging.getLogger("slurpfs.fs")

POLL_INTERVAL = 0.5
# Seconds: while a peer's batches stream in (nudges closer than this), at most one
# cycle per this after one that found changes; a lone push, or a poke, goes at once.
COALESCE = 0.05


class Kernel(Protocol):
    """The two notifications the invalidator sends (a fake in ops-level tests)."""

    def invalidate_inode(self, inode: int) -> None: ...

    def invalidate_entry(self, parent: int, name: bytes) -> None: ...


# Not errors for a cache notification: the kernel does not know the entry (ENOENT),
# or the session is ending (ENOTCONN, EBADF).
_HARMLESS = frozenset({errno.ENOENT, errno.ENOTCONN, errno.EBADF})


class FuseKernel:
    """The real kernel, through pyfuse3."""

    def invalidate_inode(self, inode: int) -> None:
        try:
            pyfuse3.invalidate_inode(inode, False)
        except OSError as exc:
            if exc.errno not in _HARMLESS:
                raise

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as exc:
            if exc.errno not in _HARMLESS:
                raise


@dataclass(frozen=True, slots=True)
class InvalidatorStatistics:
    seq: int  # the last change of the store's feed read
    invalidations: int


@dataclass
class Actions:
    inodes: list[int] = field(default_factory=list)
    attrs: list[int] = field(default_factory=list)
    entries: list[tuple[int, bytes]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inodes) + len(self.attrs) + len(self.entries)


class Invalidator:
    """Polls the change feed and invalidates stale kernel cache entries."""

    def __init__(self, ops: Operations, kernel: Kernel, *, interval: float = POLL_INTERVAL) -> None:
        self.ops = ops
        self.model = ops.model
        self.kernel = kernel
        self.interval = interval
        self.seq = self.model.store.sequence()
        self._requested = 0
        self._completed = 0
        self._wakeup = trio.Event()
        self._poked = trio.Event()
        self._busy = -math.inf  # when the last cycle that found changes started
        self._nudged = -math.inf  # when the last `nudge` came
        self._streaming = False  # it came less than `COALESCE` after the one before
        self._progress = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self._stopped = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until `stop`; a run after a failure goes on from the last change read."""
        with trio.CancelScope() as self._cancel:
            if self._stopped:
                self._cancel.cancel()
            task_status.started()
            while True:
                with trio.move_on_after(self.interval):
                    await self._wakeup.wait()
                await self._coalesce()
                self._wakeup, self._poked = trio.Event(), trio.Event()
                target = self._requested
                started, before = trio.current_time(), self.seq
                await self.cycle()
                if self.seq != before:
                    self._busy = started
                self._completed = max(self._completed, target)
                self._progress.set()
                self._progress = trio.Event()

    def stop(self) -> None:
        self._stopped = True
        if self._cancel is not None:
            self._cancel.cancel()

    def statistics(self) -> InvalidatorStatistics:
        return InvalidatorStatistics(seq=self.seq, invalidations=self.ops.invalidations)

    async def _coalesce(self) -> None:
        """Soon after a cycle that found changes, wait out the rest of `COALESCE`
        (more of a stream arrives meanwhile), unless a poke waits."""
        wait = self._busy + COALESCE - trio.current_time()
        if wait > 0 and self._streaming and self._completed >= self._requested:
            with trio.move_on_after(wait):
                await self._poked.wait()

    def nudge(self) -> None:
        """A peer's versions were stored: a cycle now, or, if the previous nudge came less
        than `COALESCE` ago (a stream), `COALESCE` after the last cycle that found
        changes. Nobody waits for it: the replication worker goes on."""
        now = trio.current_time()
        self._streaming = now - self._nudged < COALESCE
        self._nudged = now
        self._wakeup.set()

    async def poke(self) -> None:
        """Return once a full cycle that started after this call has finished."""
        self._requested += 1
        target = self._requested
        self._wakeup.set()
        self._poked.set()
        while self._completed < target:
            await self._progress.wait()

    async def cycle(self) -> int:
        """Read the change feed up to now and invalidate; returns how many notifications."""
        changed: set[tuple[str, str]] = set()
        own = self.ops.gateway.own_versions
        first: set[str] = set()  # addresses of this mount's own first versions
        while True:
            before = self.seq
            seq, records = self.model.store.changes_since(before)
            if seq == before:
                break
            self.seq = seq
            self.ops.view.follow(before, seq, records)  # read once, for the view too
            for record in records:
                if record.version_id in own:
                    # This mount wrote it and updated its nodes then; only a
                    # directory count may need telling (see `_plan_parent`).
                    own.discard(record.version_id)
                    if not record.parents:
                        first.add(record.address)
                else:
                    changed.add((record.address, record.role))
        if not changed and not first:
            return 0
        actions = self.plan(changed)
        for key in first:
            with contextlib.suppress(InvalidAddress):
                self._plan_parent(Address.from_key(key), actions)
        if actions:
            await trio.to_thread.run_sync(self._send, actions)
            self.ops.invalidations += len(actions)
        return len(actions)

    async def forget(self, gone: Iterable[tuple[str, str]]) -> None:
        """Contexts removed without a change record (a TTL purge): drop what the
        kernel holds of them."""
        actions = self.plan(gone)
        if actions:
            await trio.to_thread.run_sync(self._send, actions)
            self.ops.invalidations += len(actions)

    def plan(self, changed: Iterable[tuple[str, str]]) -> Actions:
        """What to tell the kernel about these (address key, role) changes."""
        actions = Actions()
        for key, role in changed:
            if not self._known(key):
                continue
            try:
                address = Address.from_key(key)
            except InvalidAddress:
                continue
            self._plan_one(address, role, actions)
        return actions

    def _known(self, key: str) -> bool:
        """Whether the kernel may hold anything a change at `key` makes stale: a node
        at it or at its parent (`_plan_parent`), or a role name hidden by a rename.
        A catch-up streams thousands of versions nobody has looked up: those cost
        no store read here (on the FUSE loop)."""
        inodes = self.ops.inodes
        parent = key.rpartition("/")[0]
        return (
            bool(inodes.at_address(key))
            or bool(parent and inodes.at_address(parent))
            or self.ops.scratch.hides_any()
        )

    def _plan_one(self, address: Address, role: str, actions: Actions) -> None:
        try:
            head = self.model.stat(address, role)
        except NotFound:
            head = None
        if head is not None:
            # A new version ends a backup-by-rename's hiding of the role name.
            self.ops.scratch.unhide(dir_key(address), role)
            if not head.parents:
                self._plan_parent(address, actions)
        conflicts: set[bytes] | None = None
        for node in self.ops.inodes.at_address(address.key):
            if node.key is None or node.lookups == 0 or node.key.role != role:
                continue
            if node.kind is Kind.ROLE and not node.readonly:
                if node.content is not None and node.content.dirty:
                    continue  # an open writer here: its commit comes next and wins
                known = node.info.version_id if node.info is not None else None
                # An open file's buffer may hold an older version than what the node
                # (and so the kernel's attributes) already say: its pages go too.
                held = node.content.base if node.content is not None else known
                if head is None:
                    if known is not None:
                        actions.entries.append((node.parent, node.name))
                        actions.inodes.append(node.ino)
                        node.info = None
                elif known != head.version_id or held not in (head.version_id, None):
                    actions.inodes.append(node.ino)
                    node.info = head
            elif node.kind is Kind.CONFLICT and node.info is not None:
                if conflicts is None:
                    conflicts = {v.version_id for v in self.model.conflicts(address, role)}
                if node.info.version_id not in conflicts:
                    actions.entries.append((node.parent, node.name))

    def _plan_parent(self, address: Address, actions: Actions) -> None:
        """A first version may have created directories: the parent's nlink changed."""
        parent = address.parent()
        if parent is None:
            return
        for node in self.ops.inodes.at_address(parent.key):
            if node.kind is Kind.DIR and node.lookups and node.ino not in actions.attrs:
                actions.attrs.append(node.ino)

    def _send(self, actions: Actions) -> None:
        for parent, name in actions.entries:
            self.kernel.invalidate_entry(parent, name)
        for ino in actions.inodes:
            self.kernel.invalidate_inode(ino)
        for ino in actions.attrs:
            self.kernel.invalidate_inode(ino)
