"""The replication protocol: every member holds every version.

`Replicator` is the transport's `Receiver` (`slurpfs.net.transport`) and runs
one task per member. The byte layout of its frames is in docs/FORMAT.md; what
happens, per peer:

* **Hello.** Once the peer is up: our store epoch, change sequence and the
  member log's digest each way. Differing logs are exchanged and merged
  (`ClusterView.merge`; the transport's allowlist follows the merged log).
* **Cursor pull.** We keep, per peer, the (epoch, sequence) of its change log
  up to which we hold everything (auxiliary table `aux:replica`, so an
  emptied store starts again from 0). A changed epoch resets it; a peer whose
  sequence is lower than our cursor for the same epoch was rolled back (we
  warn, and follow its log from where it is now). Then we pull "everything
  since the cursor" in batches, in its change-log order (parents come before
  children), ingest each batch and move the cursor.
* **Push.** Every change of our log (local commits, and versions we ingested:
  a peer that cannot reach their author still gets them) goes to each peer
  that is up as soon as it is committed; a version that came from that very
  peer goes as its id only. What a peer has not been sent is bounded
  (`PUSH_BACKLOG` changes): past it we skip ahead and tell the peer to pull.
  A receiver acknowledges what it holds after each batch; the acks are what
  ``replication.write_quorum`` waits for.
* **Placement.** With a replication factor R in the member log's settings,
  envelope bodies go only to the R holders of each address
  (`slurpfs.net.placement`); every other member gets the version's metadata
  and its stub (item kind 2). A node that holds only a stub sends a stub, even
  to a holder (the holder takes the body from another). An author that is not
  a holder keeps its new body until every holder acknowledged it, then drops
  it. `fetch_body` reads a body this node does not hold from the holders in
  failover order (then the author and any other member that is up), each
  bounded by `BODY_TIMEOUT`; a body that does not hash to its id is refused and
  the next one asked.
* **Missing parents.** A version whose parents are not here makes the
  receiver fetch them (and theirs) from the sender before ingesting again.
* **Digests.** Version ids are grouped into buckets (4096, by a hash of the
  address; 64 groups of 64). On connect and every `DIGEST_INTERVAL` (± 25 %)
  we compare group digests, then bucket digests, then the ids of the buckets
  that differ, and fetch what we lack: that catches what cursors cannot (a
  peer's rolled-back log, versions purged and refilled).

Foreign versions only enter through `slurpfs.ingest.Ingest` (every check, all
or nothing; a batch refused as a whole is retried one version at a time so
one bad version does not hold up the rest). A version stamped further in the
future than the cluster allows is kept, and warned about once per peer; the
local clock does not follow it (`ContextStore.max_clock_ahead_ms`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import random
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import trio

from slurpfs import hlc
from slurpfs.crypto import envelope as env
from slurpfs.errors import BodyUnavailable, Corrupt, SlurpError
from slurpfs.ingest import Incoming, Ingest, IngestReport, MissingParents
from slurpfs.model import ContextStore
from slurpfs.net.merge import merge_leaves
from slurpfs.net.placement import Placement
from slurpfs.net.rebalance import Rebalancer, decode_has_answer
from slurpfs.net.transport import PeerState, Transport, TransportError

log = logging.getLogger("slurpfs.replica")

__all__ = [
    "ClusterView",
    "PeerReport",
    "ProtocolError",
    "QuorumFailed",
    "Replicator",
]

EPOCH_BYTES = 16
CURSORS = b"replica"  # the store's auxiliary table of per-peer cursors
PULL_BATCH = 256  # versions per pull answer (fewer when they exceed PULL_BYTES)
PULL_BYTES = 1 << 20
PUSH_BATCH = 128  # changes per push frame
PUSH_BACKLOG = 10_000  # changes a peer may be behind our pushes before it must pull
FETCH_ROUNDS = 256  # rounds of fetching missing ancestors before giving up
DIGEST_INTERVAL = 600.0  # seconds between digest exchanges with a peer (± 25 %)
GROUPS = 64
BUCKETS_PER_GROUP = 64
BUCKETS = GROUPS * BUCKETS_PER_GROUP
DIGEST_FRESH = 5.0  # seconds a computed digest table is reused while nothing changed
REPAIR_BUCKETS = 64  # buckets whose ids one request lists (a repair pages through all)
UP_POLL = 0.1  # seconds between looks at whether a peer is up
RECENT = 50_000  # version ids remembered for acks and origins
INBOX = 64  # push batches waiting per peer before the sender is slowed down
BODY_TIMEOUT = 2.0  # seconds one member is given to send a body (then the next is asked)
BODY_DEADLINE = 8.0  # seconds a body read may take in all, every member asked

V = TypeVar("V")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_NO_EPOCH = bytes(EPOCH_BYTES)


class ProtocolError(SlurpError):
    """A peer sent a frame this node cannot parse."""


class QuorumFailed(SlurpError):
    """Fewer peers than ``replication.write_quorum`` acknowledged a version in time."""


class Op:
    HELLO = 1  # request: epoch ‖ sequence u64 ‖ log digest[32]; reply: the same, theirs
    LOG = 2  # request: our log entries; reply: theirs
    PULL = 3  # request: epoch ‖ since u64 ‖ limit u32; reply: epoch ‖ last u64 ‖ more u8 ‖ items
    FETCH = 4  # request: version ids; reply: items (those held)
    DIGEST = 5  # request: level u8 ‖ indices u16...; reply: digests or ids (32 bytes each)
    BODIES = 6  # request: version ids; reply: count u32 ‖ (id[32] ‖ length u32 ‖ envelope)...
    HAS = 7  # request: version ids; reply: a bit per id (1: a copy of its body is held)
    PUSH = 16  # data: epoch ‖ items (with their sequence numbers)
    ACK = 17  # data: version ids now held
    PULL_NOW = 18  # data: the sender skipped changes (backlog): pull from your cursor
    HELD = 19  # data: placement digest[16] ‖ copies u64 ‖ caches u64 ‖ partitions u32 ‖ bitmap


class MemberView(Protocol):
    @property
    def node_id(self) -> bytes: ...
    @property
    def addrs(self) -> tuple[str, ...]: ...
    @property
    def name(self) -> str: ...


class SettingsView(Protocol):
    @property
    def max_clock_offset_ms(self) -> int: ...
    @property
    def factor(self) -> int | None: ...
    @property
    def partitions(self) -> int: ...


class ClusterView(Protocol):
    """What replication uses of `slurpfs.net.members.Cluster`."""

    def me(self) -> MemberView: ...
    def members(self) -> Sequence[MemberView]: ...
    def removed(self) -> Mapping[bytes, int]: ...
    def settings(self) -> SettingsView: ...
    def digest(self) -> bytes: ...
    def entries(self) -> list[bytes]: ...
    def merge(self, entries: Sequence[bytes]) -> bool: ...


# -- encoding ----------------------------------------------------------------------------


def _pack_list(parts: Iterable[bytes]) -> bytes:
    items = list(parts)
    return _U32.pack(len(items)) + b"".join(_U32.pack(len(p)) + p for p in items)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ProtocolError("a replication frame ends early")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self.take(8))[0])

    def blob(self) -> bytes:
        return self.take(self.u32())

    def blobs(self) -> list[bytes]:
        return [self.blob() for _ in range(self.u32())]

    def end(self) -> None:
        if self.at != len(self.data):
            raise ProtocolError("a replication frame has trailing bytes")


@dataclass(frozen=True, slots=True)
class Item:
    """One change as it travels: its sequence in the sender's log, and the version
    (None: sent as its id only, the receiver holds it)."""

    seq: int
    version_id: bytes
    version: Incoming | None


def encode_item(item: Item) -> bytes:
    head = _U64.pack(item.seq) + item.version_id
    v = item.version
    if v is None:
        return head + b"\0"
    kind = b"\1" if v.body else b"\2"  # 2: metadata only, `envelope` is the stub
    slots = b"".join(
        bytes([len(s.role.encode())]) + s.role.encode() + _U32.pack(s.generation)
        + _U16.pack(len(s.sealed)) + s.sealed
        for s in v.slots
    )  # fmt: skip
    return b"".join(
        (
            head,
            kind,
            _U64.pack(v.expires_ms or 0),
            _U32.pack(len(v.envelope)),
            v.envelope,
            _U16.pack(len(v.slots)),
            slots,
        )
    )


def decode_item(r: _Reader) -> Item:
    seq, version_id, kind = r.u64(), r.take(32), r.u8()
    if not kind:
        return Item(seq, version_id, None)
    if kind not in (1, 2):
        raise ProtocolError(f"unknown item kind {kind}")
    expires = r.u64()
    envelope = r.take(r.u32())
    slots = []
    for _ in range(r.u16()):
        try:
            role = r.take(r.u8()).decode()
        except UnicodeDecodeError:
            raise ProtocolError("a key slot's role is not UTF-8") from None
        generation = r.u32()
        slots.append(env.KeySlot(role, generation, r.take(r.u16())))
    return Item(
        seq, version_id, Incoming(version_id, envelope, slots, expires or None, body=kind == 1)
    )


def _items(r: _Reader) -> list[Item]:
    return [decode_item(r) for _ in range(r.u32())]


def _pack_items(items: Sequence[Item]) -> bytes:
    return _U32.pack(len(items)) + b"".join(encode_item(i) for i in items)


# -- per-peer state ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerReport:
    """One member as `slurpfs peers` and ``.slurp/peers`` show it."""

    node_id: str
    name: str
    state: str  # up, down, removed, or "me"
    mode: str  # push, catching up, initial sync n of m, connecting, ""
    address: str | None
    rtt_ms: float | None
    clock_offset_ms: float | None
    last_contact: float | None
    lag: int | None  # versions in its log past our cursor (None: unknown)
    pushed: int
    pulled: int
    failures: int
    push_failures: int
    push_failing: bool
    acked: int
    down_since: float | None
    last_error: str


@dataclass
class _Peer:
    node_id: bytes
    name: str
    inbox: tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]] = field(
        default_factory=lambda: trio.open_memory_channel[bytes](INBOX)
    )
    lock: trio.Lock = field(default_factory=trio.Lock)  # ingest from this peer, one at a time
    wake: trio.Event = field(default_factory=trio.Event)  # new changes to push
    nudge: trio.Event = field(default_factory=trio.Event)  # want_pull or want_log was set
    want_pull: bool = False  # pull from its cursor (a gap in its pushes, its request)
    want_log: bool = False  # our member log changed: hello again (the logs are exchanged)
    pushed_seq: int | None = None  # our sequence pushed so far (None: not in a session)
    skipped: bool = False  # the backlog overflowed: the peer must be told to pull
    their_epoch: bytes = _NO_EPOCH
    their_seq: int = 0
    syncing: tuple[str, int, int] | None = None  # a pull under way: (what, done, total)
    up: bool = False
    down_since: float | None = field(default_factory=time.time)
    pushed: int = 0
    pulled: int = 0
    failures: int = 0
    push_failures: int = 0
    acked: int = 0
    last_error: str = ""
    push_failing: bool = False  # the last push to it failed (cleared by the next that works)
    warned_clock: bool = False
    warned_rollback: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def bucket_of(address: str) -> int:
    """The digest bucket of an address (the first 12 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(address.encode()).digest()[:2]) >> 4


