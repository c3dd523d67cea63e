"""Cluster membership: the private-network key and the signed member log.

A cluster lives in ``<data>/cluster/`` (directory ``0700``, files ``0600``),
outside the store on purpose: an emptied or rolled-back store still knows its
cluster and refills from its peers.

* ``psk``: the 32-byte private-network key (libp2p pnet).
* ``members.log``: the member log, signed entries appended in the order this
  node learnt them (byte layout in docs/FORMAT.md). Every entry is signed by a
  member's node key and names the *add* entry that made its signer a member
  (its proof); the first entry, the founder adding itself, names none.
* ``invites``: pending invites, by the hash of their secret (never the secret).
* ``lock``: serialises writers (the CLI and the daemon's worker append too).

The log is a set: merging two logs in either order gives the same entries and
the same `Cluster.digest`, and the state is a function of that set:

* a node is a member once an add entry for it holds; a removal ends that for
  good (removal always wins; the node rejoins with a new key). The cutoff of a
  removal is the remover's clock: entries and versions the removed node signs
  later do not count (`Ingest` refuses such versions);
* an entry by a removed node past its cutoff, or an add of a removed node past
  its cutoff, is kept out of the log (not an error: it may have been signed
  before its signer heard of the removal);
* settings: the latest settings entry (by HLC, then entry id) holds; a role
  key (role, generation) is the earliest entry naming it.

An entry that does not parse, whose signature fails, whose proof is missing or
adds someone else, or that names a second founder is refused with the reason,
and the whole batch with it (nothing is appended).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import VerifyKey

from slurpfs.crypto.keys import (
    NODE_ID_BYTES,
    SIGNATURE_BYTES,
    NodeIdentity,
    RoleKeyPair,
    validate_role,
    verify_signature,
)
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    Corrupt,
    KeyMissing,
    NotFound,
)
from slurpfs.hlc import LOGICAL_BITS

log = logging.getLogger(__name__)

__all__ = [
    "Cluster",
    "ClusterSettings",
    "Entry",
    "InvalidEntry",
    "InviteRefused",
    "Kind",
    "Member",
    "Token",
    "cluster_dir",
    "decode_entries",
    "encode_entries",
    "join_request",
    "joiner_of",
]

PSK_BYTES = 32
SECRET_BYTES = 32
ENTRY_MAGIC = b"SLM1"
SIGN_CONTEXT = b"slurpfs/members/v1\0"
JOIN_MAGIC = b"SLJ1"
JOIN_CONTEXT = b"slurpfs/join/v1\0"
TOKEN_PREFIX = "slurpfs1-"
TOKEN_VERSION = 1
DEFAULT_TTL = 600.0
MAX_TTL = 7 * 24 * 3600.0
MAX_ENTRY = 64 << 10
_NO_PROOF = bytes(32)
_HEAD = struct.Struct(">4sB32s32sQI")  # magic, kind, signer, proof, hlc, body length
_SETTINGS = struct.Struct(">III")  # factor (0: everyone), partitions, max clock offset ms
_LENGTH = struct.Struct(">I")


class InvalidEntry(Corrupt):
    """A member-log entry that does not parse, verify or follow the rules."""


class InviteRefused(AccessDenied):
    """A join request with no valid invite: wrong, expired or already used."""


class Kind(enum.IntEnum):
    ADD = 1  # node id, name, addresses
    REMOVE = 2  # node id, cutoff HLC
    SETTINGS = 3  # ClusterSettings
    ROLE_KEY = 4  # role, generation, X25519 public key
    GRANT = 5  # node id, role, the role's private keys sealed to that node


@dataclass(frozen=True, slots=True)
class Member:
    node_id: bytes  # 32-byte Ed25519 public key (the node identity; libp2p peer id)
    addrs: tuple[str, ...]  # multiaddrs it is reached at, e.g. "/ip4/10.77.0.2/tcp/7400"
    name: str  # a label for humans (host name by default)


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Signed, in the log; never from a local config value."""

    factor: int | None = None  # None: every member holds everything
    partitions: int = 4096
    max_clock_offset_ms: int = 60_000


