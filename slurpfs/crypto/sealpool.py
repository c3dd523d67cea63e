"""Sealed boxes whose public-key work is done ahead of time.

A sealed box (libsodium's ``crypto_box_seal``, PyNaCl's ``SealedBox``) to a
recipient key ``pk`` is::

    epk ‖ crypto_box(m, nonce = BLAKE2b-192(epk ‖ pk), pk, esk)

for a fresh ephemeral key pair (epk, esk). Nearly all of its cost (~50 µs) is the
key pair and the X25519 agreement ``k = crypto_box_beforenm(pk, esk)``; neither
depends on the message. A :class:`SealPool` makes (epk, k) pairs for the keys it
has been asked to seal to in a background thread (libsodium runs without the
GIL, so on another core), throws each esk away at once, and seals a message with
a pair taken from the pool: a BLAKE2b and ``crypto_box_afternm``, ~5 µs. The
output is byte for byte the sealed-box format; every pair is used once and
then dropped. When the pool for a key is empty, the box is sealed the ordinary
way.
"""

from __future__ import annotations

import collections
import hashlib
import threading

from nacl import bindings as sodium
from nacl.public import PublicKey, SealedBox

PUBLIC_KEY_BYTES = sodium.crypto_box_PUBLICKEYBYTES
NONCE_BYTES = sodium.crypto_box_NONCEBYTES
FILL_BATCH = 32  # pairs prepared between two looks at the pool


def seal_with(message: bytes, public: bytes, ephemeral_public: bytes, shared: bytes) -> bytes:
    """The sealed box of `message` to `public`, from a precomputed agreement."""
    nonce = hashlib.blake2b(ephemeral_public + public, digest_size=NONCE_BYTES).digest()
    return ephemeral_public + bytes(sodium.crypto_box_afternm(message, nonce, shared))


def prepare(public: bytes) -> tuple[bytes, bytes]:
    """One fresh ephemeral key pair's public half and its agreement with `public`."""
    ephemeral_public, ephemeral_secret = sodium.crypto_box_keypair()
    return ephemeral_public, sodium.crypto_box_beforenm(public, ephemeral_secret)


class SealPool:
    """Prepared sealed-box agreements for the recipient keys in use. Thread-safe.

    `depth` pairs are kept per recipient key (refilled when half are used), for
    at most `max_keys` keys (the least recently used is forgotten: after a key
    rotation the old generation's pool drains away). Nothing is prepared until
    :meth:`start`; without a running pool every seal is done the ordinary way.
    """

    def __init__(self, *, depth: int = 128, max_keys: int = 16) -> None:
        self.depth = depth
        self.max_keys = max_keys
        self._pairs: collections.OrderedDict[bytes, collections.deque[tuple[bytes, bytes]]] = (
            collections.OrderedDict()
        )
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.hits = self.misses = 0

    def seal(self, message: bytes, public: bytes) -> bytes:
        if len(public) != PUBLIC_KEY_BYTES:
            raise ValueError("a recipient public key is 32 bytes")
        pair = self._take(public)
        if pair is None:
            return bytes(SealedBox(PublicKey(public)).encrypt(message))
        return seal_with(message, public, *pair)

    def _take(self, public: bytes) -> tuple[bytes, bytes] | None:
        with self._cond:
            if self._thread is None:
                return None
            pairs = self._pairs.get(public)
            if pairs is None:
                pairs = self._pairs[public] = collections.deque()
                while len(self._pairs) > self.max_keys:
                    self._pairs.popitem(last=False)
            self._pairs.move_to_end(public)
            if len(pairs) <= self.depth // 2:
                self._cond.notify()
            if not pairs:
                self.misses += 1
                return None
            self.hits += 1
            return pairs.popleft()

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._fill, name="slurpfs-sealpool", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread and forget every prepared pair."""
        with self._cond:
            self._closed = True
            thread, self._thread = self._thread, None
            self._pairs.clear()
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def _fill(self) -> None:
        while True:
            with self._cond:
                wanted = self._wanted()
                while wanted is None and not self._closed:
                    self._cond.wait()
                    wanted = self._wanted()
                if self._closed or wanted is None:
                    return
            public, missing = wanted
            # Outside the lock (and, inside libsodium, without the GIL).
            fresh = [prepare(public) for _ in range(min(missing, FILL_BATCH))]
            with self._cond:
                pairs = self._pairs.get(public)
                if pairs is not None:
                    pairs.extend(fresh)

    def _wanted(self) -> tuple[bytes, int] | None:
        """A key whose pool is at or below half (the most recently used first), and
        how many pairs it lacks: refilling in bursts leaves the thread asleep for
        longer stretches."""
        for public in reversed(self._pairs):
            missing = self.depth - len(self._pairs[public])
            if missing >= self.depth // 2:
                return public, missing
        return None
