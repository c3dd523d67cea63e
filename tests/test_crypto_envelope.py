"""Envelopes: round trips, and every hostile input failing with its own typed error."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import nacl.bindings as sodium
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from slurpfs.crypto.envelope import (
    Envelope,
    Header,
    KeySlot,
    Sealed,
    decrypt,
    open_envelope,
    seal,
    unwrap_data_key,
    verify,
    wrap_data_key,
)
from slurpfs.crypto.keys import Keyring, NodeIdentity, RoleKeyPair, RolePublicKey
from slurpfs.errors import (
    AuthenticationFailed,
    BadSignature,
    CiphertextTampered,
    ConfigError,
    Corrupt,
    EnvelopeMisplaced,
    InvalidAddress,
    KeyMissing,
    MalformedEnvelope,
    UntrustedAuthor,
    WrongKey,
)

ADDRESS = "claude:architect@bzzz:auth/src/auth.go"
SECRET = b"TOP-SECRET-PLAINTEXT rotating key set"
NODE = NodeIdentity.generate()
DEV = RoleKeyPair.generate("developer", 1)
ARCH = RoleKeyPair.generate("architect", 1)
PUBLICS = [DEV.public, ARCH.public]


def keyring(
    *held: RoleKeyPair, node: NodeIdentity = NODE, trusted: tuple[bytes, ...] = ()
) -> Keyring:
    return Keyring(node, PUBLICS, held, trusted)


def seal_one(
    plaintext: bytes = SECRET,
    *,
    readers: tuple[RolePublicKey, ...] = (DEV.public,),
    node: NodeIdentity = NODE,
    deleted: bool = False,
) -> Sealed:
    parent = hashlib.blake2b(b"parent", digest_size=32).digest()
    return seal(
        plaintext, address=ADDRESS, role="developer", parents=[parent], hlc=1_700_000_000_000,
        deleted=deleted, readers=readers, node=node,
    )  # fmt: skip


def open_one(
    s: Sealed | Envelope, ring: Keyring, slots: tuple[KeySlot, ...] | None = None
) -> bytes:
    env = s if isinstance(s, Envelope) else s.envelope
    if slots is None:
        assert isinstance(s, Sealed)
        slots = s.slots
    return open_envelope(env, slots, ring, address=ADDRESS, role="developer")


def forge(payload: bytes, data_key: bytes, signer: NodeIdentity, **fields: object) -> Envelope:
    """What a trusted but hostile node can build: any header, any payload, valid AEAD."""
    base = seal_one().envelope.header
    header = replace(base, author=signer.node_id, **fields)  # type: ignore[arg-type]
    ct = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        payload, header.associated_data(), header.nonce, data_key
    )
    header = replace(header, ct_hash=hashlib.blake2b(ct, digest_size=32).digest())
    return Envelope(header, ct, signer.sign(header.signed_message()))


# ------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("plaintext", "compression"),
    [
        pytest.param(b"", 0, id="empty"),
        pytest.param(b"x", 0, id="one-byte"),
        pytest.param(bytes(range(256)) * 16, 1, id="binary"),
        pytest.param("naïve — ünïcödé\n".encode() * 100, 1, id="utf8"),
        pytest.param(b"line of context\n" * 65536, 1, id="1MiB-text"),
        pytest.param(os.urandom(1 << 20), 0, id="1MiB-random"),
    ],
)
def test_roundtrip(plaintext: bytes, compression: int) -> None:
    s = seal_one(plaintext)
    assert s.envelope.header.compression == compression
    assert s.envelope.header.size == len(plaintext)
    assert s.version_id == hashlib.blake2b(s.encoded, digest_size=32).digest()
    decoded = Envelope.decode(s.encoded)
    assert decoded == s.envelope
    assert Envelope(decoded.header, decoded.ciphertext, decoded.signature).encode() == s.encoded
    assert decoded.version_id == s.version_id
    assert open_one(decoded, keyring(DEV), s.slots) == plaintext
    if len(plaintext) >= 16:  # shorter strings could occur in random bytes by chance
        assert plaintext[:64] not in s.encoded  # nothing readable in the envelope


def test_header_fields_roundtrip() -> None:
    s = seal_one(deleted=True)
    h = Envelope.decode(s.encoded).header
    assert h.deleted is True
    assert (h.address, h.role, h.hlc, h.author) == (
        ADDRESS,
        "developer",
        1_700_000_000_000,
        NODE.node_id,
    )
    assert len(h.parents) == 1
    assert seal_one().version_id != seal_one().version_id  # fresh key and nonce each time


@given(
    address=st.text(min_size=1, max_size=200),
    role=st.text(max_size=60),
    hlc=st.integers(0, 2**64 - 1),
    size=st.integers(0, 2**64 - 1),
    deleted=st.booleans(),
    parents=st.lists(st.binary(min_size=32, max_size=32), max_size=5),
)
def test_header_encoding_is_canonical(
    address: str, role: str, hlc: int, size: int, deleted: bool, parents: list[bytes]
) -> None:
    h = Header(
        deleted=deleted, compression=1, hlc=hlc, size=size, author=b"a" * 32, nonce=b"n" * 24,
        address=address, role=role, parents=tuple(parents), ct_hash=b"h" * 32,
    )  # fmt: skip
    assert Header.decode(h.encode()) == h
    assert h.associated_data().endswith(h.encode()[:-32])


def test_readers_each_open_alone() -> None:
    s = seal_one(readers=(DEV.public, ARCH.public, DEV.public))
    assert sorted((k.role, k.generation) for k in s.slots) == [("architect", 1), ("developer", 1)]
    assert open_one(s, keyring(DEV)) == SECRET
    assert open_one(s, keyring(ARCH)) == SECRET


def test_rewrap_for_rotation_keeps_version_id() -> None:
    s = seal_one()
    dev2 = RoleKeyPair.generate("developer", 2)
    data_key = unwrap_data_key(s.slots, keyring(DEV))
    slot = wrap_data_key(data_key, dev2.public)
    ring = Keyring(NODE, [*PUBLICS, dev2.public], [dev2])
    assert open_one(Envelope.decode(s.encoded), ring, (slot,)) == SECRET
    with pytest.raises(KeyMissing):
        open_one(s, ring)  # the old slot alone no longer opens


def test_concurrent_seal_and_open() -> None:
    ring = keyring(DEV)

    def work(i: int) -> bool:
        data = f"context {i} ".encode() * (50 + i)
        return open_one(seal_one(data), ring) == data

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(64)))


# ----------------------------------------------------------------- hostile inputs


def test_tampered_ciphertext() -> None:
    s = seal_one()
    ct = bytearray(s.envelope.ciphertext)
    ct[len(ct) // 2] ^= 0x01
    env = replace(s.envelope, ciphertext=bytes(ct))
    with pytest.raises(CiphertextTampered) as exc:
        open_one(env, keyring(DEV), s.slots)
    assert SECRET not in str(exc.value).encode()


def test_tampered_header_hlc() -> None:
    s = seal_one()
    data = bytearray(s.encoded)
    data[4 + 1 + 4 + 2 + 7] ^= 0x01  # magic, format, header_len, flags, compression, hlc
    env = Envelope.decode(bytes(data))
    assert env.header.hlc == s.envelope.header.hlc ^ 1
    with pytest.raises(BadSignature):
        open_one(env, keyring(DEV), s.slots)


def test_tampered_signature() -> None:
    s = seal_one()
    data = bytearray(s.encoded)
    data[-1] ^= 0x80
    with pytest.raises(BadSignature):
        open_one(Envelope.decode(bytes(data)), keyring(DEV), s.slots)


def test_every_single_byte_flip_is_rejected() -> None:
    s = seal_one(b"short")
    ring = keyring(DEV)
    for i in range(len(s.encoded)):
        data = bytearray(s.encoded)
        data[i] ^= 0x04
        with pytest.raises(Corrupt):
            open_one(Envelope.decode(bytes(data)), ring, s.slots)


@pytest.mark.parametrize(
    "change",
    [
        {"address": "claude:architect@bzzz:auth/src/other.go"},
        {"hlc": 1_700_000_000_001},
        {"deleted": True},
        {"parents": ()},
        {"size": 4096},
    ],
    ids=lambda c: next(iter(c)),
)
def test_resigned_header_with_swapped_associated_data(change: dict[str, object]) -> None:
    """A trusted node re-labels someone else's version and re-signs it: AEAD refuses."""
    attacker = NodeIdentity.generate()
    s = seal_one()
    h = replace(s.envelope.header, author=attacker.node_id, **change)  # type: ignore[arg-type]
    h = replace(h, ct_hash=hashlib.blake2b(s.envelope.ciphertext, digest_size=32).digest())
    env = Envelope(h, s.envelope.ciphertext, attacker.sign(h.signed_message()))
    ring = keyring(DEV, trusted=(attacker.node_id,))
    verify(env, address=h.address, role="developer", keyring=ring)  # passes: it is signed
    with pytest.raises(AuthenticationFailed) as exc:
        open_envelope(env, s.slots, ring, address=h.address, role="developer")
    assert SECRET not in str(exc.value).encode()


