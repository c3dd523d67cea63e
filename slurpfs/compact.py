"""Compaction: the version-retention policy and LMDB compacting copies.

Retention (`[retention]`: keep the last `keep_versions` versions of each context
and every version newer than `keep_days`) removes old versions whole (record and
body); it never removes a leaf (the head or a conflict), a deletion record, or
the last version before a deletion (what was deleted stays readable in the
history). Every removal is audited and its id kept in `aux:dropped`, so a
child naming it as a parent is known to be complete (fsck, ingest).

LMDB never shrinks its file: pages freed by purges and drops are reused, not
given back. A compacting copy writes the live pages to a new file, which then
replaces `data.mdb`. It needs the store to itself: every process that has the
environment open maps the old file and shares its lock file, so the copy is
made only when no mount serves the data directory (docs/ARCHITECTURE.md says
why it cannot be swapped in under a running mount), holding the writers' lock.

zstd dictionaries: `dictionary_gain` trains a dictionary per role on its small
documents (in memory; plaintext never leaves the process) and measures the
compression ratio before and after on documents it did not train on. The
envelope format has no dictionary field yet, so the gain is reported
(`slurpfs compact`), not applied.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from slurpfs.config import Config, RetentionConfig
from slurpfs.errors import SlurpError
from slurpfs.model import ContextStore, data_paths
from slurpfs.store import Store, VersionRecord

DAY_MS = 86_400_000
BATCH = 256
SMALL_DOCUMENT = 4096  # dictionaries help documents up to about this size
DICTIONARY_BYTES = 16 * 1024
SAMPLE_LIMIT = 4000  # documents per role the measurement reads at most


@dataclass(frozen=True, slots=True)
class Space:
    page_size: int
    file_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return self.file_bytes - self.used_bytes


@dataclass
class RetentionPlan:
    drops: list[VersionRecord] = field(default_factory=list)
    contexts: int = 0

    @property
    def plaintext_bytes(self) -> int:
        return sum(r.size for r in self.drops)


@dataclass(frozen=True, slots=True)
class DictionaryGain:
    """What a zstd dictionary trained on a role's small documents would save.

    Trained on every other sampled document, measured on the rest (never on what
    it learned from): `plain` bytes compress to `without` bytes alone and to
    `with_dictionary` with the dictionary (zstd level 3 either way)."""

    role: str
    documents: int
    plain: int
    without: int
    with_dictionary: int
    reason: str = ""  # why there is no measurement

    @property
    def ratio_before(self) -> float:
        return self.plain / self.without if self.without else 0.0

    @property
    def ratio_after(self) -> float:
        return self.plain / self.with_dictionary if self.with_dictionary else 0.0


def dictionary_gain(model: ContextStore, role: str) -> DictionaryGain:
    """Train a dictionary on `role`'s small heads (in memory only) and measure it."""
    samples: list[bytes] = []
    for _address, ctx_role, leaves in model.store.iter_contexts():
        if ctx_role != role or not leaves:
            continue
        head = model.store.record(leaves[0])
        if head is None or head.deleted or head.size > SMALL_DOCUMENT or head.size == 0:
            continue
        if not model.is_local(head.version_id):
            continue  # its body is held by other members: sampled there
        samples.append(model.node_read(head))
        if len(samples) >= SAMPLE_LIMIT:
            break
    train, test = samples[0::2], samples[1::2]
    if len(train) < 16:
        return DictionaryGain(role, len(samples), 0, 0, 0, "fewer than 32 small documents")
    try:
        training: list[bytes | bytearray | memoryview[int]] = list(train)
        trained = zstandard.train_dictionary(DICTIONARY_BYTES, training)
    except zstandard.ZstdError as exc:
        return DictionaryGain(role, len(samples), 0, 0, 0, f"training failed: {exc}")
    plain_c = zstandard.ZstdCompressor(level=3)
    dict_c = zstandard.ZstdCompressor(level=3, dict_data=trained)
    return DictionaryGain(
        role,
        len(samples),
        sum(len(d) for d in test),
        sum(min(len(plain_c.compress(d)), len(d)) for d in test),
        sum(min(len(dict_c.compress(d)), len(d)) for d in test),
    )


