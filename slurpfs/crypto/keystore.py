"""Private keys at rest: the ``<data>/keys/`` directory.

Layout (directories ``0700``, files ``0600``, every write atomic: temp file created
with its final mode, fsync, rename, fsync of the directory)::

    keys/node.key                    the node's Ed25519 seed
    keys/roles/<role>.<gen>.key      one X25519 role private key per held generation
    keys/public.json                 {"format": 1,
                                      "roles": {role: [{"generation": g, "public": hex}]},
                                      "trusted_nodes": [hex, ...]}

``public.json`` is written last and is the commit point: the keystore *exists* iff
it does. It is not secret, but it decides which nodes are trusted and which keys
writers seal to, so it is refused when group/world writable.

Key file format (integers big-endian)::

    mode 1 (passphrase): b"SLKF" | 1 | salt 16 | opslimit u64 | memlimit u64 | nonce 24
                         | XChaCha20-Poly1305(secret 32), key = argon2id(passphrase, salt),
                           associated data = b"slurpfs/keyfile/v1\\0" + purpose
    mode 0 (no passphrase): b"SLKF" | 0 | purpose_len u8 | purpose | secret 32

``purpose`` is ``"node"`` or ``"role:<name>:<gen>"``, so a key file copied over
another fails to load (:class:`Corrupt`), whichever the mode. All files of one
keystore share one salt, so a load derives the Argon2id key once. The mode must
match the configuration: an encrypted file with no passphrase is
:class:`WrongPassphrase`, a plain file while a passphrase is configured is
:class:`ConfigError` (no silent downgrade).

Destroying a key overwrites the file with random bytes, fsyncs and unlinks it; on
copy-on-write or flash storage the old blocks may survive (documented limitation).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings as sodium
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey
from nacl.pwhash import argon2id
from nacl.signing import SigningKey

from slurpfs.crypto.keys import Keyring, NodeIdentity, RoleKeyPair, RolePublicKey, validate_role
from slurpfs.errors import (
    AlreadyExists,
    ConfigError,
    Corrupt,
    KeyMissing,
    NotFound,
    NotInitialised,
    WrongPassphrase,
)

KEYFILE_MAGIC = b"SLKF"
KEYFILE_AD_PREFIX = b"slurpfs/keyfile/v1\0"
MODE_PLAIN = 0
MODE_ARGON2ID = 1
PUBLIC_FORMAT = 1
SECRET_BYTES = 32
SALT_BYTES = argon2id.SALTBYTES
_MAX_MEMLIMIT = 4 << 30  # refuse absurd stored parameters rather than exhaust memory
_KDF_HEADER = struct.Struct(">16sQQ24s")  # salt, opslimit, memlimit, nonce
log = logging.getLogger(__name__)

SUPERSEDED_DIR = "superseded"  # keys/superseded/: own keys the cluster chose another over
DROPPED_DIR = "dropped"  # keys/dropped/<role>.<gen>: destroyed on purpose (`drop_private`)
_ROLE_FILE_RE = re.compile(r"(?P<role>[A-Za-z0-9_][A-Za-z0-9_-]{0,63})\.(?P<gen>[1-9][0-9]*)\.key")


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters for passphrase-protected key files."""

    opslimit: int
    memlimit: int

    def __post_init__(self) -> None:
        if not argon2id.OPSLIMIT_MIN <= self.opslimit <= argon2id.OPSLIMIT_MAX:
            raise ValueError(f"argon2id opslimit out of range: {self.opslimit}")
        if not argon2id.MEMLIMIT_MIN <= self.memlimit <= _MAX_MEMLIMIT:
            raise ValueError(f"argon2id memlimit out of range: {self.memlimit}")

    @classmethod
    def default(cls) -> KdfParams:
        """libsodium's MODERATE limits (256 MiB, 3 passes)."""
        return cls(argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE)

    @classmethod
    def weak(cls) -> KdfParams:
        """The minimum limits. For tests only: offers almost no brute-force resistance."""
        return cls(argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN)