def test_replayed_under_other_address_or_role() -> None:
    s = seal_one()
    ring = keyring(DEV)
    with pytest.raises(EnvelopeMisplaced):
        open_envelope(s.envelope, s.slots, ring, address=ADDRESS + "/x", role="developer")
    with pytest.raises(EnvelopeMisplaced):
        open_envelope(s.envelope, s.slots, ring, address=ADDRESS, role="architect")


def test_untrusted_author() -> None:
    stranger = NodeIdentity.generate()
    s = seal_one(node=stranger)
    with pytest.raises(UntrustedAuthor):
        open_one(s, keyring(DEV))
    assert open_one(s, keyring(DEV, trusted=(stranger.node_id,))) == SECRET


def test_missing_key() -> None:
    s = seal_one()
    with pytest.raises(KeyMissing) as exc:
        open_one(s, keyring(ARCH))
    assert "developer/1" in str(exc.value)
    assert not isinstance(exc.value, Corrupt)
    with pytest.raises(KeyMissing):
        unwrap_data_key([], keyring(DEV))


def test_wrong_key() -> None:
    s = seal_one()
    impostor = RoleKeyPair.generate("developer", 1)
    data_key = unwrap_data_key(s.slots, keyring(DEV))
    bad = replace(wrap_data_key(data_key, impostor.public), role="developer", generation=1)
    with pytest.raises(WrongKey):
        open_one(s, keyring(DEV), (bad,))
    garbage = KeySlot("developer", 1, b"\0" * 80)
    with pytest.raises(WrongKey):
        open_one(s, keyring(DEV), (garbage,))
    # a good slot after a bad one still opens
    assert open_one(s, keyring(DEV), (bad, *s.slots)) == SECRET


