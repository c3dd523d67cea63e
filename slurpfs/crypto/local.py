"""Node-local fast paths for reading versions this node already trusts.

Two records that never leave the node, each under a key only this node holds:

* **Verified tag** — ``BLAKE2b-128(key = verify key, version id)``, written when a
  version enters the store (sealed here, or received and fully verified). On a
  read, a matching tag plus the envelope hashing to its id stands in for the
  Ed25519 verification (59 µs → ~2 µs). The verify key is derived from the node's
  signing seed, so forging a tag needs the same secret as forging the node's own
  signature. Anything that fails the fast path gets the full check.
* **Local key slot** — the version's data key under XChaCha20-Poly1305 with a key
  derived from a *role private key* (per generation), associated data binding the
  version id, role and generation. It opens in ~3 µs instead of a SealedBox's
  ~40 µs and is exactly as strong as the SealedBox slot it mirrors: without the
  role private key (dropped, rotated away) it opens nothing.

Both are caches of facts the envelope already proves; deleting them loses
nothing but speed.
"""

from __future__ import annotations

import hashlib
import hmac
import threading

import nacl.bindings as sodium
from nacl.exceptions import CryptoError
from nacl.utils import random as random_bytes

from slurpfs.crypto.envelope import DATA_KEY_BYTES, NONCE_BYTES, KeySlot
from slurpfs.crypto.keys import Keyring, NodeIdentity

VERIFY_DOMAIN = b"slurpfs/verified/v1"
LOCAL_SLOT_DOMAIN = b"slurpfs/local-slot/v1"
TAG_BYTES = 16


def verify_key(node: NodeIdentity) -> bytes:
    return hashlib.blake2b(VERIFY_DOMAIN, key=bytes(node.signing_key), digest_size=32).digest()


def verified_tag(key: bytes, version_id: bytes) -> bytes:
    return hashlib.blake2b(version_id, key=key, digest_size=TAG_BYTES).digest()


def tag_matches(key: bytes, version_id: bytes, tag: bytes | None) -> bool:
    return tag is not None and hmac.compare_digest(verified_tag(key, version_id), tag)


def _associated(version_id: bytes, role: str, generation: int) -> bytes:
    return (
        LOCAL_SLOT_DOMAIN
        + b"\0"
        + version_id
        + role.encode()
        + b"\0"
        + generation.to_bytes(4, "big")
    )


class LocalSlots:
    """Wraps and opens local key slots; caches the derived per-role keys."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()

    def _key(self, keyring: Keyring, role: str, generation: int) -> bytes | None:
        with self._lock:
            key = self._keys.get((role, generation))
            if key is not None:
                return key
        private = keyring.private(role, generation)
        if private is None:
            return None
        key = hashlib.blake2b(LOCAL_SLOT_DOMAIN, key=bytes(private), digest_size=32).digest()
        with self._lock:
            self._keys[(role, generation)] = key
        return key

    def forget(self, role: str, generation: int) -> None:
        """Drop a cached key (its generation was destroyed)."""
        with self._lock:
            self._keys.pop((role, generation), None)

    def wrap(
        self, keyring: Keyring, data_key: bytes, version_id: bytes, roles: list[tuple[str, int]]
    ) -> tuple[KeySlot, ...]:
        """Local slots for every (role, generation) in `roles` whose private key is held."""
        out = []
        for role, generation in roles:
            key = self._key(keyring, role, generation)
            if key is None:
                continue
            nonce = random_bytes(NONCE_BYTES)
            sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
                data_key, _associated(version_id, role, generation), nonce, key
            )
            out.append(KeySlot(role, generation, nonce + sealed))
        return tuple(out)

    def unwrap(
        self, keyring: Keyring, version_id: bytes, slots: list[KeySlot], usable: frozenset[str]
    ) -> bytes | None:
        """The data key from a local slot of a usable role, or None (use the SealedBox path)."""
        for slot in slots:
            if slot.role not in usable:
                continue
            key = self._key(keyring, slot.role, slot.generation)
            if key is None:
                continue
            try:
                data_key = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    slot.sealed[NONCE_BYTES:],
                    _associated(version_id, slot.role, slot.generation),
                    slot.sealed[:NONCE_BYTES],
                    key,
                )
            except CryptoError:
                continue  # damaged or moved: the SealedBox slot decides
            if len(data_key) == DATA_KEY_BYTES:
                return bytes(data_key)
        return None
