"""The one way in for versions made elsewhere: peers, restores.

A local save seals its version itself (`ContextStore.put`); a version that
arrives ready-made (from a peer, from a backup being restored) comes through
`Ingest.accept` instead, so that `ContextStore` stays the local API and every
foreign version meets the same checks, in this order:

1. the envelope parses (`MalformedEnvelope`) and hashes to the id it came
   with (`Corrupt`): versions are content-addressed;
2. its address is a valid UCXL address and its role one this node knows;
3. its author is a trusted node (`UntrustedAuthor`; on a clustered node the
   member log decides who is), the header signature holds (`BadSignature`)
   and the ciphertext matches the signed hash (`CiphertextTampered`); an
   author removed from the cluster stays trusted for what it signed up to its
   cutoff, and a version it stamped later is refused (`RemovedAuthor`);
4. its key slots are sealed to public keys this node knows, each to a reader
   of the version's role (a slot for anyone else would be refused on read);
5. its parents are stored here already, or come earlier in the same batch, or
   were dropped here by the retention policy (`MissingParents`: the sender sends
   ancestors first, so the leaves of a context are always computed from a
   complete graph).

A batch is all or nothing: one failed check refuses the whole batch with
nothing stored. A version already stored is not stored again (content
addressing makes a repeat harmless), but its key slots are merged: a key
rotation re-wraps a version's data key for a new generation without changing
the version (its id hashes the envelope, not the slots), so the slots are the
one part of a version that changes. The rule: a slot for a (role, generation)
this node has no slot for is added once it passes the checks of step 4; a slot
this node has already is kept, never replaced (the one stored opened or was
checked when it came; a different one cannot be told right from forged
without the private key); no slot is ever removed by a peer. A slot for a
generation this node retired (older than the role's newest, its keys gone from
here after a rotation) cannot be checked against a public key and opens
nothing here: it is not merged into a version already stored, and it is stored
as it came with a new version (a version a writer sealed before it heard of the
rotation stays whole, and passes on to the nodes that still hold that
generation, which check it then), its role still checked to be a reader.
A version may come *metadata only* (`Incoming.body` False: a stub in place of
the envelope, sent to a member that is not a holder of its address): the same
checks but the ciphertext hash and the id, which cannot be made without the
body; it is stored as a stub. A whole version for one stored as a stub fills
in its body (checked against the stub and the id; a body that is not the
version's refuses the batch). Accepted versions commit in one store transaction, under the same writer
locks as local saves, with this node's *verified* tag (the
signature need not be checked again on each read). Their HLCs reach the local
clock through the leaves the next local save reads, so a save made after an
ingest orders after what it saw. The model's subscribers (the indexer, the
kernel cache invalidator in a mount) hear of each stored version, as of a
local save.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from slurpfs import ucxl
from slurpfs.crypto import envelope as env
from slurpfs.crypto import local
from slurpfs.errors import Corrupt, InvalidAddress, SlurpError, UntrustedAuthor
from slurpfs.model import ContextStore
from slurpfs.store import Commit, VersionRecord

__all__ = ["Incoming", "Ingest", "IngestReport", "MissingParents", "RemovedAuthor"]


class MissingParents(SlurpError):
    """A version names parents this node does not hold (send the ancestors first)."""

    def __init__(self, message: str, missing: tuple[bytes, ...]) -> None:
        super().__init__(message)
        self.missing = missing


class RemovedAuthor(UntrustedAuthor):
    """The version's author was removed from the cluster before it stamped it."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """One version as it travels: its id, envelope and key slots, and the expiry
    (ms since the epoch) its context had where it came from (None: no TTL), so
    that a context's TTL replicates with its versions."""

    version_id: bytes
    envelope: bytes  # with `body` False: the version's stub (`env.Stub`)
    slots: Sequence[env.KeySlot]
    expires_ms: int | None = None
    body: bool = True  # False: metadata only, the body is held by the address's holders


@dataclass(frozen=True, slots=True)
class IngestReport:
    stored: tuple[VersionRecord, ...]  # new here, in the order given
    known: int  # already stored: skipped
    sequence: int  # the store's change sequence after the commit
    reslotted: tuple[bytes, ...] = ()  # already stored, gained key slots (a rotation)
    numbers: tuple[int, ...] = ()  # each stored version's number in the change log
    bodies: tuple[bytes, ...] = ()  # stored as stubs before, their bodies held now


