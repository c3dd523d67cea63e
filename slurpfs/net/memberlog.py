"""The member log's entries and what a set of them means; invite tokens and
join requests (byte layouts in docs/FORMAT.md, "Cluster"). No I/O: the cluster
on disk is `slurpfs.net.members`.

An entry is signed by a member's node key and names the *add* entry that made
its signer a member (its proof); the cluster's first entry, the founder adding
itself, names none. A set of entries means (`evaluate`):

* a node is a member once an add entry for it counts; a removal ends that for
  good (removal always wins; the node rejoins with a new key). The cutoff of a
  removal is the remover's clock: what the removed node signs later does not
  count;
* an entry counts if its proof counts and neither its signer nor (for an add
  or a grant) the node it is about was removed before it was stamped;
* settings: the latest settings entry (by HLC, then entry id) holds; a role
  key (role, generation) is the earliest entry naming it;
* the cluster key (PSK) in force is the one of the greatest PSK entry by
  (generation, HLC, entry id); each PSK entry carries its key sealed to each
  member it was made for.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from slurpfs.crypto.keys import (
    NODE_ID_BYTES,
    SIGNATURE_BYTES,
    NodeIdentity,
    validate_role,
    verify_signature,
)
from slurpfs.errors import AccessDenied, ConfigError, Corrupt

__all__ = [
    "ClusterSettings",
    "Entry",
    "InvalidEntry",
    "InviteRefused",
    "Kind",
    "LogState",
    "Member",
    "Token",
    "check_batch",
    "decode_entries",
    "decode_psk",
    "encode_psk",
    "encode_entries",
    "evaluate",
    "join_request",
    "joiner_of",
    "proof_order",
    "psk_hash",
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
NO_PROOF = bytes(32)
_HEAD = struct.Struct(">4sB32s32sQI")  # magic, kind, signer, proof, hlc, body length
_SETTINGS = struct.Struct(">III")  # factor (0: everyone), partitions, max clock offset ms
LENGTH = struct.Struct(">I")


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
    PSK = 6  # generation, key hash, the new cluster key sealed to each member


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
    reader = Reader(body)
    node_id = reader.take(NODE_ID_BYTES)
    name = reader.take(reader.u8()).decode()
    addrs = tuple(reader.take(reader.u16()).decode() for _ in range(reader.u8()))
    reader.end()
    return Member(node_id, addrs, name)


def decode_remove(body: bytes) -> tuple[bytes, int]:
    reader = Reader(body)
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
    reader = Reader(body)
    role = validate_role(reader.take(reader.u8()).decode())
    generation, public = reader.u32(), reader.take(32)
    reader.end()
    if generation < 1:
        raise ValueError("generation 0")
    return role, generation, public


def encode_grant(node_id: bytes, role: str, sealed: bytes) -> bytes:
    name = validate_role(role).encode()
    return node_id + bytes([len(name)]) + name + LENGTH.pack(len(sealed)) + sealed


def decode_grant(body: bytes) -> tuple[bytes, str, bytes]:
    reader = Reader(body)
    node_id = reader.take(NODE_ID_BYTES)
    role = validate_role(reader.take(reader.u8()).decode())
    sealed = reader.take(reader.u32())
    reader.end()
    return node_id, role, sealed


PSK_SEALED = PSK_BYTES + 48  # a SealedBox of a key: ephemeral public key, MAC, key
_PSK_HEAD = struct.Struct(">I32sH")  # generation, key hash, number of shares


def psk_hash(psk: bytes) -> bytes:
    """What a PSK entry names its key by (so entries of one key are recognised)."""
    return hashlib.sha256(b"slurpfs/psk/v1\0" + psk).digest()


def encode_psk(generation: int, key_hash: bytes, shares: Mapping[bytes, bytes]) -> bytes:
    """A new cluster key's entry body: ``shares`` maps node id -> the key sealed to it."""
    out = [_PSK_HEAD.pack(generation, key_hash, len(shares))]
    for node_id, sealed in sorted(shares.items()):
        if len(node_id) != NODE_ID_BYTES or len(sealed) != PSK_SEALED:
            raise ConfigError("a cluster key share is a node id and a sealed 32-byte key")
        out += [node_id, sealed]
    return b"".join(out)


