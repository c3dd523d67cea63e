"""Placement: which members hold the envelope bodies of which addresses.

Metadata goes to every member; the body of a version goes to the *holders* of
its address. Every node computes the same holders from the same member log,
with no coordination:

* **Partition of an address.** The address key (`Address.key`: authority and
  path components, each in NFC, joined by ``/``, without scheme or temporal
  segment; the exact UTF-8 bytes an envelope header carries) is hashed with
  unkeyed BLAKE2b-64 over ``"slurpfs/partition/v1\\0" ‖ key``; the partition
  is ``(h × partitions) >> 64``, the top bits of ``h`` (the first 12 bits for
  4096 partitions). A temporal address lands with its context.
* **Holders of a partition**, by rendezvous (highest random weight) hashing:
  each member ``m`` weighs ``fmix64(seed(m) XOR key(p))`` for partition ``p``,
  where ``seed(m)`` = BLAKE2b-64(``"slurpfs/placement-node/v1\\0"`` ‖ node id),
  ``key(p)`` = BLAKE2b-64(``"slurpfs/placement-partition/v1\\0"`` ‖ p as u32
  big-endian), and ``fmix64`` is MurmurHash3's 64-bit finaliser (a bijection,
  so weights within a partition are distinct whenever seeds are). Members rank
  by weight, highest first, ties (equal seeds: never seen in practice) by the
  smaller node id; the first ``factor`` are the holders, in *preference order*:
  the order reads fail over in. ``factor`` None, or at least the member count,
  means every member, still in that order.

Rendezvous hashing moves the minimum: a joiner takes a place only in the
partitions where it ranks among the first ``factor`` (about factor/N of them),
pushing out exactly the last holder there; a leaver's partitions each take the
next candidate, and every other holder keeps its rank. `moves` lists which
partitions gain and lose which holders between two placements, for writing to
the union of old and new holders while placement changes and dropping a body
only after every new holder confirmed it.

Hashes are all BLAKE2b (hashlib) and 64-bit integer arithmetic, so any
implementation agrees bit for bit. `Placement` computes every partition at once
with numpy (4096 partitions over 1,000 members: 30-130 ms on a shared 2-core
machine); `holders` computes one partition in pure Python and gives the same
answer.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_PARTITIONS",
    "MAX_PARTITIONS",
    "Move",
    "Placement",
    "holders",
    "moves",
    "partition_of",
    "ranking",
    "weight",
]

DEFAULT_PARTITIONS = 4096
MAX_PARTITIONS = 1 << 20  # a partition number is hashed as a u32; tables stay small

_PARTITION_DOMAIN = b"slurpfs/partition/v1\0"
_NODE_DOMAIN = b"slurpfs/placement-node/v1\0"
_KEY_DOMAIN = b"slurpfs/placement-partition/v1\0"
_MASK = (1 << 64) - 1
_C1 = 0xFF51AFD7ED558CCD  # MurmurHash3 fmix64 multipliers
_C2 = 0xC4CEB9FE1A85EC53
_CHUNK_WEIGHTS = 1 << 19  # weights computed per chunk of partitions (4 MiB of uint64)

U64 = npt.NDArray[np.uint64]
Index = npt.NDArray[np.int32]


class _Member(Protocol):
    @property
    def node_id(self) -> bytes: ...


class _Settings(Protocol):
    @property
    def factor(self) -> int | None: ...

    @property
    def partitions(self) -> int: ...


class _Cluster(Protocol):
    """What `Placement.of_cluster` reads (`slurpfs.net.members.Cluster` has it)."""

    def members(self) -> Sequence[_Member]: ...

    def settings(self) -> _Settings: ...

    def digest(self) -> bytes: ...


# ---- hashes ---------------------------------------------------------------------


def _blake64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _check_partitions(partitions: int) -> None:
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be 1 to {MAX_PARTITIONS}, not {partitions}")


def partition_of(address_key: str, partitions: int = DEFAULT_PARTITIONS) -> int:
    """The partition of an address key (`Address.key`, the envelope header's address)."""
    _check_partitions(partitions)
    return (_blake64(_PARTITION_DOMAIN + address_key.encode("utf-8")) * partitions) >> 64


@functools.lru_cache(maxsize=4096)
def _seed(node_id: bytes) -> int:
    return _blake64(_NODE_DOMAIN + node_id)


@functools.lru_cache(maxsize=8192)
def _key(partition: int) -> int:
    return _blake64(_KEY_DOMAIN + partition.to_bytes(4, "big"))


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * _C1) & _MASK
    k ^= k >> 33
    k = (k * _C2) & _MASK
    return k ^ (k >> 33)