class Ingest:
    """Checks and commits foreign versions into one node's store (module docstring)."""

    def __init__(
        self, model: ContextStore, removed: Callable[[], Mapping[bytes, int]] = dict
    ) -> None:
        """`removed` gives the cluster's removed authors and their cutoff HLCs
        (`Cluster.removed`; none on a node without a cluster)."""
        self.model = model
        self._removed = removed

    def accept(self, items: Sequence[Incoming], *, origin: str = "") -> IngestReport:
        """Check every version of `items`, then commit the new ones in one transaction.

        `origin` names where they came from (``peer:<node id prefix>``): each stored
        version is recorded in the audit log as a ``replicate`` entry.
        Raises (nothing stored): `Corrupt` and its subclasses for a version that
        fails a check, `MissingParents`, `StoreFull`.
        """
        store = self.model.store
        verify_key = local.verify_key(self.model.keyring.node)
        with self.model.writer():
            fresh = [item for item in items if store.record(item.version_id) is None]
            fresh_ids = {item.version_id for item in fresh}
            added = self._slots_to_merge([i for i in items if i.version_id not in fresh_ids])
            batch: dict[bytes, VersionRecord] = {}
            commits: list[Commit] = []
            for item in fresh:
                if item.version_id in batch:
                    continue
                record = self._check(item, batch)
                batch[record.version_id] = record
                commits.append(
                    Commit(
                        record,
                        item.envelope,
                        tuple(item.slots),
                        expires_ms=item.expires_ms,
                        verified=local.verified_tag(verify_key, record.version_id),
                        stub=not item.body,
                    )
                )
            bodies = self._bodies_to_hold([i for i in items if i.version_id not in fresh_ids])
            sequence = store.commit(commits) if commits else store.sequence()
            numbers = tuple(range(sequence - len(commits) + 1, sequence + 1))
            for version_id, slots in added.items():
                sequence = store.replace_slots(version_id, slots, ())
            for version_id, envelope in bodies.items():
                store.put_body(version_id, envelope, cache=False)
        stored = tuple(c.record for c in commits)
        if origin:
            self.model.record_replicated(stored, origin)
        self.model.committed(stored)
        return IngestReport(
            stored, len(items) - len(fresh), sequence, tuple(added), numbers, tuple(bodies)
        )

    def _bodies_to_hold(self, known: Sequence[Incoming]) -> dict[bytes, bytes]:
        """The bodies that came for versions stored here as stubs, checked against
        their stubs (`Corrupt` for one that is not the version's: the batch is refused)."""
        store = self.model.store
        out: dict[bytes, bytes] = {}
        for item in known:
            if not item.body or item.version_id in out or store.has_body(item.version_id):
                continue
            stub = store.stub(item.version_id)
            short = item.version_id.hex()[:16]
            if stub is None:
                raise Corrupt(f"version {short}: stored without a body or a stub")
            body = env.Envelope.decode(item.envelope)
            if not env.Stub.decode(stub).matches(body, item.version_id):
                raise Corrupt(f"version {short}: a body that is not the version's")
            out[item.version_id] = item.envelope
        return out

    def _slots_to_merge(self, known: Sequence[Incoming]) -> dict[bytes, list[env.KeySlot]]:
        """The slots of already stored versions that this node lacks, checked
        (module docstring: the slot-merge rule)."""
        store = self.model.store
        added: dict[bytes, list[env.KeySlot]] = {}
        for item in known:
            record = store.record(item.version_id)
            assert record is not None  # (known: stored, and the writer lock is held)
            have = {(s.role, s.generation) for s in store.slots(item.version_id)}
            have.update((s.role, s.generation) for s in added.get(item.version_id, ()))
            new = [s for s in self._usable_slots(item.slots) if (s.role, s.generation) not in have]
            if new:
                self._check_slots(new, record.role, item.version_id.hex()[:16])
                added.setdefault(item.version_id, []).extend(new)
        return added

    def _usable_slots(self, slots: Sequence[env.KeySlot]) -> tuple[env.KeySlot, ...]:
        """`slots` without those of generations this node retired."""
        return tuple(s for s in slots if not self._retired(s))

    def _retired(self, slot: env.KeySlot) -> bool:
        """A slot of a generation older than the role's newest and no longer known
        here (its keys were destroyed after a rotation)."""
        keyring = self.model.keyring
        return keyring.public(slot.role, slot.generation) is None and slot.generation < max(
            keyring.generations(slot.role), default=0
        )

    def _check(self, item: Incoming, batch: dict[bytes, VersionRecord]) -> VersionRecord:
        short = item.version_id.hex()[:16]
        if item.body:
            envelope = env.Envelope.decode(item.envelope)
            if envelope.version_id != item.version_id:
                raise Corrupt(f"version {short}: the envelope does not hash to its id")
            h = envelope.header
        else:  # metadata only: the id is checked when the body comes (`Store.put_body`)
            stub = env.Stub.decode(item.envelope)
            h = stub.header
        try:
            ucxl.parse("ucxl://" + h.address)
        except InvalidAddress as exc:
            raise Corrupt(f"version {short}: its address is not valid: {exc}") from None
        keyring = self.model.keyring
        if h.role not in keyring.roles():
            raise Corrupt(f"version {short}: role {h.role!r} is not known on this node")
        if item.body:
            env.verify(envelope, address=h.address, role=h.role, keyring=keyring)
        else:
            env.verify_stub(stub, keyring=keyring)
        cutoff = self._removed().get(h.author)
        if cutoff is not None and h.hlc > cutoff:
            raise RemovedAuthor(
                f"version {short} of {h.address} [{h.role}]: its author"
                f" {h.author.hex()[:16]} was removed from the cluster before it stamped it"
                f" (HLC {h.hlc} > cutoff {cutoff})"
            )
        self._check_slots(item.slots, h.role, short)
        missing = tuple(
            p
            for p in h.parents
            if p not in batch
            and self.model.store.record(p) is None
            and not self.model.store.was_dropped(p)  # by the retention policy: gone on purpose
        )
        if missing:
            raise MissingParents(
                f"version {short} of {h.address} [{h.role}] has {len(missing)} parents"
                " this node does not hold",
                missing,
            )
        return VersionRecord(
            version_id=item.version_id,
            address=h.address,
            role=h.role,
            parents=h.parents,
            hlc=h.hlc,
            author=h.author,
            size=h.size,
            deleted=h.deleted,
        )

    def _check_slots(self, slots: Sequence[env.KeySlot], role: str, short: str) -> None:
        keyring = self.model.keyring
        readers = {role, *self.model.config.readers_of(role)}
        for slot in slots:
            if keyring.public(slot.role, slot.generation) is None and not self._retired(slot):
                raise Corrupt(
                    f"version {short}: a key slot for {slot.role!r} generation"
                    f" {slot.generation}, a key this node does not know"
                )
            if slot.role not in readers:
                raise Corrupt(f"version {short}: a key slot for {slot.role!r}, not a reader")
