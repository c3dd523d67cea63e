"""The transport seam: authenticated, long-lived channels to the cluster's members.

Everything py-libp2p stays in this module. The replication worker sees node ids
(32-byte Ed25519 public keys), purposes (``meta``, ``bodies``) and frames (bytes):

* `Transport.send` writes a batch of frames to a peer on the purpose's stream;
  the peer's `Receiver.frames` gets them, batched as they arrived.
* `Transport.request` sends one frame and waits for the peer's
  `Receiver.request` answer on the same stream.
* `Transport.peers` / `Transport.statistics` show each peer's state.

Security (each setting closes a hole found in py-libp2p's defaults):

* **Noise only.** The library's default host also offers ``/plaintext/2.0.0``,
  where a peer merely *claims* a public key: anyone who knows a member's public
  key would pass a peer-id allowlist. Only Noise is offered and accepted; it
  proves the key.
* **The cluster's private-network key** (pnet PSK): a node without it gets no
  further than the first bytes. The pnet layer is ours (`_PnetTCP`), not the
  library's one-key-per-swarm option: dials use the current key; an inbound
  connection's first bytes (the dialer's multistream header, a known
  plaintext) tell which accepted key it uses, and one that matches none is
  closed at once and counted. After a rotation (`set_keys`) the previous keys
  are accepted too until every member was seen on the current one, or until
  the grace given ends; then only the current key opens a connection.
* **The member list** is checked before every dial, on every inbound
  connection (anything else is closed and counted) and on every inbound stream.
* **The one exemption: joining.** A node with a `Joins` handler accepts a
  non-member's connection only while `Joins.open` (an invite is pending), and
  from it only the ``/slurpfs/join/1.0.0`` stream carrying one request; any
  other stream is refused and counted as before, and the guest's connection is
  closed after `JOIN_TIMEOUT` whatever it did. The joiner's side is `knock`.

Liveness and dials: one long-lived connection per peer carries one stream per
purpose each way (plus ``ping``); a ping every second measures the round trip
and the clock offset, and a peer that misses 3 is *down*: its connection is
closed and redialled. Dials are bounded (`DIAL_TIMEOUT`) and retried with
backoff capped at `BACKOFF_CAP`; the library's own 60 s "recently failed"
block on a peer is lifted before each attempt, so a restarted peer is back as
soon as it listens.

Frames on every stream (the byte layout is in docs/FORMAT.md)::

    frame = length u32 BE (of what follows) ‖ kind u8 ‖ id u32 BE ‖ payload
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Protocol

import multiaddr
import trio
from Crypto.Cipher import Salsa20
from libp2p import new_swarm
from libp2p.abc import INetConn, INetStream, INetwork, INotifee, IRawConnection
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import THandler, TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.basic_host import BasicHost
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import IOException
from libp2p.network.config import RetryConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.pnet.psk_conn import PskConn
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP, TCPListener

from slurpfs.crypto.keys import NODE_ID_BYTES, NodeIdentity
from slurpfs.errors import ConfigError, SlurpError

log = logging.getLogger(__name__)

PURPOSES = ("ping", "meta", "bodies")
PROTOCOLS = {purpose: TProtocol(f"/slurpfs/{purpose}/1.0.0") for purpose in PURPOSES}
JOIN_PROTOCOL = TProtocol("/slurpfs/join/1.0.0")
JOIN_TIMEOUT = 10.0  # a guest's whole visit: connect, one request, its answer
PSK_BYTES = 32
PING_INTERVAL = 1.0  # seconds between pings; a ping unanswered by the next one is missed
MISSED_PINGS_DOWN = 3
DIAL_TIMEOUT = 3.0  # connect and open the streams, or give up
BACKOFF_FIRST = 0.25
BACKOFF_CAP = 5.0
SEND_TIMEOUT = 10.0  # one write (a stalled peer's flow-control window)
REQUEST_TIMEOUT = 10.0
MAX_FRAME = 4 << 20
PNET_NONCE = 8
# What a dialer sends first inside pnet: the multistream-select header (varint
# length, protocol id, newline); the known plaintext that tells which key it uses.
PNET_KNOWN = b"\x13/multistream/1.0.0\n"
PNET_TIMEOUT = 10.0  # an inbound connection's first bytes, or it is closed
_HEADER = struct.Struct(">IBI")  # length, kind, id
_CLOCK = struct.Struct(">q")  # a wall clock in ns (ping and pong payloads)
_READ = 1 << 16
# py-libp2p does its own socket-level failures inside these; anything else is a bug.
_NET_ERRORS = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class TransportError(SlurpError):
    """A peer could not be reached or answered badly."""


class PeerUnavailable(TransportError):
    """The peer is not a member, not connected, or did not answer in time."""


class RemoteFailure(TransportError):
    """The peer answered a request with an error (its message is kept)."""


class Kind(enum.IntEnum):
    DATA = 1  # a frame for `Receiver.frames`; id 0
    REQUEST = 2  # for `Receiver.request`; the id comes back in the answer
    REPLY = 3
    ERROR = 4  # the answer is an error: payload is its UTF-8 message
    PING = 5  # payload: the sender's wall clock (ns)
    PONG = 6  # payload: the ping's clock, then the answerer's wall clock (ns)


_COUNTED = (Kind.DATA, Kind.REQUEST)  # frames the statistics count (not pings, not answers)


class Frame(NamedTuple):
    kind: Kind
    id: int
    payload: bytes


def encode(kind: Kind, ident: int, payload: bytes) -> bytes:
    if len(payload) + _HEADER.size - 4 > MAX_FRAME:
        raise ValueError(f"a frame of {len(payload)} bytes exceeds the limit {MAX_FRAME}")
    return _HEADER.pack(len(payload) + _HEADER.size - 4, kind, ident) + payload


class FrameReader:
    """Splits a stream's bytes into frames; a partial frame waits for more bytes."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= _HEADER.size:
            length, kind, ident = _HEADER.unpack_from(self._buffer)
            if not _HEADER.size - 4 <= length <= MAX_FRAME or kind not in Kind._value2member_map_:
                raise _Violation(f"a bad frame header (length {length}, kind {kind})")
            end = 4 + length
            if len(self._buffer) < end:
                break
            frames.append(Frame(Kind(kind), ident, bytes(self._buffer[_HEADER.size : end])))
            del self._buffer[:end]
        return frames


