"""Concurrent versions of one context, merged into one (line-level three-way merge).

Versions written concurrently on different nodes are all leaves of their
context's version graph; the one with the greatest (HLC, author) is the head and
the others show as ``<role>.conflict-<id>``. `merge_leaves` folds them into one
*merge version* whose parents are exactly the leaves it merged, sealed and
signed by this node as a local save is. The rule, deterministic on every node:

* The fold starts from the head and takes the other leaves in head order. The
  head is always part of a merge: the merge version orders after every leaf, so
  a merge that left the head out would replace it (a deletion or a binary head
  is left as it is, with its conflicts).
* A leaf whose plaintext equals one already taken (the head's, say) is taken
  as it is: concurrent versions with identical plaintext are one.
* Otherwise, with `replication.auto_merge` on, the leaf is merged three-way
  (`merge3`, line by line) with what was folded so far, against the nearest
  common ancestor: of the versions that are ancestors of (or are) both the leaf
  and a leaf already taken, the one with the greatest (HLC, author). Versions
  order after their parents, so this one is an ancestor of no other common
  ancestor. With no common ancestor (two nodes created the context apart), the
  ancestor is the empty text; a deletion as ancestor is the empty text too.
* Only text is merged: valid UTF-8 without NUL bytes, at most
  `MAX_MERGE_BYTES`, and the same holds for the ancestor. A deletion, a binary
  or unreadable version, or changes that overlap (merge3's conflict regions:
  both sides changed the same or adjacent lines) leave that leaf a conflict as
  it was. No conflict markers are ever written into a context.
* Fewer than two leaves taken: nothing is written.

The merge version replicates like any version, so every node ends with the same
head. Two nodes merging the same leaves at once make two merge versions with the
same plaintext, which the next merge collapses; the replication worker merges
only on the node designated for the address, so that stays rare.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from merge3 import Merge3

from slurpfs.errors import AccessDenied, Busy, Corrupt
from slurpfs.model import ContextStore, VersionInfo
from slurpfs.store import StaleHead, Store

__all__ = ["MAX_MERGE_BYTES", "MergeOutcome", "Unmerged", "merge_context", "merge_leaves"]

MAX_MERGE_BYTES = 4 << 20  # larger texts are not merged (difflib's time grows fast past this)
_ATTEMPTS = 3  # merges computed again when the leaves moved meanwhile
_DELETION = "a deletion (deletions are never merged)"
_AUTO_MERGE_OFF = "a different text, and automatic merging is off (replication.auto_merge)"
_TOO_LARGE = f"over {MAX_MERGE_BYTES} bytes, too large to merge"


@dataclass(frozen=True, slots=True)
class Unmerged:
    """A leaf that stays a conflict, and why."""

    version: VersionInfo
    reason: str


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    """What `merge_context` did: the merge version it wrote (None: nothing was merged)
    and the other leaves, which stay as they were."""

    merged: VersionInfo | None
    unmerged: tuple[Unmerged, ...]


def merge_leaves(model: ContextStore, address_key: str, role: str) -> VersionInfo | None:
    """If (address, role) has several leaves whose text changes against their common
    ancestor do not overlap (line-level three-way merge, the `merge3` package), write one
    merge version whose parents are all merged leaves and return it; else None (the
    conflict stays, shown as <role>.conflict-<id>).

    Leaves with identical plaintext collapse whatever `replication.auto_merge` says;
    the three-way merge runs only when it is on. The rule: the module docstring.
    None too when the leaves keep changing while this runs (the next call merges).
    Raises `StoreFull` when the version cannot be stored.
    """
    try:
        return merge_context(model, address_key, role).merged
    except Busy:
        return None


def merge_context(
    model: ContextStore, address_key: str, role: str, *, three_way: bool | None = None
) -> MergeOutcome:
    """`merge_leaves`, saying why each leaf left out stays a conflict.

    `three_way` None follows `replication.auto_merge`; ``slurpfs merge`` passes True.
    `Busy` when the leaves changed under each of a few attempts.
    """
    if three_way is None:
        three_way = model.config.replication.auto_merge
    store = model.store
    for _ in range(_ATTEMPTS):
        if store.head(address_key, role, now_ms=int(time.time() * 1000)) is None:
            return MergeOutcome(None, ())  # nothing there, or its TTL has passed
        leaves = store.leaves(address_key, role)
        if len(leaves) < 2:
            return MergeOutcome(None, ())  # (the common case: nothing to read)
        fold = _fold(model, _Graph(store, leaves), leaves, three_way=three_way)
        outcome = MergeOutcome(None, tuple(fold.unmerged))
        if len(fold.parents) < 2:
            return outcome
        try:
            merged = model.commit_merge(
                address_key, role, fold.data, fold.parents, [v.version_id for v in leaves]
            )
        except StaleHead:
            continue  # a version arrived meanwhile: merge the leaves of now
        return MergeOutcome(merged, outcome.unmerged)
    raise Busy(f"{address_key} [{role}]: its versions kept changing while they were merged")


# -- the fold ----------------------------------------------------------------------


class _Refused(Exception):
    """Why a leaf is not merged (the message)."""


@dataclass
class _Fold:
    """The text merged so far, the leaves in it, and the leaves left out."""

    data: bytes
    parents: list[bytes]
    texts: set[bytes]
    unmerged: list[Unmerged] = field(default_factory=list)


def _fold(
    model: ContextStore, graph: _Graph, leaves: Sequence[VersionInfo], *, three_way: bool
) -> _Fold:
    head, others = leaves[0], leaves[1:]
    try:
        data = _read(model, head)
    except _Refused as why:
        refused = [Unmerged(v, f"the head {head.short_id} is {why}") for v in others]
        return _Fold(b"", [], set(), refused)
    fold = _Fold(data, [head.version_id], {data})
    for leaf in others:
        try:
            _take(model, graph, fold, leaf, three_way=three_way)
        except _Refused as why:
            fold.unmerged.append(Unmerged(leaf, str(why)))
    return fold


def _take(
    model: ContextStore, graph: _Graph, fold: _Fold, leaf: VersionInfo, *, three_way: bool
) -> None:
    """Add `leaf` to `fold`, or `_Refused`."""
    if leaf.deleted:
        raise _Refused(_DELETION)
    # The record's plaintext size refuses some leaves before anything is decrypted.
    same_size = any(len(text) == leaf.size for text in fold.texts)
    if not (same_size or three_way):
        raise _Refused(_AUTO_MERGE_OFF)
    if not same_size and leaf.size > MAX_MERGE_BYTES:
        raise _Refused(f"it is {_TOO_LARGE}")
    data = _read(model, leaf)
    if data not in fold.texts:
        if not three_way:
            raise _Refused(_AUTO_MERGE_OFF)
        fold.data = _three_way(model, graph, fold, leaf, data)
    fold.parents.append(leaf.version_id)
    fold.texts.add(data)


def _three_way(
    model: ContextStore, graph: _Graph, fold: _Fold, leaf: VersionInfo, data: bytes
) -> bytes:
    theirs = _lines(data, "it is")
    ours = _lines(fold.data, "the head is" if len(fold.parents) == 1 else "the merged text is")
    base = graph.nearest_common_ancestor(fold.parents, leaf.version_id)
    if base is None or base.deleted:
        ancestor: list[bytes] = []
    else:
        try:
            raw = _read(model, base)
        except _Refused as why:
            raise _Refused(f"their common ancestor {base.short_id} is {why}") from None
        ancestor = _lines(raw, f"their common ancestor {base.short_id} is")
    sources = {"unchanged": ancestor, "a": ours, "same": ours, "b": theirs}
    out: list[bytes] = []
    overlaps: list[str] = []
    for region in Merge3(ancestor, ours, theirs).merge_regions():
        if len(region) == 7:  # a conflict: (kind, then start and end in base, ours, theirs)
            overlaps.append(_line_range(region[3], region[4], len(ours)))
        else:
            kind, start, end = region
            out += sources[kind][start:end]
    if overlaps:
        raise _Refused("changes overlap at lines " + ", ".join(overlaps))
    return b"".join(out)


def _line_range(start: int, end: int, count: int) -> str:
    """Lines [start, end) of the head's text, 1-based (an empty range names the line
    it is before, or the last)."""
    first = max(1, min(start + 1, count))
    last = max(first, end)
    return str(first) if last == first else f"{first}-{last}"


def _read(model: ContextStore, info: VersionInfo) -> bytes:
    if info.deleted:
        raise _Refused(_DELETION)
    try:
        return model.node_read(info)
    except (AccessDenied, Corrupt) as exc:
        raise _Refused(f"not readable on this node ({exc})") from None


def _lines(data: bytes, whose: str) -> list[bytes]:
    """`data` as lines (ends kept), or `_Refused` unless it is text that may be merged."""
    if len(data) > MAX_MERGE_BYTES:
        raise _Refused(f"{whose} {_TOO_LARGE}")
    if b"\0" in data:
        raise _Refused(f"{whose} binary (it holds NUL bytes)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(f"{whose} not UTF-8 text") from None
    return data.splitlines(keepends=True)


# -- the version graph -------------------------------------------------------------


class _Graph:
    """The records of one context's versions, each read from the store once."""

    def __init__(self, store: Store, leaves: Iterable[VersionInfo]) -> None:
        self._store = store
        self._records = {v.version_id: v for v in leaves}

    def record(self, version_id: bytes) -> VersionInfo:
        found = self._records.get(version_id)
        if found is None:
            found = self._store.record(version_id)
            if found is None:
                raise Corrupt(f"version {version_id.hex()[:16]} is referenced but missing")
            self._records[version_id] = found
        return found

    def nearest_common_ancestor(self, ours: Iterable[bytes], theirs: bytes) -> VersionInfo | None:
        """The greatest (HLC, author) version reachable (parents, ancestors) from one of
        `ours` and from `theirs`, itself included; None if there is none.

        Walks both graphs at once, newest first, marking what each side reaches: a
        version's descendants all order after it, so its marks are complete when it
        is taken, and the first version both sides reach is the answer.
        """
        marks: dict[bytes, int] = {}
        queue: list[_Newest] = []

        def reach(version_id: bytes, mark: int) -> None:
            old = marks.get(version_id, 0)
            if old | mark != old:
                marks[version_id] = old | mark
                if not old:
                    heapq.heappush(queue, _Newest(self.record(version_id)))

        for version_id in ours:
            reach(version_id, _OURS)
        reach(theirs, _THEIRS)
        while queue:
            version = heapq.heappop(queue).record
            mark = marks[version.version_id]
            if mark == _OURS | _THEIRS:
                return version
            for parent in version.parents:
                if self.record(parent).order >= version.order:
                    raise _Refused(
                        f"version {version.short_id} does not order after its parents"
                        " (a clock out of order): not merged"
                    )
                reach(parent, mark)
        return None


_OURS, _THEIRS = 1, 2


@dataclass(frozen=True, slots=True)
class _Newest:
    """A heap entry: `heapq` pops the version with the greatest (HLC, author) first."""

    record: VersionInfo

    def __lt__(self, other: _Newest) -> bool:
        return self.record.order > other.record.order
