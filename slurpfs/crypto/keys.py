"""Node identity and role keys, and the keyring a node reads and writes with.

* A **node identity** is an Ed25519 key pair; its 32-byte public key is the node id
  (the same key libp2p uses as the peer id). Nodes sign envelope headers with it.
* A **role key** is an X25519 key pair with a *generation* number (1, 2, ...).
  Every node knows every role's public keys; a node holds the private keys of the
  roles it is trusted with. Rotation adds a generation; the highest one is current.
* A :class:`Keyring` is the immutable snapshot of what one node knows. It is built
  once (by :class:`slurpfs.crypto.keystore.Keystore`) and only read afterwards, so
  sharing it between threads needs no lock; a change produces a new keyring.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from slurpfs.errors import ConfigError, KeyMissing

NODE_ID_BYTES = 32
SIGNATURE_BYTES = 64
ROLE_KEY_BYTES = 32

# Role names end up in key file names and in the envelope header (role_len u8), so they
# are restricted to the UCXL role alphabet and a short length.
ROLE_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}"
_ROLE_RE = re.compile(ROLE_PATTERN)


def validate_role(role: str) -> str:
    """Return ``role`` if it is a valid role name, else raise :class:`ConfigError`.

    Valid: 1-64 characters of letters, digits, ``_`` and ``-``, not starting with ``-``.
    """
    if not isinstance(role, str) or _ROLE_RE.fullmatch(role) is None:
        raise ConfigError(f"invalid role name {role!r}: use 1-64 letters, digits, '_' or '-'")
    return role


@dataclass(frozen=True)
class NodeIdentity:
    """A node's Ed25519 signing key; its public key is the node id."""

    signing_key: SigningKey

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh random node identity."""
        return cls(SigningKey.generate())

    @property
    def node_id(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return bytes(self.signing_key.verify_key)

    @property
    def node_id_hex(self) -> str:
        """The node id as lowercase hex (64 characters)."""
        return self.node_id.hex()

    def sign(self, msg: bytes) -> bytes:
        """The 64-byte detached Ed25519 signature of ``msg``."""
        return bytes(self.signing_key.sign(msg).signature)

    def __repr__(self) -> str:  # never show the secret key
        return f"NodeIdentity(node_id={self.node_id_hex})"


def verify_signature(node_id: bytes, msg: bytes, sig: bytes) -> bool:
    """True iff ``sig`` is a valid Ed25519 signature of ``msg`` by ``node_id``.

    Malformed keys or signatures (wrong length, small-order points) give False.
    """
    if len(node_id) != NODE_ID_BYTES or len(sig) != SIGNATURE_BYTES:
        return False
    try:
        VerifyKey(node_id).verify(msg, sig)
    except CryptoError:
        return False
    return True


@dataclass(frozen=True)
class RolePublicKey:
    """One generation of a role's X25519 public key."""

    role: str
    generation: int
    public: bytes

    def __post_init__(self) -> None:
        validate_role(self.role)
        if not 1 <= self.generation < 2**32:
            raise ValueError(f"role key generation out of range: {self.generation}")
        if len(self.public) != ROLE_KEY_BYTES:
            raise ValueError(f"role public key must be {ROLE_KEY_BYTES} bytes")


@dataclass(frozen=True)
class RoleKeyPair:
    """One generation of a role's X25519 key pair (private part included)."""

    role: str
    generation: int
    private: PrivateKey

    def __post_init__(self) -> None:
        validate_role(self.role)
        if not 1 <= self.generation < 2**32:
            raise ValueError(f"role key generation out of range: {self.generation}")

    @classmethod
    def generate(cls, role: str, generation: int) -> RoleKeyPair:
        """A fresh random key pair for ``role`` at ``generation``."""
        return cls(role, generation, PrivateKey.generate())

    @property
    def public(self) -> RolePublicKey:
        """The public half."""
        return RolePublicKey(self.role, self.generation, bytes(self.private.public_key))

    def __repr__(self) -> str:  # never show the secret key
        return f"RoleKeyPair(role={self.role!r}, generation={self.generation})"