class _Violation(TransportError):
    """The peer broke the frame protocol; its stream is reset."""


class Joins(Protocol):
    """The inviter's side of a join (`slurpfs.net.join`): the only thing a
    non-member may reach, and only while `open`."""

    def open(self) -> bool:
        """True while an invite is pending (else non-members are refused as always)."""

    async def admit(self, peer: bytes, request: bytes) -> bytes:
        """The answer to a join request from ``peer`` (a node id proven by Noise);
        a `SlurpError` is sent back as its message."""


class Receiver(Protocol):
    """What the transport hands incoming frames to (the replication worker)."""

    async def frames(self, peer: bytes, purpose: str, frames: list[bytes]) -> None:
        """Frames `send` delivered, in order, in the batches they arrived in."""

    async def request(self, peer: bytes, purpose: str, frame: bytes) -> bytes:
        """The answer to a `request`; a `SlurpError` is sent back as its message."""


@dataclass(frozen=True, slots=True)
class PeerState:
    node_id: bytes
    up: bool
    address: str | None  # the multiaddr it is dialled at, else where its connection came from
    rtt: float | None  # seconds, the last ping's round trip
    clock_offset: float | None  # seconds the peer's wall clock is ahead of ours
    last_contact: float | None  # our wall clock when it last sent us anything
    frames_sent: int
    frames_received: int
    bytes_sent: int
    bytes_received: int
    dials: int
    dial_failures: int


@dataclass(frozen=True, slots=True)
class TransportStatistics:
    members: int
    up: int
    refused_connections: int  # inbound connections from non-members, closed
    refused_streams: int  # inbound streams from non-members, reset
    refused_keys: int  # inbound connections with no accepted cluster key (PSK), closed
    keys_accepted: int  # cluster keys accepted inbound: 1, or more during a rotation
    protocol_errors: int  # streams reset for a bad frame
    dials: int
    dial_failures: int
    frames_sent: int
    frames_received: int
    bytes_sent: int
    bytes_received: int


def peer_id_of(node_id: bytes) -> ID:
    """The libp2p peer id of a node id (the same Ed25519 public key)."""
    if len(node_id) != NODE_ID_BYTES:
        raise ConfigError(f"a node id is {NODE_ID_BYTES} bytes, not {len(node_id)}")
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(node_id))


def key_pair_of(identity: NodeIdentity) -> KeyPair:
    """The node's identity as a libp2p key pair: the peer id is the node id."""
    key = identity.signing_key
    return KeyPair(Ed25519PrivateKey(key), Ed25519PublicKey(key.verify_key))