def weight(node_id: bytes, partition: int) -> int:
    """The rendezvous weight of a member for a partition (a 64-bit integer)."""
    if not 0 <= partition < MAX_PARTITIONS:
        raise ValueError(f"partition {partition} is out of range")
    return _fmix64(_seed(node_id) ^ _key(partition))


# ---- one partition, pure Python ------------------------------------------------------


def _members(members: Iterable[bytes]) -> tuple[bytes, ...]:
    ids = tuple(sorted(set(members)))
    if not ids:
        raise ValueError("placement needs at least one member")
    for node in ids:
        if not isinstance(node, bytes) or not node:
            raise TypeError(f"a member is a node id (non-empty bytes), not {node!r}")
    return ids


def _width(factor: int | None, count: int) -> int:
    if factor is None:
        return count
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(
            f"the replication factor must be at least 1 (or None: all), not {factor!r}"
        )
    return min(factor, count)


def ranking(partition: int, members: Iterable[bytes]) -> tuple[bytes, ...]:
    """Every member in preference order for `partition` (highest weight first)."""
    ids = _members(members)
    return tuple(sorted(ids, key=lambda node: (-weight(node, partition), node)))


def holders(partition: int, members: Iterable[bytes], factor: int | None) -> tuple[bytes, ...]:
    """The holders of `partition`, in preference order (the failover order).

    ``factor`` None or at least the member count: every member. Raises
    `ValueError` for no members, a factor below 1 or a partition out of range.
    """
    order = ranking(partition, members)
    return order[: _width(factor, len(order))]


# ---- every partition at once --------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _keys(partitions: int) -> U64:
    keys = np.fromiter((_key(p) for p in range(partitions)), dtype=np.uint64, count=partitions)
    keys.setflags(write=False)
    return keys


def _fmix64_array(k: U64) -> U64:
    """`_fmix64` over an array, in place (uint64 arithmetic wraps like the masks above)."""
    k ^= k >> np.uint64(33)
    k *= np.uint64(_C1)
    k ^= k >> np.uint64(33)
    k *= np.uint64(_C2)
    k ^= k >> np.uint64(33)
    return k