DEFAULT_KDF = KdfParams.default()


@dataclass
class _State:
    """Everything on disk, decoded; mutated by Keystore methods and then written."""

    node: NodeIdentity
    publics: dict[str, dict[int, bytes]]
    trusted: list[bytes]
    pairs: dict[tuple[str, int], RoleKeyPair] = field(default_factory=dict)

    def keyring(self) -> Keyring:
        pubs = [RolePublicKey(r, g, p) for r, gens in self.publics.items() for g, p in gens.items()]
        return Keyring(self.node, pubs, self.pairs.values(), self.trusted)


class Keystore:
    """Reads and writes the node's key directory. Methods are serialised by a lock.

    ``passphrase`` None means key files are stored unencrypted (still ``0600``);
    ``kdf`` applies to key files of a newly created keystore (existing ones keep the
    parameters stored in their files).
    """

    def __init__(
        self, data_dir: Path, passphrase: bytes | None, kdf: KdfParams = DEFAULT_KDF
    ) -> None:
        if passphrase is not None and not passphrase:
            raise ConfigError("the key passphrase is empty")
        self.keys_dir = Path(data_dir) / "keys"
        self._data_dir = Path(data_dir)
        self._roles_dir = self.keys_dir / "roles"
        self._public_path = self.keys_dir / "public.json"
        self._node_path = self.keys_dir / "node.key"
        self._passphrase = passphrase
        self._kdf = kdf
        self._derived: dict[tuple[bytes, int, int], bytes] = {}
        self._proven: set[tuple[bytes, int, int]] = set()  # derived keys that opened a file
        self._salt: tuple[bytes, KdfParams] | None = None  # used for files written next
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- public API

    def exists(self) -> bool:
        """True if a keystore has been created here (``public.json`` present)."""
        return self._public_path.exists()

    def create(self, roles: Iterable[str], held: Iterable[str] | None = None) -> Keyring:
        """Create a node key and a generation-1 key pair per role.

        Private key files are written only for roles in ``held`` (default: all).
        :class:`AlreadyExists` if a keystore (or any key file) is present;
        :class:`ConfigError` for bad
        role names or a ``held`` role not in ``roles``.
        """
        with self._lock:
            if self.exists():
                raise AlreadyExists(f"a keystore already exists in {self.keys_dir}")
            if self._node_path.exists() or any(self._roles_dir.glob("*.key")):
                # Never overwrite keys that an incomplete keystore may still need.
                raise AlreadyExists(f"key files already present in {self.keys_dir}; move them")
            role_list = sorted({validate_role(r) for r in roles})
            held_set = set(role_list) if held is None else {validate_role(r) for r in held}
            if not held_set <= set(role_list):
                raise ConfigError(f"held roles not in roles: {sorted(held_set - set(role_list))}")
            self._data_dir.mkdir(parents=True, exist_ok=True)
            for d in (self.keys_dir, self._roles_dir):
                _make_private_dir(d)
            if self._passphrase is not None:
                self._salt = (secrets.token_bytes(SALT_BYTES), self._kdf)
            state = _State(NodeIdentity.generate(), {}, [])
            for role in role_list:
                pair = RoleKeyPair.generate(role, 1)
                state.publics[role] = {1: pair.public.public}
                if role in held_set:
                    self._write_pair(pair)
                    state.pairs[(role, 1)] = pair
            self._write_key(self._node_path, bytes(state.node.signing_key), "node")
            self._write_public(state)
            return state.keyring()

    def load(self) -> Keyring:
        """Load the keyring. :class:`NotInitialised` if there is no keystore;
        :class:`ConfigError` for unsafe permissions; :class:`WrongPassphrase`;
        :class:`Corrupt` for damaged or swapped files."""
        with self._lock:
            return self._load_state().keyring()

    def add_role(self, role: str) -> Keyring:
        """Add ``role`` with a held generation-1 key pair. :class:`AlreadyExists` if known."""
        with self._lock:
            state = self._load_state()
            if validate_role(role) in state.publics:
                raise AlreadyExists(f"role {role!r} already has keys")
            pair = RoleKeyPair.generate(role, 1)
            self._write_pair(pair)
            state.pairs[(role, 1)] = pair
            state.publics[role] = {1: pair.public.public}
            self._write_public(state)
            return state.keyring()

    def drop_private(self, role: str) -> Keyring:
        """Destroy every private key file of ``role`` (the public keys stay known)."""
        with self._lock:
            state = self._load_state()
            if role not in state.publics:
                raise NotFound(f"no keys for role {role!r}")
            for generation in sorted(state.publics[role]):
                self._mark_dropped(role, generation)
            for path in sorted(self._roles_dir.iterdir()):
                m = _ROLE_FILE_RE.fullmatch(path.name)
                if m is not None and m["role"] == role:
                    _destroy(path)
            state.pairs = {k: v for k, v in state.pairs.items() if k[0] != role}
            return state.keyring()

    def rotate(self, role: str) -> tuple[RoleKeyPair, RoleKeyPair | None]:
        """Store a new generation of ``role`` and make it current.

        Returns (new pair, previous current pair or None if it was not held). The
        caller re-wraps key slots from old to new, then calls :meth:`destroy_generation`.
        """
        with self._lock:
            state = self._load_state()
            gens = state.publics.get(role)
            if not gens:
                raise NotFound(f"no keys for role {role!r}")
            current = max(gens)
            if (role, current) not in state.pairs:
                # Rotating is re-wrapping data keys to the new generation, which needs
                # the current private key; without it this node would only make itself
                # a key that opens none of the role's existing versions.
                raise KeyMissing(
                    f"this node does not hold role {role!r} (generation {current});"
                    " rotate it on a node that does"
                )
            new = RoleKeyPair.generate(role, current + 1)
            self._write_pair(new)
            gens[new.generation] = new.public.public
            self._write_public(state)
            return new, state.pairs.get((role, current))

    def destroy_generation(self, role: str, generation: int) -> None:
        """Destroy the private key of an old generation and forget its public key.

        :class:`NotFound` if unknown; :class:`ConfigError` for the current generation
        (use :meth:`drop_private` to give up a role entirely).
        """
        with self._lock:
            state = self._load_state()
            gens = state.publics.get(role, {})
            if generation not in gens:
                raise NotFound(f"no generation {generation} of role {role!r}")
            if generation == max(gens):
                raise ConfigError(f"refusing to destroy the current generation of role {role!r}")
            # Destroy first: a crash before the rewrite leaves a harmless public entry,
            # never an unreferenced private key.
            path = self._role_path(role, generation)
            if path.exists():
                _destroy(path)
            del gens[generation]
            self._write_public(state)

    def trust_node(self, node_id: bytes) -> None:
        """Trust envelopes signed by ``node_id`` (a 32-byte Ed25519 public key)."""
        if len(node_id) != 32:
            raise ConfigError("a node id is 32 bytes (64 hex characters)")
        with self._lock:
            state = self._load_state()
            if node_id not in state.trusted:
                state.trusted.append(bytes(node_id))
                self._write_public(state)

    def distrust_node(self, node_id: bytes) -> None:
        """Stop trusting ``node_id`` (no-op if it was not trusted)."""
        with self._lock:
            state = self._load_state()
            if node_id in state.trusted:
                state.trusted.remove(node_id)
                self._write_public(state)

    def adopt_publics(self, publics: Mapping[str, Mapping[int, bytes]]) -> Keyring:
        """Take a cluster's role public keys in place of this node's own (joining).

        Every private key of this node that the cluster does not list (its own
        unused keys from before it joined) is destroyed; granted keys come later.
        """
        with self._lock:
            state = self._load_state()
            for (role, generation), pair in list(state.pairs.items()):
                if publics.get(role, {}).get(generation) != pair.public.public:
                    _destroy(self._role_path(role, generation))
                    del state.pairs[(role, generation)]
            state.publics = {validate_role(r): dict(g) for r, g in publics.items() if g}
            self._write_public(state)
            return state.keyring()

    def follow_cluster(
        self,
        publics: Mapping[str, Mapping[int, bytes]],
        pairs: Iterable[RoleKeyPair],
        trusted: Iterable[bytes],
    ) -> Keyring:
        """Make a clustered node's keys follow its member log: role public keys it
        lacks are added (not an old generation this node destroyed), private keys granted to it are stored (under the configured
        passphrase), and the trusted nodes are exactly ``trusted`` (the log's).

        A public key that differs from this node's for the same (role, generation)
        wins (the log keeps one per generation): this node's own is set aside
        (`_supersede`).
        """
        with self._lock:
            state = self._load_state()
            before = (json.dumps(state.publics, default=bytes.hex, sort_keys=True), state.trusted)
            for role, gens in publics.items():
                mine = state.publics.setdefault(validate_role(role), {})
                newest = max(mine, default=0)
                for generation, public in gens.items():
                    if generation < newest and generation not in mine:
                        continue  # destroyed here after a rotation: not brought back
                    if mine.setdefault(generation, public) != public:
                        self._supersede(state, role, generation, public)
            for pair in pairs:
                known = state.publics.get(pair.role, {})
                if pair.generation not in known and pair.generation < max(known, default=0):
                    continue  # a generation this node retired: its grant is not taken again
                if (pair.role, pair.generation) not in state.pairs:
                    if known.get(pair.generation) != pair.public.public:
                        raise Corrupt(f"a granted key of role {pair.role!r} does not match")
                    self._write_pair(pair)
                    state.pairs[(pair.role, pair.generation)] = pair
            state.trusted = sorted({bytes(t) for t in trusted} - {state.node.node_id})
            after = (json.dumps(state.publics, default=bytes.hex, sort_keys=True), state.trusted)
            if after != before:
                self._write_public(state)
            return state.keyring()

    # ------------------------------------------------------------------ internals

    def _supersede(self, state: _State, role: str, generation: int, public: bytes) -> None:
        """The cluster holds another key for (``role``, ``generation``) than this node
        made (two members added or rotated the role at once; the member log keeps
        the earliest): take its public key, and move this node's own private key of
        that generation to ``keys/superseded/`` (kept, not destroyed, not loaded: it
        opens only what this node sealed to it before it learnt of the other key)."""
        log.error(
            "role %r generation %d was added on another member at the same time, and the"
            " cluster keeps that key: this node's is set aside (keys/%s/); a holder grants"
            " the role (slurpfs keys grant)",
            role,
            generation,
            SUPERSEDED_DIR,
        )
        path = self._role_path(role, generation)
        if path.exists():
            _make_private_dir(self.keys_dir / SUPERSEDED_DIR)
            os.rename(
                path,
                self.keys_dir / SUPERSEDED_DIR / f"{role}.{generation}.{secrets.token_hex(4)}.key",
            )
            _fsync_dir(self._roles_dir)
            self._mark_dropped(role, generation)  # given up on purpose (fsck)
        state.pairs.pop((role, generation), None)
        state.publics[role][generation] = public

    def was_dropped(self, role: str, generation: int) -> bool:
        """True if `drop_private` destroyed this generation's private key on purpose
        (what `fsck` tells from a key file lost by accident)."""
        return (self.keys_dir / DROPPED_DIR / f"{role}.{generation}").exists()

    def _mark_dropped(self, role: str, generation: int) -> None:
        """Leave an empty ``keys/dropped/<role>.<gen>`` (no key material)."""
        _make_private_dir(self.keys_dir / DROPPED_DIR)
        _write_atomic(self.keys_dir / DROPPED_DIR / f"{role}.{generation}", b"")

    def _role_path(self, role: str, generation: int) -> Path:
        return self._roles_dir / f"{role}.{generation}.key"

    def _load_state(self) -> _State:
        if not self._public_path.exists():
            raise NotInitialised(f"no keystore in {self.keys_dir} (run `slurpfs init`)")
        _check_private_dir(self.keys_dir)
        _check_private_dir(self._roles_dir)
        seed = self._read_key(self._node_path, "node")
        if seed is None:
            raise NotInitialised(f"node key missing: {self._node_path}")
        state = _read_public(self._public_path, NodeIdentity(SigningKey(seed)))
        for role, gens in state.publics.items():
            for gen, public in gens.items():
                path = self._role_path(role, gen)
                secret = self._read_key(path, f"role:{role}:{gen}")
                if secret is None:
                    continue
                pair = RoleKeyPair(role, gen, PrivateKey(secret))
                if pair.public.public != public:
                    raise Corrupt(f"private key in {path} does not match public.json")
                state.pairs[(role, gen)] = pair
        return state

    def _write_public(self, state: _State) -> None:
        doc = {
            "format": PUBLIC_FORMAT,
            "roles": {
                role: [{"generation": g, "public": gens[g].hex()} for g in sorted(gens)]
                for role, gens in sorted(state.publics.items())
            },
            "trusted_nodes": [t.hex() for t in state.trusted],
        }
        _write_atomic(self._public_path, json.dumps(doc, indent=2).encode() + b"\n")

    def _write_pair(self, pair: RoleKeyPair) -> None:
        path = self._role_path(pair.role, pair.generation)
        self._write_key(path, bytes(pair.private), f"role:{pair.role}:{pair.generation}")

    def _write_key(self, path: Path, secret: bytes, purpose: str) -> None:
        p = purpose.encode()
        if self._passphrase is None:
            data = KEYFILE_MAGIC + bytes([MODE_PLAIN, len(p)]) + p + secret
        else:
            if self._salt is None:  # create() sets it; _load_state() adopts the node's
                raise RuntimeError("keystore salt unknown: load before writing")
            salt, kdf = self._salt
            key = self._derive(salt, kdf.opslimit, kdf.memlimit)
            nonce = secrets.token_bytes(24)
            ct = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
                secret, KEYFILE_AD_PREFIX + p, nonce, key
            )
            head = _KDF_HEADER.pack(salt, kdf.opslimit, kdf.memlimit, nonce)
            data = KEYFILE_MAGIC + bytes([MODE_ARGON2ID]) + head + ct
        _write_atomic(path, data)

    def _read_key(self, path: Path, purpose: str) -> bytes | None:
        """The 32-byte secret in ``path``, or None if the file does not exist."""
        data = _read_private_file(path)
        if data is None:
            return None
        p = purpose.encode()
        if data[:4] != KEYFILE_MAGIC or len(data) < 5:
            raise Corrupt(f"{path} is not a slurpfs key file")
        mode = data[4]
        if mode == MODE_PLAIN:
            if self._passphrase is not None:
                raise ConfigError(f"{path} is not passphrase-protected but a passphrase is set")
            prefix = KEYFILE_MAGIC + bytes([MODE_PLAIN, len(p)]) + p
            if len(data) != len(prefix) + SECRET_BYTES or not data.startswith(prefix):
                raise Corrupt(f"{path} holds a different key (swapped or damaged)")
            return data[len(prefix) :]
        if mode != MODE_ARGON2ID:
            raise Corrupt(f"{path} has unknown key file mode {mode}")
        if self._passphrase is None:
            raise WrongPassphrase(f"{path} is passphrase-protected: a passphrase is required")
        body = data[5:]
        if len(body) != _KDF_HEADER.size + SECRET_BYTES + 16:
            raise Corrupt(f"{path} has the wrong length for a key file")
        salt, ops, mem, nonce = _KDF_HEADER.unpack(body[: _KDF_HEADER.size])
        try:
            KdfParams(ops, mem)
        except ValueError:
            raise Corrupt(f"{path} has out-of-range KDF parameters") from None
        key = self._derive(salt, ops, mem)
        try:
            secret = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                body[_KDF_HEADER.size :], KEYFILE_AD_PREFIX + p, nonce, key
            )
        except CryptoError:
            if (salt, ops, mem) in self._proven:  # passphrase known good: the file is wrong
                raise Corrupt(f"{path} holds a different key (swapped or damaged)") from None
            raise WrongPassphrase(f"wrong passphrase for {path}") from None
        self._proven.add((salt, ops, mem))
        if self._salt is None:
            self._salt = (salt, KdfParams(ops, mem))
        return bytes(secret)

    def _derive(self, salt: bytes, opslimit: int, memlimit: int) -> bytes:
        assert self._passphrase is not None
        cache_key = (salt, opslimit, memlimit)
        key = self._derived.get(cache_key)
        if key is None:
            key = argon2id.kdf(32, self._passphrase, salt, opslimit=opslimit, memlimit=memlimit)
            self._derived[cache_key] = key
        return key


