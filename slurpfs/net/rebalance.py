"""Rebalancing: envelope bodies follow placement as members join, leave or stay down.

Every member holds every version's metadata; the body of a version only on the
holders of its address's partition (`slurpfs.net.placement`). `Rebalancer`
runs in the replication worker beside `slurpfs.net.replica.Replicator` and,
once a second (sooner when poked), compares what this node holds with the
*effective placement*:

* **Who counts.** The members of the log, but a member down for
  ``replication.down_after`` or longer is left out, so its partitions go to the
  next candidates (re-replication). While a quarter or more of the members are
  down, nobody is left out (*frozen*: a network split must not make every side
  copy everything). `effective_members` decides; the placement's digest
  (`placement_digest`) names it, so two nodes can tell whether they agree.
* **Fetch.** Partitions this node holds but lacks bodies of: the bodies are
  fetched from peers (those that announced the partition complete first), and
  verified and kept as copies (`Store.put_body`); a cached body is promoted.
* **Announce.** ``HELD`` tells every peer which partitions this node holds
  *complete* (a copy of every body of the partition it knows of, but those
  written in the last `CLAIM_GRACE` seconds) under which placement, and its
  body counts. That is what ``slurpfs peers`` shows per peer, and what
  `under_replicated` counts from.
* **Drop.** Bodies of partitions this node does not hold (it did before the
  change, or it wrote them): dropped only once every holder of the partition
  announced it complete under the same placement, and then only the bodies each
  of those holders confirms holding as a copy (``HAS``): never fewer than R
  copies. Caches are not this module's (they are evicted by the store's owner).

The frames are documented in docs/FORMAT.md ("Replication protocol").
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from slurpfs.errors import Corrupt, NotFound, SlurpError
from slurpfs.model import ContextStore
from slurpfs.net.placement import Placement, weight

log = logging.getLogger("slurpfs.replica")

__all__ = [
    "DROP_CAUSES",
    "Held",
    "Rebalancer",
    "decode_held",
    "effective_members",
    "encode_held",
    "placement_digest",
]

PASS_INTERVAL = 1.0  # seconds between looks at what this node should hold
ANNOUNCE_INTERVAL = 10.0  # seconds after which an unchanged HELD is sent again
CLAIM_GRACE = 5.0  # seconds: versions this young do not make a partition incomplete
FETCH_BATCH = 64  # bodies per fetch request
FETCH_PER_PASS = 1024  # bodies fetched at most per pass (then announce, then go on)
DROP_BATCH = 256  # ids per HAS request
DIGEST_BYTES = 16
# Why a node turned a body it held back into a stub (the worker's status ``dropped``):
# ``moved``: this rebalancer, once the partition's holders confirmed it; ``handed_off``:
# a body sent whole to every holder of its address (its author, or a former holder that
# passed it on) once each acknowledged it (`slurpfs.net.replica`); ``cache_evicted``: a
# body fetched for a read, kept as a cache, evicted past the limit (`ContextStore`).
DROP_CAUSES = ("moved", "handed_off", "cache_evicted")

_HELD_HEAD = struct.Struct(">16sQQI")  # placement digest, copies, caches, partitions
_DIGEST_DOMAIN = b"slurpfs/effective-placement/v1\0"


# -- the frames ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A peer's announcement: under `placement` it holds `complete` partitions whole."""

    placement: bytes
    copies: int
    caches: int
    partitions: int
    complete: frozenset[int]
    at: float = field(default_factory=time.time, compare=False)