def decode_psk(body: bytes) -> tuple[int, bytes, dict[bytes, bytes]]:
    reader = Reader(body)
    generation, key_hash, count = _PSK_HEAD.unpack(reader.take(_PSK_HEAD.size))
    shares = {reader.take(NODE_ID_BYTES): reader.take(PSK_SEALED) for _ in range(count)}
    reader.end()
    if generation < 1 or len(shares) != count:
        raise ValueError("generation 0 or a node named twice")
    return generation, key_hash, shares


_BODY_DECODERS = {
    Kind.ADD: decode_add,
    Kind.REMOVE: decode_remove,
    Kind.SETTINGS: decode_settings,
    Kind.ROLE_KEY: decode_role_key,
    Kind.GRANT: decode_grant,
    Kind.PSK: decode_psk,
}


def _check_body(entry: Entry) -> None:
    try:
        _BODY_DECODERS[entry.kind](entry.body)
    except (ValueError, ConfigError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidEntry(f"a malformed {entry.short}: {exc}") from None


class Reader:
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
        return int(LENGTH.unpack(self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def end(self) -> None:
        if self._at != len(self._data):
            raise ValueError(f"{len(self._data) - self._at} bytes left over")


def encode_entries(entries: Sequence[bytes]) -> bytes:
    """count u32 ‖ (length u32 ‖ entry)*: how a log travels."""
    return LENGTH.pack(len(entries)) + b"".join(LENGTH.pack(len(e)) + e for e in entries)


def decode_entries(data: bytes) -> list[bytes]:
    reader = Reader(data)
    try:
        entries = [reader.take(reader.u32()) for _ in range(reader.u32())]
        reader.end()
    except ValueError as exc:
        raise InvalidEntry(f"a malformed member log: {exc}") from None
    return entries


# ---- the state a set of entries means --------------------------------------------


@dataclass(frozen=True, slots=True)
class LogState:
    """What a set of entries means (module docstring); a pure function of the set."""

    genesis: Entry
    entries: tuple[Entry, ...]  # those that count, in the order given
    members: Mapping[bytes, Member]  # current members
    removed: Mapping[bytes, int]  # node id -> cutoff
    adds: Mapping[bytes, bytes]  # node id -> id of an add entry that counts (its proof)
    settings: ClusterSettings
    role_keys: Mapping[str, Mapping[int, bytes]]
    grants: tuple[Entry, ...]
    psk: Entry | None  # the PSK entry in force (None: the founding key)
    psks: tuple[Entry, ...]  # every PSK entry that counts


def evaluate(entries: Sequence[Entry]) -> LogState:
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
    for entry in proof_order(entries, by_id):
        if entry.kind is Kind.REMOVE:
            counted[entry.id] = entry  # removal always wins
        elif (
            (entry.proof in counted or entry is entries[0])
            and alive(entry.signer, entry.hlc)
            and alive(entry.subject, entry.hlc)
        ):
            counted[entry.id] = entry
    return _summarise(entries[0], [e for e in entries if e.id in counted], removed)


def proof_order(entries: Sequence[Entry], by_id: Mapping[bytes, Entry]) -> Iterator[Entry]:
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


def _summarise(genesis: Entry, entries: list[Entry], removed: dict[bytes, int]) -> LogState:
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
    psks = [e for e in entries if e.kind is Kind.PSK]
    return LogState(
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
        psk=max(psks, key=_psk_order, default=None),
        psks=tuple(psks),
    )


def _psk_order(entry: Entry) -> tuple[int, int, bytes]:
    return decode_psk(entry.body)[0], entry.hlc, entry.id


def check_batch(
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
        if entry.proof == NO_PROOF:
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
            reader = Reader(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
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


def read_join_request(request: bytes, inviter: bytes) -> tuple[Member, bytes]:
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