class Keyring:
    """What this node knows: its identity, role public keys, held private keys, trust.

    Immutable after construction (read-only mappings), hence safe to read from many
    threads. Raises ``ValueError`` if a private key does not match the public key
    listed for the same (role, generation).
    """

    __slots__ = ("_held", "_privates", "_publics", "_trusted", "node")

    def __init__(
        self,
        node: NodeIdentity,
        publics: Iterable[RolePublicKey] = (),
        privates: Iterable[RoleKeyPair] = (),
        trusted_nodes: Iterable[bytes] = (),
    ) -> None:
        self.node = node
        by_role: dict[str, dict[int, RolePublicKey]] = {}
        for pub in publics:
            by_role.setdefault(pub.role, {})[pub.generation] = pub
        priv: dict[tuple[str, int], PrivateKey] = {}
        for pair in privates:
            known = by_role.setdefault(pair.role, {}).setdefault(pair.generation, pair.public)
            if known.public != pair.public.public:
                raise ValueError(
                    f"private key of role {pair.role!r} generation {pair.generation} "
                    "does not match its public key"
                )
            priv[(pair.role, pair.generation)] = pair.private
        trusted = set()
        for node_id in trusted_nodes:
            if len(node_id) != NODE_ID_BYTES:
                raise ValueError("trusted node id must be 32 bytes")
            trusted.add(bytes(node_id))
        self._publics: Mapping[str, Mapping[int, RolePublicKey]] = MappingProxyType(
            {role: MappingProxyType(dict(gens)) for role, gens in by_role.items()}
        )
        self._privates: Mapping[tuple[str, int], PrivateKey] = MappingProxyType(priv)
        self._trusted = frozenset(trusted)
        self._held = frozenset(
            role for role, gens in self._publics.items() if (role, max(gens)) in self._privates
        )

    def roles(self) -> frozenset[str]:
        """Every role with at least one known public key."""
        return frozenset(self._publics)

    def held_roles(self) -> frozenset[str]:
        """Roles whose *current* generation private key this node holds."""
        return self._held

    def generations(self, role: str) -> tuple[int, ...]:
        """Known generations of ``role``, ascending (empty if the role is unknown)."""
        return tuple(sorted(self._publics.get(role, {})))

    def current_public(self, role: str) -> RolePublicKey:
        """The highest-generation public key of ``role``; :class:`KeyMissing` if unknown."""
        gens = self._publics.get(role)
        if not gens:
            raise KeyMissing(f"no public key known for role {role!r}")
        return gens[max(gens)]

    def public(self, role: str, generation: int) -> RolePublicKey | None:
        """The public key of ``role`` at ``generation``, if known."""
        return self._publics.get(role, {}).get(generation)

    def private(self, role: str, generation: int) -> PrivateKey | None:
        """The private key of ``role`` at ``generation``, if this node holds it."""
        return self._privates.get((role, generation))

    def held_pairs(self) -> tuple[RoleKeyPair, ...]:
        """Every held private key as a key pair, sorted by (role, generation)."""
        return tuple(
            RoleKeyPair(role, gen, key) for (role, gen), key in sorted(self._privates.items())
        )

    @property
    def trusted_nodes(self) -> frozenset[bytes]:
        """Configured trusted node ids (this node is trusted implicitly, not listed)."""
        return self._trusted

    def is_trusted(self, node_id: bytes) -> bool:
        """True for this node's own id and for configured trusted nodes."""
        return node_id == self.node.node_id or node_id in self._trusted

    def __repr__(self) -> str:
        return (
            f"Keyring(node={self.node.node_id_hex[:16]}…, roles={sorted(self.roles())}, "
            f"held={sorted(self.held_roles())}, trusted={len(self._trusted)})"
        )
