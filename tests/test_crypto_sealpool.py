"""Sealed boxes from prepared agreements: the same format, each agreement used once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from slurpfs.crypto.envelope import open_envelope, seal
from slurpfs.crypto.keys import Keyring, NodeIdentity, RoleKeyPair
from slurpfs.crypto.sealpool import SealPool, prepare, seal_with

DATA_KEY = bytes(range(32))


@pytest.fixture
def pool() -> Iterator[SealPool]:
    boxes = SealPool(depth=8)
    yield boxes
    boxes.close()


def filled(pool: SealPool, public: bytes) -> None:
    """Ask for `public` once and wait until the thread has prepared its pairs."""
    pool.seal(DATA_KEY, public)
    ready = threading.Event()
    for _ in range(2000):
        with pool._cond:
            if len(pool._pairs.get(public, ())) >= pool.depth // 2:
                ready.set()
                break
        ready.wait(0.005)
    assert ready.is_set(), "the pool thread prepared nothing"


def test_a_prepared_box_opens_with_an_ordinary_sealed_box() -> None:
    recipient = PrivateKey.generate()
    public = bytes(recipient.public_key)
    box = seal_with(DATA_KEY, public, *prepare(public))
    assert len(box) == 80  # as SealedBox: epk[32] ‖ MAC[16] ‖ 32 bytes
    assert SealedBox(recipient).decrypt(box) == DATA_KEY
    with pytest.raises(CryptoError):
        SealedBox(PrivateKey.generate()).decrypt(box)


def test_the_pool_seals_from_prepared_pairs_each_used_once(pool: SealPool) -> None:
    recipient = PrivateKey.generate()
    public = bytes(recipient.public_key)
    pool.start()
    filled(pool, public)
    boxes = [pool.seal(DATA_KEY, public) for _ in range(pool.depth // 2)]
    assert pool.hits >= pool.depth // 2
    assert len({b[:32] for b in boxes}) == len(boxes), "an ephemeral key was used twice"
    assert all(SealedBox(recipient).decrypt(b) == DATA_KEY for b in boxes)


def test_without_the_thread_every_box_is_sealed_the_ordinary_way(pool: SealPool) -> None:
    recipient = PrivateKey.generate()
    box = pool.seal(DATA_KEY, bytes(recipient.public_key))
    assert SealedBox(recipient).decrypt(box) == DATA_KEY
    assert (pool.hits, pool.misses) == (0, 0)
    assert pool._pairs == {}, "nothing is prepared before start()"
    with pytest.raises(ValueError, match="32 bytes"):
        pool.seal(DATA_KEY, b"short")


def test_close_stops_the_thread_and_forgets_the_prepared_pairs(pool: SealPool) -> None:
    public = bytes(PrivateKey.generate().public_key)
    pool.start()
    filled(pool, public)
    thread = pool._thread
    assert thread is not None
    pool.close()
    assert not thread.is_alive()
    assert pool._pairs == {}
    pool.start()  # a closed pool stays closed: seals go the ordinary way
    assert pool._thread is None


def test_only_the_most_recently_used_keys_are_kept(pool: SealPool) -> None:
    pool.max_keys = 2
    publics = [bytes(PrivateKey.generate().public_key) for _ in range(3)]
    pool.start()
    for public in publics:
        pool.seal(DATA_KEY, public)
    with pool._cond:
        assert list(pool._pairs) == publics[1:]


def test_envelopes_sealed_with_the_pool_open_for_every_reader(pool: SealPool) -> None:
    node = NodeIdentity.generate()
    dev, arch = RoleKeyPair.generate("developer", 1), RoleKeyPair.generate("architect", 1)
    pool.start()
    for pub in (dev.public, arch.public):
        filled(pool, pub.public)
    sealed = seal(
        b"rotating key set",
        address="claude:architect@bzzz:auth/src/auth.go",
        role="developer",
        parents=(),
        hlc=1,
        deleted=False,
        readers=[dev.public, arch.public],
        node=node,
        boxes=pool,
    )
    for held in (dev, arch):
        keyring = Keyring(node, [dev.public, arch.public], [held], ())
        opened = open_envelope(
            sealed.envelope,
            list(sealed.slots),
            keyring,
            address="claude:architect@bzzz:auth/src/auth.go",
            role="developer",
        )
        assert opened == b"rotating key set"
