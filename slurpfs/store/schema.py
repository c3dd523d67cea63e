"""LMDB schema: sub-database names, key encodings and record layouts.

Everything that is written to LMDB is encoded here and nowhere else; the byte
layouts are documented in docs/FORMAT.md. Integers are big-endian so that LMDB's
byte order is numeric order. A *context* is one (address key, role) pair and is
encoded ``address \\0 role``; neither part may contain NUL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from slurpfs.errors import Corrupt

FORMAT_VERSION = 1
VERSION_ID_LEN = 32
NODE_ID_LEN = 32

# sub-database name -> what it maps
DB_INFO = b"info"  # name -> value (format, node id, change sequence)
DB_ENVELOPES = b"envelopes"  # version id -> signed envelope bytes
DB_META = b"meta"  # version id -> VersionRecord.pack()
DB_SLOTS = b"slots"  # version id | role \0 | generation u32 -> sealed data key
DB_LEAVES = b"leaves"  # context -> leaf version ids, head first (32 bytes each)
DB_HISTORY = b"history"  # context \0 | hlc u64 | author 32 | version id -> b""
DB_TREE = b"tree"  # parent dir key \0 | child name -> b""
DB_TTL = b"ttl"  # expiry ms u64 | context -> b""
DB_TTL_BY_CONTEXT = b"ttl_ctx"  # context -> expiry ms u64
DB_CHANGES = b"changes"  # sequence u64 -> version id
DB_VERIFIED = b"verified"  # version id -> node-local verified tag [16]
DB_LOCAL_SLOTS = b"local_slots"  # version id | role \0 | generation u32 -> nonce | sealed key
DB_STUBS = b"stubs"  # version id -> stub (the envelope without its ciphertext): body not held
DB_CACHED = b"cached"  # version id -> u64 ms: the body in `envelopes` is a cache, not a copy
ALL_DBS = (
    DB_INFO,
    DB_ENVELOPES,
    DB_META,
    DB_SLOTS,
    DB_LEAVES,
    DB_HISTORY,
    DB_TREE,
    DB_TTL,
    DB_TTL_BY_CONTEXT,
    DB_CHANGES,
    DB_VERIFIED,
    DB_LOCAL_SLOTS,
    DB_STUBS,
    DB_CACHED,
)

INFO_FORMAT = b"format"
INFO_SEQUENCE = b"sequence"
INFO_NODE_ID = b"node_id"
INFO_EPOCH = b"epoch"  # 16 random bytes, also named by the node's seal (slurpfs.seal)
INFO_ENVELOPE_BYTES = b"envelope_bytes"  # u64 running totals, kept by every commit and purge
INFO_PLAINTEXT_BYTES = b"plaintext_bytes"
INFO_JOURNAL = b"journal"  # journal id | seq u64: the newest write-behind entry stored

U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
_META_FIXED = struct.Struct(">QQB32sH")  # hlc, size, flags, author, n_parents
FLAG_DELETED = 0x01


def context_key(address: str, role: str) -> bytes:
    return address.encode() + b"\0" + role.encode()


def split_context(key: bytes) -> tuple[str, str]:
    address, _, role = key.partition(b"\0")
    return address.decode(), role.decode()


def history_prefix(address: str, role: str) -> bytes:
    return context_key(address, role) + b"\0"


def history_key(address: str, role: str, hlc: int, author: bytes, version_id: bytes) -> bytes:
    return history_prefix(address, role) + U64.pack(hlc) + author + version_id


def tree_key(parent: str, child: str) -> bytes:
    return parent.encode() + b"\0" + child.encode()


def tree_prefix(parent: str) -> bytes:
    return parent.encode() + b"\0"


def slot_key(version_id: bytes, role: str, generation: int) -> bytes:
    return version_id + role.encode() + b"\0" + U32.pack(generation)


def split_slot_key(key: bytes) -> tuple[bytes, str, int]:
    version_id, rest = key[:VERSION_ID_LEN], key[VERSION_ID_LEN:]
    role, _, generation = rest.partition(b"\0")
    return version_id, role.decode(), U32.unpack(generation)[0]


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """The metadata of one immutable version, readable without decrypting."""

    version_id: bytes
    address: str
    role: str
    parents: tuple[bytes, ...]
    hlc: int
    author: bytes
    size: int
    deleted: bool

    @property
    def mtime(self) -> float:
        """Wall-clock time of the write, epoch seconds (from the HLC)."""
        return (self.hlc >> 16) / 1000.0

    @property
    def short_id(self) -> str:
        return self.version_id.hex()[:16]

    @property
    def order(self) -> tuple[int, bytes, bytes]:
        """Deterministic order: the head is the leaf with the greatest (HLC, author)."""
        return (self.hlc, self.author, self.version_id)

    def pack(self) -> bytes:
        address = self.address.encode()
        role = self.role.encode()
        flags = FLAG_DELETED if self.deleted else 0
        return b"".join(
            (
                _META_FIXED.pack(self.hlc, self.size, flags, self.author, len(self.parents)),
                *self.parents,
                struct.pack(">H", len(address)),
                address,
                struct.pack(">B", len(role)),
                role,
            )
        )

    @classmethod
    def unpack(cls, version_id: bytes, data: bytes) -> VersionRecord:
        try:
            hlc, size, flags, author, n_parents = _META_FIXED.unpack_from(data)
            offset = _META_FIXED.size
            parents = tuple(
                bytes(data[offset + i * VERSION_ID_LEN : offset + (i + 1) * VERSION_ID_LEN])
                for i in range(n_parents)
            )
            offset += n_parents * VERSION_ID_LEN
            (address_len,) = struct.unpack_from(">H", data, offset)
            offset += 2
            address = bytes(data[offset : offset + address_len]).decode()
            offset += address_len
            role_len = data[offset]
            role = bytes(data[offset + 1 : offset + 1 + role_len]).decode()
            if offset + 1 + role_len != len(data):
                raise ValueError("trailing bytes")
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise Corrupt(f"version {version_id.hex()[:16]}: bad metadata record ({exc})") from None
        return cls(
            version_id=bytes(version_id),
            address=address,
            role=role,
            parents=parents,
            hlc=hlc,
            author=bytes(author),
            size=size,
            deleted=bool(flags & FLAG_DELETED),
        )
