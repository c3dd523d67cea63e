"""The context model: what the filesystem, the CLI and replication call.

`ContextStore` joins the pieces below it: UCXL addresses (`slurpfs.ucxl`),
envelopes and keys (`slurpfs.crypto`), the LMDB store (`slurpfs.store`) and the
plaintext cache. It owns the rules every front end shares: which names are
valid, who may read which role, how a write becomes exactly one new version,
how temporal segments pick a version, and the CSS-like cascade of front matter.

Thread-safe: the FUSE daemon calls it from worker threads, the CLI directly.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurpfs import frontmatter, hlc, seal
from slurpfs.audit import (
    ANCHOR_KEY,
    ANCHOR_TABLE,
    AuditKeys,
    AuditLog,
    StoreAnchorSlot,
    Verified,
    has_keyed_entries,
    verify,
)
from slurpfs.cache import EnvelopeTier
from slurpfs.cache.memory import CacheStatistics, PlaintextCache
from slurpfs.config import Config, render_toml
from slurpfs.crypto import envelope as env
from slurpfs.crypto import local
from slurpfs.crypto.keypool import KeyPool
from slurpfs.crypto.keys import ROLE_PATTERN, Keyring, RolePublicKey
from slurpfs.crypto.keystore import KdfParams, Keystore
from slurpfs.errors import (
    AccessDenied,
    AlreadyExists,
    BodyUnavailable,
    Busy,
    Corrupt,
    EnvelopeMisplaced,
    InvalidAddress,
    KeyMissing,
    NotFound,
    SlurpError,
    StoreFull,
    WrongKey,
)
from slurpfs.metrics import NO_LATENCY, Latency
from slurpfs.store import (
    Commit,
    StaleHead,
    Store,
    StoredVersion,
    StoreStatistics,
    VersionRecord,
)
from slurpfs.ucxl import Address, TemporalKind, validate_component

if TYPE_CHECKING:
    from slurpfs.metrics import Metrics

log = logging.getLogger(__name__)

VersionInfo = VersionRecord
"""Metadata of one version (an alias: the store's record is the public shape)."""


class WriterBusy(Exception):
    """Another writer holds the writer lock and the caller asked not to wait."""


# `<role>.conflict-<id>`: a losing leaf of concurrent heads, listed beside the role file.
CONFLICT_NAME = re.compile(rf"(?P<role>{ROLE_PATTERN})\.conflict-(?P<id>[0-9a-f]{{16}})")

# Later than every TTL: the head "as of then" is None exactly when the context has one.
_END_OF_TIME_MS = (1 << 64) - 1
DEFAULT_CLOCK_AHEAD_MS = 60_000  # the cluster setting's default (`slurpfs.net.members`)
# Bodies fetched from their holders kept as caches at most; past it the oldest tenth go.
BODY_CACHE_VERSIONS = 4096

# Re-seal attempts on leaves that moved (`ContextStore._commit_retrying`).
_COMMIT_RETRIES = 64
_RETRY_BACKOFF = 0.0005  # seconds, times the attempt number (capped at 20)


class ContextTooLarge(SlurpError):
    errno = 27  # EFBIG
    exit_code = 8


@dataclass(frozen=True, slots=True)
class Context:
    """One decrypted version: its metadata and the exact bytes that were written."""

    info: VersionInfo
    data: bytes

    @property
    def front_matter(self) -> frontmatter.FrontMatter:
        return frontmatter.parse(self.data)


@dataclass(frozen=True, slots=True)
class Listing:
    """An address directory: subdirectories, live role files and losing conflict leaves."""

    dirs: tuple[str, ...]
    roles: tuple[str, ...]
    conflicts: tuple[tuple[str, VersionInfo], ...]


@dataclass(frozen=True, slots=True)
class BatchItem:
    address: Address
    role: str
    data: bytes
    label: str = ""


@dataclass(frozen=True, slots=True)
class BatchReport:
    committed: tuple[VersionInfo, ...]
    failed: tuple[tuple[str, str], ...]  # (label, reason)
    unchanged: tuple[str, ...] = ()  # labels of items equal to their head: nothing stored


@dataclass(frozen=True, slots=True)
class JournaledSave:
    """A save write-behind journaled: `ContextStore.save_journaled` stores it."""

    address: Address
    role: str
    data: bytes
    based_on: tuple[bytes, ...] | None  # the head it was acknowledged on (`save`)


@dataclass(frozen=True, slots=True)
class Saved:
    """What a save did: the context's head afterwards, and whether it is a new version
    (false when the bytes equal the head's: see `ContextStore.save`)."""

    info: VersionInfo
    stored: bool


@dataclass(frozen=True, slots=True)
class Resolved:
    """The cascaded view of a context: merged front matter and where it came from."""

    address: str
    role: str
    fields: dict[str, Any]
    sources: tuple[str, ...]  # address keys, farthest ancestor first


@dataclass(frozen=True, slots=True)
class RotationReport:
    role: str
    old_generation: int | None
    new_generation: int
    rewrapped: int


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    store: StoreStatistics
    cache: CacheStatistics
    puts: int
    gets: int
    denied: int
    corrupt: int
    # Data keys a mount prepared ahead (`KeyPool`): ready now, versions sealed with
    # one, and versions sealed inline because none was ready.
    prepared_keys_ready: int = 0
    prepared_keys_taken: int = 0
    prepared_keys_missed: int = 0


def data_paths(data_dir: Path) -> dict[str, Path]:
    """Where things live inside a data directory."""
    return {
        "config": data_dir / "config.toml",
        "store": data_dir / "store",
        "seal": data_dir / "store.seal",
        "audit": data_dir / "audit.log",
        "keys": data_dir / "keys",
    }


def _open_store(config: Config) -> Store:
    path = data_paths(config.data_dir)["store"]
    if not (path / "data.mdb").is_file():
        # `init` made it; opening would quietly start an empty store, and every
        # command (fsck too) would report the loss as a clean, empty node.
        raise Corrupt(
            f"{path}: the store is missing although this node is initialised"
            " (restore the data directory from a backup or a peer)"
        )
    return Store(path, map_size=config.store.map_size)


def verify_audit(
    config: Config, passphrase: bytes | None = None, *, kdf: KdfParams | None = None
) -> Verified:
    """Check a data directory's audit log with the node key and the store's anchor.

    Opens neither the model nor the log for appending, so a log whose last line is
    damaged is reported line by line too. NotInitialised, WrongPassphrase; Corrupt
    says what is wrong and where.
    """
    keyring = Keystore(config.data_dir, passphrase, kdf or KdfParams.default()).load()
    store = _open_store(config)
    try:
        return verify(
            data_paths(config.data_dir)["audit"],
            AuditKeys.for_node(keyring.node),
            StoreAnchorSlot(store),
        )
    finally:
        store.close()


def _check_seal(store: Store, sealed: seal.StoreSeal, audit_path: Path, *, accept: bool) -> None:
    """Refuse (`Corrupt`) a store that is not the one this node sealed, or is behind
    its seal; seal a store that has no seal yet (made before stores were sealed).

    With `accept` (`slurpfs fsck --accept-rollback`), seal the store as it is now.
    Sealing holds the store's writer lock, so two processes opening an unsealed
    store at once agree on one epoch.
    """
    state = sealed.read()
    if state is not None and not accept:
        _compare(store, sealed, state)
        return
    store.writer.acquire()
    try:
        state = sealed.read()  # another process may have sealed it meanwhile
        if state is not None and not accept:
            _compare(store, sealed, state)
        else:
            _seal_anew(store, sealed, state, audit_path, accept=accept)
    finally:
        store.writer.release()


def _compare(store: Store, sealed: seal.StoreSeal, state: seal.SealState) -> None:
    epoch, sequence = store.epoch(), store.sequence()
    if epoch is None and state.counter == 1 and sequence >= state.sequence:
        store.set_epoch(state.epoch)  # the first sealing was cut short: finish it
        return
    seal.check(state, epoch, sequence, store.path / "data.mdb")


def _seal_anew(
    store: Store,
    sealed: seal.StoreSeal,
    state: seal.SealState | None,
    audit_path: Path,
    *,
    accept: bool,
) -> None:
    epoch, sequence = store.epoch(), store.sequence()
    file = store.path / "data.mdb"
    if not accept and epoch is not None:
        raise Corrupt(f"{file} was sealed, but its seal {sealed.path} is missing; {seal.FIX_HINT}")
    if (
        not accept
        and has_keyed_entries(audit_path)
        and store.aux_get(ANCHOR_TABLE, ANCHOR_KEY) is None
    ):
        raise Corrupt(
            f"{file} holds no audit anchor although the audit log has keyed entries:"
            f" the store was replaced or emptied; {seal.FIX_HINT}"
        )
    if epoch is None:
        epoch = os.urandom(seal.EPOCH_BYTES)
        sealed.create(seal.SealState(epoch, sequence, 0))
        store.set_epoch(epoch)
    else:
        sealed.replace(seal.SealState(epoch, sequence, 0))
    if state is not None:
        log.warning(
            "accepted %s as it is now: %d commits (its seal named %d); sealed again",
            file,
            sequence,
            state.sequence,
        )


class ContextStore:
    """The encrypted, versioned context store of one node."""

    def __init__(
        self,
        config: Config,
        keystore: Keystore,
        keyring: Keyring,
        store: Store,
        audit: AuditLog,
        sealed: seal.StoreSeal | None = None,
    ) -> None:
        self.config = config
        self._keystore = keystore
        self.keyring = keyring
        self._store = store
        self._audit = audit
        self._store_seal = sealed
        self._clock = hlc.HybridClock()
        # How far past this node's wall clock a leaf another node wrote may move
        # its clock (the cluster's `max_clock_offset_ms`): a peer with a clock far
        # ahead must not drag every later local save into its future.
        self.max_clock_ahead_ms = DEFAULT_CLOCK_AHEAD_MS
        self._cache = PlaintextCache(config.cache.plaintext_bytes)
        self._local = local.LocalSlots()
        self._reloaded_for: set[tuple[str, int]] = set()  # (role, generation) looked for
        self._verify_key = local.verify_key(keyring.node)
        self._write_lock = threading.Lock()
        # Data keys sealed ahead of time (a mount fills it in the background).
        self.key_pool: KeyPool | None = None
        self._subscribers: list[Callable[[VersionInfo], None]] = []
        self._puts = self._gets = self._denied = self._corrupt = 0
        self.role_names: tuple[str, ...] = config.role_names
        # Latency histograms (get, put; seal, open): a daemon sets its registry's.
        self.latency: Latency = NO_LATENCY
        self.crypto_latency: Latency = NO_LATENCY
        # Envelope bodies beside the store (the Redis tier), when a daemon configures one:
        # written through on every save, read when the store lacks a body.
        self.envelopes: EnvelopeTier | None = None
        # The body of a version held only by other members (placement): a daemon with a
        # replication worker sets this to ask it (`BodyUnavailable` when no holder gives
        # it); None: such a read fails with `BodyUnavailable` at once.
        self.fetch_body: Callable[[VersionInfo], bytes] | None = None
        self.caches_evicted = 0  # fetched bodies (caches) dropped to keep their number bounded

    def instrument(self, metrics: Metrics) -> None:
        """Observe reads, saves, sealing and opening, and audit entries into `metrics`."""
        self.latency = metrics.model
        self.crypto_latency = metrics.crypto
        self._audit.events = metrics.audit

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def init(
        cls,
        config: Config,
        passphrase: bytes | None = None,
        *,
        kdf: KdfParams | None = None,
        held: Iterable[str] | None = None,
    ) -> ContextStore:
        """Create a data directory: config file, node identity, role keys, empty store."""
        paths = data_paths(config.data_dir)
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keystore = Keystore(config.data_dir, passphrase, kdf or KdfParams.default())
        if keystore.exists():
            raise AlreadyExists(f"{config.data_dir} is already initialised")
        keystore.create(config.role_names, held=held)
        if not paths["config"].exists():
            paths["config"].write_text(render_toml(config), encoding="utf-8")
        Store(paths["store"], map_size=config.store.map_size).close()  # the empty store
        return cls.open(config, passphrase, kdf=kdf)

    @classmethod
    def open(
        cls,
        config: Config,
        passphrase: bytes | None = None,
        *,
        kdf: KdfParams | None = None,
        accept_rollback: bool = False,
    ) -> ContextStore:
        """Open an initialised data directory (NotInitialised, WrongPassphrase, ConfigError).

        Corrupt if the store is damaged, or is not the one this node sealed or is
        behind its seal (`slurpfs.seal`); `accept_rollback` seals it as it is instead.
        """
        paths = data_paths(config.data_dir)
        keystore = Keystore(config.data_dir, passphrase, kdf or KdfParams.default())
        keyring = keystore.load()
        unknown = sorted(set(config.role_names) - keyring.roles())
        if unknown:
            raise SlurpError(
                f"role {unknown[0]!r} is configured but has no key: run `slurpfs keys add {unknown[0]}`"
            )
        store = _open_store(config)
        try:
            sealed = seal.StoreSeal(paths["seal"], seal.SealKey.for_node(keyring.node))
            _check_seal(store, sealed, paths["audit"], accept=accept_rollback)
            audit = AuditLog(
                paths["audit"], AuditKeys.for_node(keyring.node), StoreAnchorSlot(store)
            )
        except BaseException:
            store.close()
            raise
        return cls(config, keystore, keyring, store, audit, sealed)

    def close(self) -> None:
        """Anchor the audit log's newest entries and seal the store, then close the
        store and the log."""
        try:
            self._anchor()
            self._sync_and_seal()
        finally:
            self._store.close()
            self._audit.close()
            self._cache.clear()

    def _sync_and_seal(self) -> None:
        """Sync the store, then move its seal up to what was committed before the sync."""
        sequence, anchored = self._store.sequence(), self._audit.stored_anchor()
        self._store.sync()
        if self._store_seal is None:
            return
        try:
            self._store_seal.advance(sequence, anchored)
        except OSError as exc:
            # The seal only lags behind (a rollback to before it goes unnoticed);
            # the next sync tries again.
            log.warning("the store's seal was not moved forward: %s", exc)

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> Store:
        return self._store

    @property
    def keystore(self) -> Keystore:
        return self._keystore

    def reload_keyring(self) -> None:
        """Read the keys again: the member log installed trust or granted role keys."""
        self.keyring = self._keystore.load()

    def audit_problem(self) -> str | None:
        """Why access decisions cannot be recorded now (see `AuditLog.problem`), or None."""
        return self._audit.problem()

    def sync(self) -> None:
        """Make every commit so far survive power loss (and seal them)."""
        self._sync_and_seal()

    @property
    def audit_unanchored(self) -> bool:
        """True if the audit log has entries newer than its anchor (cheap: no I/O)."""
        return self._audit.unanchored

    def anchor_audit(self) -> bool:
        """Anchor the audit log's newest entries in the store, durably (the daemon
        calls this at every periodic sync). True if the anchor moved."""
        if not self._anchor():
            return False
        self._sync_and_seal()
        return True

    def verify_audit(self) -> Verified:
        """Check the audit log (as `verify_audit` does, with this model's store open)."""
        return self._audit.verify()

    def _anchor(self) -> bool:
        try:
            return self._audit.anchor()
        except (StoreFull, OSError) as exc:
            # The entries are recorded; only their protection against being cut off
            # waits for room (the next sync tries again). Loud, but no reason to
            # refuse access.
            log.warning("audit log not anchored: %s", exc)
            return False

    def record_maintenance(self, action: str, address: str, role: str, reason: str) -> None:
        """Audit a change the node made on its own (the retention policy's drops)."""
        self._audit.record(
            who="node", action=action, address=address, role=role, allowed=True, reason=reason
        )

    def forget_cached(self, version_ids: Iterable[bytes]) -> None:
        """Drop versions from the plaintext cache (they were removed from the store)."""
        for vid in version_ids:
            self._cache.discard(vid)

    def subscribe(self, callback: Callable[[VersionInfo], None]) -> None:
        """Call `callback(info)` after every local commit (from the committing thread)."""
        self._subscribers.append(callback)

    # -- names and access ----------------------------------------------------

    def held_roles(self) -> frozenset[str]:
        return self.keyring.held_roles() & frozenset(self.role_names)

    def readable_roles(self, caller_roles: Collection[str]) -> frozenset[str]:
        """Role files that a caller holding `caller_roles` can open on this node."""
        usable = frozenset(caller_roles) & self.held_roles()
        return frozenset(r for r in self.role_names if usable & set(self.config.readers_of(r)))

    def check_component(self, name: str) -> None:
        """InvalidAddress unless `name` may be an address path component."""
        validate_component(name)
        reserved = self._reserved(name)
        if reserved:
            raise InvalidAddress(f"path component {name!r} is {reserved}")

    def _reserved(self, name: str) -> str:
        """Why `name` names a file in an address directory (a role or a conflict), or ''."""
        if name in self.config.roles:
            return "a role name; role names are files"
        match = CONFLICT_NAME.fullmatch(name)
        if match is not None and match["role"] in self.config.roles:
            return "the name of a conflict file"
        return ""

    def _check_address(self, address: Address, *, writing: bool) -> None:
        for name in address.path:
            reserved = self._reserved(name)
            if reserved:
                raise InvalidAddress(
                    f"invalid address {str(address)!r}: path component {name!r} is {reserved}"
                )
        if writing and address.temporal is not None:
            raise InvalidAddress(f"cannot write to a temporal address {str(address)!r}")

    def _check_role(self, role: str) -> None:
        if role not in self.config.roles:
            raise NotFound(f"no role {role!r} (configured: {', '.join(self.role_names)})")

    def _authorise(
        self, address: str, role: str, caller_roles: Collection[str] | None, who: str, action: str
    ) -> frozenset[str]:
        """The roles whose keys may open `role`'s envelopes for this caller; audited."""
        readers = set(self.config.readers_of(role))
        caller = self.held_roles() if caller_roles is None else frozenset(caller_roles)
        entitled = readers & caller
        usable = entitled & self.held_roles()
        denial: AccessDenied | None = None
        if not entitled:
            reason = "caller holds no reader role"
            denial = AccessDenied(f"reading {role!r} needs one of the roles {sorted(readers)}")
        elif not usable:
            reason = "node holds no key"
            denial = KeyMissing(f"this node holds no private key for {sorted(entitled)}")
        self._audit.record(
            who=who,
            action=action,
            address=address,
            role=role,
            allowed=denial is None,
            reason="" if denial is None else reason,
        )
        if denial is not None:
            self._denied += 1
            raise denial
        return frozenset(usable)

    # -- writing ---------------------------------------------------------------

    def put(
        self,
        address: Address,
        role: str,
        data: bytes,
        *,
        ttl: float | None = None,
        wait: bool = True,
    ) -> VersionInfo:
        """`save`, returning the head afterwards (the new version, or the head it equals)."""
        return self.save(address, role, data, ttl=ttl, wait=wait).info

    def save(
        self,
        address: Address,
        role: str,
        data: bytes,
        *,
        ttl: float | None = None,
        wait: bool = True,
        journal: bytes | None = None,
        based_on: tuple[bytes, ...] | None = None,
    ) -> Saved:
        """Store `data` as the new latest version of (address, role): one LMDB transaction.

        A save of exactly the bytes of the current head stores nothing (``stored``
        false; the head keeps its version and time): every writer saving unchanged
        content (an editor's save without changes, a copy or sync run again) leaves
        history as it was. It is a new version all the same when the head is a
        deletion, when concurrent versions are unresolved (a save supersedes them),
        when `ttl` is given or the context has one (the save changes its lifetime),
        or when this node holds no key to compare with.

        With `wait` false, `WriterBusy` instead of waiting while another writer (a
        thread, or another process such as `slurpfs import`) holds the writer lock.
        `journal`: the write-behind journal's mark, stored with the version
        (`Store.commit`). `based_on`: the head (none or one version) the save was
        acknowledged on; if another writer moved the head since, the save becomes
        a concurrent version beside it (a conflict), as it would have been had it
        been committed when acknowledged.
        """
        self._check_address(address, writing=True)
        self._check_role(role)
        if len(data) > self.config.store.max_context_bytes:
            raise ContextTooLarge(
                f"{len(data)} bytes is over store.max_context_bytes ({self.config.store.max_context_bytes})"
            )
        expires = None if ttl is None else int((time.time() + ttl) * 1000)
        with self.latency.time("put"):
            saved = self._write(
                address.key, role, data, deleted=False, expires_ms=expires, wait=wait,
                keep_same=ttl is None, journal=journal, based_on=based_on,
            )  # fmt: skip
        if saved.stored:
            self._puts += 1
        return saved

    def save_journaled(self, saves: Sequence[JournaledSave], journal: bytes) -> list[Saved]:
        """Store write-behind's journaled saves, in order, in one LMDB transaction.

        Each is what `save` of it would store (`based_on` as there; a save without
        one builds on the version its predecessor in the batch made, else on the
        head), and `journal`, the mark of the last, is stored with them. All or
        nothing: an error stores none of them.
        """
        results: list[Saved | Commit] = []

        def seal() -> list[Commit]:
            results[:] = self._seal_journaled(saves)
            return [r for r in results if isinstance(r, Commit)]

        with self._writer():
            commits = self._commit_retrying(
                seal, f"a group commit of {len(saves)}", journal=journal
            )
        self._write_through(commits)
        done = []
        for save, result in zip(saves, results, strict=True):
            if isinstance(result, Commit):
                self._cache.put(result.record.version_id, save.data)
                for callback in self._subscribers:
                    callback(result.record)
                result = Saved(result.record, stored=True)
            done.append(result)
        self._puts += len(commits)
        return done

    def _seal_journaled(self, saves: Sequence[JournaledSave]) -> list[Saved | Commit]:
        """Per save: the commit that stores it, or `Saved` (not stored) if it equals its
        head or its predecessor in the batch."""
        made: dict[tuple[str, str], tuple[bytes, VersionInfo, tuple[bytes, ...]]] = {}
        out: list[Saved | Commit] = []
        for save in saves:
            self._check_address(save.address, writing=True)
            self._check_role(save.role)
            ctx = (save.address.key, save.role)
            result: Saved | Commit
            if ctx in made:  # its predecessor is in this batch: it builds on that
                data, record, leaves = made[ctx]
                if data == save.data:
                    result = Saved(record, stored=False)
                else:
                    result = self._seal_on(save, (record.version_id,), leaves)
            elif (head := self._same_as_head(*ctx, save.data)) is not None:
                result, leaves = Saved(head, stored=False), (head.version_id,)
            else:
                parents, leaves = self._leaves(*ctx)
                result = self._seal_on(
                    save, parents if save.based_on is None else save.based_on, leaves
                )
            if isinstance(result, Commit):
                record = result.record
                leaves = (*(v for v in leaves if v not in record.parents), record.version_id)
            else:
                record = result.info
            made[ctx] = (save.data, record, leaves)
            out.append(result)
        return out

    def _seal_on(
        self, save: JournaledSave, parents: tuple[bytes, ...], leaves: tuple[bytes, ...]
    ) -> Commit:
        return self._seal(
            save.address.key, save.role, save.data, parents, leaves, deleted=False, expires_ms=None
        )

    def delete(self, address: Address, role: str, *, wait: bool = True) -> VersionInfo:
        """Store a deletion (tombstone); history stays. NotFound if nothing live is there.

        `wait` as for `put`.
        """
        self._check_address(address, writing=True)
        self._check_role(role)
        head = self._store.head(address.key, role)
        if head is None or head.deleted:
            raise NotFound(f"no context at {address} for role {role!r}")
        return self._write(address.key, role, b"", deleted=True, expires_ms=None, wait=wait).info

    def writer(self, *, wait: bool = True) -> contextlib.AbstractContextManager[None]:
        """The locks every commit into this store holds (`_writer`): local saves and
        `slurpfs.ingest` take turns through them."""
        return self._writer(wait=wait)

    def record_replicated(self, records: Sequence[VersionInfo], origin: str) -> None:
        """Audit versions another node wrote that came in from `origin` (a peer)."""
        for record in records:
            self._audit.record(
                who=f"node:{record.author.hex()[:16]}",
                action="replicate",
                address=record.address,
                role=record.role,
                allowed=True,
                reason=f"version {record.short_id} from {origin}",
            )

    def committed(
        self,
        records: Sequence[VersionInfo],
        data: Sequence[bytes] = (),
        *,
        write_through: bool = False,
    ) -> None:
        """Versions another path of this process stored (`slurpfs.ingest`, the commit
        worker): the subscribers hear of them as of a local save, and `data` (their
        plaintexts, if given, in the same order) goes to the plaintext cache. With
        `write_through` (saves of this node that another process sealed) their
        envelopes go to the envelope tier, as a save here sends its own."""
        for record, plaintext in zip(records, data, strict=False):
            self._cache.put(record.version_id, plaintext)
        if write_through and self.envelopes is not None:
            stored = [(r.version_id, self._store.read_version(r.version_id)) for r in records]
            self.envelopes.put_many([(vid, s.envelope) for vid, s in stored if s is not None])
        for record in records:
            for callback in self._subscribers:
                callback(record)

    @contextlib.contextmanager
    def _writer(self, *, wait: bool = True) -> Iterator[None]:
        """Hold this process's write lock and the store's writer lock (`WriterBusy`
        at once, if not `wait` and either is taken)."""
        if not self._write_lock.acquire(blocking=wait):
            raise WriterBusy
        try:
            if not self._store.writer.acquire(blocking=wait):
                raise WriterBusy
            try:
                yield
            finally:
                self._store.writer.release()
        finally:
            self._write_lock.release()

    def _write(
        self,
        address: str,
        role: str,
        data: bytes,
        *,
        deleted: bool,
        expires_ms: int | None,
        extra_parents: Sequence[bytes] = (),
        wait: bool = True,
        keep_same: bool = False,
        journal: bytes | None = None,
        based_on: tuple[bytes, ...] | None = None,
    ) -> Saved:
        """Seal and commit one version; with `keep_same`, none if `_same_as_head`."""
        same: list[VersionInfo] = []

        def seal() -> list[Commit]:
            head = self._same_as_head(address, role, data) if keep_same else None
            if head is not None:
                same[:] = [head]
                return []
            parents, expected = self._leaves(address, role)
            if based_on is not None:
                parents = based_on
            return [
                self._seal(
                    address, role, data, parents + tuple(extra_parents), expected,
                    deleted=deleted, expires_ms=expires_ms,
                )
            ]  # fmt: skip

        with self._writer(wait=wait):
            commits = self._commit_retrying(seal, f"{address} [{role}]", journal=journal)
        if not commits:
            return Saved(same[0], stored=False)
        self._write_through(commits)
        record = commits[0].record
        if not deleted:
            self._cache.put(record.version_id, data)
        for callback in self._subscribers:
            callback(record)
        return Saved(record, stored=True)

    def _write_through(self, commits: Sequence[Commit]) -> None:
        """Committed envelopes to the envelope tier (it never raises for an outage)."""
        if self.envelopes is not None:
            self.envelopes.put_many([(c.record.version_id, c.envelope) for c in commits])

    def _same_as_head(self, address: str, role: str, data: bytes) -> VersionInfo | None:
        """The head, if a save of `data` would change nothing: it is the only leaf,
        no deletion, without a TTL, and holds exactly `data` (compared in plaintext,
        with a key this node holds; without one the save is stored)."""
        leaves = self._store.leaves(address, role)
        if len(leaves) != 1:
            return None
        head = leaves[0]
        if head.deleted or head.size != len(data):
            return None
        if self._store.head(address, role, now_ms=_END_OF_TIME_MS) is None:
            return None  # the context has a TTL; a save without one makes it permanent
        try:
            current = self._decrypt(head, self.held_roles(), keep=False)
        except (AccessDenied, Corrupt):
            return None  # no key here, or a damaged head (reported): store the save
        return head if hmac.compare_digest(current, data) else None

    def reader_set(self, role: str) -> tuple[RolePublicKey, ...]:
        """The current public keys a new version of `role` is sealed to."""
        return env.distinct_readers(
            [self.keyring.current_public(r) for r in self.config.readers_of(role)]
        )

    def _leaves(self, address: str, role: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """The parent of a new version of (address, role), which is its head, and the
        leaves the new version replaces; the clock moves past every leaf, but past a
        leaf another node stamped at most `max_clock_ahead_ms` ahead of the wall
        clock (`_stamp` still orders the new version after it)."""
        leaves = self._store.leaves(address, role)
        me = self.keyring.node.node_id
        limit = (int(time.time() * 1000) + self.max_clock_ahead_ms) << hlc.LOGICAL_BITS
        for leaf in leaves:
            self._clock.observe(leaf.hlc if leaf.author == me else min(leaf.hlc, limit))
        return ((leaves[0].version_id,) if leaves else ()), tuple(v.version_id for v in leaves)

    def _stamp(self, leaves: Sequence[bytes]) -> int:
        """The HLC of a version replacing `leaves`: the clock's, or just past the newest
        leaf when that one is further ahead (a peer's fast clock): the version comes
        after what it replaces, and the clock itself stays where it was."""
        stamp = self._clock.now()
        newest = max((r.hlc for r in map(self._store.record, leaves) if r is not None), default=0)
        return stamp if stamp > newest else newest + 1

    def _commit_retrying(
        self, seal: Callable[[], list[Commit]], what: str, *, journal: bytes | None = None
    ) -> list[Commit]:
        """Commit what `seal` makes on the leaves of now, and return it.

        Writers take turns (`Store.writer`), but a version stored by another path (a
        replica, a writer of an older slurpfs) can still move the leaves between
        reading and committing (`StaleHead`): then seal again on the new leaves, after
        a random moment, so two busy writers do not overtake each other in lockstep.
        """
        for attempt in range(_COMMIT_RETRIES):
            if attempt:
                time.sleep(random.random() * _RETRY_BACKOFF * min(attempt, 20))
            commits = seal()
            try:
                if commits:
                    self._store.commit(commits, journal=journal)
            except StaleHead:
                continue
            return commits
        raise Busy(f"{what}: gave up after {_COMMIT_RETRIES} concurrent commits")

    def _seal(
        self,
        address: str,
        role: str,
        data: bytes,
        parents: tuple[bytes, ...],
        expected: tuple[bytes, ...],
        *,
        deleted: bool,
        expires_ms: int | None,
    ) -> Commit:
        """Seal one new version on `parents`, to commit if the leaves are still `expected`."""
        readers = self.reader_set(role)
        stamp = self._stamp(expected)
        with self.crypto_latency.time("seal"):
            sealed = env.seal(
                data,
                address=address,
                role=role,
                parents=parents,
                hlc=stamp,
                deleted=deleted,
                readers=readers,
                node=self.keyring.node,
                prepared=None if self.key_pool is None else self.key_pool.take(readers),
            )
        local_slots = self._local.wrap(
            self.keyring,
            sealed.data_key,
            sealed.version_id,
            [(pub.role, pub.generation) for pub in readers],
        )
        record = VersionRecord(
            version_id=sealed.version_id,
            address=address,
            role=role,
            parents=parents,
            hlc=stamp,
            author=self.keyring.node.node_id,
            size=len(data),
            deleted=deleted,
        )
        return Commit(
            record,
            sealed.encoded,
            sealed.slots,
            expected_leaves=expected,
            expires_ms=expires_ms,
            local_slots=local_slots,
            verified=local.verified_tag(self._verify_key, sealed.version_id),
        )

    def put_many(self, items: Iterable[BatchItem]) -> BatchReport:
        """Store many contexts in one transaction; bad items are reported, not fatal.

        As with `put`, each new version is sealed on the leaves it replaces; when
        another process commits to one of those contexts first (`StaleHead`), the
        batch is sealed again on the new heads, so concurrent writers never fork a
        context's history. An item whose bytes equal its context's head stores
        nothing (see `save`) and is reported as unchanged.
        """
        batch = list(items)
        failed: list[tuple[str, str]] = []
        unchanged: list[str] = []

        def seal() -> list[Commit]:
            commits, bad, same = self._seal_batch(batch)
            failed[:] = bad
            unchanged[:] = same
            return commits

        with self._writer():
            commits = self._commit_retrying(seal, f"a batch of {len(batch)}")
        self._write_through(commits)
        for commit in commits:
            for callback in self._subscribers:
                callback(commit.record)
        self._puts += len(commits)
        return BatchReport(tuple(c.record for c in commits), tuple(failed), tuple(unchanged))

    def _seal_batch(
        self, items: Sequence[BatchItem]
    ) -> tuple[list[Commit], list[tuple[str, str]], list[str]]:
        """Seal every good item on its context's current leaves (or on the batch's own
        previous version of it); the bad ones, labelled, with why; the labels of the
        items equal to their head (nothing to seal)."""
        failed: list[tuple[str, str]] = []
        unchanged: list[str] = []
        heads: dict[tuple[str, str], bytes] = {}
        commits: list[Commit] = []
        for item in items:
            label = item.label or f"{item.address} [{item.role}]"
            try:
                self._check_address(item.address, writing=True)
                self._check_role(item.role)
                if len(item.data) > self.config.store.max_context_bytes:
                    raise ContextTooLarge(f"{len(item.data)} bytes is over store.max_context_bytes")
                ctx = (item.address.key, item.role)
                parents: tuple[bytes, ...]
                expected: tuple[bytes, ...]
                if ctx in heads:  # written earlier in this batch
                    parents = expected = (heads[ctx],)
                elif self._same_as_head(*ctx, item.data) is not None:
                    unchanged.append(label)
                    continue
                else:
                    parents, expected = self._leaves(*ctx)
                commit = self._seal(
                    ctx[0], item.role, item.data, parents, expected, deleted=False, expires_ms=None
                )
            except SlurpError as exc:
                failed.append((label, str(exc)))
                continue
            heads[ctx] = commit.record.version_id
            commits.append(commit)
        return commits, failed, unchanged

    def resolve_conflict(self, address: Address, role: str, version_id: bytes) -> VersionInfo:
        """Drop a losing leaf: a merge version (content of the head) with both as parents."""
        leaves = self._store.leaves(address.key, role)
        losers = [leaf for leaf in leaves[1:] if leaf.version_id == version_id]
        if not losers:
            raise NotFound(f"no conflict {version_id.hex()[:16]} at {address} for role {role!r}")
        head = leaves[0]
        data = b"" if head.deleted else self._decrypt(head, self.held_roles())
        return self._write(
            address.key,
            role,
            data,
            deleted=head.deleted,
            expires_ms=None,
            extra_parents=(version_id,),
        ).info

    def commit_merge(
        self,
        address: str,
        role: str,
        data: bytes,
        parents: Sequence[bytes],
        leaves: Sequence[bytes],
    ) -> VersionInfo:
        """Seal `data` as one version of (address key, role) whose parents are exactly
        `parents`: two or more of the context's `leaves`, its head among them (the
        merge `slurpfs.net.merge` computed from those leaves).

        `StaleHead` (nothing written) if the context's leaves are no longer `leaves`;
        `ValueError` if `parents` are not such leaves. The version keeps the context's
        TTL, and orders after every leaf (it is the new head).
        """
        with self._writer():
            current = self._store.leaves(address, role)
            ids = [leaf.version_id for leaf in current]
            if set(ids) != set(leaves):
                raise StaleHead(f"{address} [{role}] changed while it was merged")
            if len(set(parents)) < 2 or not set(parents) <= set(ids) or ids[0] not in parents:
                raise ValueError("a merge's parents are two or more leaves, the head among them")
            for leaf in current:
                self._clock.observe(leaf.hlc)
            commit = self._seal(
                address, role, data, tuple(parents), tuple(ids),
                deleted=False, expires_ms=self._store.expiry(address, role),
            )  # fmt: skip
            self._store.commit([commit])
        self._write_through([commit])
        self._cache.put(commit.record.version_id, data)
        for callback in self._subscribers:
            callback(commit.record)
        return commit.record

    def mkdir(self, address: Address) -> None:
        self._check_address(address, writing=True)
        if self._store.is_dir(address.key):
            raise AlreadyExists(f"{address} exists")
        self._store.mkdir(address.key)

    def rmdir(self, address: Address) -> None:
        self._check_address(address, writing=True)
        self._store.rmdir(address.key)

    def expire(
        self, now: float | None = None, *, purged: list[tuple[str, str]] | None = None
    ) -> int:
        """TTL cleanup pass: purge every context whose TTL has passed. Returns versions
        removed; each purged (address key, role) is appended to `purged` if given."""
        now_ms = int((time.time() if now is None else now) * 1000)
        removed = 0
        for address, role in self._store.expired(now_ms):
            for leaf in self._store.history(address, role):
                self._cache.discard(leaf.version_id)
            removed += self._store.purge(address, role)
            if purged is not None:
                purged.append((address, role))
        return removed

    def rotate_role(self, role: str, announce: Callable[[], None] | None = None) -> RotationReport:
        """Move `role` to a new key generation and destroy the old private key.

        Every version sealed to the old generation gets a slot for the new one and
        loses the old one, one version per transaction, so reads keep working
        throughout. Content is not re-encrypted. Each re-wrap is a change in the
        change log, so a cluster's replication carries the new slots to its peers.
        `announce` runs once the new generation exists and before any re-wrap
        (a cluster publishes the new public key and grants the new private key to
        the role's holders then, so the peers know the key before its slots reach
        them). A mount on this data directory seals to the old generation until
        it reloads its keys (a clustered mount does when told the log changed).
        """
        self._check_role(role)
        with self._writer():
            new, old = self._keystore.rotate(role)
            self.keyring = self._keystore.load()
            if announce is not None:
                announce()
            rewrapped = 0
            if old is not None:
                for vid in self._store.versions_sealed_to(role, old.generation):
                    slots = [
                        s
                        for s in self._store.slots(vid)
                        if (s.role, s.generation) == (role, old.generation)
                    ]
                    data_key = env.unwrap_data_key(slots, self.keyring)
                    self._store.replace_slots(
                        vid,
                        [env.wrap_data_key(data_key, new.public)],
                        [(role, old.generation)],
                        add_local=self._local.wrap(
                            self.keyring, data_key, vid, [(role, new.generation)]
                        ),
                    )
                    rewrapped += 1
                self._keystore.destroy_generation(role, old.generation)
                self._local.forget(role, old.generation)
                self.keyring = self._keystore.load()
            if self.key_pool is not None:
                self.key_pool.clear()  # keys sealed to the old generation
        return RotationReport(
            role, None if old is None else old.generation, new.generation, rewrapped
        )

    def complete_rotations(self) -> int:
        """Give every version sealed to an older generation of a role, and not to
        its newest, a slot for the newest, where this node holds the older key.

        A rotation re-wraps what the rotating node holds; a version another node
        sealed to the old generation before it heard of the rotation reaches the
        rotating node sealed to a key it destroyed. A node that still holds that
        generation (a holder granted both) completes it, adding (not replacing)
        the slot; each is a change, so it replicates. Returns the versions re-wrapped.
        """
        done = 0
        with self._writer():
            ring = self.keyring
            for role in sorted(ring.roles()):
                newest = ring.current_public(role)
                for generation in ring.generations(role)[:-1]:
                    if ring.private(role, generation) is not None:
                        done += self._complete(role, generation, newest)
        return done

    def _complete(self, role: str, generation: int, newest: RolePublicKey) -> int:
        done = 0
        for vid in self._store.versions_sealed_to(role, generation):
            slots = self._store.slots(vid)
            if any((s.role, s.generation) == (role, newest.generation) for s in slots):
                continue
            old = [s for s in slots if (s.role, s.generation) == (role, generation)]
            try:
                data_key = env.unwrap_data_key(old, self.keyring)
            except WrongKey as exc:  # (fsck reports the version; nothing to re-wrap)
                log.warning("version %s: not re-wrapped for %s: %s", vid.hex()[:16], role, exc)
                continue
            self._store.replace_slots(vid, [env.wrap_data_key(data_key, newest)], ())
            done += 1
        return done

    # -- reading ---------------------------------------------------------------

    def stat(self, address: Address, role: str) -> VersionInfo:
        """Metadata of the version the address (and its temporal segment) selects."""
        self._check_address(address, writing=False)
        self._check_role(role)
        info = self._select(address, role)
        self._check_filed(info, address, role)
        return info

    def _check_filed(self, info: VersionInfo, address: Address, role: str) -> None:
        if (info.address, info.role) != (address.key, role):
            # The index names a version written for another context (a replay): its
            # envelope is authentic, but it must never be served from here.
            self._corrupt += 1
            self._audit.record(
                who="node",
                action="verify",
                address=address.key,
                role=role,
                allowed=False,
                reason=f"version {info.short_id} belongs to another context",
            )
            raise EnvelopeMisplaced(
                f"version {info.short_id} of {info.address} [{info.role}]"
                f" is filed under {address.key} [{role}]"
            )

    def _select(self, address: Address, role: str) -> VersionInfo:
        key = address.key
        t = address.temporal
        missing = NotFound(f"no context at {address} for role {role!r}")
        if t is None or t.kind is TemporalKind.LATEST:
            # An expired context is gone at once, before the daemon's cleanup purges
            # it (and with no daemon at all).
            head = self._store.head(key, role, now_ms=int(time.time() * 1000))
            if head is None or head.deleted:
                raise missing
            return head
        every = self._store.history(key, role)
        if t.kind is TemporalKind.AT:
            assert t.at is not None
            limit = hlc.from_datetime(t.at)
            before = [v for v in every if v.hlc <= limit]
            if not before or before[-1].deleted:
                raise missing
            return before[-1]
        content = [v for v in every if not v.deleted]
        index = {
            TemporalKind.FIRST: 0,
            TemporalKind.FORWARD: t.n,
            TemporalKind.BACK: len(content) - 1 - t.n,
        }[t.kind]
        if not 0 <= index < len(content):
            raise NotFound(f"{address}: {role!r} has {len(content)} versions")
        return content[index]

    def get(
        self,
        address: Address,
        role: str,
        caller_roles: Collection[str] | None = None,
        *,
        who: str = "local",
    ) -> Context:
        """The decrypted version the address selects. AccessDenied/KeyMissing/Corrupt/NotFound."""
        with self.latency.time("get"):
            return self._get(address, role, caller_roles, who)

    def _get(
        self, address: Address, role: str, caller_roles: Collection[str] | None, who: str
    ) -> Context:
        stored: StoredVersion | None = None
        if address.temporal is None:
            # The hot path: head record and its envelope in one read transaction,
            # skipping the envelope when the plaintext is cached.
            self._check_address(address, writing=False)
            self._check_role(role)
            found = self._store.read_head(
                address.key,
                role,
                load=lambda r: not self._cache.contains(r.version_id),
                now_ms=int(time.time() * 1000),
            )
            if found is None or found[0].deleted:
                raise NotFound(f"no context at {address} for role {role!r}")
            info, stored = found
            self._check_filed(info, address, role)
        else:
            info = self.stat(address, role)
        usable = self._authorise(info.address, role, caller_roles, who, "read")
        return Context(info, self._decrypt(info, usable, stored))

    def authorise_read(
        self,
        address: Address,
        role: str,
        caller_roles: Collection[str] | None = None,
        *,
        who: str = "local",
    ) -> None:
        """Decide (and audit) whether the caller may read `role` at `address`, reading nothing.

        For a reader that already holds the plaintext of the current version (the
        kernel's page cache of a mounted file): the same decision `get` makes, with
        the same audit entry, without the envelope. AccessDenied/KeyMissing.
        """
        self._check_role(role)
        self._authorise(address.key, role, caller_roles, who, "read")

    def authorise_change(
        self,
        address: str,
        role: str,
        caller_roles: Collection[str] | None = None,
        *,
        who: str = "local",
        action: str = "write",
    ) -> None:
        """Decide (and audit) whether the caller may change `role` at address key `address`.

        A mount's caller must be able to read the role here (`readable_roles`): a role
        file is opened whole. The node itself (`caller_roles` None: the command line)
        writes for any role, as the envelope allows (public keys only). `action` names
        the change in the audit log (write, delete, rename, resolve). AccessDenied.
        """
        self._check_role(role)
        allowed = caller_roles is None or role in self.readable_roles(caller_roles)
        self._audit.record(
            who=who,
            action=action,
            address=address,
            role=role,
            allowed=allowed,
            reason="" if allowed else "caller cannot read the role on this node",
        )
        if not allowed:
            self._denied += 1
            raise AccessDenied(f"{who} may not {action} {role!r} contexts on this node")

    def get_version(
        self,
        address: Address,
        role: str,
        version_id: bytes,
        caller_roles: Collection[str] | None = None,
        *,
        who: str = "local",
    ) -> Context:
        self._check_role(role)
        info = self._store.record(version_id)
        if info is None or info.address != address.key or info.role != role:
            raise NotFound(f"no version {version_id.hex()[:16]} of {address} for role {role!r}")
        usable = self._authorise(info.address, role, caller_roles, who, "read")
        return Context(info, b"" if info.deleted else self._decrypt(info, usable))

    def node_read(self, info: VersionInfo) -> bytes:
        """The content of a version for the node's own work (the indexer).

        No caller, so no access decision and no audit entry; opened with any role
        key the node holds and checked as every read is (a failure is audited).
        Read from the plaintext cache when there (a version just written is), but
        not added to it: one pass over the store must not evict what callers read.
        """
        if info.deleted:
            return b""
        return self._decrypt(info, self.held_roles(), keep=False)

    def _decrypt(
        self,
        info: VersionInfo,
        usable: frozenset[str],
        stored: StoredVersion | None = None,
        *,
        keep: bool = True,
    ) -> bytes:
        cached = self._cache.get(info.version_id)
        if cached is not None:
            return cached
        remote = False
        if stored is None:
            stored = self._store.read_version(info.version_id) or self._tier_read(info)
        if stored is None:
            stored, remote = self._remote_read(info), True
        try:
            with self.crypto_latency.time("open"):
                data = self._open(info, usable, stored)
        except Corrupt:
            self._corrupt += 1
            self._audit.record(
                who="node",
                action="verify",
                address=info.address,
                role=info.role,
                allowed=False,
                reason=f"version {info.short_id} failed authentication",
            )
            raise
        if remote:
            self._keep_fetched(info, stored.envelope)
        if keep:
            self._cache.put(info.version_id, data)
            self._gets += 1
        return data

    def is_local(self, version_id: bytes) -> bool:
        """True if reading the version needs no other member: its plaintext is cached
        or its body held here (else the read may wait for a holder: not on a loop)."""
        return self._cache.contains(version_id) or self._store.has_body(version_id)

    def _remote_read(self, info: VersionInfo) -> StoredVersion:
        """A body this node does not hold (a stub here), from its holders through
        `fetch_body`; verified by `_open` like any envelope (no fast path)."""
        if self._store.stub(info.version_id) is None:
            self._corrupt += 1
            raise Corrupt(f"version {info.short_id} of {info.address} is missing its envelope")
        if self.fetch_body is None:
            raise BodyUnavailable(
                f"version {info.short_id} of {info.address}: its body is held by other"
                " members; read it through a mount of this node (its replication worker"
                " fetches it)"
            )
        body = self.fetch_body(info)
        return StoredVersion(body, self._store.slots(info.version_id), [], None)

    def _keep_fetched(self, info: VersionInfo, body: bytes) -> None:
        """Keep a fetched, verified body as a cache (never counted as a copy), and in
        the Redis tier when there is one (the next node that lacks it reads it there)."""
        if self.envelopes is not None:
            self.envelopes.put(info.version_id, body)
        try:
            self._store.put_body(info.version_id, body, cache=True)
            if self._store.body_count()[1] > BODY_CACHE_VERSIONS:
                self.caches_evicted += self._store.evict_caches(BODY_CACHE_VERSIONS * 9 // 10)
        except SlurpError as exc:
            log.warning("version %s: the fetched body was not kept: %s", info.short_id, exc)

    def _tier_read(self, info: VersionInfo) -> StoredVersion | None:
        """A body the store lacks, from the envelope tier, with the store's key slots.

        Checked like any other (the tier checks the id hash, `_open` the signature and
        the AEAD); without the local fast paths, so the signature is verified."""
        if self.envelopes is None:
            return None
        body = self.envelopes.get(info.version_id)
        if body is None:
            return None
        log.debug("version %s: body read from the envelope tier", info.short_id)
        return StoredVersion(body, self._store.slots(info.version_id), [], None)

    def _open(self, info: VersionInfo, usable: frozenset[str], stored: StoredVersion) -> bytes:
        """Check `stored` against `info` and decrypt it with a key of `usable`. Corrupt."""
        envelope = env.Envelope.decode(stored.envelope)
        self._check_matches(envelope, info)
        h = envelope.header
        # A version this node verified when it entered the store carries a tag
        # only this node can make; the signature check is then already done.
        if not (
            local.tag_matches(self._verify_key, info.version_id, stored.verified)
            and (h.address, h.role) == (info.address, info.role)
        ):
            env.verify(envelope, address=info.address, role=info.role, keyring=self.keyring)
        slots = [s for s in stored.slots if s.role in usable]
        try:
            data_key = self._local.unwrap(
                self.keyring, info.version_id, stored.local_slots, usable
            ) or env.unwrap_data_key(slots, self.keyring)
        except KeyMissing:
            if not self._reload_for(slots):
                raise
            data_key = env.unwrap_data_key(slots, self.keyring)
        return env.decrypt(envelope, data_key)

    def _reload_for(self, slots: Sequence[env.KeySlot]) -> bool:
        """A version sealed only to role generations this keyring has not loaded (a
        rotation elsewhere, whose grant reached the keystore on disk before this process
        read it again): read the keys again, once per generation. True if it did."""
        wanted = {(s.role, s.generation) for s in slots} - self._reloaded_for
        if not wanted:
            return False
        self._reloaded_for |= wanted
        self.reload_keyring()
        return True

    @staticmethod
    def _check_matches(envelope: env.Envelope, info: VersionInfo) -> None:
        h = envelope.header
        if (h.hlc, h.size, h.deleted, h.author, tuple(h.parents)) != (
            info.hlc,
            info.size,
            info.deleted,
            info.author,
            info.parents,
        ):
            raise Corrupt(f"version {info.short_id}: metadata disagrees with its signed header")
        if envelope.version_id != info.version_id:
            raise Corrupt(f"version {info.short_id}: envelope does not hash to its id")

    def history(self, address: Address, role: str) -> tuple[VersionInfo, ...]:
        """Content versions (not deletions), oldest first: `.history/<role>/<n>` is [n-1]."""
        self._check_role(role)
        return tuple(v for v in self._store.history(address.key, role) if not v.deleted)

    def all_versions(self, address: Address, role: str) -> tuple[VersionInfo, ...]:
        """Every version, deletions included, oldest first."""
        self._check_role(role)
        return tuple(self._store.history(address.key, role))

    def conflicts(self, address: Address, role: str) -> tuple[VersionInfo, ...]:
        return tuple(v for v in self._store.leaves(address.key, role)[1:] if not v.deleted)

    def is_dir(self, address: Address) -> bool:
        return self._store.is_dir(address.key)

    def list_dir(self, address: Address | None) -> Listing:
        """Subdirectories, live roles and conflicts; `None` lists the authorities."""
        if address is None:
            return Listing(tuple(self._store.children("")), (), ())
        key = address.key
        if not self._store.is_dir(key):
            raise NotFound(f"no directory {address}")
        roles: list[str] = []
        conflicts: list[tuple[str, VersionInfo]] = []
        for role in self._store.roles_at(key):
            leaves = self._store.leaves(key, role)
            if leaves and not leaves[0].deleted:
                roles.append(role)
            conflicts.extend((role, v) for v in leaves[1:] if not v.deleted)
        return Listing(tuple(self._store.children(key)), tuple(roles), tuple(conflicts))

    def resolve(
        self, address: Address, role: str, caller_roles: Collection[str] | None = None
    ) -> Resolved:
        """Front matter cascaded over the address's ancestors (bounded depth)."""
        chain = [address.without_temporal(), *address.ancestors()][
            : self.config.store.cascade_depth + 1
        ]
        layers: list[frontmatter.FrontMatter] = []
        sources: list[str] = []
        for ancestor in reversed(chain):
            try:
                ctx = self.get(ancestor, role, caller_roles)
            except NotFound:
                continue
            layers.append(ctx.front_matter)
            sources.append(ancestor.key)
        if not sources or sources[-1] != address.key:
            raise NotFound(f"no context at {address} for role {role!r}")
        return Resolved(address.key, role, frontmatter.cascade(layers), tuple(sources))

    def changes_since(self, seq: int) -> tuple[int, list[tuple[str, str]]]:
        """(new sequence, [(address key, role)]) committed after `seq`, by any process."""
        last, records = self._store.changes_since(seq)
        return last, [(r.address, r.role) for r in records]

    def statistics(self) -> ModelStatistics:
        return ModelStatistics(
            self._store.statistics(),
            self._cache.statistics(),
            self._puts,
            self._gets,
            self._denied,
            self._corrupt,
            0 if self.key_pool is None else len(self.key_pool),
            0 if self.key_pool is None else self.key_pool.taken,
            0 if self.key_pool is None else self.key_pool.missed,
        )
