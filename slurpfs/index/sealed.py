"""The search index at rest: sealed files and an authenticated manifest in the store.

Every file an engine writes is sealed with XChaCha20-Poly1305 under a per-role
*index key* before it leaves memory, and kept in the store's auxiliary table
``index`` (layout in docs/FORMAT.md, "Search index at rest")::

    index key   = BLAKE2b-256(key = role private key, "slurpfs/index-key/v1\\0" ‖ role)
    sealed file = nonce[24] ‖ AEAD(index key, nonce, AD = "slurpfs/index-file/v1\\0" ‖ role ‖ 0 ‖ name)

One *manifest* per role, sealed as well and bound to the role, the node and the
key generation, lists every file of the current index with the BLAKE2b hash of
its sealed bytes, the index generation (incremented on every save) and the
store change sequence the index covers. Opening checks every file against the
manifest, so an older set of validly sealed files put back is refused
(`IndexRollback`), as is any altered byte (`IndexCorrupt`). Saving is one store
transaction that succeeds only if the manifest is still the one this process
last saw (`IndexConflict` otherwise: another process saved meanwhile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import nacl.bindings as sodium
from nacl.exceptions import CryptoError
from nacl.utils import random as random_bytes

from slurpfs.crypto.keys import Keyring
from slurpfs.errors import Corrupt, KeyMissing, SlurpError
from slurpfs.store import StaleHead, Store

INDEX_TABLE = b"index"
FORMAT = 1
MAGIC = b"SLIX"
KEY_DOMAIN = b"slurpfs/index-key/v1\0"
FILE_AD = b"slurpfs/index-file/v1\0"
META_AD = b"slurpfs/index-meta/v1\0"
CHUNK_BYTES = 8 << 20  # sealed files are stored in pieces of at most this size
NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_HEADER = struct.Struct(">4sBI")  # magic, format, key generation
_U32 = struct.Struct(">I")


def open_table(store: Store) -> None:
    """Open (and if need be create) the index table in this process now.

    A process opens a table on its first use, and py-lmdb holds the interpreter
    lock while that waits for LMDB's writer lock: a worker thread saving the
    first index while the trio thread is inside a write transaction (which
    releases the interpreter lock around each put) would deadlock both. A
    daemon calls this before it serves requests or starts worker threads.
    """
    store.aux_write(INDEX_TABLE, {})


class IndexCorrupt(Corrupt):
    """A sealed index file or manifest fails authentication or does not parse."""


class IndexRollback(IndexCorrupt):
    """The sealed files are not the ones the manifest names (an older or swapped set)."""


class IndexConflict(SlurpError):
    """Another process saved this role's index since this one loaded it."""


class IndexOutdated(SlurpError):
    """The saved index is intact but was made with an older schema: rebuild it."""


def index_key(keyring: Keyring, role: str, generation: int) -> bytes:
    """The index key of `role` at a key generation; `KeyMissing` if that key is not held."""
    private = keyring.private(role, generation)
    if private is None:
        raise KeyMissing(f"no private key of role {role!r} generation {generation} for its index")
    return hashlib.blake2b(KEY_DOMAIN + role.encode(), key=bytes(private), digest_size=32).digest()


def _file_ad(role: str, name: str) -> bytes:
    return FILE_AD + role.encode() + b"\0" + name.encode()


def seal_file(key: bytes, role: str, name: str, data: bytes) -> bytes:
    nonce = random_bytes(NONCE_BYTES)
    return nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        data, _file_ad(role, name), nonce, key
    )


def open_file(key: bytes, role: str, name: str, sealed: bytes) -> bytes:
    try:
        return bytes(
            sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed[NONCE_BYTES:], _file_ad(role, name), sealed[:NONCE_BYTES], key
            )
        )
    except (CryptoError, ValueError):
        raise IndexCorrupt(f"index file {name!r} of role {role!r} fails authentication") from None


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


