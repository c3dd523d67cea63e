"""Cluster membership: the private-network key and the signed member log.

A cluster lives in ``<data>/cluster/`` (directory ``0700``, files ``0600``),
outside the store on purpose: an emptied or rolled-back store still knows its
cluster and refills from its peers.

* ``psk``: the 32-byte private-network key (libp2p pnet) this node was given
  when it founded or joined the cluster. A removal rotates it: the remover signs
  a PSK entry carrying a new key sealed to each remaining member (`ClusterKeys`
  says which key is in force and which previous ones are still accepted).
* ``members.log``: the member log (`slurpfs.net.memberlog`), signed entries
  appended in the order this node learnt them (byte layout in docs/FORMAT.md).
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

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import VerifyKey

from slurpfs.crypto.keys import NodeIdentity, RoleKeyPair
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import AccessDenied, AlreadyExists, ConfigError, Corrupt, KeyMissing, NotFound
from slurpfs.hlc import LOGICAL_BITS
from slurpfs.net.memberlog import (
    DEFAULT_TTL,
    LENGTH,
    MAX_TTL,
    NO_PROOF,
    PSK_BYTES,
    SECRET_BYTES,
    ClusterSettings,
    Entry,
    InvalidEntry,
    InviteRefused,
    Kind,
    LogState,
    Member,
    Reader,
    Token,
    check_batch,
    decode_entries,
    decode_grant,
    decode_psk,
    decode_role_key,
    encode_add,
    encode_entries,
    encode_grant,
    encode_psk,
    encode_role_key,
    encode_settings,
    evaluate,
    join_request,
    joiner_of,
    proof_order,
    psk_hash,
    read_join_request,
    secret_hash,
)

log = logging.getLogger(__name__)

__all__ = [
    "PSK_GRACE",
    "Cluster",
    "ClusterKeys",
    "ClusterSettings",
    "Entry",
    "InvalidEntry",
    "InviteRefused",
    "Kind",
    "Member",
    "Token",
    "cluster_dir",
    "decode_entries",
    "decode_grant",
    "default_name",
    "encode_add",
    "encode_entries",
    "encode_settings",
    "hlc_now",
    "join_request",
    "joiner_of",
]


# After a PSK rotation the previous keys stay accepted inbound until every member
# was seen on the new one, and never longer than this after the rotation: a member
# down longer learns the new key from no one (it is removed and rejoins).
PSK_GRACE = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    """The cluster keys (PSKs) this node knows: ``current`` (dial with it) and the
    ``previous`` ones, accepted inbound until ``until`` (unix seconds) at most."""

    current: bytes
    previous: tuple[bytes, ...]
    until: float


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
        self._base_psk = b""
        self._opened: dict[bytes, bytes | None] = {}  # PSK entry id -> the key it seals here
        self._entries: list[Entry] = []
        self._ids: dict[bytes, Entry] = {}
        self._size = self._valid = -1
        self._state: LogState | None = None
        self._mutex = threading.RLock()

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
        genesis = Entry.make(ring.node, Kind.ADD, NO_PROOF, hlc_now(), encode_add(me))
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
        if not decoded or decoded[0].proof != NO_PROOF or decoded[0].kind is not Kind.ADD:
            raise InvalidEntry("a member log that does not start with its founder")
        if decoded[0].subject != decoded[0].signer:
            raise InvalidEntry("a member log whose founder did not add itself")
        usable = check_batch({}, decoded[0], decoded)
        state = evaluate(usable)
        if ring.node.node_id not in state.members:
            raise InvalidEntry("the member log sent does not list this node as a member")
        keystore.adopt_publics({role: dict(gens) for role, gens in state.role_keys.items()})
        cluster._create(
            psk, [e.raw for e in proof_order(state.entries, {e.id: e for e in state.entries})]
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
            _write_new(self.dir / "members.log", b"".join(LENGTH.pack(len(e)) + e for e in entries))
            self._open()
            self._apply_keys(self.state())

    def _open(self) -> None:
        _check_private(self.dir)
        self._base_psk = _read_private(self.dir / "psk")
        if len(self._base_psk) != PSK_BYTES:
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
            if at + 4 > len(data) or at + 4 + LENGTH.unpack_from(data, at)[0] > len(data):
                break  # a torn last append (a crash mid-write): the rest is ignored
            (length,) = LENGTH.unpack_from(data, at)
            entries.append(Entry.decode(data[at + 4 : at + 4 + length]))
            at += 4 + length
        if not entries:
            raise Corrupt(f"{path} holds no entries")
        self._entries, self._ids = entries, {e.id: e for e in entries}
        self._size, self._valid, self._state = size, at, None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive use: the thread lock (a worker calls in from several threads),
        then the file lock (other processes)."""
        with self._mutex:
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # ---- reading ------------------------------------------------------------------

    def state(self) -> LogState:
        with self._mutex:
            self._reread()
            if self._state is None:
                self._state = evaluate(self._entries)
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

    @property
    def psk(self) -> bytes:
        """The cluster key in force (what invites carry and dials use)."""
        return self.keys().current

    def keys(self) -> ClusterKeys:
        """The cluster keys this node knows (`ClusterKeys`): the founding or joining
        key and every PSK entry's key sealed to this node."""
        state = self.state()
        known = {psk_hash(self._base_psk): self._base_psk}
        for entry in state.psks:
            if (key := self._open_psk(entry)) is not None:
                known[psk_hash(key)] = key
        if state.psk is None:
            return ClusterKeys(self._base_psk, (), 0.0)
        current = known.get(decode_psk(state.psk.body)[1])
        if current is None:  # sealed to members this node is not among
            if self._identity.node_id in state.members:  # (a joiner during a removal)
                log.error(
                    "the cluster key in force (%s) is not sealed to this node", state.psk.short
                )
            current = self._base_psk
        until = (state.psk.hlc >> LOGICAL_BITS) / 1000 + PSK_GRACE
        return ClusterKeys(current, tuple(k for k in known.values() if k != current), until)

    def _open_psk(self, entry: Entry) -> bytes | None:
        if entry.id not in self._opened:
            sealed = decode_psk(entry.body)[2].get(self._identity.node_id)
            key = None
            if sealed is not None:
                private = self._identity.signing_key.to_curve25519_private_key()
                try:
                    key = SealedBox(private).decrypt(sealed)
                except CryptoError:
                    log.error("%s is sealed to this node but does not open: skipped", entry.short)
            if key is not None and psk_hash(key) != decode_psk(entry.body)[1]:
                log.error("%s seals another key than it names: skipped", entry.short)
                key = None
            self._opened[entry.id] = key
        return self._opened[entry.id]

    def digest(self) -> bytes:
        """32 bytes, equal iff the logs hold the same entries (in whatever order)."""
        h = hashlib.sha256(b"slurpfs/members/digest/v1\0")
        for entry_id in sorted(e.id for e in self.state().entries):
            h.update(entry_id)
        return h.digest()

    def entries(self) -> list[bytes]:
        """The entries that count, encoded, in an order `merge` accepts (proofs first)."""
        state = self.state()
        return [e.raw for e in proof_order(state.entries, {e.id: e for e in state.entries})]

    def roles_held_by(self, node_id: bytes) -> frozenset[str]:
        """The roles a node may hold private keys of, as far as the log tells: those
        granted to it and those whose keys it published (which needs the key)."""
        state = self.state()
        granted = {decode_grant(e.body)[1] for e in state.grants if e.subject == node_id}
        published = {
            decode_role_key(e.body)[0]
            for e in state.entries
            if e.kind is Kind.ROLE_KEY and e.signer == node_id
        }
        return frozenset(granted | published)

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
            usable = check_batch(self._ids, self._entries[0], fresh)
            counted = {e.id for e in evaluate([*self._entries, *usable]).entries}
            new = [e for e in usable if e.id in counted]
            if not new:
                return False
            self._append(new)
            self._apply_keys(self.state())
            return True

    def _append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        data = b"".join(LENGTH.pack(len(e.raw)) + e.raw for e in entries)
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
            self._rotate_psk()
            return cutoff

    def _rotate_psk(self) -> None:
        """A new cluster key sealed to each member, in a PSK entry (caller holds the
        lock): what a removed node knows opens no connection once it is in force."""
        state = self.state()
        key = secrets.token_bytes(PSK_BYTES)
        generation = 1 + max((decode_psk(e.body)[0] for e in state.psks), default=0)
        shares = {
            node_id: bytes(SealedBox(PublicKey(_x25519_public(node_id))).encrypt(key))
            for node_id in state.members
        }
        self._sign(Kind.PSK, encode_psk(generation, psk_hash(key), shares))

    def heal_psk(self) -> bool:
        """Keep the cluster key in force known to the members only; True if this
        node signed anything. Two removals made at once on two members each seal
        their key to the node the other removed: rotate again. A member that has
        no share of the key in force (it joined while a removal elsewhere made
        it): seal it one, if this node holds the key."""
        with self._locked():
            state = self.state()
            if state.psk is None or self._identity.node_id not in state.members:
                return False
            key_hash = decode_psk(state.psk.body)[1]
            shared = {
                node_id
                for entry in state.psks
                if decode_psk(entry.body)[1] == key_hash
                for node_id in decode_psk(entry.body)[2]
            }
            if shared & set(state.removed):
                self._rotate_psk()
                return True
            return self._share_psk(set(state.members) - shared)

    def _share_psk(self, lacking: set[bytes]) -> bool:
        """Seal the key in force to the members ``lacking`` a share, in a PSK entry of
        the same generation and key hash (caller holds the lock)."""
        state = self.state()
        key = self.keys().current
        if state.psk is None or not lacking:
            return False
        generation, key_hash, _ = decode_psk(state.psk.body)
        if psk_hash(key) != key_hash:
            return False  # this node does not hold it: a member that does will seal it
        shares = {n: bytes(SealedBox(PublicKey(_x25519_public(n))).encrypt(key)) for n in lacking}
        self._sign(Kind.PSK, encode_psk(generation, key_hash, shares))
        return True

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

    def regrant(self, role: str) -> tuple[Member, ...]:
        """After a rotation of ``role`` here: grant its keys (the new generation
        with them) again to every other member that held the role (`roles_held_by`),
        so a rotation never takes a role from a node that had it; returns them."""
        me = self._identity.node_id
        holders = tuple(
            m for m in self.members() if m.node_id != me and role in self.roles_held_by(m.node_id)
        )
        for member in holders:
            self.grant(role, member.node_id)
        return holders

    # ---- keys the log carries -------------------------------------------------------

    def _apply_keys(self, state: LogState) -> None:
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
        joiner, secret = read_join_request(request, self._identity.node_id)
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
            self._share_psk({joiner.node_id})  # (after a rotation: its share, in the log)
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
    reader = Reader(plain)
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
