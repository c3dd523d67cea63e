"""Consistency check of a data directory (`slurpfs fsck`).

Verifies that every head resolves, that leaves are ordered as the head rule
says, that every version's envelope authenticates (signature, ciphertext hash,
metadata agreeing with the signed header, content address) and - with `deep`
and where this node holds a key - decrypts to the recorded size, and that
history, leaves and the address tree agree. Across the whole store: that it is
the store this node sealed and not behind its seal or its audit anchor
(`slurpfs.seal`), and that every role key the node sealed versions with is still
here. Damage the store cannot even be read past is reported, never raised.
Reports problems; repairs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from slurpfs import audit, seal
from slurpfs.crypto import envelope as env
from slurpfs.crypto import local
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import Corrupt
from slurpfs.model import ContextStore, data_paths
from slurpfs.store import StoredVersion, VersionRecord, schema


@dataclass
class FsckReport:
    versions: int = 0
    contexts: int = 0
    directories: int = 0
    decrypted: int = 0
    conflicts: int = 0  # contexts with concurrent heads: not damage, but worth telling
    stubs: int = 0  # versions whose body other members hold (placement): header checked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(model: ContextStore, *, deep: bool = True) -> FsckReport:
    report = FsckReport()
    try:
        records = {r.version_id: r for r in model.store.iter_records()}
    except Corrupt as exc:
        report.problems.append(str(exc))
        return report  # nothing below can be told without the versions
    report.versions = len(records)
    phases: list[Callable[[], None]] = [
        lambda: _check_versions(report, model, records, deep),
        lambda: _check_history(report, model, records),
        lambda: _check_contexts(report, model, records),
        lambda: _check_sealed(report, model),
    ]
    for phase in phases:
        try:
            phase()
        except Corrupt as exc:
            report.problems.append(str(exc))
    return report


def _check_versions(
    report: FsckReport, model: ContextStore, records: dict[bytes, VersionRecord], deep: bool
) -> None:
    store = model.store
    held = model.held_roles()
    locals_ = local.LocalSlots()
    sealed_with: dict[tuple[str, int], int] = {}  # this node's local slots, per role key
    for vid, rec in records.items():
        where = f"version {rec.short_id} ({rec.address} [{rec.role}])"
        stored = store.read_version(vid)
        if stored is None:
            _check_stub(report, model, rec, where)
            continue
        for slot in stored.local_slots:
            key = (slot.role, slot.generation)
            sealed_with[key] = sealed_with.get(key, 0) + 1
        raw, slots = stored.envelope, stored.slots
        try:
            envelope = env.Envelope.decode(raw)
            ContextStore._check_matches(envelope, rec)
            env.verify(envelope, address=rec.address, role=rec.role, keyring=model.keyring)
        except Corrupt as exc:
            report.problems.append(f"{where}: {exc}")
            continue
        slot_roles = {s.role for s in slots}
        missing = set(model.config.readers_of(rec.role)) & model.keyring.roles() - slot_roles
        if rec.role not in slot_roles:
            report.problems.append(f"{where}: no key slot for its own role")
        elif missing:
            report.problems.append(f"{where}: no key slot for reader roles {sorted(missing)}")
        if deep:
            _check_slots(report, where, model, envelope, stored, held, locals_)
        for parent_id in rec.parents:
            if parent_id not in records and not model.store.was_dropped(parent_id):
                report.problems.append(f"{where}: parent {parent_id.hex()[:16]} missing")
    _check_keys(report, model, sealed_with)


def _check_stub(report: FsckReport, model: ContextStore, rec: VersionRecord, where: str) -> None:
    """A version stored without its body (held by other members): its stub must
    parse, carry the author's signature and agree with the record."""
    raw = model.store.stub(rec.version_id)
    if raw is None:
        report.problems.append(f"{where}: envelope missing")
        return
    try:
        stub = env.Stub.decode(raw)
        env.verify_stub(stub, keyring=model.keyring)
    except Corrupt as exc:
        report.problems.append(f"{where}: {exc}")
        return
    h = stub.header
    if (h.address, h.role, h.hlc, h.size, h.deleted, h.author, tuple(h.parents)) != (
        rec.address, rec.role, rec.hlc, rec.size, rec.deleted, rec.author, rec.parents,
    ):  # fmt: skip
        report.problems.append(f"{where}: metadata disagrees with its signed header (stub)")
        return
    report.stubs += 1


def _check_keys(
    report: FsckReport, model: ContextStore, sealed_with: dict[tuple[str, int], int]
) -> None:
    """A role key this node sealed versions with (it wrote local key slots for it)
    must still be here, unless `slurpfs keys drop` destroyed it on purpose."""
    keystore = Keystore(model.config.data_dir, None)
    for (role, generation), count in sorted(sealed_with.items()):
        if model.keyring.private(role, generation) is None and not keystore.was_dropped(
            role, generation
        ):
            report.problems.append(
                f"role {role} generation {generation}: this node held its private key (it"
                f" wrote {count} versions with it), but the key file"
                f" keys/roles/{role}.{generation}.key is missing: those versions cannot be"
                " read here (restore the key file from a backup)"
            )