@dataclass(frozen=True, slots=True)
class IndexMeta:
    """The authenticated manifest of one role's index."""

    engine: str
    generation: int
    seq: int
    docs: int
    key_generation: int
    files: Mapping[str, tuple[int, str]]  # name -> (sealed length, BLAKE2b-256 hex of sealed bytes)
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Engine-specific values the manifest vouches for (the sqlite engine: its database file)."""


def _meta_key(role: str) -> bytes:
    return role.encode() + b"\0m"


def _file_prefix(role: str, name: str = "") -> bytes:
    return role.encode() + b"\0f\0" + (name.encode() + b"\0" if name else b"")


def _meta_ad(role: str, node_id: bytes, key_generation: int) -> bytes:
    return META_AD + role.encode() + b"\0" + node_id + _U32.pack(key_generation)


class SealedIndexStore:
    """Load and save one role's sealed index files through the store.

    Not thread-safe by itself: the owning index serialises `load`/`save`.
    """

    def __init__(self, store: Store, keyring: Callable[[], Keyring], role: str) -> None:
        self._store = store
        self._keyring = keyring  # read at each use: key rotation replaces the keyring
        self.role = role
        self._raw_meta: bytes | None = None
        self._meta: IndexMeta | None = None  # None: the next save seals every file
        self._generation = 0
        self._chunks: dict[str, int] = {}  # name -> chunks stored, for deletion

    @property
    def meta(self) -> IndexMeta | None:
        return self._meta

    @property
    def next_generation(self) -> int:
        """The index generation the next `save` writes unless told another."""
        return self._generation + 1

    def key(self, key_generation: int) -> bytes:
        """The role's index key at a key generation (`KeyMissing` if not held)."""
        return index_key(self._keyring(), self.role, key_generation)

    def current_generation(self) -> int:
        gens = self._keyring().generations(self.role)
        if not gens:
            raise KeyMissing(f"no key known for role {self.role!r}")
        return gens[-1]

    def load(self, engine: str) -> tuple[IndexMeta, dict[str, bytes]] | None:
        """The manifest and plaintext files, or None if nothing is saved.

        Raises `IndexRollback`, `IndexCorrupt`, or `KeyMissing` when the key the
        index was sealed under is no longer held.
        """
        # One scan, so one read transaction: the manifest and the files it names
        # are from the same save even while another process saves.
        rows = self._store.aux_scan(INDEX_TABLE, self.role.encode() + b"\0")
        raw = dict(rows).get(_meta_key(self.role))
        if raw is None:
            self._raw_meta, self._meta, self._chunks = None, None, {}
            return None
        meta = self._open_meta(raw)
        if meta.engine != engine:
            # Intact, but another engine's (search.engine changed): rebuilt, not an attack.
            raise IndexOutdated(f"the saved index of role {self.role!r} is a {meta.engine} index")
        key = index_key(self._keyring(), self.role, meta.key_generation)
        pieces: dict[str, list[bytes]] = {}
        prefix = _file_prefix(self.role)
        for k, value in rows:
            if not k.startswith(prefix):
                continue
            rest = k[len(prefix) :]  # name ‖ 0 ‖ chunk number u32
            name = rest[: -1 - _U32.size].decode(errors="replace")
            parts = pieces.setdefault(name, [])
            if len(rest) <= _U32.size or _U32.unpack(rest[-_U32.size :])[0] != len(parts):
                raise IndexCorrupt(f"index file {name!r} of role {self.role!r} is out of order")
            parts.append(value)
        files: dict[str, bytes] = {}
        for name, (length, digest) in meta.files.items():
            sealed = b"".join(pieces.get(name, ()))
            if len(sealed) != length or _digest(sealed) != digest:
                raise IndexRollback(
                    f"index file {name!r} of role {self.role!r} is not the one its manifest "
                    f"(generation {meta.generation}) names: refusing an older or altered index"
                )
            files[name] = open_file(key, self.role, name, sealed)
        self._raw_meta, self._meta, self._generation = raw, meta, meta.generation
        self._chunks = {name: len(parts) for name, parts in pieces.items()}
        return meta, files

    def save(
        self,
        engine: str,
        files: Mapping[str, bytes],
        changed: Collection[str],
        *,
        seq: int,
        docs: int,
        generation: int | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> IndexMeta:
        """Seal the files named in `changed` (and any not saved before), drop the
        ones no longer present, and write the new manifest: one transaction.

        The manifest's generation is `generation` if given (at least
        `next_generation`), else `next_generation`; `extra` is stored as given.
        `IndexConflict` if another process saved since our last load or save.
        """
        key_generation = self.current_generation()
        key = index_key(self._keyring(), self.role, key_generation)
        old = self._meta
        reseal_all = old is None or old.key_generation != key_generation
        manifest: dict[str, tuple[int, str]] = {}
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        chunks = dict(self._chunks)
        for name in sorted(files):
            if not reseal_all and name not in changed and old is not None and name in old.files:
                manifest[name] = old.files[name]
                continue
            sealed = seal_file(key, self.role, name, files[name])
            manifest[name] = (len(sealed), _digest(sealed))
            count = max(1, -(-len(sealed) // CHUNK_BYTES))
            for i in range(count):
                puts[_file_prefix(self.role, name) + _U32.pack(i)] = sealed[
                    i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES
                ]
            deletes.extend(
                _file_prefix(self.role, name) + _U32.pack(i)
                for i in range(count, chunks.get(name, 0))
            )
            chunks[name] = count
        for name in sorted(set(chunks) - set(files)):
            deletes.extend(
                _file_prefix(self.role, name) + _U32.pack(i) for i in range(chunks[name])
            )
            del chunks[name]
        meta = IndexMeta(
            engine=engine,
            generation=max(self.next_generation, generation or 0),
            seq=seq,
            docs=docs,
            key_generation=key_generation,
            files=manifest,
            extra=dict(extra or {}),
        )
        raw = self._seal_meta(meta, key)
        puts[_meta_key(self.role)] = raw
        try:
            self._store.aux_write(
                INDEX_TABLE, puts, deletes, expect=(_meta_key(self.role), self._raw_meta)
            )
        except StaleHead:
            raise IndexConflict(
                f"the index of role {self.role!r} was saved by another process meanwhile"
            ) from None
        self._raw_meta, self._meta, self._chunks = raw, meta, chunks
        self._generation = meta.generation
        return meta

    def take_over(self) -> None:
        """Make the next save replace whatever is saved now, sealing every file.

        For a complete build that lost a race with another process's save: the
        build is as good as what was saved, so it wins rather than being lost.
        """
        rows = self._store.aux_scan(INDEX_TABLE, self.role.encode() + b"\0")
        self._raw_meta = dict(rows).get(_meta_key(self.role))
        self._meta = None
        if self._raw_meta is not None:
            with contextlib.suppress(IndexCorrupt, KeyMissing):  # replaced either way
                current = self._open_meta(self._raw_meta)
                self._generation = max(self._generation, current.generation)
        prefix = _file_prefix(self.role)
        self._chunks = {}
        for k, _ in rows:
            if k.startswith(prefix):
                name = k[len(prefix) : -1 - _U32.size].decode(errors="replace")
                self._chunks[name] = self._chunks.get(name, 0) + 1

    def purge(self) -> None:
        """Remove everything saved for this role (before a rebuild of a corrupt index)."""
        keys = [k for k, _ in self._store.aux_scan(INDEX_TABLE, self.role.encode() + b"\0")]
        self._store.aux_write(INDEX_TABLE, {}, keys)
        self._raw_meta, self._meta, self._chunks = None, None, {}

    # -- the manifest record ----------------------------------------------------

    def _seal_meta(self, meta: IndexMeta, key: bytes) -> bytes:
        body: dict[str, object] = {
            "engine": meta.engine,
            "generation": meta.generation,
            "seq": meta.seq,
            "docs": meta.docs,
            "files": {name: list(entry) for name, entry in meta.files.items()},
        }
        if meta.extra:
            body["extra"] = dict(meta.extra)
        payload = json.dumps(
            body,
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        nonce = random_bytes(NONCE_BYTES)
        ad = _meta_ad(self.role, self._keyring().node.node_id, meta.key_generation)
        return (
            _HEADER.pack(MAGIC, FORMAT, meta.key_generation)
            + nonce
            + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(payload, ad, nonce, key)
        )

    def _open_meta(self, raw: bytes) -> IndexMeta:
        where = f"the index manifest of role {self.role!r}"
        if len(raw) < _HEADER.size + NONCE_BYTES:
            raise IndexCorrupt(f"{where} is truncated")
        magic, fmt, key_generation = _HEADER.unpack_from(raw)
        if magic != MAGIC or fmt != FORMAT:
            raise IndexCorrupt(f"{where} has an unknown format")
        key = index_key(self._keyring(), self.role, key_generation)
        nonce = raw[_HEADER.size : _HEADER.size + NONCE_BYTES]
        ad = _meta_ad(self.role, self._keyring().node.node_id, key_generation)
        try:
            payload = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                raw[_HEADER.size + NONCE_BYTES :], ad, nonce, key
            )
            body = json.loads(payload)
            return IndexMeta(
                engine=str(body["engine"]),
                generation=int(body["generation"]),
                seq=int(body["seq"]),
                docs=int(body["docs"]),
                key_generation=key_generation,
                files={
                    str(name): (int(length), str(digest))
                    for name, (length, digest) in body["files"].items()
                },
                extra={str(k): str(v) for k, v in body.get("extra", {}).items()},
            )
        except CryptoError:
            raise IndexCorrupt(f"{where} fails authentication") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexCorrupt(f"{where} does not parse ({exc})") from None