class _Call:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: Frame | None = None


class _Channel:
    """Our stream of one purpose to a peer: frames out, answers back."""

    def __init__(self, stream: INetStream, link: _Link) -> None:
        self.stream = stream
        self._link = link
        self._lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Call] = {}

    async def write(self, data: bytes, frames: int) -> None:
        try:
            async with self._lock:
                with trio.fail_after(SEND_TIMEOUT):
                    await self.stream.write(data)
        except (*_NET_ERRORS, trio.TooSlowError) as exc:
            raise PeerUnavailable(f"peer {self._link.name}: {exc or type(exc).__name__}") from None
        self._link.count_sent(len(data), frames)

    async def call(self, kind: Kind, payload: bytes, timeout: float) -> Frame:  # noqa: ASYNC109 (a late answer is PeerUnavailable, not TooSlowError)
        ident = next(self._ids)
        call = self._waiting[ident] = _Call()
        try:
            with trio.move_on_after(timeout):
                await self.write(encode(kind, ident, payload), int(kind is Kind.REQUEST))
                await call.done.wait()
        finally:
            del self._waiting[ident]
        if call.answer is None:
            raise PeerUnavailable(f"peer {self._link.name} did not answer")
        return call.answer

    async def read_answers(self) -> None:
        """Until the stream ends: hand each answer to its waiting call."""
        reader = FrameReader()
        try:
            while data := await self.stream.read(_READ):
                self._link.count_received(len(data), 0)
                for frame in reader.feed(data):
                    if (call := self._waiting.get(frame.id)) is not None:
                        call.answer = frame
                        call.done.set()
        except _Violation as exc:
            log.warning("peer %s broke the frame protocol: %s", self._link.name, exc)
        except _NET_ERRORS:
            pass
        finally:
            for call in self._waiting.values():
                call.done.set()


class _Link:
    """Everything the transport knows about one member."""

    def __init__(self, node_id: bytes, address: multiaddr.Multiaddr | None) -> None:
        self.node_id = node_id
        self.peer_id = peer_id_of(node_id)
        self.name = node_id.hex()[:16]
        self.address = address
        self.remote: str | None = None
        self.key: bytes | None = None  # the cluster key of its connection (`Transport._seen`)
        self.channels: dict[str, _Channel] = {}
        self.wake = trio.Event()  # an inbound connection or a new address
        self.cancel = trio.CancelScope()
        self.rtt: float | None = None
        self.offset: float | None = None
        self.last_contact: float | None = None
        self.counts = dict.fromkeys(
            (
                "frames_sent",
                "frames_received",
                "bytes_sent",
                "bytes_received",
                "dials",
                "dial_failures",
            ),
            0,
        )

    def count_sent(self, size: int, frames: int) -> None:
        self.counts["bytes_sent"] += size
        self.counts["frames_sent"] += frames

    def count_received(self, size: int, frames: int) -> None:
        self.counts["bytes_received"] += size
        self.counts["frames_received"] += frames
        self.last_contact = time.time()

    def state(self) -> PeerState:
        address = str(self.address) if self.address is not None else self.remote
        return PeerState(
            self.node_id, bool(self.channels), address, self.rtt, self.offset, self.last_contact,
            **self.counts,
        )  # fmt: skip