# ---- entries ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One signed log entry, decoded (``raw`` is what was signed plus the signature)."""

    kind: Kind
    signer: bytes
    proof: bytes  # id of the add entry that made the signer a member; zeros: the founder
    hlc: int
    body: bytes
    raw: bytes

    @property
    def id(self) -> bytes:
        return hashlib.sha256(self.raw).digest()

    @property
    def short(self) -> str:
        return f"{self.kind.name.lower()} entry {self.id.hex()[:16]}"

    @property
    def subject(self) -> bytes:
        """The node an add, removal or grant is about (the signer for the rest)."""
        return self.body[:NODE_ID_BYTES] if self.kind in _ABOUT_NODE else self.signer

    @classmethod
    def make(cls, identity: NodeIdentity, kind: Kind, proof: bytes, hlc: int, body: bytes) -> Entry:
        head = _HEAD.pack(ENTRY_MAGIC, kind, identity.node_id, proof, hlc, len(body))
        signed = head + body
        return cls.decode(signed + identity.sign(SIGN_CONTEXT + signed))

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        """Parse and check the signature; `InvalidEntry` with the reason otherwise."""
        if not _HEAD.size + SIGNATURE_BYTES <= len(raw) <= MAX_ENTRY:
            raise InvalidEntry(f"a member-log entry of {len(raw)} bytes")
        magic, kind, signer, proof, hlc, size = _HEAD.unpack_from(raw)
        if magic != ENTRY_MAGIC or kind not in Kind._value2member_map_:
            raise InvalidEntry(f"not a member-log entry (magic {magic!r}, kind {kind})")
        if len(raw) != _HEAD.size + size + SIGNATURE_BYTES:
            raise InvalidEntry("a member-log entry whose length does not match its header")
        signed, signature = raw[:-SIGNATURE_BYTES], raw[-SIGNATURE_BYTES:]
        if not verify_signature(signer, SIGN_CONTEXT + signed, signature):
            raise InvalidEntry(
                f"a member-log entry whose signature by {signer.hex()[:16]} does not verify"
                " (tampered?)"
            )
        entry = cls(Kind(kind), signer, proof, hlc, raw[_HEAD.size : -SIGNATURE_BYTES], raw)
        _check_body(entry)
        return entry


_ABOUT_NODE = (Kind.ADD, Kind.REMOVE, Kind.GRANT)


def encode_add(member: Member) -> bytes:
    name = member.name.encode()
    if len(name) > 255 or len(member.addrs) > 255:
        raise ConfigError("a member name is at most 255 bytes, with at most 255 addresses")
    out = [member.node_id, bytes([len(name)]), name, bytes([len(member.addrs)])]
    for addr in member.addrs:
        data = addr.encode()
        out += [struct.pack(">H", len(data)), data]
    return b"".join(out)


def decode_add(body: bytes) -> Member:
    reader = _Reader(body)
    node_id = reader.take(NODE_ID_BYTES)
    name = reader.take(reader.u8()).decode()
    addrs = tuple(reader.take(reader.u16()).decode() for _ in range(reader.u8()))
    reader.end()
    return Member(node_id, addrs, name)


def decode_remove(body: bytes) -> tuple[bytes, int]:
    reader = _Reader(body)
    node_id, cutoff = reader.take(NODE_ID_BYTES), reader.u64()
    reader.end()
    return node_id, cutoff


def encode_settings(settings: ClusterSettings) -> bytes:
    return _SETTINGS.pack(settings.factor or 0, settings.partitions, settings.max_clock_offset_ms)


def decode_settings(body: bytes) -> ClusterSettings:
    if len(body) != _SETTINGS.size:
        raise ValueError("settings of the wrong size")
    factor, partitions, offset = _SETTINGS.unpack(body)
    if partitions < 1:
        raise ValueError("no partitions")
    return ClusterSettings(factor or None, partitions, offset)


def encode_role_key(role: str, generation: int, public: bytes) -> bytes:
    name = validate_role(role).encode()
    return bytes([len(name)]) + name + struct.pack(">I", generation) + public


def decode_role_key(body: bytes) -> tuple[str, int, bytes]:
    reader = _Reader(body)
    role = validate_role(reader.take(reader.u8()).decode())
    generation, public = reader.u32(), reader.take(32)
    reader.end()
    if generation < 1:
        raise ValueError("generation 0")
    return role, generation, public


def encode_grant(node_id: bytes, role: str, sealed: bytes) -> bytes:
    name = validate_role(role).encode()
    return node_id + bytes([len(name)]) + name + _LENGTH.pack(len(sealed)) + sealed