class _Digests:
    """Per-bucket XOR of SHA-256(version id) over the versions held."""

    def __init__(self, model: ContextStore) -> None:
        self.model = model
        self.ids: list[list[bytes]] = [[] for _ in range(BUCKETS)]
        self.buckets = [0] * BUCKETS
        self._made_at = -DIGEST_FRESH
        self._seq = -1
        self._lock = trio.Lock()

    async def fresh(self) -> _Digests:
        async with self._lock:
            seq = self.model.store.sequence()
            if seq != self._seq or time.monotonic() - self._made_at > DIGEST_FRESH:
                await trio.to_thread.run_sync(self._compute)
                self._seq, self._made_at = seq, time.monotonic()
        return self

    def _compute(self) -> None:
        ids: list[list[bytes]] = [[] for _ in range(BUCKETS)]
        buckets = [0] * BUCKETS
        for record in self.model.store.iter_records():
            b = bucket_of(record.address)
            ids[b].append(record.version_id)
            buckets[b] ^= int.from_bytes(hashlib.sha256(record.version_id).digest())
        self.ids, self.buckets = ids, buckets

    def groups(self) -> list[bytes]:
        out = []
        for g in range(GROUPS):
            value = 0
            for b in range(g * BUCKETS_PER_GROUP, (g + 1) * BUCKETS_PER_GROUP):
                value ^= self.buckets[b]
            out.append(value.to_bytes(32))
        return out

    def bucket_digests(self, groups: Iterable[int]) -> list[bytes]:
        return [
            self.buckets[b].to_bytes(32)
            for g in groups
            for b in range(g * BUCKETS_PER_GROUP, (g + 1) * BUCKETS_PER_GROUP)
        ]