def test_slot_from_another_version() -> None:
    a, b = seal_one(), seal_one()
    with pytest.raises(AuthenticationFailed):
        open_one(a.envelope, keyring(DEV), b.slots)


def test_wrong_data_key() -> None:
    with pytest.raises(AuthenticationFailed):
        decrypt(seal_one().envelope, os.urandom(32))


def test_truncated_at_every_length() -> None:
    data = seal_one(b"some context").encoded
    for n in range(len(data)):
        with pytest.raises(MalformedEnvelope):
            Envelope.decode(data[:n])


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        pytest.param(0, b"X", id="magic"),
        pytest.param(4, b"\x02", id="format"),
        pytest.param(9, b"\x02", id="unknown-flag"),
        pytest.param(10, b"\x07", id="unknown-compression"),
        pytest.param(5, b"\xff", id="header-len"),
    ],
)
def test_garbage_fields(offset: int, value: bytes) -> None:
    data = bytearray(seal_one().encoded)
    data[offset : offset + len(value)] = value
    with pytest.raises(MalformedEnvelope):
        Envelope.decode(bytes(data))


def test_trailing_bytes_and_random_garbage() -> None:
    data = seal_one().encoded
    with pytest.raises(MalformedEnvelope):
        Envelope.decode(data + b"\0")
    for n in (0, 1, 50, 500):
        with pytest.raises(MalformedEnvelope):
            Envelope.decode(os.urandom(n))


def test_invalid_utf8_address() -> None:
    data = bytearray(seal_one().encoded)
    start = 4 + 1 + 4 + 1 + 1 + 8 + 8 + 32 + 24 + 2
    data[start] = 0xFF
    with pytest.raises(MalformedEnvelope):
        Envelope.decode(bytes(data))


def test_decompression_bomb_is_refused() -> None:
    """A trusted hostile writer declares a small size but ships a huge frame."""
    key = os.urandom(32)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    env = forge(bomb, key, NODE, compression=1, size=100)
    with pytest.raises(Corrupt):
        decrypt(env, key)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (1 << 20))
    with pytest.raises(Corrupt):
        decrypt(forge(unsized, key, NODE, compression=1, size=100), key)
    with pytest.raises(Corrupt):
        decrypt(forge(b"not zstd at all", key, NODE, compression=1, size=15), key)


def test_size_mismatch_and_limits() -> None:
    key = os.urandom(32)
    short = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 1000)
    with pytest.raises(Corrupt):
        decrypt(forge(short, key, NODE, compression=1, size=2000), key)
    with pytest.raises(Corrupt):
        decrypt(forge(short, key, NODE, compression=1, size=0), key)
    with pytest.raises(Corrupt):
        decrypt(forge(short, key, NODE, compression=1, size=2**62), key)
    # raw payload whose length disagrees with the header cannot even be decoded
    raw = forge(b"abc", key, NODE, compression=0, size=4)
    with pytest.raises(MalformedEnvelope):
        Envelope.decode(raw.encode())


def test_seal_argument_checks() -> None:
    with pytest.raises(ValueError, match="reader"):
        seal_one(readers=())
    with pytest.raises(ConfigError):
        seal(b"x", address=ADDRESS, role="bad/role", parents=[], hlc=0, deleted=False,
             readers=[DEV.public], node=NODE)  # fmt: skip
    with pytest.raises(InvalidAddress):
        seal(b"x", address="", role="developer", parents=[], hlc=0, deleted=False,
             readers=[DEV.public], node=NODE)  # fmt: skip
    with pytest.raises(ValueError, match="32 bytes"):
        wrap_data_key(b"short", DEV.public)