def _table(ids: Sequence[bytes], partitions: int, width: int) -> Index:
    """Member indices (into `ids`, ascending node ids), `width` per partition, best first."""
    seeds = np.fromiter((_seed(node) for node in ids), dtype=np.uint64, count=len(ids))
    keys = _keys(partitions)
    table = np.empty((partitions, width), dtype=np.int32)
    step = max(1, _CHUNK_WEIGHTS // len(ids))
    for start in range(0, partitions, step):
        inverted = ~_fmix64_array(keys[start : start + step, None] ^ seeds[None, :])
        table[start : start + step] = _best(inverted, width)
    table.setflags(write=False)
    return table


def _best(inverted: U64, width: int) -> Index:
    """The `width` smallest of each row of ``~weight`` (the heaviest members), in
    order; overwrites `inverted`.

    Ties (equal seeds) go to the smaller index, the smaller node id, as in
    `ranking`: `argmin` and the stable sort both take the first of equals.
    """
    rows, count = inverted.shape
    largest = np.uint64(_MASK)
    # A member of weight exactly 0 would tie with the taken ones below: sort then.
    if width * 4 >= count or bool((inverted == largest).any()):
        return np.argsort(inverted, axis=1, kind="stable")[:, :width].astype(np.int32)
    # A few passes of argmin beat a partial sort of every row by far.
    best = np.empty((rows, width), dtype=np.int32)
    every = np.arange(rows)
    for rank in range(width):
        best[:, rank] = inverted.argmin(axis=1)
        inverted[every, best[:, rank]] = largest
    return best


@dataclass(frozen=True, eq=False)
class Placement:
    """The holders of every partition for one member set and one set of settings.

    ``version`` is the member-log digest it was computed from (placements of
    equal logs are equal). ``members`` are node ids in ascending order.
    """

    version: bytes
    members: tuple[bytes, ...]
    factor: int | None
    partitions: int
    table: Index  # [partition, rank] -> index into members; read-only

    @classmethod
    def compute(
        cls,
        members: Iterable[bytes],
        factor: int | None,
        partitions: int = DEFAULT_PARTITIONS,
        version: bytes = b"",
    ) -> Placement:
        """Place every partition; raises `ValueError` as `holders` does."""
        _check_partitions(partitions)
        ids = _members(members)
        width = _width(factor, len(ids))
        return cls(version, ids, factor, partitions, _table(ids, partitions, width))

    @classmethod
    def of_cluster(cls, cluster: _Cluster) -> Placement:
        """The placement a cluster's signed settings and current members give."""
        settings = cluster.settings()
        return cls.compute(
            (m.node_id for m in cluster.members()),
            settings.factor,
            settings.partitions,
            cluster.digest(),
        )

    @property
    def width(self) -> int:
        """Holders per partition: the factor, capped at the member count."""
        return int(self.table.shape[1])

    def partition_of(self, address_key: str) -> int:
        return partition_of(address_key, self.partitions)

    def holders(self, partition: int) -> tuple[bytes, ...]:
        """The holders of a partition in preference order (the failover order)."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} is not in 0..{self.partitions - 1}")
        return tuple(map(self.members.__getitem__, self.table[partition].tolist()))

    def holders_of_address(self, address_key: str) -> tuple[bytes, ...]:
        return self.holders(self.partition_of(address_key))

    def holds(self, node: bytes, partition: int) -> bool:
        return node in self.holders(partition)

    def _index(self, node: bytes) -> int | None:
        position = bisect.bisect_left(self.members, node)
        if position < len(self.members) and self.members[position] == node:
            return position
        return None

    def partitions_of(self, node: bytes) -> tuple[int, ...]:
        """The partitions `node` holds, ascending (none for a node that is not a member)."""
        index = self._index(node)
        if index is None:
            return ()
        return tuple(np.flatnonzero((self.table == index).any(axis=1)).tolist())

    def load(self) -> dict[bytes, int]:
        """Partitions held per member (every member listed, zero included)."""
        counts = np.bincount(self.table.ravel(), minlength=len(self.members))
        return dict(zip(self.members, counts.tolist(), strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (
            self.members == other.members
            and self.factor == other.factor
            and self.partitions == other.partitions
            and bool(np.array_equal(self.table, other.table))
        )

    __hash__ = None  # type: ignore[assignment]  # equality compares the table


@dataclass(frozen=True, slots=True)
class Move:
    """One partition whose holders change between two placements."""

    partition: int
    old: tuple[bytes, ...]  # holders before, preference order
    new: tuple[bytes, ...]  # holders after, preference order

    @property
    def gained(self) -> tuple[bytes, ...]:
        """New holders: each must confirm a full sync of the partition before any drop."""
        return tuple(node for node in self.new if node not in self.old)

    @property
    def lost(self) -> tuple[bytes, ...]:
        """Old holders that may drop the partition's bodies once every gained one confirmed."""
        return tuple(node for node in self.old if node not in self.new)

    @property
    def writers(self) -> tuple[bytes, ...]:
        """Where writes go while the move is under way: new holders first, then the lost."""
        return self.new + self.lost


def moves(old: Placement, new: Placement) -> tuple[Move, ...]:
    """The partitions whose holder sets differ, ascending. Both placements must
    have the same partition count (`ValueError` otherwise: a change of the count
    re-places every address, which is not a per-partition move)."""
    if old.partitions != new.partitions:
        raise ValueError(
            f"placements with {old.partitions} and {new.partitions} partitions "
            "cannot be compared partition by partition"
        )
    union = tuple(sorted(set(old.members) | set(new.members)))
    position = {node: i for i, node in enumerate(union)}
    before = np.sort(_remap(old, position), axis=1)
    after = np.sort(_remap(new, position), axis=1)
    if before.shape == after.shape:  # rows hold distinct members: sorted rows are sets
        changed = np.flatnonzero((before != after).any(axis=1)).tolist()
        return tuple(Move(p, old.holders(p), new.holders(p)) for p in changed)
    every = (Move(p, old.holders(p), new.holders(p)) for p in range(old.partitions))
    return tuple(move for move in every if set(move.old) != set(move.new))


def _remap(placement: Placement, position: dict[bytes, int]) -> Index:
    mapping = np.array([position[node] for node in placement.members], dtype=np.int32)
    remapped: Index = mapping[placement.table]
    return remapped
