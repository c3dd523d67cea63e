"""Envelopes: the signed, encrypted form of one immutable context version.

Byte layout (format 1; all integers big-endian)::

    Envelope  := b"SLEV" | format u8 (= 1) | header_len u32 | header
                 | ct_len u32 | ciphertext | signature (64 bytes, Ed25519)
    Header    := flags u8 (bit0 = deleted; other bits must be 0)
                 | compression u8 (0 raw, 1 zstd) | hlc u64 | size u64 (plaintext size)
                 | author 32 (node id) | nonce 24
                 | address_len u16 | address (UTF-8 address key, e.g. "a:r@p:t/src/x.go")
                 | role_len u8 | role (UTF-8)
                 | n_parents u16 | parents (32 bytes each)
                 | ct_hash 32 (BLAKE2b-256 of the ciphertext)

* AEAD: XChaCha20-Poly1305-IETF under a fresh random 32-byte *data key* per version;
  associated data = ``b"slurpfs/envelope/v1\\0"`` + the header bytes *without* the
  trailing ct_hash. Address, role, parents, HLC, size, flags and author are therefore
  bound to the ciphertext: an envelope re-labelled elsewhere fails to decrypt even if
  re-signed by a trusted node.
* Signature: Ed25519 by the author over ``b"slurpfs/sign/v1\\0"`` + the full header
  bytes (which include ct_hash, so the signature covers the ciphertext too).
* Version id: BLAKE2b-256 of the whole envelope bytes. Encoding is canonical (every
  length explicit, no slack, unknown flags rejected) so decode/encode round-trips
  byte for byte and the id is stable.
* Key slots: ``SealedBox(role public key).encrypt(data key)`` (80 bytes), labelled
  with (role, generation) and kept *outside* the envelope, so key rotation re-wraps
  slots without changing the version id. Slots are not signed: a forged slot can
  only yield a wrong data key, which then fails AEAD authentication.
* Compression: zstd level 3 before encryption, stored raw when that is not smaller.
  Decompression is bounded by the (authenticated) header size.

Every failure raises a typed :class:`slurpfs.errors.Corrupt` subclass (or
:class:`~slurpfs.errors.KeyMissing`); messages never contain plaintext or keys.
Known leak (by design): address, role, sizes, HLC, parents and author are readable
by anyone holding the envelope.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import nacl.bindings as sodium
import zstandard
from nacl.exceptions import CryptoError
from nacl.public import PublicKey, SealedBox
from nacl.utils import random as random_bytes

from slurpfs.crypto.keys import (
    Keyring,
    NodeIdentity,
    RolePublicKey,
    validate_role,
    verify_signature,
)
from slurpfs.errors import (
    AuthenticationFailed,
    BadSignature,
    CiphertextTampered,
    Corrupt,
    EnvelopeMisplaced,
    InvalidAddress,
    KeyMissing,
    MalformedEnvelope,
    StoreFull,
    UntrustedAuthor,
    WrongKey,
)

MAGIC = b"SLEV"
FORMAT = 1
AD_PREFIX = b"slurpfs/envelope/v1\0"
SIGN_PREFIX = b"slurpfs/sign/v1\0"
COMPRESSION_RAW = 0
COMPRESSION_ZSTD = 1
ZSTD_LEVEL = 3
DATA_KEY_BYTES = 32
NONCE_BYTES = 24
HASH_BYTES = 32
TAG_BYTES = 16
SIGNATURE_BYTES = 64
SEALED_SLOT_BYTES = 80
# Refuse to seal or open anything larger: bounds the memory a (trusted but hostile)
# writer can make a reader allocate through the header's size field.
MAX_PLAINTEXT_SIZE = 1 << 30

_FLAG_DELETED = 0x01
_FIXED = struct.Struct(">BBQQ32s24sH")  # flags, compression, hlc, size, author, nonce, addr_len
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_PREAMBLE = struct.Struct(">4sBI")  # magic, format, header_len


def blake2b_256(data: bytes) -> bytes:
    """BLAKE2b with a 32-byte digest (content hashes and version ids)."""
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


@dataclass(frozen=True)
class Header:
    """The signed, cleartext metadata of one version (see the module docstring).

    Construction checks field sizes and ranges and raises ``ValueError``.
    """

    deleted: bool
    compression: int
    hlc: int
    size: int
    author: bytes
    nonce: bytes
    address: str
    role: str
    parents: tuple[bytes, ...]
    ct_hash: bytes

    def __post_init__(self) -> None:
        if self.compression not in (COMPRESSION_RAW, COMPRESSION_ZSTD):
            raise ValueError(f"unknown compression {self.compression}")
        if not (0 <= self.hlc < 2**64 and 0 <= self.size < 2**64):
            raise ValueError("hlc and size must fit in u64")
        if len(self.author) != 32 or len(self.nonce) != NONCE_BYTES:
            raise ValueError("author must be 32 bytes and nonce 24 bytes")
        if len(self.ct_hash) != HASH_BYTES:
            raise ValueError("ct_hash must be 32 bytes")
        if len(self.address.encode()) > 0xFFFF or len(self.role.encode()) > 0xFF:
            raise ValueError("address or role too long for the header")
        if len(self.parents) > 0xFFFF or any(len(p) != HASH_BYTES for p in self.parents):
            raise ValueError("parents must be at most 65535 ids of 32 bytes")

    @cached_property
    def _body(self) -> bytes:
        """The header bytes without the trailing ct_hash (computed once per header)."""
        address = self.address.encode()
        role = self.role.encode()
        flags = _FLAG_DELETED if self.deleted else 0
        return b"".join(
            (
                _FIXED.pack(
                    flags, self.compression, self.hlc, self.size, self.author, self.nonce,
                    len(address),
                ),
                address,
                _U8.pack(len(role)),
                role,
                _U16.pack(len(self.parents)),
                *self.parents,
            )
        )  # fmt: skip

    def encode(self) -> bytes:
        """The canonical header bytes."""
        return self._body + self.ct_hash

    def associated_data(self) -> bytes:
        """AEAD associated data: domain string + header without ct_hash."""
        return AD_PREFIX + self._body

    def signed_message(self) -> bytes:
        """What the author signs: domain string + full header."""
        return SIGN_PREFIX + self.encode()

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """Parse header bytes exactly; :class:`MalformedEnvelope` on any defect."""
        r = _Reader(data, "header")
        flags, compression, hlc, size, author, nonce, addr_len = r.unpack(_FIXED)
        if flags & ~_FLAG_DELETED:
            raise MalformedEnvelope(f"unknown header flags {flags:#04x}")
        if compression not in (COMPRESSION_RAW, COMPRESSION_ZSTD):
            raise MalformedEnvelope(f"unknown compression {compression}")
        address = r.text(addr_len, "address")
        (role_len,) = r.unpack(_U8)
        role = r.text(role_len, "role")
        (n_parents,) = r.unpack(_U16)
        parents = tuple(r.take(HASH_BYTES, "parent") for _ in range(n_parents))
        ct_hash = r.take(HASH_BYTES, "ct_hash")
        r.end()
        return cls(
            deleted=bool(flags & _FLAG_DELETED), compression=compression, hlc=hlc, size=size,
            author=author, nonce=nonce, address=address, role=role, parents=parents,
            ct_hash=ct_hash,
        )  # fmt: skip


@dataclass(frozen=True)
class Envelope:
    """Header + ciphertext + the author's signature over the header."""

    header: Header
    ciphertext: bytes
    signature: bytes

    def encode(self) -> bytes:
        """The canonical envelope bytes (what is stored and replicated)."""
        return self.encoded

    @cached_property
    def encoded(self) -> bytes:
        """Cached :meth:`encode` result."""
        header = self.header.encode()
        return b"".join(
            (
                _PREAMBLE.pack(MAGIC, FORMAT, len(header)),
                header,
                _U32.pack(len(self.ciphertext)),
                self.ciphertext,
                self.signature,
            )
        )

    @cached_property
    def version_id(self) -> bytes:
        """BLAKE2b-256 of the envelope bytes: the version's content address."""
        return blake2b_256(self.encoded)

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        """Parse envelope bytes exactly.

        Raises :class:`MalformedEnvelope` on bad magic or format, truncation, bad
        lengths, invalid UTF-8 or trailing bytes. Does *not* check the signature or
        the ciphertext hash: call :func:`verify`.
        """
        data = bytes(data)
        r = _Reader(data, "envelope")
        header, ct_len = _read_head(r, MAGIC, "envelope")
        ciphertext = r.take(ct_len, "ciphertext")
        signature = r.take(SIGNATURE_BYTES, "signature")
        r.end()
        _check_ct_len(header, ct_len)
        env = cls(header, ciphertext, signature)
        env.__dict__["encoded"] = data  # canonical: re-encoding gives the same bytes
        return env