# -- the replicator ----------------------------------------------------------------------


class Replicator:
    """One node's side of replication (module docstring). Run `run` in a nursery
    with the `Transport` it is the receiver of."""

    def __init__(
        self,
        model: ContextStore,
        cluster: ClusterView,
        *,
        on_ingest: Callable[[IngestReport], Awaitable[None]] | None = None,
        on_log: Callable[[], None] | None = None,
        digest_interval: float = DIGEST_INTERVAL,
    ) -> None:
        self.model = model
        self.cluster = cluster
        self.ingest = Ingest(model, removed=cluster.removed)
        self.transport: Transport | None = None
        self._on_ingest = on_ingest
        self._on_log = on_log  # the member log changed by a merge
        self.digest_interval = digest_interval
        self._peers: dict[bytes, _Peer] = {}
        # version id -> (the peer it came from, its number in our change log): the
        # push to that peer sends only the id, unless the version is listed again
        # later (its key slots changed: a rotation) and the slots must travel.
        self._origin: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()
        self._acks: OrderedDict[bytes, set[bytes]] = OrderedDict()
        self._acked = trio.Event()
        self._digests = _Digests(model)
        self._nursery: trio.Nursery | None = None
        self._me = cluster.me().node_id
        self.rejected = 0  # versions refused by ingest (checks failed)
        self.ingested = 0
        self.merges = 0  # merge versions this node wrote for concurrent leaves
        self.rebalancer: Rebalancer | None = None  # moves bodies (`slurpfs.net.rebalance`)
        # The placement of the member log as last read (`placement`; None: not computed)
        self._placed: tuple[Placement | None] | None = None
        # version id -> peers it was sent to whole (their acks then mean they hold the body)
        self._sent_whole: OrderedDict[bytes, set[bytes]] = OrderedDict()
        self.bodies_fetched = 0  # bodies fetched from other members for reads here
        self.bodies_refused = 0  # bodies a member sent that were not the version's
        self.handed_off = 0  # bodies dropped here once every holder acknowledged them

    # -- running -------------------------------------------------------------------------

    async def run(self, transport: Transport) -> None:
        """Replicate with every member until cancelled."""
        self.transport = transport
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.members_changed()
            await trio.sleep_forever()

    def members_changed(self) -> None:
        """The member log changed: the transport's allowlist and our peer tasks follow."""
        self._placed = None  # (settings and members: placement is computed again)
        members = {m.node_id: m for m in self.cluster.members()}
        if self.transport is not None:
            self.transport.set_members(
                {n: (m.addrs[0] if m.addrs else None) for n, m in members.items()}
            )
        for node_id in list(self._peers):
            if node_id not in members:
                self._peers.pop(node_id).scope.cancel()
        for node_id, member in members.items():
            if node_id == self._me or node_id in self._peers:
                continue
            peer = self._peers[node_id] = _Peer(node_id, member.name or node_id.hex()[:16])
            if self._nursery is not None:
                self._nursery.start_soon(self._peer_main, peer)

    def log_changed(self) -> None:
        """Our member log changed: every peer that is up hears of it (hello again)."""
        for peer in self._peers.values():
            peer.want_log = True
            peer.nudge.set()

    @staticmethod
    def _want_pull(peer: _Peer) -> None:
        peer.want_pull = True
        peer.nudge.set()

    def local_changed(self) -> None:
        """Our change log grew: push to every peer."""
        for peer in self._peers.values():
            peer.wake.set()

    async def _peer_main(self, peer: _Peer) -> None:
        with peer.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._inbox, peer)
                while True:
                    await self._until(peer, up=True)
                    peer.up, peer.down_since = True, None
                    self._rebalance_poke()
                    try:
                        await self._session(peer)
                    except* SlurpError as group:
                        # (from the session's nursery, a push task's too: in a group)
                        exc = group.exceptions[0]
                        peer.failures += 1
                        peer.last_error = str(exc)
                        log.info("replication with %s interrupted: %s", peer.name, exc)
                    peer.pushed_seq, peer.syncing = None, None
                    if self._is_up(peer.node_id):
                        await trio.sleep(1.0)  # a failure while connected: not in a loop
                    else:
                        peer.up, peer.down_since = False, time.time()
                        if self.rebalancer is not None:
                            self.rebalancer.forget(peer.node_id)

    def _rebalance_poke(self) -> None:
        if self.rebalancer is not None:
            self.rebalancer.poke()

    def _state(self, node_id: bytes) -> PeerState | None:
        if self.transport is None:
            return None
        for state in self.transport.peers():
            if state.node_id == node_id:
                return state
        return None

    def _is_up(self, node_id: bytes) -> bool:
        state = self._state(node_id)
        return state is not None and state.up

    async def _until(self, peer: _Peer, *, up: bool) -> None:
        # The transport keeps no event per peer state: a cheap look every UP_POLL.
        while self._is_up(peer.node_id) != up:  # noqa: ASYNC110
            await trio.sleep(UP_POLL)

    async def _session(self, peer: _Peer) -> None:
        """One connection's replication: hello, pull, then push and repair until down."""
        log.debug("replicating with %s (%s): hello", peer.name, peer.node_id.hex()[:16])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._end_when_down, peer, nursery.cancel_scope)
            peer.pushed_seq = self.model.store.sequence()
            await self._hello(peer)
            nursery.start_soon(self._push_loop, peer)
            await self._pull(peer)
            await self._repair(peer)
            next_repair = trio.current_time() + self._jittered()
            while True:
                with trio.move_on_at(next_repair):
                    await peer.nudge.wait()
                peer.nudge = trio.Event()
                if peer.want_log:
                    peer.want_log = False
                    await self._hello(peer)
                if peer.want_pull:
                    peer.want_pull = False
                    await self._pull(peer)
                if trio.current_time() >= next_repair:
                    await self._repair(peer)
                    next_repair = trio.current_time() + self._jittered()

    def _jittered(self) -> float:
        return self.digest_interval * random.uniform(0.75, 1.25)

    async def _end_when_down(self, peer: _Peer, scope: trio.CancelScope) -> None:
        await self._until(peer, up=False)
        scope.cancel()

    # -- hello and the member log ----------------------------------------------------------

    def _hello_payload(self) -> bytes:
        store = self.model.store
        return (store.epoch() or _NO_EPOCH) + _U64.pack(store.sequence()) + self.cluster.digest()

    async def _hello(self, peer: _Peer) -> None:
        answer = await self._request(peer, "meta", Op.HELLO, self._hello_payload())
        r = _Reader(answer)
        epoch, seq, digest = r.take(EPOCH_BYTES), r.u64(), r.take(32)
        r.end()
        peer.their_epoch, peer.their_seq = epoch, seq
        if digest != self.cluster.digest():
            theirs = await self._request(peer, "meta", Op.LOG, _pack_list(self.cluster.entries()))
            await self._merge_log(_Reader(theirs).blobs())
        self._check_rollback(peer)

    async def _merge_log(self, entries: list[bytes]) -> None:
        if await trio.to_thread.run_sync(self.cluster.merge, entries):
            log.info("the member log changed (merged from a peer)")
            self.members_changed()
            if self._on_log is not None:
                self._on_log()

    def _check_rollback(self, peer: _Peer) -> None:
        epoch, seq = self._cursor(peer)
        if epoch == peer.their_epoch and peer.their_seq < seq:
            log.warning(
                "peer %s was rolled back: its change log ends at %d, but we had read it up"
                " to %d; following it from where it is now (it refills from its peers)",
                peer.name,
                peer.their_seq,
                seq,
            )
            peer.warned_rollback = True
            self._set_cursor(peer, epoch, peer.their_seq)

    # -- cursors ---------------------------------------------------------------------------

    def _cursor(self, peer: _Peer) -> tuple[bytes, int]:
        raw = self.model.store.aux_get(CURSORS, peer.node_id)
        if raw is None or len(raw) != EPOCH_BYTES + 8:
            return _NO_EPOCH, 0
        return raw[:EPOCH_BYTES], int(_U64.unpack(raw[EPOCH_BYTES:])[0])

    def _set_cursor(self, peer: _Peer, epoch: bytes, seq: int) -> None:
        self.model.store.aux_write(CURSORS, {peer.node_id: epoch + _U64.pack(seq)})

    # -- pulling ---------------------------------------------------------------------------

    async def _pull(self, peer: _Peer) -> None:
        """Everything in the peer's log past our cursor, in batches."""
        async with peer.lock:
            epoch, since = self._cursor(peer)
            start = since
            while True:
                request = epoch + _U64.pack(since) + _U32.pack(PULL_BATCH)
                r = _Reader(await self._request(peer, "bodies", Op.PULL, request))
                their_epoch, last, more = r.take(EPOCH_BYTES), r.u64(), r.u8()
                items = _items(r)
                r.end()
                if their_epoch != epoch:
                    epoch, since, start = their_epoch, 0, 0  # the answer starts from 0
                peer.their_epoch, peer.their_seq = their_epoch, max(peer.their_seq, last)
                what = "initial sync" if start == 0 else "catching up"
                peer.syncing = (what, last - start, peer.their_seq - start) if more else None
                await self._ingest(peer, [i.version for i in items if i.version is not None])
                log.debug("pulled %d changes of %s (%d to %d of %d)", len(items), peer.name,
                          since, last, peer.their_seq)  # fmt: skip
                peer.pulled += len(items)
                self._set_cursor(peer, epoch, last)
                await self._ack(peer, [i.version_id for i in items])
                since = last
                if not more:
                    return

    def _serve_pull(self, payload: bytes, peer: bytes) -> bytes:
        r = _Reader(payload)
        epoch, since, limit = r.take(EPOCH_BYTES), r.u64(), min(r.u32(), PULL_BATCH)
        r.end()
        store = self.model.store
        mine = store.epoch() or _NO_EPOCH
        if epoch != mine:
            since = 0
        last, records = store.numbered_changes(since, limit=limit)
        items: list[Item] = []
        size = 0
        for seq, record in records:
            item = self._item(seq, record.version_id, full=True, to=peer)
            if item is None:
                continue
            items.append(item)
            size += len(item.version.envelope) if item.version else 0
            if size >= PULL_BYTES:
                last = seq
                break
        more = last < store.sequence()
        return mine + _U64.pack(last) + bytes([more]) + _pack_items(items)

    def _item(self, seq: int, version_id: bytes, *, full: bool, to: bytes) -> Item | None:
        """The change as it goes to peer `to`: its id only (not `full`), whole (`to`
        holds the address's bodies and the body is here), else metadata only."""
        if not full:
            return Item(seq, version_id, None)
        store = self.model.store
        record = store.record(version_id)
        if record is None:
            return None  # purged meanwhile
        body = store.envelope(version_id) if self._wants_body(to, record.address) else None
        envelope = body if body is not None else store.stub(version_id)
        if envelope is None:
            return None  # purged meanwhile
        if body is not None:
            _remember(self._sent_whole, version_id, self._sent_whole.get(version_id, set()) | {to})
        expires = store.expiry(record.address, record.role)
        return Item(
            seq,
            version_id,
            Incoming(version_id, envelope, store.slots(version_id), expires, body=body is not None),
        )

    # -- ingesting -------------------------------------------------------------------------

    async def _ingest(self, peer: _Peer, versions: list[Incoming]) -> None:
        """Ingest `versions` from `peer`, fetching missing ancestors from it."""
        if not versions:
            return
        if self._newer_keys(versions):
            await self._catch_up_keys(peer)
        batch = versions
        for _ in range(FETCH_ROUNDS):
            try:
                report = await self._accept(peer, batch)
            except MissingParents as exc:
                fetched = await self._fetch(peer, exc.missing)
                if not fetched:
                    raise SlurpError(
                        f"peer {peer.name} does not hold the parents it sent versions of"
                    ) from None
                batch = _ordered(fetched + batch)
                continue
            log.debug("from %s: %d versions stored, %d known", peer.name, len(report.stored),
                      report.known)  # fmt: skip
            await self._ingested(peer, report)
            return
        raise SlurpError(f"versions from {peer.name}: too many missing ancestors")

    def _newer_keys(self, versions: Sequence[Incoming]) -> bool:
        """True if a slot is sealed to a role generation newer than any known here
        (a rotation elsewhere whose member-log entry has not reached us yet)."""
        keyring = self.model.keyring
        return any(
            slot.generation > max(keyring.generations(slot.role), default=0)
            for version in versions
            for slot in version.slots
        )

    async def _catch_up_keys(self, peer: _Peer) -> None:
        """Take the peer's member log (the new role keys, grants) before its slots."""
        await self._hello(peer)
        await trio.to_thread.run_sync(self.model.reload_keyring)

    async def _accept(self, peer: _Peer, batch: list[Incoming]) -> IngestReport:
        origin = f"peer:{peer.node_id.hex()[:16]}"
        try:
            return await trio.to_thread.run_sync(
                functools.partial(self.ingest.accept, batch, origin=origin)
            )
        except MissingParents:
            raise
        except Corrupt as exc:
            if len(batch) == 1:
                self.rejected += 1
                log.warning("refused version %s from %s: %s", batch[0].version_id.hex()[:16],
                            peer.name, exc)  # fmt: skip
                return IngestReport((), 0, self.model.store.sequence())
        reports = [await self._accept(peer, [one]) for one in batch]
        stored = tuple(r for report in reports for r in report.stored)
        return IngestReport(
            stored,
            sum(r.known for r in reports),
            reports[-1].sequence,
            tuple(v for report in reports for v in report.reslotted),
            tuple(n for report in reports for n in report.numbers),
        )

    async def _ingested(self, peer: _Peer, report: IngestReport) -> None:
        if report.reslotted and not report.stored:
            self.local_changed()  # new key slots: peers that lack them get them from us too
        if not report.stored:
            return
        self.ingested += len(report.stored)
        for record, number in zip(report.stored, report.numbers, strict=True):
            _remember(self._origin, record.version_id, (peer.node_id, number))
        self._warn_future(peer, report)
        self.local_changed()  # pass them on (to peers that cannot reach the author)
        if self._on_ingest is not None:
            await self._on_ingest(report)
        await self._merge(report)

    async def _merge(self, report: IngestReport) -> None:
        """Fold the concurrent leaves the ingested versions made (`merge_leaves`), on the
        one member designated for it, so that merges do not multiply; the merge versions
        replicate like any save."""
        contexts = dict.fromkeys(
            (r.address, r.role) for r in report.stored if self._merges(r.address)
        )
        merged = 0
        for address, role in contexts:
            try:
                info = await trio.to_thread.run_sync(merge_leaves, self.model, address, role)
            except SlurpError as exc:
                log.warning("could not merge the concurrent versions of %s [%s]: %s",
                            address, role, exc)  # fmt: skip
                continue
            merged += info is not None
        if merged:
            self.merges += merged
            self.local_changed()  # push the merge versions
            if self._on_ingest is not None:  # and show them through the mount at once
                await self._on_ingest(report)

    def _merges(self, address: str) -> bool:
        """This node merges an address's concurrent versions: its first holder that
        is up (it has the bodies), or without a factor `_designated_merger`."""
        holders = self.holders(address)
        if holders is None:
            return self._designated_merger()
        up = [n for n in holders if n == self._me or self._is_up(n)]
        return bool(up) and up[0] == self._me

    def _designated_merger(self) -> bool:
        """This node merges when it has the smallest id among the members that are up."""
        if self.transport is None:
            return False
        up = [state.node_id for state in self.transport.peers() if state.up]
        return all(self._me < node_id for node_id in up)

    def _warn_future(self, peer: _Peer, report: IngestReport) -> None:
        if peer.warned_clock:
            return
        allowed = self.cluster.settings().max_clock_offset_ms
        now_ms = int(time.time() * 1000)
        ahead = max(hlc.physical_ms(r.hlc) - now_ms for r in report.stored)
        if ahead > allowed:
            peer.warned_clock = True
            log.warning(
                "versions from %s are stamped %.1f s in the future (the cluster allows %.1f s):"
                " kept, but this node's clock does not follow them",
                peer.name,
                ahead / 1000,
                allowed / 1000,
            )

    async def _fetch(self, peer: _Peer, ids: Sequence[bytes]) -> list[Incoming]:
        r = _Reader(await self._request(peer, "bodies", Op.FETCH, b"".join(ids)))
        items = _items(r)
        r.end()
        return [i.version for i in items if i.version is not None]

    def _serve_fetch(self, payload: bytes, peer: bytes) -> bytes:
        if len(payload) % 32:
            raise ProtocolError("a fetch request's ids are not 32 bytes each")
        items = []
        for at in range(0, len(payload), 32):
            item = self._item(0, payload[at : at + 32], full=True, to=peer)
            if item is not None:
                items.append(item)
        return _pack_items(items)

    # -- pushing ---------------------------------------------------------------------------

    async def _push_loop(self, peer: _Peer) -> None:
        while True:
            await peer.wake.wait()
            peer.wake = trio.Event()
            while await self._push_some(peer):
                pass

    async def _push_some(self, peer: _Peer) -> bool:
        """Send the next batch of our changes to `peer`; False when none are left."""
        assert self.transport is not None
        assert peer.pushed_seq is not None
        store = self.model.store
        if store.sequence() - peer.pushed_seq > PUSH_BACKLOG:
            peer.pushed_seq = store.sequence()
            log.info("%s is more than %d changes behind: it pulls instead", peer.name, PUSH_BACKLOG)
            await self.transport.send(peer.node_id, "meta", [bytes([Op.PULL_NOW])])
            return False
        build = functools.partial(self._push_frame, peer, peer.pushed_seq)
        last, frame, count = await trio.to_thread.run_sync(build)
        if frame is None:
            peer.pushed_seq = last
            return False
        try:
            await self.transport.send(peer.node_id, "meta", [frame])
        except TransportError:
            peer.push_failures += 1
            peer.push_failing = True
            raise
        peer.push_failing = False
        peer.pushed_seq = last
        peer.pushed += count
        return True

    def _push_frame(self, peer: _Peer, since: int) -> tuple[int, bytes | None, int]:
        store = self.model.store
        last, records = store.numbered_changes(since, limit=PUSH_BATCH)
        items = []
        for seq, record in records:
            full = self._origin.get(record.version_id) != (peer.node_id, seq)
            item = self._item(seq, record.version_id, full=full, to=peer.node_id)
            if item is not None:
                items.append(item)
        if not items:
            return last, None, 0
        epoch = store.epoch() or _NO_EPOCH
        return last, bytes([Op.PUSH]) + epoch + _pack_items(items), len(items)

    async def _ack(self, peer: _Peer, ids: Sequence[bytes]) -> None:
        if not ids or self.transport is None:
            return
        with contextlib.suppress(TransportError):
            await self.transport.send(peer.node_id, "meta", [bytes([Op.ACK]) + b"".join(ids)])

    # -- incoming frames -------------------------------------------------------------------

    async def frames(self, peer: bytes, purpose: str, frames: list[bytes]) -> None:
        """`Receiver.frames`: pushes go to the peer's inbox, acks are counted here."""
        state = self._peers.get(peer)
        if state is None:
            return
        for frame in frames:
            try:
                await self._frame(state, frame)
            except ProtocolError as exc:  # never into the transport: drop the frame
                state.failures += 1
                state.last_error = str(exc)
                log.warning("peer %s sent a bad replication frame: %s", state.name, exc)

    async def _frame(self, peer: _Peer, frame: bytes) -> None:
        if not frame:
            raise ProtocolError("an empty replication frame")
        if frame[0] == Op.ACK:
            self._acked_by(peer, frame[1:])
        elif frame[0] == Op.HELD:
            if self.rebalancer is not None:
                try:
                    self.rebalancer.received_held(peer.node_id, frame[1:])
                except Corrupt as exc:
                    raise ProtocolError(str(exc)) from None
        elif frame[0] == Op.PULL_NOW:
            self._want_pull(peer)
        elif frame[0] == Op.PUSH:
            await peer.inbox[0].send(frame[1:])
        else:
            raise ProtocolError(f"unknown replication frame {frame[0]}")

    async def _inbox(self, peer: _Peer) -> None:
        async for body in peer.inbox[1]:
            try:
                await self._received_push(peer, body)
            except (TransportError, ProtocolError, SlurpError) as exc:
                peer.failures += 1
                peer.last_error = str(exc)
                log.info("a push from %s was not ingested (%s): pulling instead", peer.name, exc)
                self._want_pull(peer)

    async def _received_push(self, peer: _Peer, body: bytes) -> None:
        r = _Reader(body)
        epoch, items = r.take(EPOCH_BYTES), _items(r)
        r.end()
        if not items:
            return
        async with peer.lock:
            versions = [i.version for i in items if i.version is not None]
            await self._ingest(peer, versions)
            held = [i.version_id for i in items]
            missing = [v for v in held if self.model.store.record(v) is None]
            cursor_epoch, cursor = self._cursor(peer)
            contiguous = all(b.seq == a.seq + 1 for a, b in zip(items, items[1:], strict=False))
            if not missing and cursor_epoch == epoch and items[0].seq == cursor + 1 and contiguous:
                self._set_cursor(peer, epoch, items[-1].seq)
            elif items[-1].seq > cursor or cursor_epoch != epoch:
                self._want_pull(peer)  # a gap: what we missed comes by the cursor
            peer.their_epoch, peer.their_seq = epoch, max(peer.their_seq, items[-1].seq)
        await self._ack(peer, [v for v in held if v not in missing])

    def _acked_by(self, peer: _Peer, ids: bytes) -> None:
        if len(ids) % 32:
            raise ProtocolError("an ack's ids are not 32 bytes each")
        for at in range(0, len(ids), 32):
            vid = ids[at : at + 32]
            seen = self._acks.get(vid)
            if seen is None:
                seen = set()
                _remember(self._acks, vid, seen)
            seen.add(peer.node_id)
        peer.acked += len(ids) // 32
        self._acked.set()
        self._acked = trio.Event()
        self._hand_off_later([ids[at : at + 32] for at in range(0, len(ids), 32)])

    async def request(self, peer: bytes, purpose: str, frame: bytes) -> bytes:
        """`Receiver.request`: answer a peer's hello, log, pull, fetch or digest."""
        if not frame:
            raise ProtocolError("an empty replication request")
        op, payload = frame[0], frame[1:]
        state = self._peers.get(peer)
        if op == Op.HELLO:
            if state is not None and len(payload) == EPOCH_BYTES + 8 + 32:
                state.their_epoch = payload[:EPOCH_BYTES]
                state.their_seq = int(_U64.unpack(payload[EPOCH_BYTES : EPOCH_BYTES + 8])[0])
            return self._hello_payload()
        if op == Op.LOG:
            theirs = _Reader(payload).blobs()
            mine = _pack_list(self.cluster.entries())
            await self._merge_log(theirs)
            return mine
        if op == Op.PULL:
            return await trio.to_thread.run_sync(self._serve_pull, payload, peer)
        if op == Op.FETCH:
            return await trio.to_thread.run_sync(self._serve_fetch, payload, peer)
        if op == Op.BODIES:
            return await trio.to_thread.run_sync(self._serve_bodies, payload)
        if op == Op.DIGEST:
            return await self._serve_digest(payload)
        if op == Op.HAS and self.rebalancer is not None:
            try:
                return await trio.to_thread.run_sync(self.rebalancer.serve_has, payload)
            except Corrupt as exc:
                raise ProtocolError(str(exc)) from None
        raise ProtocolError(f"unknown replication request {op}")

    async def _request(self, peer: _Peer, purpose: str, op: int, payload: bytes) -> bytes:
        assert self.transport is not None
        return await self.transport.request(peer.node_id, purpose, bytes([op]) + payload)

    # -- for the rebalancer (`slurpfs.net.rebalance.Peers`) -----------------------------------

    def down_since(self) -> dict[bytes, float | None]:
        """Each peer's time of going down (None: up)."""
        return {n: None if p.up else (p.down_since or 0.0) for n, p in self._peers.items()}

    async def send_held(self, node: bytes, payload: bytes) -> bool:
        if self.transport is None or node not in self._peers:
            return False
        try:
            await self.transport.send(node, "meta", [bytes([Op.HELD]) + payload])
        except TransportError:
            return False
        return True

    async def ask_has(self, node: bytes, ids: Sequence[bytes]) -> list[bool]:
        peer = self._peers.get(node)
        if peer is None:
            raise ProtocolError(f"{node.hex()[:16]} is not a peer")
        answer = await self._request(peer, "meta", Op.HAS, b"".join(ids))
        try:
            return decode_has_answer(answer, len(ids))
        except Corrupt as exc:
            raise ProtocolError(str(exc)) from None

    async def fetch_bodies(self, node: bytes, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        """The bodies of `ids` that `node` holds (unverified: `Store.put_body` checks them)."""
        peer = self._peers.get(node)
        if peer is None:
            raise ProtocolError(f"{node.hex()[:16]} is not a peer")
        return _bodies(await self._request(peer, "bodies", Op.BODIES, b"".join(ids)))

    # -- digests ---------------------------------------------------------------------------

    async def _serve_digest(self, payload: bytes) -> bytes:
        r = _Reader(payload)
        level = r.u8()
        indices = [r.u16() for _ in range((len(payload) - 1) // 2)]
        r.end()
        digests = await self._digests.fresh()
        if level == 0:
            return b"".join(digests.groups())
        if level == 1:
            return b"".join(digests.bucket_digests(i for i in indices if i < GROUPS))
        if level == 2:
            return b"".join(v for b in indices if b < BUCKETS for v in digests.ids[b])
        raise ProtocolError(f"unknown digest level {level}")

    async def _digest_request(self, peer: _Peer, level: int, indices: Sequence[int]) -> list[bytes]:
        payload = bytes([level]) + b"".join(_U16.pack(i) for i in indices)
        answer = await self._request(peer, "meta", Op.DIGEST, payload)
        if len(answer) % 32:
            raise ProtocolError("a digest answer is not 32-byte values")
        return [answer[at : at + 32] for at in range(0, len(answer), 32)]

    async def _repair(self, peer: _Peer) -> None:
        """Compare digests with `peer` and fetch the versions we lack."""
        mine = await self._digests.fresh()
        theirs = await self._digest_request(peer, 0, [])
        groups = [g for g, d in enumerate(mine.groups()) if theirs[g : g + 1] != [d]]
        if not groups:
            return
        their_buckets = await self._digest_request(peer, 1, groups)
        buckets = [
            g * BUCKETS_PER_GROUP + i
            for n, g in enumerate(groups)
            for i, d in enumerate(mine.bucket_digests([g]))
            if their_buckets[n * BUCKETS_PER_GROUP + i : n * BUCKETS_PER_GROUP + i + 1] != [d]
        ]
        for at in range(0, len(buckets), REPAIR_BUCKETS):  # every differing bucket, in pages
            await self._repair_buckets(peer, buckets[at : at + REPAIR_BUCKETS])

    async def _repair_buckets(self, peer: _Peer, buckets: Sequence[int]) -> None:
        """Fetch the versions of ``buckets`` (a page of those that differ) we lack."""
        ids = await self._digest_request(peer, 2, buckets)
        store = self.model.store
        lacking = [v for v in dict.fromkeys(ids) if store.record(v) is None]
        if lacking:
            log.info("digests with %s: fetching %d versions this node lacks", peer.name,
                     len(lacking))  # fmt: skip
        async with peer.lock:
            for at in range(0, len(lacking), PULL_BATCH):
                fetched = await self._fetch(peer, lacking[at : at + PULL_BATCH])
                await self._ingest(peer, _ordered(fetched))
                peer.pulled += len(fetched)

    # -- write quorum ----------------------------------------------------------------------

    async def quorum(self, version_ids: Sequence[bytes], n: int, timeout: float) -> None:  # noqa: ASYNC109 (the wait is the request)
        """Return once `n` peers acknowledged every one of `version_ids`, else
        `QuorumFailed` after `timeout` seconds. With a replication factor only the
        holders' acknowledgements of bodies sent whole count, and `n` is at most
        the holders other than this node."""
        self.local_changed()
        with trio.move_on_after(timeout):
            while True:
                if all(have >= need for have, need in self._quorum(version_ids, n)):
                    return
                await self._acked.wait()
        have = min((have for have, _ in self._quorum(version_ids, n)), default=0)
        up = sum(p.up for p in self._peers.values())
        raise QuorumFailed(
            f"{have} of the {n} peer acknowledgements replication.write_quorum asks for"
            f" came within {timeout:g} s ({up} of {len(self._peers)} peers up)"
        )

    def _quorum(self, version_ids: Sequence[bytes], n: int) -> list[tuple[int, int]]:
        """(acknowledgements that count, how many are needed) of each version."""
        out = []
        for version_id in version_ids:
            acked = self._acks.get(version_id, set())
            record = self.model.store.record(version_id)
            holders = None if record is None else self.holders(record.address)
            if holders is None:
                out.append((len(acked), n))
                continue
            whole = self._sent_whole.get(version_id, set())
            others = [h for h in holders if h != self._me]
            out.append((sum(h in acked and h in whole for h in others), min(n, len(others))))
        return out

    # -- bodies: placement, remote reads, handing off ----------------------------------------

    def placement(self) -> Placement | None:
        """The placement the member log gives (None: no factor, every member holds
        every body); computed again after the log changed (`members_changed`)."""
        placed = self._placed
        if placed is None:
            factor = self.cluster.settings().factor
            placed = self._placed = (
                None if factor is None else Placement.of_cluster(self.cluster),
            )
        return placed[0]

    def holders(self, address: str) -> tuple[bytes, ...] | None:
        """The holders of an address's bodies in failover order (None: every member)."""
        placement = self.placement()
        return None if placement is None else placement.holders_of_address(address)

    def _wants_body(self, node: bytes, address: str) -> bool:
        holders = self.holders(address)
        return holders is None or node in holders

    def _serve_bodies(self, payload: bytes) -> bytes:
        """The bodies held here (copies or caches) of the ids asked for."""
        if len(payload) % 32:
            raise ProtocolError("a bodies request's ids are not 32 bytes each")
        found = []
        for at in range(0, len(payload), 32):
            version_id = payload[at : at + 32]
            body = self.model.store.envelope(version_id)
            if body is not None:
                found.append(version_id + _U32.pack(len(body)) + body)
        return _U32.pack(len(found)) + b"".join(found)

    async def fetch_body(self, version_id: bytes, address: str) -> bytes:
        """The body of a version this node does not hold: asked of its holders in
        failover order, then its author and the other members that are up, each
        for at most `BODY_TIMEOUT` (a member that is down is skipped); checked to
        hash to its id. `BodyUnavailable` naming who was asked, after at most
        `BODY_DEADLINE` seconds."""
        tried: list[tuple[bytes, str]] = []
        with trio.move_on_after(BODY_DEADLINE):
            for node in self._body_sources(version_id, address):
                body, why = await self._body_from(node, version_id)
                if body is not None:
                    self.bodies_fetched += 1
                    return body
                tried.append((node, why))
        asked = ", ".join(f"{self._name(n)} ({why})" for n, why in tried) or "no member"
        raise BodyUnavailable(
            f"version {version_id.hex()[:16]} of {address}: no member gave its body"
            f" (asked {asked})",
            tuple(n.hex() for n, _ in tried),
        )

    def _body_sources(self, version_id: bytes, address: str) -> list[bytes]:
        holders = self.holders(address) or ()
        record = self.model.store.record(version_id)
        author = () if record is None else (record.author,)
        order = dict.fromkeys((*holders, *author, *sorted(self._peers)))
        return [node for node in order if node != self._me and node in self._peers]

    def _name(self, node: bytes) -> str:
        peer = self._peers.get(node)
        return peer.name if peer is not None else node.hex()[:16]

    async def _body_from(self, node: bytes, version_id: bytes) -> tuple[bytes | None, str]:
        """(the body from `node`, or None and why not)."""
        if self.transport is None or not self._is_up(node):
            return None, "down"
        frame = bytes([Op.BODIES]) + version_id
        answer = b""
        with trio.move_on_after(BODY_TIMEOUT):
            try:
                answer = await self.transport.request(node, "bodies", frame, timeout=BODY_TIMEOUT)
            except TransportError as exc:
                return None, str(exc)
        if not answer:
            return None, f"no answer in {BODY_TIMEOUT:g} s"
        try:
            body = _bodies(answer).get(version_id)
        except ProtocolError as exc:
            return None, str(exc)
        if body is None:
            return None, "does not hold it"
        if env.blake2b_256(body) != version_id:
            self.bodies_refused += 1
            log.warning("%s sent a body for version %s that does not hash to its id: refused",
                        self._name(node), version_id.hex()[:16])  # fmt: skip
            return None, "sent a body that is not the version's"
        return body, ""

    def _hand_off_later(self, ids: list[bytes]) -> None:
        if self._nursery is not None and self.placement() is not None:
            self._nursery.start_soon(self._hand_off, ids)

    async def _hand_off(self, ids: list[bytes]) -> None:
        try:
            self.handed_off += await trio.to_thread.run_sync(self._drop_handed_off, ids)
        except SlurpError as exc:
            log.warning("bodies handed off to their holders were not dropped here: %s", exc)

    def _drop_handed_off(self, ids: Sequence[bytes]) -> int:
        """Drop the copies this node keeps of bodies it does not hold (an author that
        is not a holder) once every holder acknowledged them, sent whole."""
        store = self.model.store
        dropped = 0
        for version_id in ids:
            record = store.record(version_id)
            holders = None if record is None else self.holders(record.address)
            if holders is None or self._me in holders or store.is_cached(version_id):
                continue
            acked = self._acks.get(version_id, set())
            whole = self._sent_whole.get(version_id, set())
            if all(h in acked and h in whole for h in holders):
                dropped += store.drop_body(version_id)
        return dropped

    # -- reports ---------------------------------------------------------------------------

    def reports(self) -> list[PeerReport]:
        """Every member, this node first, then the removed ones."""
        out = []
        members = {m.node_id: m for m in self.cluster.members()}
        me = members.get(self._me)
        if me is not None:
            out.append(_report_me(me))
        for peer in self._peers.values():
            member = members.get(peer.node_id)
            out.append(self._report(peer, member.addrs if member is not None else ()))
        for node_id in self.cluster.removed():
            out.append(_report_removed(node_id))
        return out

    def _report(self, peer: _Peer, addrs: Sequence[str]) -> PeerReport:
        state = self._state(peer.node_id)
        epoch, cursor = self._cursor(peer)
        lag = max(peer.their_seq - cursor, 0) if epoch == peer.their_epoch else None
        if not peer.up:
            mode = ""
        elif peer.syncing is not None:
            what, done, total = peer.syncing
            mode = f"{what} {done} of {total}"
        else:
            mode = "push" if peer.pushed_seq is not None else "connecting"
        return PeerReport(
            node_id=peer.node_id.hex(),
            name=peer.name,
            state="up" if peer.up else "down",
            mode=mode,
            address=(state.address if state is not None else None) or (addrs[0] if addrs else None),
            rtt_ms=None if state is None or state.rtt is None else round(state.rtt * 1000, 3),
            clock_offset_ms=None
            if state is None or state.clock_offset is None
            else round(state.clock_offset * 1000, 3),
            last_contact=None if state is None else state.last_contact,
            lag=lag,
            pushed=peer.pushed,
            pulled=peer.pulled,
            failures=peer.failures,
            push_failures=peer.push_failures,
            push_failing=peer.push_failing,
            acked=peer.acked,
            down_since=peer.down_since,
            last_error=peer.last_error,
        )


def _bodies(answer: bytes) -> dict[bytes, bytes]:
    r = _Reader(answer)
    out = {}
    for _ in range(r.u32()):
        version_id = r.take(32)
        out[version_id] = r.take(r.u32())
    r.end()
    return out


def _remember(table: OrderedDict[bytes, V], key: bytes, value: V) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > RECENT:
        table.popitem(last=False)


def _report_me(member: MemberView) -> PeerReport:
    return PeerReport(
        member.node_id.hex(), member.name, "me", "", member.addrs[0] if member.addrs else None,
        None, None, None, None, 0, 0, 0, 0, False, 0, None, "",
    )  # fmt: skip


def _report_removed(node_id: bytes) -> PeerReport:
    return PeerReport(
        node_id.hex(),
        "",
        "removed",
        "",
        None,
        None,
        None,
        None,
        None,
        0,
        0,
        0,
        0,
        False,
        0,
        None,
        "",
    )


def _ordered(versions: list[Incoming]) -> list[Incoming]:
    """`versions` with parents before children (ids deduplicated)."""
    by_id: dict[bytes, Incoming] = {}
    for v in versions:
        by_id.setdefault(v.version_id, v)
    out: list[Incoming] = []
    done: set[bytes] = set()
    for root in by_id:
        stack = [(root, False)]
        while stack:
            vid, expanded = stack.pop()
            if vid in done or vid not in by_id:
                continue
            if expanded:
                done.add(vid)
                out.append(by_id[vid])
                continue
            stack.append((vid, True))
            stack += [(p, False) for p in _parents(by_id[vid]) if p not in done]
    return out


def _parents(version: Incoming) -> tuple[bytes, ...]:
    try:
        return tuple(env.Envelope.decode(version.envelope).header.parents)
    except (Corrupt, ValueError):
        return ()  # ingest refuses it, with the reason
