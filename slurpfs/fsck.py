"""Consistency check of a data directory (`slurpfs fsck`).

Verifies that every head resolves, that leaves are ordered as the head rule
says, that every version's envelope authenticates (signature, ciphertext hash,
metadata agreeing with the signed header, content address) and - with `deep`
and where this node holds a key - decrypts to the recorded size, and that
history, leaves and the address tree agree. Reports problems; repairs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slurpfs.crypto import envelope as env
from slurpfs.crypto import local
from slurpfs.errors import Corrupt
from slurpfs.model import ContextStore
from slurpfs.store import StoredVersion, schema


@dataclass
class FsckReport:
    versions: int = 0
    contexts: int = 0
    directories: int = 0
    decrypted: int = 0
    conflicts: int = 0  # contexts with concurrent heads: not damage, but worth telling
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(model: ContextStore, *, deep: bool = True) -> FsckReport:
    store = model.store
    report = FsckReport()
    records = {r.version_id: r for r in store.iter_records()}
    report.versions = len(records)
    held = model.held_roles()
    locals_ = local.LocalSlots()

    for vid, rec in records.items():
        where = f"version {rec.short_id} ({rec.address} [{rec.role}])"
        stored = store.read_version(vid)
        if stored is None:
            report.problems.append(f"{where}: envelope missing")
            continue
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
            if parent_id not in records:
                report.problems.append(f"{where}: parent {parent_id.hex()[:16]} missing")

    history_ids: set[bytes] = set()
    for key in store.iter_history_keys():
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
    return report


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