def decode_grant(body: bytes) -> tuple[bytes, str, bytes]:
    reader = _Reader(body)
    node_id = reader.take(NODE_ID_BYTES)
    role = validate_role(reader.take(reader.u8()).decode())
    sealed = reader.take(reader.u32())
    reader.end()
    return node_id, role, sealed


_BODY_DECODERS = {
    Kind.ADD: decode_add,
    Kind.REMOVE: decode_remove,
    Kind.SETTINGS: decode_settings,
    Kind.ROLE_KEY: decode_role_key,
    Kind.GRANT: decode_grant,
}


def _check_body(entry: Entry) -> None:
    try:
        _BODY_DECODERS[entry.kind](entry.body)
    except (ValueError, ConfigError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidEntry(f"a malformed {entry.short}: {exc}") from None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._data):
            raise ValueError("truncated")
        self._at += n
        return self._data[self._at - n : self._at]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(_LENGTH.unpack(self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def end(self) -> None:
        if self._at != len(self._data):
            raise ValueError(f"{len(self._data) - self._at} bytes left over")


def encode_entries(entries: Sequence[bytes]) -> bytes:
    """count u32 ‖ (length u32 ‖ entry)*: how a log travels."""
    return _LENGTH.pack(len(entries)) + b"".join(_LENGTH.pack(len(e)) + e for e in entries)


def decode_entries(data: bytes) -> list[bytes]:
    reader = _Reader(data)
    try:
        entries = [reader.take(reader.u32()) for _ in range(reader.u32())]
        reader.end()
    except ValueError as exc:
        raise InvalidEntry(f"a malformed member log: {exc}") from None
    return entries


# ---- the state a set of entries means --------------------------------------------


@dataclass(frozen=True, slots=True)
class _State:
    """What a set of entries means (module docstring); a pure function of the set."""

    genesis: Entry
    entries: tuple[Entry, ...]  # those that count, in the order given
    members: Mapping[bytes, Member]  # current members
    removed: Mapping[bytes, int]  # node id -> cutoff
    adds: Mapping[bytes, bytes]  # node id -> id of an add entry that counts (its proof)
    settings: ClusterSettings
    role_keys: Mapping[str, Mapping[int, bytes]]
    grants: tuple[Entry, ...]


def _evaluate(entries: Sequence[Entry]) -> _State:
    """The state of a (checked) set of entries; the first entry is the founder's."""
    by_id = {entry.id: entry for entry in entries}
    removed: dict[bytes, int] = {}
    for entry in entries:
        if entry.kind is Kind.REMOVE and entry.proof in by_id:
            node_id, cutoff = decode_remove(entry.body)
            removed[node_id] = min(cutoff, removed.get(node_id, cutoff))

    def alive(node_id: bytes, hlc: int) -> bool:
        return node_id not in removed or hlc <= removed[node_id]

    counted: dict[bytes, Entry] = {}
    for entry in _proof_order(entries, by_id):
        if entry.kind is Kind.REMOVE:
            counted[entry.id] = entry  # removal always wins
        elif (
            (entry.proof in counted or entry is entries[0])
            and alive(entry.signer, entry.hlc)
            and alive(entry.subject, entry.hlc)
        ):
            counted[entry.id] = entry
    return _summarise(entries[0], [e for e in entries if e.id in counted], removed)


def _proof_order(entries: Sequence[Entry], by_id: Mapping[bytes, Entry]) -> Iterator[Entry]:
    """Every entry after the entry it names as proof (the founder's first)."""
    done: set[bytes] = set()
    for entry in entries:
        chain: list[Entry] = []
        step: Entry | None = entry
        while step is not None and step.id not in done:
            chain.append(step)
            done.add(step.id)
            step = by_id.get(step.proof)
        yield from reversed(chain)


def _summarise(genesis: Entry, entries: list[Entry], removed: dict[bytes, int]) -> _State:
    latest: dict[bytes, Entry] = {}
    settings: Entry | None = None
    role_keys: dict[str, dict[int, tuple[tuple[int, bytes], bytes]]] = {}
    for entry in entries:
        key = (entry.hlc, entry.id)
        if entry.kind is Kind.ADD:
            node_id = entry.subject
            if node_id not in latest or key > (latest[node_id].hlc, latest[node_id].id):
                latest[node_id] = entry
        elif entry.kind is Kind.SETTINGS and (
            settings is None or key > (settings.hlc, settings.id)
        ):
            settings = entry
        elif entry.kind is Kind.ROLE_KEY:
            role, generation, public = decode_role_key(entry.body)
            known = role_keys.setdefault(role, {}).get(generation)
            if known is None or key < known[0]:
                role_keys[role][generation] = (key, public)
    members = {
        node_id: decode_add(entry.body)
        for node_id, entry in latest.items()
        if node_id not in removed
    }
    return _State(
        genesis=genesis,
        entries=tuple(entries),
        members=MappingProxyType(members),
        removed=MappingProxyType(dict(removed)),
        adds=MappingProxyType({node_id: entry.id for node_id, entry in latest.items()}),
        settings=decode_settings(settings.body) if settings else ClusterSettings(),
        role_keys=MappingProxyType(
            {
                r: MappingProxyType({g: p for g, (_, p) in gens.items()})
                for r, gens in role_keys.items()
            }
        ),
        grants=tuple(e for e in entries if e.kind is Kind.GRANT),
    )


def _check_batch(
    known: Mapping[bytes, Entry], genesis: Entry, fresh: Sequence[Entry]
) -> list[Entry]:
    """The new entries whose signer's proof holds; `InvalidEntry` names the first
    that breaks a rule. An entry of a removed node whose proof this node never
    stored (an add that did not count) is left out, not refused."""
    pool = {**known, **{entry.id: entry for entry in fresh}}
    removed = {
        decode_remove(e.body)[0] for e in pool.values() if e.kind is Kind.REMOVE and e.proof in pool
    }
    usable = []
    for entry in fresh:
        if entry.proof == _NO_PROOF:
            if entry.id != genesis.id:
                raise InvalidEntry(
                    f"{entry.short} claims to found the cluster: a log from another cluster?"
                )
        elif (proof := pool.get(entry.proof)) is None and entry.signer in removed:
            continue
        elif proof is None or proof.kind is not Kind.ADD or proof.subject != entry.signer:
            raise InvalidEntry(
                f"{entry.short} is signed by {entry.signer.hex()[:16]}, which is not a member"
                " of this cluster"
            )
        usable.append(entry)
    return usable


# ---- invites -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """What `slurpfs peers invite` prints: everything a joiner needs, once."""

    psk: bytes
    inviter: bytes
    secret: bytes
    expires: int  # unix seconds
    addrs: tuple[str, ...]

    def encode(self) -> str:
        body = struct.pack(
            ">B32s32s32sQ", TOKEN_VERSION, self.psk, self.inviter, self.secret, self.expires
        )
        body += bytes([len(self.addrs)])
        body += b"".join(struct.pack(">H", len(a.encode())) + a.encode() for a in self.addrs)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> Token:
        text = text.strip()
        try:
            if not text.startswith(TOKEN_PREFIX):
                raise ValueError(f"it does not start with {TOKEN_PREFIX!r}")
            raw = text[len(TOKEN_PREFIX) :]
            reader = _Reader(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            if reader.u8() != TOKEN_VERSION:
                raise ValueError("an unknown token version")
            psk, inviter, secret = reader.take(32), reader.take(32), reader.take(32)
            expires = reader.u64()
            addrs = tuple(reader.take(reader.u16()).decode() for _ in range(reader.u8()))
            reader.end()
        except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise ConfigError(f"not a slurpfs invite token: {exc}") from None
        return cls(psk, inviter, secret, expires, addrs)


def secret_hash(secret: bytes) -> str:
    return hashlib.sha256(b"slurpfs/invite/v1\0" + secret).hexdigest()


def join_request(identity: NodeIdentity, token: Token, me: Member) -> bytes:
    """The joiner's request: who it is, where it listens, the invite's secret; signed."""
    body = JOIN_MAGIC + token.inviter + token.secret + encode_add(me)
    return body + identity.sign(JOIN_CONTEXT + body)


def joiner_of(request: bytes) -> Member:
    """The node a join request claims to be (`Cluster.admit` checks the claim)."""
    try:
        return decode_add(request[len(JOIN_MAGIC) + 64 : -SIGNATURE_BYTES])
    except ValueError as exc:
        raise InviteRefused(f"a malformed join request: {exc}") from None


def _read_join_request(request: bytes, inviter: bytes) -> tuple[Member, bytes]:
    fixed = len(JOIN_MAGIC) + 2 * 32
    if len(request) < fixed + NODE_ID_BYTES + SIGNATURE_BYTES or not request.startswith(JOIN_MAGIC):
        raise InviteRefused("not a join request")
    body, signature = request[:-SIGNATURE_BYTES], request[-SIGNATURE_BYTES:]
    if body[4:36] != inviter:
        raise InviteRefused("the join request is for another inviter")
    try:
        member = decode_add(body[fixed:])
    except ValueError as exc:
        raise InviteRefused(f"a malformed join request: {exc}") from None
    if not verify_signature(member.node_id, JOIN_CONTEXT + body, signature):
        raise InviteRefused("the join request is not signed by the key it claims")
    return member, body[36:fixed]


# ---- the cluster on disk -------------------------------------------------------


def cluster_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "cluster"


def hlc_now(after: int = 0) -> int:
    """An HLC (the store's encoding) at least one past ``after``."""
    return max((time.time_ns() // 1_000_000) << LOGICAL_BITS, after + 1)


def default_name() -> str:
    return socket.gethostname()[:255] or "node"


class Cluster:
    """This node's view of its cluster (module docstring). Methods take the file lock
    to change anything and reread the log when another process appended to it."""

    def __init__(self, data_dir: Path, keystore: Keystore, identity: NodeIdentity) -> None:
        self.dir = cluster_dir(data_dir)
        self._keystore = keystore
        self._identity = identity
        self.psk = b""
        self._entries: list[Entry] = []
        self._ids: dict[bytes, Entry] = {}
        self._size = self._valid = -1
        self._state: _State | None = None

    # ---- opening ----------------------------------------------------------------

    @classmethod
    def load(cls, data_dir: Path, keystore: Keystore) -> Cluster | None:
        """This node's cluster, or None when it has none (`peers invite` founds one)."""
        if not (cluster_dir(data_dir) / "members.log").exists():
            return None
        cluster = cls(data_dir, keystore, keystore.load().node)
        cluster._open()
        cluster._apply_keys(cluster.state())  # the log is the source of truth
        return cluster

    @classmethod
    def found(
        cls,
        data_dir: Path,
        keystore: Keystore,
        addrs: Sequence[str],
        name: str | None = None,
        settings: ClusterSettings | None = None,
    ) -> Cluster:
        """Found a cluster of this node alone: a new PSK, its add entry, the settings
        and every role public key it knows. `AlreadyExists` if it has a cluster."""
        ring = keystore.load()
        cluster = cls(data_dir, keystore, ring.node)
        me = Member(ring.node.node_id, tuple(addrs), name or default_name())
        genesis = Entry.make(ring.node, Kind.ADD, _NO_PROOF, hlc_now(), encode_add(me))
        entries = [genesis]
        for body, kind in [(encode_settings(settings or ClusterSettings()), Kind.SETTINGS)] + [
            (encode_role_key(role, g, ring.public(role, g).public), Kind.ROLE_KEY)  # type: ignore[union-attr]
            for role in sorted(ring.roles())
            for g in ring.generations(role)
        ]:
            entries.append(Entry.make(ring.node, kind, genesis.id, hlc_now(entries[-1].hlc), body))
        cluster._create(secrets.token_bytes(PSK_BYTES), [e.raw for e in entries])
        return cluster

    @classmethod
    def adopt(
        cls, data_dir: Path, keystore: Keystore, psk: bytes, entries: Sequence[bytes]
    ) -> Cluster:
        """A joiner stores the log it was sent (it must list this node as a member)
        and takes the cluster's role public keys in place of its own."""
        ring = keystore.load()
        cluster = cls(data_dir, keystore, ring.node)
        if (cluster.dir / "members.log").exists():
            raise AlreadyExists(f"this node already belongs to a cluster ({cluster.dir})")
        decoded = [Entry.decode(raw) for raw in entries]
        if not decoded or decoded[0].proof != _NO_PROOF or decoded[0].kind is not Kind.ADD:
            raise InvalidEntry("a member log that does not start with its founder")
        if decoded[0].subject != decoded[0].signer:
            raise InvalidEntry("a member log whose founder did not add itself")
        usable = _check_batch({}, decoded[0], decoded)
        state = _evaluate(usable)
        if ring.node.node_id not in state.members:
            raise InvalidEntry("the member log sent does not list this node as a member")
        keystore.adopt_publics({role: dict(gens) for role, gens in state.role_keys.items()})
        cluster._create(
            psk, [e.raw for e in _proof_order(state.entries, {e.id: e for e in state.entries})]
        )
        return cluster

    def _create(self, psk: bytes, entries: list[bytes]) -> None:
        if self.dir.exists() and (self.dir / "members.log").exists():
            raise AlreadyExists(f"this node already belongs to a cluster ({self.dir})")
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.dir, 0o700)
        _check_private(self.dir)
        with self._locked():
            _write_new(self.dir / "psk", psk)
            _write_new(
                self.dir / "members.log", b"".join(_LENGTH.pack(len(e)) + e for e in entries)
            )
            self._open()
            self._apply_keys(self.state())

    def _open(self) -> None:
        _check_private(self.dir)
        self.psk = _read_private(self.dir / "psk")
        if len(self.psk) != PSK_BYTES:
            raise Corrupt(f"{self.dir / 'psk'} is not a {PSK_BYTES}-byte key")
        self._reread()

    def _reread(self) -> None:
        path = self.dir / "members.log"
        size = path.stat().st_size
        if size == self._size:
            return
        data = _read_private(path)
        entries, at = [], 0
        while at < len(data):
            if at + 4 > len(data) or at + 4 + _LENGTH.unpack_from(data, at)[0] > len(data):
                break  # a torn last append (a crash mid-write): the rest is ignored
            (length,) = _LENGTH.unpack_from(data, at)
            entries.append(Entry.decode(data[at + 4 : at + 4 + length]))
            at += 4 + length
        if not entries:
            raise Corrupt(f"{path} holds no entries")
        self._entries, self._ids = entries, {e.id: e for e in entries}
        self._size, self._valid, self._state = size, at, None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- reading ------------------------------------------------------------------

    def state(self) -> _State:
        self._reread()
        if self._state is None:
            self._state = _evaluate(self._entries)
        return self._state

    def me(self) -> Member:
        node_id = self._identity.node_id
        member = self.state().members.get(node_id)
        if member is None:
            raise AccessDenied(f"this node ({node_id.hex()[:16]}) was removed from its cluster")
        return member

    def members(self) -> tuple[Member, ...]:
        """Current members, this node included, by node id."""
        return tuple(m for _, m in sorted(self.state().members.items()))

    def removed(self) -> Mapping[bytes, int]:
        return self.state().removed

    def settings(self) -> ClusterSettings:
        return self.state().settings

    def role_keys(self) -> Mapping[str, Mapping[int, bytes]]:
        return self.state().role_keys

    def digest(self) -> bytes:
        """32 bytes, equal iff the logs hold the same entries (in whatever order)."""
        h = hashlib.sha256(b"slurpfs/members/digest/v1\0")
        for entry_id in sorted(e.id for e in self.state().entries):
            h.update(entry_id)
        return h.digest()

    def entries(self) -> list[bytes]:
        """The entries that count, encoded, in an order `merge` accepts (proofs first)."""
        state = self.state()
        return [e.raw for e in _proof_order(state.entries, {e.id: e for e in state.entries})]

    def find(self, text: str) -> Member:
        """A member by node id hex prefix or name; `NotFound` / `ConfigError` if none or several."""
        found = [
            m
            for m in self.members()
            if m.name == text or (len(text) >= 4 and m.node_id.hex().startswith(text.lower()))
        ]
        if not found:
            raise NotFound(f"no member {text!r} (slurpfs peers lists them)")
        if len(found) > 1:
            raise ConfigError(f"{text!r} names {len(found)} members; give more of the node id")
        return found[0]

    # ---- changing -----------------------------------------------------------------

    def merge(self, entries: Sequence[bytes]) -> bool:
        """Verify ``entries`` and append the new ones; True if the log changed.

        All or nothing: `InvalidEntry` (nothing appended) for an entry that fails a
        check. Entries that do not count (module docstring) are left out silently.
        Then this node's keystore follows the log (`_apply_keys`).
        """
        decoded = [Entry.decode(raw) for raw in entries]
        with self._locked():
            self.state()
            fresh = list({e.id: e for e in decoded if e.id not in self._ids}.values())
            usable = _check_batch(self._ids, self._entries[0], fresh)
            counted = {e.id for e in _evaluate([*self._entries, *usable]).entries}
            new = [e for e in usable if e.id in counted]
            if not new:
                return False
            self._append(new)
            self._apply_keys(self.state())
            return True

    def _append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        data = b"".join(_LENGTH.pack(len(e.raw)) + e.raw for e in entries)
        fd = os.open(self.dir / "members.log", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != self._valid:
                os.ftruncate(fd, self._valid)  # drop a torn append before adding to the log
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._reread()

    def _sign(self, kind: Kind, body: bytes) -> Entry:
        """A new entry by this node (caller holds the lock)."""
        proof = self.state().adds.get(self._identity.node_id)
        if proof is None or self._identity.node_id in self.state().removed:
            raise AccessDenied("this node is not a member of its cluster any more")
        last = max(e.hlc for e in self._entries)
        entry = Entry.make(self._identity, kind, proof, hlc_now(last), body)
        self._append([entry])
        self._apply_keys(self.state())
        return entry

    def update_me(self, addrs: Sequence[str], name: str | None = None) -> bool:
        """Record this node's addresses (and name) when they changed; True if so."""
        with self._locked():
            me = self.me()
            new = Member(me.node_id, tuple(addrs), name or me.name)
            if new == me:
                return False
            self._sign(Kind.ADD, encode_add(new))
            return True

    def remove(self, node_id: bytes) -> int:
        """Remove a member for good; returns the cutoff HLC."""
        with self._locked():
            if node_id == self._identity.node_id:
                raise ConfigError("a node does not remove itself: remove it from another member")
            if node_id not in self.state().members:
                raise NotFound(f"{node_id.hex()[:16]} is not a member")
            cutoff = hlc_now(max(e.hlc for e in self._entries))
            self._sign(Kind.REMOVE, node_id + struct.pack(">Q", cutoff))
            return cutoff

    def set_settings(self, settings: ClusterSettings) -> None:
        with self._locked():
            self._sign(Kind.SETTINGS, encode_settings(settings))

    def publish_role_key(self, role: str, generation: int, public: bytes) -> None:
        """A new role generation (a rotation) joins the log for every member."""
        with self._locked():
            known = self.state().role_keys.get(role, {}).get(generation)
            if known == public:
                return
            if known is not None:
                raise AlreadyExists(f"role {role!r} generation {generation} has another key")
            self._sign(Kind.ROLE_KEY, encode_role_key(role, generation, public))

    def grant(self, role: str, to: bytes) -> int:
        """Seal every generation of ``role``'s private keys this node holds to the
        member ``to``; returns how many generations."""
        ring = self._keystore.load()
        pairs = [ring.private(role, g) for g in ring.generations(role)]
        held = [(g, key) for g, key in zip(ring.generations(role), pairs, strict=True) if key]
        if not held:
            raise KeyMissing(f"this node holds no private key of role {role!r} to grant")
        with self._locked():
            if to not in self.state().members:
                raise NotFound(f"{to.hex()[:16]} is not a member")
            plain = _grant_plaintext(role, [(g, bytes(k)) for g, k in held])
            sealed = SealedBox(PublicKey(_x25519_public(to))).encrypt(plain)
            self._sign(Kind.GRANT, encode_grant(to, role, bytes(sealed)))
        return len(held)

    # ---- keys the log carries -------------------------------------------------------

    def _apply_keys(self, state: _State) -> None:
        """Make this node's keystore follow the log: the role public keys, the grants
        sealed to it, and trust in every node ever admitted (a removed one stays
        trusted for what it signed before its cutoff: `Ingest` checks that)."""
        publics = {role: dict(gens) for role, gens in state.role_keys.items()}
        pairs = [pair for entry in state.grants for pair in self._open_grant(entry, publics)]
        self._keystore.follow_cluster(publics, pairs, sorted(state.adds))

    def _open_grant(
        self, entry: Entry, publics: Mapping[str, Mapping[int, bytes]]
    ) -> list[RoleKeyPair]:
        node_id, role, sealed = decode_grant(entry.body)
        if node_id != self._identity.node_id:
            return []
        # A member signed it, so a grant that does not open is that member's fault:
        # said loudly, and skipped (the rest of the log still applies).
        key = self._identity.signing_key.to_curve25519_private_key()
        try:
            sealed_role, keys = _read_grant_plaintext(SealedBox(key).decrypt(sealed))
        except (CryptoError, ValueError):
            log.error("%s is sealed to this node but does not open: skipped", entry.short)
            return []
        pairs = [RoleKeyPair(role, g, PrivateKey(k)) for g, k in keys]
        if sealed_role != role or any(
            publics.get(role, {}).get(pair.generation) != pair.public.public for pair in pairs
        ):
            log.error("%s holds keys that are not %r's in the log: skipped", entry.short, role)
            return []
        return pairs

    # ---- invites ------------------------------------------------------------------

    def invite(self, ttl: float = DEFAULT_TTL) -> Token:
        """A single-use token valid for ``ttl`` seconds; only its secret's hash is kept."""
        if not 0 < ttl <= MAX_TTL:
            raise ConfigError(f"an invite lives more than 0 and at most {MAX_TTL:.0f} seconds")
        me = self.me()
        secret = secrets.token_bytes(SECRET_BYTES)
        expires = int(time.time() + ttl)
        with self._locked():
            invites = self._invites()
            invites[secret_hash(secret)] = {"expires": expires, "used": None}
            self._save_invites(invites)
        return Token(self.psk, me.node_id, secret, expires, me.addrs)

    def inviting(self) -> bool:
        """True while an unexpired, unused invite exists."""
        now = time.time()
        return any(i["used"] is None and i["expires"] > now for i in self._invites().values())

    def admit(self, request: bytes) -> bytes:
        """The inviter's side of a join: check the secret and the joiner's signature,
        use the invite up, add the joiner; the whole log, encoded (`encode_entries`)."""
        joiner, secret = _read_join_request(request, self._identity.node_id)
        with self._locked():
            invites = self._invites()
            invite = invites.get(secret_hash(secret))
            if invite is None:
                raise InviteRefused("no such invite (a wrong or mistyped token?)")
            if invite["used"] is not None:
                raise InviteRefused("this invite was used already: ask for a new one")
            if invite["expires"] <= time.time():
                raise InviteRefused("this invite has expired: ask for a new one")
            if joiner.node_id in self.state().removed:
                raise InviteRefused(
                    "this node was removed from the cluster: it rejoins with a new node key"
                )
            invite["used"] = joiner.node_id.hex()
            self._save_invites(invites)
            self._sign(Kind.ADD, encode_add(joiner))
        return encode_entries(self.entries())

    def _invites(self) -> dict[str, dict[str, Any]]:
        path = self.dir / "invites"
        if not path.exists():
            return {}
        try:
            invites = json.loads(_read_private(path))
        except ValueError as exc:
            raise Corrupt(f"{path} is malformed: {exc}") from None
        now = time.time()
        # Expired invites are forgotten a day after (a reuse until then says "expired").
        return {h: i for h, i in invites.items() if i["expires"] > now - 86400}

    def _save_invites(self, invites: Mapping[str, object]) -> None:
        _write_atomic(self.dir / "invites", json.dumps(invites, indent=1).encode())


# ---- helpers -----------------------------------------------------------------


def _grant_plaintext(role: str, keys: Iterable[tuple[int, bytes]]) -> bytes:
    name = role.encode()
    keys = list(keys)
    out = b"SLG1" + bytes([len(name)]) + name + bytes([len(keys)])
    return out + b"".join(struct.pack(">I", g) + k for g, k in keys)


def _read_grant_plaintext(plain: bytes) -> tuple[str, list[tuple[int, bytes]]]:
    reader = _Reader(plain)
    if reader.take(4) != b"SLG1":
        raise ValueError("not a grant")
    role = reader.take(reader.u8()).decode()
    keys = [(reader.u32(), reader.take(32)) for _ in range(reader.u8())]
    reader.end()
    return role, keys


def _x25519_public(node_id: bytes) -> bytes:
    """A node's X25519 public key, converted from its Ed25519 id."""
    try:
        return bytes(VerifyKey(node_id).to_curve25519_public_key())
    except (CryptoError, ValueError):
        raise ConfigError(f"{node_id.hex()[:16]} is not a usable node key") from None


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} is accessible by group/others; chmod 700 it")


def _read_private(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_mode & 0o077:
            raise ConfigError(f"{path} is accessible by group/others; chmod 600 it")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> None:
    _write_atomic(path, data)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