# --------------------------------------------------------------------- file helpers


def public_role_names(data_dir: Path) -> list[str] | None:
    """The role names in ``<data_dir>/keys/public.json`` (public, no key needed);
    None when there is no such file or it does not parse (`Keystore.load` says why)."""
    try:
        roles = json.loads((Path(data_dir) / "keys" / "public.json").read_bytes())["roles"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return [r for r in roles if isinstance(r, str)] if isinstance(roles, dict) else None


def _read_public(path: Path, node: NodeIdentity) -> _State:
    st = os.stat(path)
    if st.st_mode & 0o022:
        raise ConfigError(f"{path} is group/world writable (mode {st.st_mode & 0o777:o})")
    try:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict) or set(doc) != {"format", "roles", "trusted_nodes"}:
            raise ValueError("unexpected keys")
        if doc["format"] != PUBLIC_FORMAT:
            raise ValueError(f"unsupported format {doc['format']!r}")
        publics: dict[str, dict[int, bytes]] = {}
        for role, entries in doc["roles"].items():
            gens = publics.setdefault(validate_role(role), {})
            for entry in entries:
                gen = entry["generation"]
                if type(gen) is not int or set(entry) != {"generation", "public"}:
                    raise ValueError(f"bad key entry for role {role!r}")
                gens[gen] = RolePublicKey(role, gen, bytes.fromhex(entry["public"])).public
            if not gens:
                raise ValueError(f"role {role!r} has no keys")
        trusted = [bytes.fromhex(h) for h in doc["trusted_nodes"]]
        if any(len(t) != 32 for t in trusted):
            raise ValueError("bad trusted node id")
    except (ValueError, TypeError, KeyError, AttributeError, ConfigError) as e:
        raise Corrupt(f"{path} is malformed: {e}") from None
    return _State(node, publics, trusted)


def _make_private_dir(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    _check_private_dir(path)


def _check_private_dir(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotInitialised(f"key directory missing: {path}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory")
    _check_owner_only(path, st, "chmod 700 it")


def _check_owner_only(path: Path, st: os.stat_result, fix: str) -> None:
    if st.st_mode & 0o077:
        mode = st.st_mode & 0o777
        raise ConfigError(f"{path} is accessible by group/others (mode {mode:o}); {fix}")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by this user")


def _read_private_file(path: Path) -> bytes | None:
    """Read a key file, refusing symlinks, non-files and group/world access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symlink; key files must be regular files") from None
        raise
    try:
        st = os.fstat(fd)  # check the file we opened, not the path (no TOCTOU)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        _check_owner_only(path, st, "chmod 600 it")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(4096)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically; the file is created with ``mode``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _destroy(path: Path) -> None:
    """Move ``path`` aside, overwrite it with random bytes, fsync, unlink, fsync the
    directory. (Moved first: another process loading the keystore meanwhile finds
    the key or no key, never the random bytes.)"""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(8)}.destroyed")
    os.rename(path, aside)
    path = aside
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        os.write(fd, secrets.token_bytes(size))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    _fsync_dir(path.parent)