def encode_held(held: Held) -> bytes:
    bitmap = bytearray((held.partitions + 7) // 8)
    for p in held.complete:
        bitmap[p >> 3] |= 0x80 >> (p & 7)
    head = _HELD_HEAD.pack(held.placement, held.copies, held.caches, held.partitions)
    return head + bytes(bitmap)


def decode_held(payload: bytes) -> Held:
    """Parse a ``HELD`` body (`Corrupt` if its length does not match)."""
    if len(payload) < _HELD_HEAD.size:
        raise Corrupt("a HELD frame is too short")
    digest, copies, caches, partitions = _HELD_HEAD.unpack_from(payload)
    bitmap = payload[_HELD_HEAD.size :]
    if len(bitmap) != (partitions + 7) // 8:
        raise Corrupt("a HELD frame's bitmap does not match its partition count")
    complete = frozenset(
        i * 8 + bit for i, byte in enumerate(bitmap) if byte for bit in range(8)
        if byte & (0x80 >> bit) and i * 8 + bit < partitions
    )  # fmt: skip
    return Held(digest, copies, caches, partitions, complete)


def encode_has_answer(flags: Sequence[bool]) -> bytes:
    out = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        if flag:
            out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def decode_has_answer(answer: bytes, count: int) -> list[bool]:
    if len(answer) != (count + 7) // 8:
        raise Corrupt("a HAS answer's length does not match the ids asked")
    return [bool(answer[i >> 3] & (0x80 >> (i & 7))) for i in range(count)]


# -- the effective placement ----------------------------------------------------------------


def effective_members(
    members: Iterable[bytes],
    me: bytes,
    down_since: Mapping[bytes, float | None],
    now: float,
    down_after: float,
) -> tuple[tuple[bytes, ...], bool]:
    """The members placement counts, and whether re-replication is frozen.

    `down_since` has each peer's time of going down (None: up; a member not
    listed counts as up). Members down for `down_after` seconds or longer are
    left out, unless a quarter or more of the members are down (frozen: none are).
    """
    everyone = tuple(sorted(set(members)))
    down = {n: t for n in everyone if n != me and (t := down_since.get(n)) is not None}
    if len(down) * 4 >= len(everyone) and down:
        return everyone, True
    gone = {n for n, since in down.items() if now - since >= down_after}
    return tuple(n for n in everyone if n not in gone), False


def placement_digest(log_digest: bytes, placement: Placement) -> bytes:
    """Names an effective placement: the member log's digest and the members counted."""
    h = hashlib.blake2b(_DIGEST_DOMAIN + log_digest, digest_size=DIGEST_BYTES)
    h.update(struct.pack(">II", placement.factor or 0, placement.partitions))
    for node in placement.members:
        h.update(node)
    return h.digest()


# -- one look at the store ------------------------------------------------------------------


@dataclass
class Survey:
    """Per partition: the addresses known, the ids without a copy here, the ids with one."""

    addresses: dict[int, set[str]] = field(default_factory=dict)
    lacking: dict[int, list[bytes]] = field(default_factory=dict)
    young: dict[int, int] = field(default_factory=dict)  # lacking ids written lately
    copies: dict[int, list[bytes]] = field(default_factory=dict)

    def complete(self) -> frozenset[int]:
        """Partitions with versions, all of whose bodies (but the young) are copies here."""
        return frozenset(
            p for p in self.addresses if len(self.lacking.get(p, ())) <= self.young.get(p, 0)
        )


def survey(model: ContextStore, placement: Placement, now: float) -> Survey:
    """Every version's partition, and whether its body is a copy here (in a thread)."""
    store = model.store
    copies = set(store.body_ids(copies_only=True))
    out = Survey()
    young_ms = int((now - CLAIM_GRACE) * 1000)
    for record in store.iter_records():
        p = placement.partition_of(record.address)
        out.addresses.setdefault(p, set()).add(record.address)
        if record.version_id in copies:
            out.copies.setdefault(p, []).append(record.version_id)
        else:
            out.lacking.setdefault(p, []).append(record.version_id)
            if record.hlc >> 16 > young_ms:
                out.young[p] = out.young.get(p, 0) + 1
    return out


# -- the rebalancer -------------------------------------------------------------------------


class Peers(Protocol):
    """What the rebalancer uses of the replicator (`slurpfs.net.replica.Replicator`)."""

    def down_since(self) -> dict[bytes, float | None]: ...

    async def send_held(self, node: bytes, payload: bytes) -> bool: ...

    async def ask_has(self, node: bytes, ids: Sequence[bytes]) -> list[bool]: ...

    async def fetch_bodies(self, node: bytes, ids: Sequence[bytes]) -> dict[bytes, bytes]: ...


class ClusterInfo(Protocol):
    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class RebalanceReport:
    """What ``status`` shows of rebalancing."""

    placement: str  # the effective placement's digest, hex
    frozen: bool  # a quarter or more of the members are down: no re-replication
    left_out: int  # members left out of placement (down for replication.down_after)
    holding: int  # partitions this node holds
    lacking: int  # partitions this node holds but lacks bodies of
    surplus: int  # partitions whose bodies this node keeps but does not hold
    under_replicated: int  # addresses with fewer than R reachable confirmed copies
    under_replicated_partitions: int
    fetched: int  # bodies fetched (or promoted from a cache) as copies, since start
    fetched_bytes: int
    dropped: int
    fetch_failures: int


class Rebalancer:
    """One node's side of rebalancing (module docstring). `run` until cancelled."""

    def __init__(
        self,
        model: ContextStore,
        cluster: ClusterInfo,
        me: bytes,
        members: Callable[[], Sequence[bytes]],
        settings: Callable[[], tuple[int | None, int]],
        peers: Peers,
        *,
        down_after: float,
    ) -> None:
        self.model = model
        self.cluster = cluster
        self.me = me
        self._members = members
        self._settings = settings  # (factor, partitions) of the signed log
        self.peers = peers
        self.down_after = down_after
        self.held: dict[bytes, Held] = {}  # the latest HELD of each peer
        self._sent: dict[bytes, tuple[bytes, float]] = {}  # peer -> (what, when) last sent
        self._wake = trio.Event()
        self._placement: Placement | None = None
        self._digest = b""
        self._frozen = False
        self._left_out = 0
        self._survey = Survey()
        self._complete: frozenset[int] = frozenset()
        self._mine: frozenset[int] = frozenset()
        self.fetched = self.dropped = self.fetch_failures = self.fetched_bytes = 0
        self._looked: tuple[object, ...] = ()  # what the last pass saw (nothing new: no pass)
        self._heard = 0  # HELD announcements that changed something

    def poke(self) -> None:
        """Something changed (a commit, a HELD, a member up or down): look at once."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.rebalance_once()
            except SlurpError as exc:
                log.warning("rebalancing failed (trying again): %s", exc)
            with trio.move_on_after(PASS_INTERVAL):
                await self._wake.wait()
            self._wake = trio.Event()

    # -- one pass -----------------------------------------------------------------------------

    def placement(self) -> Placement:
        """The effective placement now (computed again only when the members counted change)."""
        members = self._members()
        factor, partitions = self._settings()
        counted, self._frozen = effective_members(
            members, self.me, self.peers.down_since(), time.time(), self.down_after
        )
        self._left_out = len(set(members)) - len(counted)
        old = self._placement
        if (
            old is None
            or old.members != counted
            or old.factor != factor
            or old.partitions != partitions
            or old.version != self.cluster.digest()
        ):
            new = Placement.compute(counted, factor, partitions, self.cluster.digest())
            self._placement, self._digest = new, placement_digest(new.version, new)
            if old is not None and old.members != new.members:
                log.info(
                    "placement changed: %d of %d members hold bodies%s",
                    len(counted), len(set(members)), " (frozen)" if self._frozen else "",
                )  # fmt: skip
        assert self._placement is not None
        return self._placement

    def _news(self) -> tuple[object, ...]:
        """What a pass depends on; the same as last time and nothing left to do: no pass."""
        busy = any(self._survey.lacking.values()) or bool(self._survey.copies.keys() - self._mine)
        store = self.model.store
        return (self._digest, store.sequence(), store.body_count(), self._heard, busy)

    async def rebalance_once(self) -> None:
        placement = self.placement()
        self._mine = frozenset(placement.partitions_of(self.me))
        looked = self._news()
        young = any(self._survey.young.values())
        if looked == self._looked and not young and not looked[-1]:
            await self._announce(placement)  # (a refresh, or a peer that came up)
            return
        self._looked = looked
        now = time.time()
        found = await trio.to_thread.run_sync(survey, self.model, placement, now)
        mine = set(placement.partitions_of(self.me))
        lacking = {p: ids for p, ids in found.lacking.items() if p in mine}
        if lacking:
            got = await self._fetch(placement, lacking)
            if got:
                found = await trio.to_thread.run_sync(survey, self.model, placement, time.time())
        self._survey, self._complete = found, found.complete()
        await self._announce(placement)
        surplus = {p: ids for p, ids in found.copies.items() if p not in mine}
        if surplus:
            await self._drop(placement, surplus)

    # -- fetching -----------------------------------------------------------------------------

    def _sources(self, placement: Placement, partition: int) -> list[bytes]:
        """Peers to ask for a partition's bodies: up ones that announced it complete,
        then the other up ones by rank."""
        down = self.peers.down_since()
        up = [n for n in self._members() if n != self.me and down.get(n, 0.0) is None]
        complete = [n for n in up if partition in self._held(n, any_placement=True)]
        rest = [n for n in sorted(up, key=lambda n: -weight(n, partition)) if n not in complete]
        return complete + rest

    def _held(self, node: bytes, *, any_placement: bool = False) -> frozenset[int]:
        held = self.held.get(node)
        if held is None or (not any_placement and held.placement != self._digest):
            return frozenset()
        return held.complete

    async def _fetch(self, placement: Placement, lacking: Mapping[int, list[bytes]]) -> int:
        """Fetch (or promote from a cache) bodies this node should hold; how many came."""
        store, got, budget = self.model.store, 0, FETCH_PER_PASS
        failed: set[bytes] = set()  # peers a request failed to this pass: not asked again
        for partition, ids in sorted(lacking.items()):
            cached = {v for v in ids if store.has_body(v)}
            for vid in cached:
                envelope = store.envelope(vid)
                if envelope is not None and await self._put(vid, envelope):
                    got += 1
            wanted = [v for v in ids if v not in cached][:budget]
            for node in self._sources(placement, partition):
                if not wanted:
                    break
                if node in failed:
                    continue
                wanted, came, ok = await self._fetch_from(node, wanted)
                got += came
                if not ok:
                    failed.add(node)
            budget -= len(ids)
            if budget <= 0:
                break
        return got

    async def _fetch_from(self, node: bytes, wanted: list[bytes]) -> tuple[list[bytes], int, bool]:
        """Ask `node` for `wanted` bodies: what is still wanted, how many came, and
        False if a request failed (the peer is not asked again this pass)."""
        came = 0
        still: list[bytes] = []
        for at in range(0, len(wanted), FETCH_BATCH):
            batch = wanted[at : at + FETCH_BATCH]
            try:
                bodies = await self.peers.fetch_bodies(node, batch)
            except SlurpError as exc:
                self.fetch_failures += 1
                log.info("fetching bodies from %s failed: %s", node.hex()[:16], exc)
                return still + wanted[at:], came, False
            for vid in batch:
                envelope = bodies.get(vid)
                if envelope is not None and await self._put(vid, envelope):
                    came += 1
                else:
                    still.append(vid)
        return still, came, True

    async def _put(self, vid: bytes, envelope: bytes) -> bool:
        try:
            await trio.to_thread.run_sync(self._put_copy, vid, envelope)
        except Corrupt as exc:
            self.fetch_failures += 1
            log.warning("a fetched body of %s was refused: %s", vid.hex()[:16], exc)
            return False
        except NotFound:
            return False  # purged meanwhile
        self.fetched += 1
        self.fetched_bytes += len(envelope)
        return True

    def _put_copy(self, vid: bytes, envelope: bytes) -> None:
        self.model.store.put_body(vid, envelope, cache=False)

    # -- announcing ---------------------------------------------------------------------------

    async def _announce(self, placement: Placement) -> None:
        copies, caches = self.model.store.body_count()
        held = Held(self._digest, copies, caches, placement.partitions, self._complete)
        payload = encode_held(held)
        down = self.peers.down_since()
        now = time.monotonic()
        for node in self._members():
            if node == self.me or down.get(node, 0.0) is not None:
                if node != self.me:
                    self._sent.pop(node, None)  # down: send again once up
                continue
            last = self._sent.get(node)
            if last is not None and last[0] == payload and now - last[1] < ANNOUNCE_INTERVAL:
                continue
            if await self.peers.send_held(node, payload):
                self._sent[node] = (payload, now)

    def received_held(self, node: bytes, payload: bytes) -> None:
        """A peer's ``HELD`` (`Corrupt` for a malformed one)."""
        held = decode_held(payload)
        old = self.held.get(node)
        self.held[node] = held
        if old is None or old.placement != held.placement or old.complete != held.complete:
            self._heard += 1
            self.poke()

    def forget(self, node: bytes) -> None:
        """A peer went down: its announcements no longer count as reachable copies."""
        self._sent.pop(node, None)
        self._heard += 1
        self.poke()

    # -- dropping -----------------------------------------------------------------------------

    async def _drop(self, placement: Placement, surplus: Mapping[int, list[bytes]]) -> None:
        """Drop bodies of partitions this node does not hold, once their holders confirmed."""
        down = self.peers.down_since()
        for partition, ids in sorted(surplus.items()):
            holders = placement.holders(partition)
            if self.me in holders or len(holders) < placement.width:
                continue
            if not all(down.get(h, 0.0) is None and partition in self._held(h) for h in holders):
                continue  # a new holder has not confirmed the partition complete yet
            confirmed = set(ids)
            for holder in holders:
                confirmed &= set(await self._has(holder, [v for v in ids if v in confirmed]))
                if not confirmed:
                    break
            if confirmed:
                dropped = await trio.to_thread.run_sync(self._drop_bodies, confirmed)
                self.dropped += dropped
                log.debug("dropped %d bodies of partition %d", dropped, partition)

    async def _has(self, holder: bytes, ids: list[bytes]) -> list[bytes]:
        """The ids of which `holder` confirms a copy (none if it cannot be asked)."""
        yes: list[bytes] = []
        for at in range(0, len(ids), DROP_BATCH):
            batch = ids[at : at + DROP_BATCH]
            try:
                flags = await self.peers.ask_has(holder, batch)
            except SlurpError:
                return yes
            yes += [v for v, held in zip(batch, flags, strict=True) if held]
        return yes

    def _drop_bodies(self, ids: Iterable[bytes]) -> int:
        return sum(self.model.store.drop_body(v) for v in ids)

    def serve_has(self, payload: bytes) -> bytes:
        """A peer asks which of these ids this node holds a copy of (in a thread)."""
        if len(payload) % 32:
            raise Corrupt("a HAS request's ids are not 32 bytes each")
        store = self.model.store
        ids = [payload[at : at + 32] for at in range(0, len(payload), 32)]
        return encode_has_answer([store.has_body(v) and not store.is_cached(v) for v in ids])

    # -- reports ------------------------------------------------------------------------------

    def peer_bodies(self) -> dict[bytes, int]:
        """Copies each peer last announced."""
        return {node: held.copies for node, held in self.held.items()}

    def report(self) -> RebalanceReport:
        placement = self._placement
        found = self._survey
        if placement is None:
            return RebalanceReport("", False, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        mine = set(placement.partitions_of(self.me))
        short = self._short_partitions(placement)
        return RebalanceReport(
            placement=self._digest.hex(),
            frozen=self._frozen,
            left_out=self._left_out,
            holding=len(mine),
            lacking=sum(1 for p, ids in found.lacking.items() if p in mine and ids),
            surplus=sum(1 for p in found.copies if p not in mine),
            under_replicated=sum(len(found.addresses[p]) for p in short),
            under_replicated_partitions=len(short),
            fetched=self.fetched,
            fetched_bytes=self.fetched_bytes,
            dropped=self.dropped,
            fetch_failures=self.fetch_failures,
        )

    def _short_partitions(self, placement: Placement) -> list[int]:
        """Partitions with versions and fewer than R reachable complete copies."""
        members = set(self._members())
        factor, _ = self._settings()
        needed = len(members) if factor is None else min(factor, len(members))
        down = self.peers.down_since()
        reachable = [
            self.held[n].complete
            for n in members
            if n != self.me and n in self.held and down.get(n, 0.0) is None
        ]
        short = []
        for p in self._survey.addresses:
            count = (p in self._complete) + sum(p in c for c in reachable)
            if count < needed:
                short.append(p)
        return short
