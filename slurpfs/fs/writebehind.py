"""Write-behind: a mount's saves acknowledged from the journal, sealed by group commit.

With ``durability.write_behind`` the ``close`` of a changed role file appends
the new content to the node-local journal (`slurpfs.store.journal`) and returns;
the group commit stores every save journaled within ``durability.commit_delay``
in one LMDB transaction: the seal (signature, AEAD + zstd, key slots) and the
commit run in the commit worker's process (`slurpfs.service.commit_worker`,
which reads the saves from the journal), or here in a worker thread while that
worker is not running or fails.

Until its version is stored, a journaled save holds its node open (one
``opens`` per save), so the open-file layer keeps serving its buffer: reads,
``stat`` and listings in the mount see the save at once. Other processes see it
after the group commit. Anything that must see the store as the mount's users
do (``fsync`` of a file or a directory, a synchronous commit, unlink, rename,
rmdir, shutdown) first waits for the group commit (`drain`), so saves are stored
in the order they were acknowledged, each as one version, exactly as without
write-behind.

A save is sealed on the head it was acknowledged on (`Entry.based_on`): if
another process committed a version of the same context in between, the save
becomes a concurrent version beside it (a conflict), never a silent overwrite.
A group commit that fails (a full disk) keeps its saves in the journal and in
memory, reports the cause in health and the log, and is retried; meanwhile
every ``close`` and ``fsync`` waits for the backlog and returns its error.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from slurpfs import ucxl
from slurpfs.errors import SlurpError, StoreFull
from slurpfs.fs.handles import Content, Gateway
from slurpfs.fs.inodes import Node
from slurpfs.model import ContextStore, Saved
from slurpfs.store.journal import (
    CHAINED,
    DAMAGED_SUFFIX,
    FILE_NAME,
    Journal,
    journal_key,
    mark,
    pending,
    scan,
)
from slurpfs.ucxl import Address

log = logging.getLogger("slurpfs.fs")

RETRY_DELAY = 1.0  # seconds before a failed group commit is tried again


@dataclass
class Pending:
    """One journaled save waiting for its group commit."""

    seq: int
    offset: int  # where its entry starts in the journal file
    node: Node
    content: Content
    address: Address
    role: str
    data: bytes
    content_seq: int  # the buffer's change count when it was journaled
    based_on: bytes | None


class Committer(Protocol):
    """Stores journal entries in another process (`slurpfs.service.commit_worker`)."""

    @property
    def ready(self) -> bool: ...

    async def commit(self, journal_id: bytes, offset: int, first: int, last: int) -> list[Saved]:
        """Store entries `first`..`last` of the journal (the first at byte `offset`)."""


@dataclass(frozen=True, slots=True)
class WriteBehindStatistics:
    journaled: int
    committed: int
    batches: int
    pending: int
    failures: int


class WriteBehind:
    """The journal of one mount and its group commit (module docstring)."""

    def __init__(
        self,
        journal: Journal,
        gateway: Gateway,
        delay: float,
        stored: Callable[[Pending, Saved], None],
        worker: Committer | None = None,
    ) -> None:
        self.journal = journal
        self.worker = worker  # the commit worker (None: the group commit stores here)
        self.gateway = gateway
        self.delay = delay
        self._stored = stored  # the open-file layer's bookkeeping for a stored save
        self._queue: deque[Pending] = deque()
        self._queued: Counter[tuple[str, str]] = Counter()  # per context (key, role)
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self.failure: SlurpError | OSError | None = None
        self.committed = 0
        self.batches = 0
        self.failures = 0

    def __len__(self) -> int:
        return len(self._queue)

    def newest(self, content: Content) -> bytes:
        """The newest journaled save of `content` (it has one)."""
        return next(p.data for p in reversed(self._queue) if p.content is content)

    def save(self, node: Node, content: Content, address: Address, role: str) -> None:
        """Journal the buffer of `content` as a save of (address, role); `StoreFull` or
        OSError if the append fails (nothing is journaled then)."""
        assert content.buffer is not None
        data = bytes(content.buffer)
        based_on = self._head(address, role)
        offset = self.journal.end
        try:
            seq = self.journal.append(address.key, role, data, content.mtime_ns, based_on)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise StoreFull(
                f"the write-behind journal {self.journal.path} is full: {exc.strerror}"
            ) from None
        self._queue.append(
            Pending(seq, offset, node, content, address, role, data, content.seq, based_on)
        )
        self._queued[address.key, role] += 1
        node.opens += 1  # held open until stored (`OpenFiles.stored`)
        content.journaled += 1
        self.gateway.journaled()
        self._wake.set()

    def _head(self, address: Address, role: str) -> bytes | None:
        """What this save builds on: this context's previous journaled save, else its head."""
        key = address.key
        if self._queued[key, role]:
            return CHAINED
        leaves = self.gateway.model.store.leaves(key, role)
        return leaves[0].version_id if leaves else None

    async def serve(self) -> None:
        """The group commit: store what was journaled, `delay` after the first save."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(self.delay)
            try:
                await self.drain()
            except (SlurpError, OSError):
                await trio.sleep(RETRY_DELAY)  # reported by `drain`; tried again
                self._wake.set()

    async def drain(self) -> None:
        """Store every journaled save now, in order; raise the error of one that fails
        (it and the saves after it stay journaled)."""
        if not self._queue:
            return
        async with self._lock:
            while self._queue:
                batch = list(self._queue)
                done, error = await self._store(batch)
                for pending, saved in zip(batch, done, strict=False):
                    self._queue.popleft()
                    self._unqueued(pending)
                    self._stored(pending, saved)
                    self.committed += 1
                self.batches += 1
                if error is not None:
                    self._failed(error)
                    raise error
                self.failure = None
            self.journal.truncate()

    async def _store(self, batch: list[Pending]) -> tuple[list[Saved], SlurpError | OSError | None]:
        """Store `batch` by the commit worker if it runs, else here (in a thread): what
        was stored, and the error that stopped the rest."""
        worker = self.worker
        if worker is not None and worker.ready:
            last = batch[-1].seq
            try:
                done = await worker.commit(
                    self.journal.journal_id, batch[0].offset, batch[0].seq, last
                )
            except SlurpError as exc:
                # Its answer lost: the batch is stored if the store holds its mark.
                if self.gateway.model.store.journal_mark() != self.journal.mark(last):
                    log.info("the commit worker did not store %d saves: %s", len(batch), exc)
                    return await self._store_here(batch)
                done = [self._stored_head(p) for p in batch]
            self.gateway.stored_elsewhere(done, [p.data for p in batch])
            return done, None
        return await self._store_here(batch)

    async def _store_here(
        self, batch: list[Pending]
    ) -> tuple[list[Saved], SlurpError | OSError | None]:
        return await self.gateway.store_journaled(
            [(p.address, p.role, p.data, self._based_on(p, batch)) for p in batch],
            [self.journal.mark(p.seq) for p in batch],
        )

    def _unqueued(self, pending: Pending) -> None:
        ctx = (pending.address.key, pending.role)
        self._queued[ctx] -= 1
        if not self._queued[ctx]:
            del self._queued[ctx]

    def _stored_head(self, pending: Pending) -> Saved:
        """What `pending` became, its answer lost: its context's head now."""
        leaves = self.gateway.model.store.leaves(pending.address.key, pending.role)
        return Saved(leaves[0], stored=True)

    def _based_on(self, pending: Pending, batch: list[Pending]) -> tuple[bytes, ...] | None:
        """The `ContextStore.save` parents of `pending` (None: the current head)."""
        if pending.based_on == CHAINED:
            return None  # sealed right after its predecessor: on the head that one made
        return _parents(pending.based_on)

    def _failed(self, error: SlurpError | OSError) -> None:
        if self.failure is None or str(self.failure) != str(error):
            log.error(
                "group commit failed: %s; %d journaled saves kept and retried", error, len(self)
            )
        self.failure = error
        self.failures += 1

    def statistics(self) -> WriteBehindStatistics:
        return WriteBehindStatistics(
            self.journal.appended, self.committed, self.batches, len(self), self.failures
        )


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a replay found: saves stored, saves equal to their head, what it could not read."""

    stored: int
    unchanged: int
    problems: tuple[str, ...]
    kept: Path | None  # the journal, kept beside for inspection when it had problems


def replay(model: ContextStore, directory: Path) -> Replayed:
    """Store the saves a previous run journaled but did not commit (before the mount answers).

    Entries the store's mark covers are versions already and are skipped, so each
    save is stored exactly once. A journal with damaged or torn entries is kept as
    ``journal.damaged.<time>`` (still encrypted) and its problems are returned for
    the log and health; the intact entries are stored all the same. The store is
    synced before the journal is let go.
    """
    path = directory / FILE_NAME
    found = scan(path, journal_key(model.keyring.node))
    stored = unchanged = 0
    for entry in pending(found, model.store.journal_mark()):
        assert found.journal_id is not None
        saved = model.save(
            ucxl.parse(ucxl_scheme(entry.address)),
            entry.role,
            entry.data,
            journal=mark(found.journal_id, entry.seq),
            based_on=None if entry.based_on == CHAINED else _parents(entry.based_on),
        )
        stored += saved.stored
        unchanged += not saved.stored
    model.sync()
    kept = None
    if found.problems:
        kept = path.with_name(f"{FILE_NAME}{DAMAGED_SUFFIX}.{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, kept)
    return Replayed(stored, unchanged, tuple(found.problems), kept)


def _parents(based_on: bytes | None) -> tuple[bytes, ...]:
    return () if based_on is None else (based_on,)


def ucxl_scheme(key: str) -> str:
    return "ucxl://" + key