STUB_MAGIC = b"SLES"


@dataclass(frozen=True)
class Stub:
    """An envelope without its ciphertext: what a node that does not hold a version's
    body keeps (docs/FORMAT.md, "Stub"). The signed header (with ``ct_hash``), the
    ciphertext's length and the signature travel and are verified like an envelope's;
    the version id cannot be checked until the body arrives (`matches`)."""

    header: Header
    ct_len: int
    signature: bytes

    @classmethod
    def of(cls, envelope: Envelope) -> Stub:
        return cls(envelope.header, len(envelope.ciphertext), envelope.signature)

    def encode(self) -> bytes:
        header = self.header.encode()
        return b"".join(
            (
                _PREAMBLE.pack(STUB_MAGIC, FORMAT, len(header)),
                header,
                _U32.pack(self.ct_len),
                self.signature,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> Stub:
        """Parse stub bytes exactly (`MalformedEnvelope` on any defect)."""
        r = _Reader(bytes(data), "stub")
        header, ct_len = _read_head(r, STUB_MAGIC, "stub")
        signature = r.take(SIGNATURE_BYTES, "signature")
        r.end()
        _check_ct_len(header, ct_len)
        return cls(header, ct_len, signature)

    def matches(self, envelope: Envelope, version_id: bytes) -> bool:
        """True if `envelope` is this stub's body: same header, length and signature,
        its ciphertext hashes to the signed ``ct_hash`` and the whole to `version_id`."""
        return (
            envelope.header == self.header
            and len(envelope.ciphertext) == self.ct_len
            and hmac.compare_digest(envelope.signature, self.signature)
            and hmac.compare_digest(blake2b_256(envelope.ciphertext), self.header.ct_hash)
            and hmac.compare_digest(envelope.version_id, version_id)
        )


def verify_stub(stub: Stub, *, keyring: Keyring) -> None:
    """The checks of `verify` a stub allows: a trusted author and its signature."""
    h = stub.header
    if not keyring.is_trusted(h.author):
        raise UntrustedAuthor(f"envelope author {h.author.hex()} is not a trusted node")
    if not verify_signature(h.author, h.signed_message(), stub.signature):
        raise BadSignature(f"bad header signature on a stub at {h.address!r} role {h.role!r}")


def stub_bytes(envelope: bytes) -> bytes:
    """The stub of envelope bytes (`MalformedEnvelope` if they do not parse)."""
    return Stub.of(Envelope.decode(envelope)).encode()


@dataclass(frozen=True)
class KeySlot:
    """The data key of one version, sealed to one role generation's public key."""

    role: str
    generation: int
    sealed: bytes

    def __repr__(self) -> str:
        return f"KeySlot(role={self.role!r}, generation={self.generation})"


@dataclass(frozen=True)
class Sealed:
    """The result of :func:`seal`: what the store keeps for one new version."""

    envelope: Envelope
    encoded: bytes
    version_id: bytes
    slots: tuple[KeySlot, ...]
    # The version's data key, for this node's local key slots (slurpfs.crypto.local);
    # process memory only, never stored as is.
    data_key: bytes = field(default=b"", repr=False)


def _read_head(r: _Reader, magic: bytes, what: str) -> tuple[Header, int]:
    """The preamble, header and ciphertext length an envelope and a stub share."""
    found, fmt, header_len = r.unpack(_PREAMBLE)
    if found != magic:
        raise MalformedEnvelope(f"not {'an' if what[0] in 'aeiou' else 'a'} {what} (bad magic)")
    if fmt != FORMAT:
        raise MalformedEnvelope(f"unsupported {what} format {fmt}")
    header = Header.decode(r.take(header_len, "header"))
    (ct_len,) = r.unpack(_U32)
    return header, ct_len


def _check_ct_len(header: Header, ct_len: int) -> None:
    if ct_len < TAG_BYTES:
        raise MalformedEnvelope("ciphertext shorter than the AEAD tag")
    if header.compression == COMPRESSION_RAW and header.size != ct_len - TAG_BYTES:
        raise MalformedEnvelope("raw ciphertext length does not match the plaintext size")


class _Reader:
    """Bounds-checked cursor over bytes; every overrun is MalformedEnvelope."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int, field: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise MalformedEnvelope(f"{self._what} truncated in {field}")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size, self._what))

    def text(self, n: int, field: str) -> str:
        try:
            return self.take(n, field).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEnvelope(f"{self._what} {field} is not valid UTF-8") from None

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedEnvelope(
                f"{self._what} has {len(self._data) - self._pos} trailing bytes"
            )


class _ZstdContexts(threading.local):
    """Per-thread zstd contexts: they are not thread-safe, and seal/decrypt run in workers."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        self.decompressor = zstandard.ZstdDecompressor()


_zstd = _ZstdContexts()


def _decompress(payload: bytes, size: int) -> bytes:
    """Decompress one zstd frame to exactly ``size`` bytes, never allocating more."""
    if size == 0:  # max_output_size=0 would mean "unbounded"; seal never compresses b""
        raise Corrupt("compressed envelope declares an empty plaintext")
    try:
        # A frame that declares its content size is decompressed to that size regardless
        # of max_output_size, so check the declaration first (zip-bomb guard).
        declared = zstandard.frame_content_size(payload)
        if declared not in (-1, size):
            raise Corrupt("compressed frame size does not match the header size")
        out = _zstd.decompressor.decompress(payload, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError:
        raise Corrupt("compressed payload does not decompress") from None
    if len(out) != size:
        raise Corrupt("decompressed size does not match the header size")
    return out


def seal(
    plaintext: bytes,
    *,
    address: str,
    role: str,
    parents: Sequence[bytes],
    hlc: int,
    deleted: bool,
    readers: Sequence[RolePublicKey],
    node: NodeIdentity,
    prepared: PreparedKey | None = None,
) -> Sealed:
    """Compress, encrypt, sign and wrap one new version.

    The data key is sealed to each distinct reader (role, generation); `prepared`
    gives one made ahead of time for exactly those readers (`slurpfs.crypto.keypool`),
    used once. Raises
    :class:`InvalidAddress` for an empty or over-long address, :class:`ConfigError` for
    an invalid role name, :class:`StoreFull` for a
    plaintext over :data:`MAX_PLAINTEXT_SIZE`, ``ValueError`` for no readers or
    malformed parents.
    """
    if not readers:
        raise ValueError("seal needs at least one reader")
    validate_role(role)
    if not address or len(address.encode()) > 0xFFFF:
        raise InvalidAddress("address is empty or longer than 65535 bytes")
    if len(plaintext) > MAX_PLAINTEXT_SIZE:
        raise StoreFull(f"context larger than {MAX_PLAINTEXT_SIZE} bytes")
    plaintext = bytes(plaintext)
    payload, compression = plaintext, COMPRESSION_RAW
    if plaintext:
        packed = _zstd.compressor.compress(plaintext)
        if len(packed) < len(plaintext):
            payload, compression = packed, COMPRESSION_ZSTD
    distinct = distinct_readers(readers)
    if prepared is None:
        prepared = prepare_key(distinct)
    elif [(k.role, k.generation) for k in prepared.slots] != [
        (r.role, r.generation) for r in distinct
    ]:
        raise ValueError("the prepared key was sealed for other readers")
    data_key = prepared.data_key
    draft = Header(
        deleted=deleted, compression=compression, hlc=hlc, size=len(plaintext),
        author=node.node_id, nonce=random_bytes(NONCE_BYTES), address=address, role=role,
        parents=tuple(bytes(p) for p in parents), ct_hash=bytes(HASH_BYTES),
    )  # fmt: skip
    ciphertext = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        payload, draft.associated_data(), draft.nonce, data_key
    )
    header = replace(draft, ct_hash=blake2b_256(ciphertext))
    header.__dict__["_body"] = draft._body  # ct_hash is not part of the body
    envelope = Envelope(header, ciphertext, node.sign(header.signed_message()))
    return Sealed(envelope, envelope.encoded, envelope.version_id, prepared.slots, data_key)


@dataclass(frozen=True, slots=True)
class PreparedKey:
    """A fresh data key and its slots, one per distinct reader (role, generation)."""

    data_key: bytes = field(repr=False)
    slots: tuple[KeySlot, ...]


def distinct_readers(readers: Sequence[RolePublicKey]) -> tuple[RolePublicKey, ...]:
    """`readers` without repeated (role, generation), the first kept, in order."""
    seen: dict[tuple[str, int], RolePublicKey] = {}
    for reader in readers:
        seen.setdefault((reader.role, reader.generation), reader)
    return tuple(seen.values())


def prepare_key(readers: Sequence[RolePublicKey]) -> PreparedKey:
    """A new random data key sealed to each of `readers` (already distinct)."""
    data_key = random_bytes(DATA_KEY_BYTES)
    return PreparedKey(data_key, tuple(wrap_data_key(data_key, pub) for pub in readers))


def verify(envelope: Envelope, *, address: str, role: str, keyring: Keyring) -> None:
    """Check that ``envelope`` belongs at (address, role) and is authentic.

    In this order: :class:`EnvelopeMisplaced` if the header names another address or
    role (a replay); :class:`UntrustedAuthor` if the author is not trusted;
    :class:`BadSignature` if the header signature fails; :class:`CiphertextTampered`
    if the ciphertext does not match the signed hash.
    """
    h = envelope.header
    if h.address != address or h.role != role:
        raise EnvelopeMisplaced(
            f"envelope for {h.address!r} role {h.role!r} found at {address!r} role {role!r}"
        )
    if not keyring.is_trusted(h.author):
        raise UntrustedAuthor(f"envelope author {h.author.hex()} is not a trusted node")
    if not verify_signature(h.author, h.signed_message(), envelope.signature):
        raise BadSignature(f"bad header signature on envelope at {address!r} role {role!r}")
    if not hmac.compare_digest(blake2b_256(envelope.ciphertext), h.ct_hash):
        raise CiphertextTampered(f"ciphertext hash mismatch at {address!r} role {role!r}")


def wrap_data_key(data_key: bytes, public: RolePublicKey) -> KeySlot:
    """Seal ``data_key`` to one role generation (new versions and key rotation)."""
    if len(data_key) != DATA_KEY_BYTES:
        raise ValueError("data key must be 32 bytes")
    sealed = SealedBox(PublicKey(public.public)).encrypt(data_key)
    return KeySlot(public.role, public.generation, bytes(sealed))


def unwrap_data_key(slots: Iterable[KeySlot], keyring: Keyring) -> bytes:
    """Open the data key from the first slot whose private key this node holds.

    Slots whose (role, generation) is held are tried in order; the first that opens
    wins. :class:`KeyMissing` if no slot is held (the message lists the slot labels,
    never content); :class:`WrongKey` if held slots exist but none opens.
    """
    tried: list[str] = []
    failed = 0
    for slot in slots:
        tried.append(f"{slot.role}/{slot.generation}")
        private = keyring.private(slot.role, slot.generation)
        if private is None:
            continue
        try:
            key = SealedBox(private).decrypt(slot.sealed)
        except CryptoError:
            failed += 1
            continue
        if len(key) == DATA_KEY_BYTES:
            return bytes(key)
        failed += 1
    if failed:
        raise WrongKey(f"{failed} key slot(s) for held roles do not open (slots: {tried})")
    raise KeyMissing(f"no private key held for any key slot (slots: {tried or 'none'})")


def decrypt(envelope: Envelope, data_key: bytes) -> bytes:
    """Decrypt and decompress the envelope's payload with ``data_key``.

    :class:`AuthenticationFailed` if AEAD fails (wrong key, altered header or
    ciphertext); :class:`Corrupt` if the plaintext size does not match the header.
    """
    h = envelope.header
    if h.size > MAX_PLAINTEXT_SIZE:
        raise Corrupt("envelope declares a plaintext over the size limit")
    try:
        payload = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            envelope.ciphertext, h.associated_data(), h.nonce, data_key
        )
    except CryptoError:
        raise AuthenticationFailed(
            f"envelope at {h.address!r} role {h.role!r} failed authentication"
        ) from None
    if h.compression == COMPRESSION_ZSTD:
        return _decompress(payload, h.size)
    if len(payload) != h.size:
        raise Corrupt("plaintext size does not match the header size")
    return bytes(payload)


def open_envelope(
    envelope: Envelope,
    slots: Iterable[KeySlot],
    keyring: Keyring,
    *,
    address: str,
    role: str,
) -> bytes:
    """:func:`verify`, :func:`unwrap_data_key`, :func:`decrypt`: the plaintext or an error."""
    verify(envelope, address=address, role=role, keyring=keyring)
    return decrypt(envelope, unwrap_data_key(slots, keyring))