def space(store: Store) -> Space:
    psize, pages, used = store.space()
    return Space(psize, pages * psize, used * psize)


def droppable(
    history: list[VersionRecord], leaves: set[bytes], policy: RetentionConfig, now_ms: int
) -> list[VersionRecord]:
    """The versions of one context (history oldest first) the policy removes."""
    if policy.keep_versions == 0 and policy.keep_days == 0:
        return []
    newest_kept = len(history) - policy.keep_versions
    cutoff = now_ms - int(policy.keep_days * DAY_MS)
    before_deletion = {
        history[i - 1].version_id
        for i in range(1, len(history))
        if history[i].deleted and not history[i - 1].deleted
    }
    return [
        r
        for i, r in enumerate(history)
        if i < newest_kept
        and (r.hlc >> 16) < cutoff
        and not r.deleted
        and r.version_id not in leaves
        and r.version_id not in before_deletion
    ]


def plan_retention(model: ContextStore, now: float | None = None) -> RetentionPlan:
    policy = model.config.retention
    now_ms = int((time.time() if now is None else now) * 1000)
    plan = RetentionPlan()
    for address, role, leaves in model.store.iter_contexts():
        drops = droppable(model.store.history(address, role), set(leaves), policy, now_ms)
        if drops:
            plan.drops.extend(drops)
            plan.contexts += 1
    return plan


def apply_retention(
    model: ContextStore, plan: RetentionPlan, progress: Callable[[int, int], None] | None = None
) -> int:
    """Remove the plan's versions (batches of 256, each one transaction), auditing each."""
    policy = model.config.retention
    why = f"retention: keep {policy.keep_versions} versions and {policy.keep_days:g} days"
    removed = 0
    now_ms = int(time.time() * 1000)
    for start in range(0, len(plan.drops), BATCH):
        batch = plan.drops[start : start + BATCH]
        with model.writer():  # no save reads a context's leaves meanwhile
            removed += model.store.drop_versions([r.version_id for r in batch], now_ms)
        model.forget_cached(r.version_id for r in batch)
        for r in batch:
            model.record_maintenance("drop", r.address, r.role, f"{why}: version {r.short_id}")
        if progress is not None:
            progress(removed, len(plan.drops))
    model.sync()
    return removed


def mounted(cfg: Config) -> bool:
    """Whether a mount's daemon serves this data directory."""
    from slurpfs.service import control

    return control.request(cfg.data_dir, "ping", timeout=2.0) is not None


def compacting_copy(cfg: Config) -> tuple[int, int]:
    """Replace the store's file by a compacting copy; (bytes before, after).

    Refuses (`SlurpError`) while a mount serves the data directory. Open no model
    of this data directory in this process while it runs.
    """
    if mounted(cfg):
        raise SlurpError(
            "a mount serves this data directory: the compacting copy waits for an unmount"
        )
    path = data_paths(cfg.data_dir)["store"]
    store = Store(path, map_size=cfg.store.map_size)
    work = path / ".compact"
    shutil.rmtree(work, ignore_errors=True)
    try:
        store.writer.acquire()
        before = (path / "data.mdb").stat().st_size
        expected = store.statistics()
        store.compact_to(work)
        _check_copy(work, cfg.store.map_size, expected.sequence, expected.versions)
        os.chmod(work / "data.mdb", 0o600)
        fd = os.open(work / "data.mdb", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(work / "data.mdb", path / "data.mdb")
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        after = (path / "data.mdb").stat().st_size
    finally:
        store.writer.release()
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return before, after


def _check_copy(work: Path, map_size: int, sequence: int, versions: int) -> None:
    copy = Store(work, map_size=map_size)
    try:
        got = copy.statistics()
    finally:
        copy.close()
    if (got.sequence, got.versions) != (sequence, versions):
        raise SlurpError(
            f"the compacting copy does not match the store ({got.versions} versions at"
            f" sequence {got.sequence}, not {versions} at {sequence}): left as it was"
        )