def _check_history(
    report: FsckReport, model: ContextStore, records: dict[bytes, VersionRecord]
) -> None:
    history_ids: set[bytes] = set()
    for key in model.store.iter_history_keys():
        vid = key[-schema.VERSION_ID_LEN :]
        history_ids.add(vid)
        entry = records.get(vid)
        if entry is None:
            report.problems.append(f"history entry for missing version {vid.hex()[:16]}")
        elif key != schema.history_key(entry.address, entry.role, entry.hlc, entry.author, vid):
            report.problems.append(
                f"version {entry.short_id}: history entry disagrees with its metadata"
            )
    for vid in records.keys() - history_ids:
        report.problems.append(f"version {vid.hex()[:16]}: not in the history index")


def _check_contexts(
    report: FsckReport, model: ContextStore, records: dict[bytes, VersionRecord]
) -> None:
    store = model.store
    dirs = {(parent, child) for parent, child in store.iter_tree()}
    report.directories = len(dirs)
    for parent, _child in dirs:
        if parent:
            grand, _, name = parent.rpartition("/")
            if (grand, name) not in dirs:
                report.problems.append(
                    f"directory {parent!r} is listed under but not itself present"
                )

    has_children = {p for r in records.values() for p in r.parents}
    for address, role, leaf_ids in store.iter_contexts():
        report.contexts += 1
        where = f"{address} [{role}]"
        leaves = [records.get(v) for v in leaf_ids]
        if not leaf_ids or any(leaf is None for leaf in leaves):
            report.problems.append(f"{where}: a leaf does not resolve to a version")
            continue
        known = [leaf for leaf in leaves if leaf is not None]
        if len(known) > 1:
            report.conflicts += 1
        if [leaf.order for leaf in known] != sorted((leaf.order for leaf in known), reverse=True):
            report.problems.append(f"{where}: head is not the greatest (HLC, author) leaf")
        if any(leaf.address != address or leaf.role != role for leaf in known):
            report.problems.append(f"{where}: a leaf belongs to another context")
        up, _, name = address.rpartition("/")
        if not known[0].deleted and (up, name) not in dirs:
            report.problems.append(f"{where}: address directory missing from the tree")
        for leaf in known:
            if leaf.version_id in has_children:
                report.problems.append(f"{where}: leaf {leaf.short_id} has a child version")


def _check_sealed(report: FsckReport, model: ContextStore) -> None:
    """The store against its seal (opening checked epoch and sequence) and the audit
    anchor it holds against the one the seal names: an anchor behind the seal means
    the store was put back to an older copy, even one with no fewer commits."""
    node = model.keyring.node
    state = seal.StoreSeal(
        data_paths(model.config.data_dir)["seal"], seal.SealKey.for_node(node)
    ).read()
    if state is None:
        report.problems.append("the store has no seal (opening it should have made one)")
        return
    raw = model.store.aux_get(audit.ANCHOR_TABLE, audit.ANCHOR_KEY)
    if raw is None:
        if state.anchored:
            report.problems.append(
                f"the store holds no audit anchor, but its seal names entry {state.anchored}:"
                " the anchor was removed or the store put back to an older copy"
            )
        return
    anchored = audit.AuditKeys.for_node(node).open_anchor(raw).seq
    if anchored < state.anchored:
        report.problems.append(
            f"the store's audit anchor names entry {anchored}, but its seal names entry"
            f" {state.anchored}: the store was put back to an older copy"
        )


def _check_slots(
    report: FsckReport,
    where: str,
    model: ContextStore,
    envelope: env.Envelope,
    stored: StoredVersion,
    held: frozenset[str],
    locals_: local.LocalSlots,
) -> None:
    """Every key slot this node can open (SealedBox and local) must open the content."""
    rec_size = envelope.header.size
    opened = 0
    candidates: list[tuple[str, bytes | None]] = []
    for slot in stored.slots:
        if slot.role in held and model.keyring.private(slot.role, slot.generation) is not None:
            try:
                candidates.append(
                    (
                        f"key slot {slot.role}/{slot.generation}",
                        env.unwrap_data_key([slot], model.keyring),
                    )
                )
            except Corrupt as exc:
                report.problems.append(f"{where}: key slot {slot.role}/{slot.generation}: {exc}")
    for slot in stored.local_slots:
        if model.keyring.private(slot.role, slot.generation) is not None:
            key = locals_.unwrap(model.keyring, envelope.version_id, [slot], frozenset({slot.role}))
            candidates.append((f"local key slot {slot.role}/{slot.generation}", key))
    for label, key in candidates:
        if key is None:
            report.problems.append(f"{where}: {label} does not open")
            continue
        try:
            data = env.decrypt(envelope, key)
        except Corrupt as exc:
            report.problems.append(f"{where}: {label}: {exc}")
            continue
        opened += 1
        if len(data) != rec_size:
            report.problems.append(f"{where}: decrypts to {len(data)} bytes, not {rec_size}")
    if opened:
        report.decrypted += 1