class Transport:
    """One node's connections to the other members (run it in a nursery)."""

    def __init__(
        self,
        identity: NodeIdentity,
        psk: bytes,
        receiver: Receiver,
        members: Mapping[bytes, str | None],
        joins: Joins | None = None,
    ) -> None:
        self.identity = identity
        self._keys = _Keys(psk)
        self._receiver = receiver
        self._joins = joins
        self._links: dict[bytes, _Link] = {}
        self._by_peer: dict[ID, _Link] = {}
        self._host: BasicHost | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping = trio.Event()
        self._refused = {"connections": 0, "streams": 0, "protocol": 0}
        self.set_members(members)

    # ---- running -------------------------------------------------------------

    async def run(
        self, listen: str, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``listen`` (a multiaddr) and keep every member connected until `stop`.

        `task_status` gets the addresses actually listened on (port 0 is resolved).
        When this returns, every connection and stream is closed.
        """
        host = _new_host(self.identity, self._keys, [_multiaddr(listen)])
        host.get_network().register_notifee(_Gate(self))
        for purpose, protocol in PROTOCOLS.items():
            host.set_stream_handler(protocol, partial(self._serve, purpose))
        if self._joins is not None:
            host.set_stream_handler(JOIN_PROTOCOL, self._serve_join)
        async with host.run([_multiaddr(listen)]), trio.open_nursery() as nursery:
            self._host, self._nursery = host, nursery
            for link in self._links.values():
                nursery.start_soon(self._maintain, link)
            task_status.started([str(addr) for addr in host.get_addrs()])
            await self._stopping.wait()
            nursery.cancel_scope.cancel()
        self._host = self._nursery = None

    def stop(self) -> None:
        """Make `run` close everything and return."""
        self._stopping.set()

    # ---- membership ----------------------------------------------------------

    def set_members(self, members: Mapping[bytes, str | None]) -> None:
        """Replace the allowlist: node id -> multiaddr to dial (None: it dials us).

        A node no longer listed is disconnected at once; a new one is dialled.
        """
        wanted = {
            node_id: _multiaddr(address) if address is not None else None
            for node_id, address in members.items()
            if node_id != self.identity.node_id
        }
        for node_id in set(self._links) - set(wanted):
            link = self._links.pop(node_id)
            del self._by_peer[link.peer_id]
            link.cancel.cancel()
            if self._nursery is not None:
                self._nursery.start_soon(self._disconnect, link)
        for node_id, address in wanted.items():
            if (known := self._links.get(node_id)) is not None:
                known.address = address
                known.wake.set()
                continue
            link = self._links[node_id] = _Link(node_id, address)
            self._by_peer[link.peer_id] = link
            if self._nursery is not None:
                self._nursery.start_soon(self._maintain, link)

    def _member(self, peer_id: ID) -> _Link | None:
        return self._by_peer.get(peer_id)

    # ---- cluster keys --------------------------------------------------------

    def set_keys(self, current: bytes, previous: Sequence[bytes] = (), until: float = 0.0) -> None:
        """The cluster's PSKs after a rotation: dial with ``current``; accept
        ``previous`` too until every member was seen on ``current`` or the wall
        clock passes ``until``. A new current key closes this node's connections
        that use another, so that they come back on it."""
        if not self._keys.set(current, previous, until):
            self._check_retired()
            return
        log.info("the cluster key changed: reconnecting the members on it")
        for link in self._links.values():
            if link.key is not None and link.key != current and self._nursery is not None:
                self._nursery.start_soon(self._disconnect, link)
        self._check_retired()

    def _seen(self, link: _Link, conn: INetConn) -> None:
        link.key = self._keys.used(_remote_pair(conn))
        self._check_retired()

    def _check_retired(self) -> None:
        current, links = self._keys.current, self._links.values()
        if self._keys.previous and all(link.channels and link.key == current for link in links):
            self._keys.retire()

    def _guest(self, conn: INetConn) -> bool:
        """Let a non-member's connection stay for one join request, if one may come
        now; it is closed after `JOIN_TIMEOUT` unless it became a member's."""
        if self._joins is None or self._nursery is None or not self._joins.open():
            return False
        self._nursery.start_soon(self._see_out, conn)
        return True

    async def _see_out(self, conn: INetConn) -> None:
        await trio.sleep(JOIN_TIMEOUT)
        if self._member(conn.muxed_conn.peer_id) is None:
            with trio.move_on_after(DIAL_TIMEOUT), contextlib.suppress(*_NET_ERRORS):
                await conn.close()

    def _refuse(self, what: str, peer_id: ID, remote: object) -> None:
        self._refused[what] += 1
        log.warning("refused a %s from non-member %s at %s", what[:-1], peer_id, remote)

    # ---- sending -------------------------------------------------------------

    async def send(self, peer: bytes, purpose: str, frames: Sequence[bytes]) -> None:
        """Write ``frames`` to ``peer`` in one batch on the purpose's stream.

        Raises `PeerUnavailable` when the peer is down, not a member, or stalls.
        """
        channel = self._channel(peer, purpose)
        data = b"".join(encode(Kind.DATA, 0, frame) for frame in frames)
        await channel.write(data, len(frames))

    async def request(
        self,
        peer: bytes,
        purpose: str,
        frame: bytes,
        *,
        timeout: float = REQUEST_TIMEOUT,  # noqa: ASYNC109 (as for _Channel.call)
    ) -> bytes:
        """Send one request and return the peer's answer (`RemoteFailure` if it failed)."""
        answer = await self._channel(peer, purpose).call(Kind.REQUEST, frame, timeout)
        if answer.kind is Kind.ERROR:
            raise RemoteFailure(answer.payload.decode(errors="replace"))
        return answer.payload

    def _channel(self, peer: bytes, purpose: str) -> _Channel:
        if purpose not in PURPOSES or purpose == "ping":
            raise ValueError(f"unknown purpose {purpose!r}")
        link = self._links.get(peer)
        if link is None:
            raise PeerUnavailable(f"{peer.hex()[:16]} is not a member")
        if not link.channels:
            raise PeerUnavailable(f"peer {link.name} is down")
        return link.channels[purpose]

    # ---- state ---------------------------------------------------------------

    def peers(self) -> tuple[PeerState, ...]:
        return tuple(link.state() for link in self._links.values())

    def statistics(self) -> TransportStatistics:
        states = self.peers()
        total = {
            key: sum(getattr(s, key) for s in states)
            for key in _Link(self.identity.node_id, None).counts
        }
        return TransportStatistics(
            members=len(states),
            up=sum(s.up for s in states),
            refused_connections=self._refused["connections"],
            refused_streams=self._refused["streams"],
            refused_keys=self._keys.refused,
            keys_accepted=len(self._keys.accepted()),
            protocol_errors=self._refused["protocol"],
            **total,
        )

    # ---- one member's connection ---------------------------------------------

    async def _maintain(self, link: _Link) -> None:
        """Connect, ping until down, reconnect with backoff; until the member is removed."""
        backoff = BACKOFF_FIRST
        with link.cancel:
            while True:
                if await self._open(link):
                    backoff = BACKOFF_FIRST
                    await self._session(link)
                    await self._disconnect(link)
                    continue
                with trio.move_on_after(backoff):
                    await link.wake.wait()
                link.wake = trio.Event()
                backoff = min(backoff * 2, BACKOFF_CAP)

    async def _open(self, link: _Link) -> bool:
        """Connect (when not connected) and open our stream of each purpose, bounded."""
        assert self._host is not None
        if link.address is None and not self._host.get_network().get_connections(link.peer_id):
            return False  # it dials us: wait for its connection
        link.counts["dials"] += 1
        streams: list[INetStream] = []
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                if link.address is not None:
                    # Forget the library's 60 s block after an earlier failure.
                    network = self._host.get_network()
                    assert isinstance(network, Swarm)  # what new_swarm makes
                    network.unblock_peer(link.peer_id)
                    await self._host.connect(PeerInfo(link.peer_id, [link.address]))
                for purpose in PURPOSES:
                    streams.append(await self._host.new_stream(link.peer_id, [PROTOCOLS[purpose]]))
        except (*_NET_ERRORS, trio.TooSlowError) as exc:
            link.counts["dial_failures"] += 1
            log.debug("dial %s failed: %r", link.name, exc)
            for stream in streams:
                await _reset(stream)
            return False
        link.channels = {p: _Channel(s, link) for p, s in zip(PURPOSES, streams, strict=True)}
        remote = streams[0].get_remote_address()
        link.remote = f"/ip4/{remote[0]}/tcp/{remote[1]}" if remote else None
        log.info("peer %s is up (%s)", link.name, link.remote)
        self._check_retired()
        return True

    async def _session(self, link: _Link) -> None:
        """Ping until 3 in a row are missed or a stream ends; then the peer is down."""
        try:
            async with trio.open_nursery() as nursery:
                for channel in link.channels.values():
                    nursery.start_soon(_until_ends, channel.read_answers, nursery.cancel_scope)
                await self._ping(link, link.channels["ping"])
                nursery.cancel_scope.cancel()
        finally:
            channels, link.channels, link.remote = link.channels, {}, None
            with trio.CancelScope(shield=True):
                for channel in channels.values():
                    await _reset(channel.stream)
            log.info("peer %s is down", link.name)

    async def _ping(self, link: _Link, channel: _Channel) -> None:
        missed = 0
        while missed < MISSED_PINGS_DOWN:
            due = trio.current_time() + PING_INTERVAL
            sent = time.time_ns()
            try:
                pong = await channel.call(Kind.PING, _CLOCK.pack(sent), PING_INTERVAL)
            except PeerUnavailable:
                missed += 1
                continue  # the call waited the whole interval
            back = time.time_ns()
            if len(pong.payload) != 2 * _CLOCK.size:
                missed += 1
                continue
            (theirs,) = _CLOCK.unpack_from(pong.payload, _CLOCK.size)
            link.rtt = (back - sent) / 1e9
            link.offset = (theirs - (sent + back) / 2) / 1e9
            missed = 0
            await trio.sleep_until(due)

    async def _disconnect(self, link: _Link) -> None:
        assert self._host is not None
        with trio.move_on_after(DIAL_TIMEOUT, shield=True):
            await self._host.disconnect(link.peer_id)

    # ---- inbound -------------------------------------------------------------

    async def _serve(self, purpose: str, stream: INetStream) -> None:
        """A member's stream: deliver its frames, answer its requests and pings."""
        link = self._member(stream.muxed_conn.peer_id)
        if link is None:
            self._refuse("streams", stream.muxed_conn.peer_id, stream.get_remote_address())
            await _reset(stream)
            return
        reader = FrameReader()
        try:
            while data := await stream.read(_READ):
                frames = reader.feed(data)
                link.count_received(len(data), sum(f.kind in _COUNTED for f in frames))
                await self._handle(link, purpose, stream, frames)
        except _Violation as exc:
            self._refused["protocol"] += 1
            log.warning("peer %s broke the frame protocol on %s: %s", link.name, purpose, exc)
        except (*_NET_ERRORS, trio.TooSlowError):
            pass  # the connection ended; our own session notices and reconnects
        await _reset(stream)

    async def _serve_join(self, stream: INetStream) -> None:
        """A join stream (`Joins`): one request, its answer, then the stream ends."""
        peer_id = stream.muxed_conn.peer_id
        if self._joins is None or not self._joins.open():
            self._refuse("streams", peer_id, stream.get_remote_address())
            await _reset(stream)
            return
        try:
            with trio.fail_after(JOIN_TIMEOUT):
                frame = await _read_frame(stream)
                if frame.kind is not Kind.REQUEST:
                    raise _Violation(f"a {frame.kind.name} frame on the join stream")
                try:
                    answer = encode(
                        Kind.REPLY,
                        frame.id,
                        await self._joins.admit(node_id_of(peer_id), frame.payload),
                    )
                except SlurpError as exc:
                    answer = encode(Kind.ERROR, frame.id, str(exc).encode())
                await stream.write(answer)
                await stream.close()
        except _Violation as exc:
            self._refused["protocol"] += 1
            log.warning("a join from %s broke the frame protocol: %s", peer_id, exc)
            await _reset(stream)
        except (*_NET_ERRORS, trio.TooSlowError):
            await _reset(stream)

    async def _handle(
        self, link: _Link, purpose: str, stream: INetStream, frames: list[Frame]
    ) -> None:
        batch: list[bytes] = []
        for frame in frames:
            if frame.kind is Kind.DATA:
                batch.append(frame.payload)
                continue
            if batch:
                await self._receiver.frames(link.node_id, purpose, batch)
                batch = []
            answer = await self._answer(link, purpose, frame)
            with trio.fail_after(SEND_TIMEOUT):
                await stream.write(answer)
            link.count_sent(len(answer), 0)
        if batch:
            await self._receiver.frames(link.node_id, purpose, batch)

    async def _answer(self, link: _Link, purpose: str, frame: Frame) -> bytes:
        if frame.kind is Kind.PING and purpose == "ping" and len(frame.payload) == _CLOCK.size:
            return encode(Kind.PONG, frame.id, frame.payload[:8] + _CLOCK.pack(time.time_ns()))
        if frame.kind is Kind.REQUEST and purpose != "ping":
            try:
                answer = await self._receiver.request(link.node_id, purpose, frame.payload)
            except SlurpError as exc:
                return encode(Kind.ERROR, frame.id, str(exc).encode())
            return encode(Kind.REPLY, frame.id, answer)
        raise _Violation(f"a {frame.kind.name} frame on the {purpose} stream")


class _Gate(INotifee):
    """Closes every inbound connection from a non-member; wakes a member's link."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        link = self._transport._member(peer_id)
        if link is not None:
            self._transport._seen(link, conn)
            link.wake.set()
        elif not self._transport._guest(conn):
            self._transport._refuse("connections", peer_id, _remote(conn))
            await conn.close()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


async def knock(
    identity: NodeIdentity,
    psk: bytes,
    address: str,
    peer: bytes,
    request: bytes,
    *,
    timeout: float = JOIN_TIMEOUT,  # noqa: ASYNC109 (a silent peer is PeerUnavailable)
) -> bytes:
    """A non-member's one join request to ``peer`` listening at ``address``.

    Raises `PeerUnavailable` when it cannot be reached within ``timeout`` (a
    wrong PSK looks the same: a stall), `RemoteFailure` with its message when it
    refused the request.
    """
    host = _new_host(identity, _Keys(psk), [])
    info = PeerInfo(peer_id_of(peer), [_multiaddr(address)])
    answer: Frame | None = None
    failure = "no answer"
    async with host.run([]):  # (what leaves this block comes out as an ExceptionGroup)
        try:
            with trio.fail_after(timeout):
                await host.connect(info)
                stream = await host.new_stream(info.peer_id, [JOIN_PROTOCOL])
                await stream.write(encode(Kind.REQUEST, 1, request))
                answer = await _read_frame(stream)
                await _reset(stream)
        except (*_NET_ERRORS, trio.TooSlowError, _Violation) as exc:
            failure = str(exc) or type(exc).__name__
        with trio.move_on_after(DIAL_TIMEOUT, shield=True), contextlib.suppress(*_NET_ERRORS):
            await host.disconnect(info.peer_id)
    if answer is None:
        raise PeerUnavailable(f"{address}: {failure}")
    if answer.kind is Kind.ERROR:
        raise RemoteFailure(answer.payload.decode(errors="replace"))
    if answer.kind is not Kind.REPLY:
        raise PeerUnavailable(f"{address} answered with a {answer.kind.name} frame")
    return answer.payload


def node_id_of(peer_id: ID) -> bytes:
    """The node id behind a libp2p peer id (Ed25519 keys are inlined in the id)."""
    node_id = peer_id.to_bytes()[-NODE_ID_BYTES:]
    if peer_id_of(node_id) != peer_id:
        raise TransportError(f"peer {peer_id} is not an Ed25519 node")
    return node_id


def _new_host(identity: NodeIdentity, psks: _Keys, listen: list[multiaddr.Multiaddr]) -> BasicHost:
    keys = key_pair_of(identity)
    noise = NoiseTransport(keys, noise_privkey=new_x25519_key_pair().private_key)
    swarm = new_swarm(
        key_pair=keys,
        sec_opt={NOISE: noise},  # never the library default: it includes plaintext
        muxer_preference="YAMUX",
        listen_addrs=listen,
        retry_config=RetryConfig(max_retries=0),  # our loop retries, with our backoff
        transports=[_PnetTCP(psks)],  # pnet is ours: no psk= here
    )
    return BasicHost(network=swarm)


class _Keys:
    """The PSKs of one node: the current one (dials; always accepted) and, during a
    rotation, the previous ones (accepted inbound until `retire` or ``until``)."""

    def __init__(self, current: bytes) -> None:
        _check_psk(current)
        self.current = current
        self.previous: tuple[bytes, ...] = ()
        self.until = 0.0  # wall clock after which the previous keys are refused
        self.refused = 0  # inbound connections that used no accepted key
        self._used: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def set(self, current: bytes, previous: Sequence[bytes], until: float) -> bool:
        """True if the current key changed."""
        for key in (current, *previous):
            _check_psk(key)
        changed = current != self.current
        self.current, self.until = current, until
        self.previous = tuple(k for k in dict.fromkeys(previous) if k != current)
        return changed

    def accepted(self) -> tuple[bytes, ...]:
        if self.previous and time.time() < self.until:
            return (self.current, *self.previous)
        return (self.current,)

    def retire(self) -> None:
        if self.previous:
            log.info("every member was seen on the current cluster key: the previous retired")
        self.previous = ()

    def note(self, remote: tuple[str, int] | None, key: bytes) -> None:
        """Which key the connection from or to ``remote`` uses (`used`)."""
        if remote is not None:
            self._used[remote] = key
            self._used.move_to_end(remote)
            while len(self._used) > 1024:
                self._used.popitem(last=False)

    def used(self, remote: tuple[str, int] | None) -> bytes | None:
        return self._used.get(remote) if remote is not None else None


class _WrongKey(IOException):
    """An inbound connection whose first bytes open with no accepted key."""


class _Inbound(ReadWriteCloser):
    """The listener's side of pnet with several accepted keys: the dialer's nonce
    and first bytes are read before anything is written, and the key under which
    they are `PNET_KNOWN` is the connection's key (`_WrongKey` if none)."""

    def __init__(self, stream: ReadWriteCloser, keys: _Keys) -> None:
        self._stream = stream
        self._keys = keys
        self._lock = trio.Lock()
        self._key: bytes | None = None
        self._read: Salsa20.Salsa20Cipher | None = None
        self._write: Salsa20.Salsa20Cipher | None = None
        self._pending = b""

    async def _choose(self) -> bytes:
        async with self._lock:
            if self._key is None:
                with trio.fail_after(PNET_TIMEOUT):
                    head = await _read_exactly(self._stream, PNET_NONCE + len(PNET_KNOWN))
                nonce, first = head[:PNET_NONCE], head[PNET_NONCE:]
                for key in self._keys.accepted():
                    cipher = Salsa20.new(key=key, nonce=nonce)
                    if cipher.decrypt(first) == PNET_KNOWN:
                        self._key, self._read, self._pending = key, cipher, PNET_KNOWN
                        self._keys.note(self.get_remote_address(), key)
                        break
                else:
                    self._keys.refused += 1
                    log.info("closed a connection from %s: no cluster key", self._remote())
                    await self._stream.close()
                    raise _WrongKey("the connection uses no accepted cluster key")
            return self._key

    async def read(self, n: int | None = None) -> bytes:
        await self._choose()
        if self._pending:
            size = len(self._pending) if n is None else n
            out, self._pending = self._pending[:size], self._pending[size:]
            return out
        data = await self._stream.read(n)
        assert self._read is not None
        return self._read.decrypt(data) if data else b""

    async def write(self, data: bytes) -> None:
        key = await self._choose()
        if self._write is None:
            nonce = secrets.token_bytes(PNET_NONCE)
            self._write = Salsa20.new(key=key, nonce=nonce)
            data_out = nonce + self._write.encrypt(data)
        else:
            data_out = self._write.encrypt(data)
        await self._stream.write(data_out)

    async def close(self) -> None:
        await self._stream.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._stream.get_remote_address()

    def _remote(self) -> str:
        remote = self.get_remote_address()
        return f"{remote[0]}:{remote[1]}" if remote else "?"


class _PnetTCP(TCP):
    """TCP with our pnet layer (`_Keys`) instead of the swarm's one-key option."""

    def __init__(self, keys: _Keys) -> None:
        super().__init__()
        self._keys = keys

    async def dial(self, maddr: multiaddr.Multiaddr) -> IRawConnection:
        raw = await super().dial(maddr)
        key = self._keys.current
        self._keys.note(raw.get_remote_address(), key)
        return PskConn(raw, key.hex())

    async def dial_with_source(
        self, maddr: multiaddr.Multiaddr, source: multiaddr.Multiaddr
    ) -> IRawConnection:
        raise OpenConnectionError("slurpfs dials from no chosen source address")

    def create_listener(self, handler_function: THandler) -> TCPListener:
        keys = self._keys

        async def accept(stream: ReadWriteCloser) -> None:
            await handler_function(_Inbound(stream, keys))

        return super().create_listener(accept)


async def _read_exactly(stream: ReadWriteCloser, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.read(n - len(data))
        if not chunk:
            raise _WrongKey("the connection ended before its first bytes")
        data += chunk
    return data


def _check_psk(psk: bytes) -> None:
    if len(psk) != PSK_BYTES:
        raise ConfigError(f"the cluster key (PSK) is {PSK_BYTES} bytes, not {len(psk)}")


async def _read_frame(stream: INetStream) -> Frame:
    """The first frame on ``stream`` (`_Violation` if it ends or breaks first)."""
    reader = FrameReader()
    while data := await stream.read(_READ):
        if frames := reader.feed(data):
            return frames[0]
    raise _Violation("the stream ended before a whole frame")


def _multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except ValueError as exc:  # the parser's errors are ValueErrors
        raise ConfigError(f"bad peer address {text!r}: {exc}") from None


def _remote_pair(conn: INetConn) -> tuple[str, int] | None:
    """The connection's remote host and port (the key `_Keys.note` used)."""
    for address in conn.get_transport_addresses():
        with contextlib.suppress(ValueError, LookupError):
            return str(address.value_for_protocol("ip4")), int(address.value_for_protocol("tcp"))
    return None


def _remote(conn: INetConn) -> object:
    addresses = conn.get_transport_addresses()
    return str(addresses[0]) if addresses else "?"


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(1, shield=True), contextlib.suppress(*_NET_ERRORS):
        await stream.reset()


async def _until_ends(run: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await run()
    scope.cancel()


__all__ = [
    "JOIN_PROTOCOL",
    "PURPOSES",
    "Joins",
    "Kind",
    "PeerState",
    "PeerUnavailable",
    "Receiver",
    "RemoteFailure",
    "Transport",
    "TransportError",
    "TransportStatistics",
    "encode",
    "knock",
    "node_id_of",
    "peer_id_of",
]
