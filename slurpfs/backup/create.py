"""Making a backup: full, or incremental on the newest backup of the same store.

Everything from the store comes from one LMDB read transaction (a consistent
point while a mount keeps writing); the data directory's files (config, keys)
and the audit log are read beside it. A backup is incremental by the store's
change log: the versions committed after its parent's sequence. It is full when
asked, when the destination holds no backup of this store (another epoch: a
restored or replaced store), or when something a change log cannot carry
changed since the parent (a key rotation re-wraps old versions' key slots; a
new backup key; an audit log shorter than the parent saw).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.public import SealedBox

from slurpfs.backup import catalog
from slurpfs.backup import format as fmt
from slurpfs.backup import keys as backup_keys
from slurpfs.errors import Corrupt, SlurpError
from slurpfs.model import ContextStore, data_paths
from slurpfs.store.lmdb_store import DROPPED_TABLE
from slurpfs.store.snapshot import Snapshot

Progress = Callable[[int, int], None]  # (versions written, versions to write)
LIVE_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class Created:
    id: str
    kind: str  # "full" or "incremental"
    parent: str | None
    why_full: str  # why not incremental ("" when incremental)
    versions: int
    bytes: int
    path: Path


def _private_files(data_dir: Path) -> dict[str, bytes]:
    """What a restore needs beyond the store: the config file and the keystore."""
    out: dict[str, bytes] = {}
    paths = data_paths(data_dir)
    if paths["config"].is_file():
        out["config.toml"] = paths["config"].read_bytes()
    keys = paths["keys"]
    for path in sorted(keys.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            out[str(path.relative_to(data_dir))] = path.read_bytes()
    return out


def _audit_bytes(path: Path, start: int) -> tuple[bytes, int]:
    """The log's whole lines from `start` on, and where they end."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size < start:
                raise Corrupt(
                    f"{path} is shorter than when the last backup was made (cut or replaced):"
                    " make a full backup (--full) after checking it (`slurpfs audit verify`)"
                )
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        if start:
            raise Corrupt(f"{path} is gone since the last backup") from None
        return b"", start
    cut = data.rfind(b"\n") + 1
    return data[:cut], start + cut


def _parent(
    dest: Path, model: ContextStore, epoch: str, key_hex: str
) -> tuple[catalog.Entry | None, str]:
    """The newest backup of this store in `dest` to build on, or None and why."""
    node = model.keyring.node.node_id_hex
    for backup_id in reversed(catalog.ids(dest)):
        entry = catalog.load(dest, backup_id)
        if entry.node != node:
            continue
        m = entry.manifest
        if m["epoch"] != epoch:
            return None, "the newest backup here is of another store (restored or replaced since)"
        if m["backup_key"] != key_hex:
            return None, "the backup key changed since the last backup"
        if m["generations"] != _generations(model):
            return None, "role keys were rotated since the last backup"
        return entry, ""
    return None, "no earlier backup of this node here"


def _generations(model: ContextStore) -> dict[str, int]:
    ring = model.keyring
    return {r: ring.current_public(r).generation for r in sorted(ring.roles())}


def create(
    model: ContextStore,
    dest: Path,
    *,
    full: bool = False,
    progress: Progress | None = None,
    now: dt.datetime | None = None,
) -> Created:
    """Write a new backup of `model`'s data directory into `dest` (see module docstring)."""
    data_dir = model.config.data_dir
    public = backup_keys.load_public(data_dir)
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_hex = bytes(public).hex()
    created = now or dt.datetime.now(dt.UTC)
    backup_id = catalog.new_id(created)
    work = dest / f".{backup_id}{catalog.PARTIAL_SUFFIX}"
    work.mkdir(mode=0o700)
    try:
        files = _private_files(data_dir)
        with model.store.snapshot(aux=(DROPPED_TABLE,)) as snap:
            epoch = (snap.epoch() or b"").hex()
            parent, why = (
                (None, "asked for a full backup") if full else _parent(dest, model, epoch, key_hex)
            )
            data_key = os.urandom(32)
            doc = _write(snap, model, work, backup_id, data_key, parent, files, progress)
        if _private_files(data_dir) != files:
            raise SlurpError(
                "the node's keys changed during the backup (a rotation?): run it again"
            )
        doc.update(
            format=fmt.FORMAT,
            id=backup_id,
            kind="full" if parent is None else "incremental",
            parent=None if parent is None else parent.id,
            created=created.isoformat(),
            node=model.keyring.node.node_id_hex,
            epoch=epoch,
            backup_key=key_hex,
            sealed_key=base64.b64encode(SealedBox(public).encrypt(data_key)).decode(),
            generations=_generations(model),
        )
        return _finish(dest, work, backup_id, doc, model, why if parent is None else "")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _write(
    snap: Snapshot,
    model: ContextStore,
    work: Path,
    backup_id: str,
    data_key: bytes,
    parent: catalog.Entry | None,
    files: dict[str, bytes],
    progress: Progress | None,
) -> dict[str, Any]:
    sequence = snap.sequence()
    after = 0 if parent is None else int(parent.manifest["sequence"])
    if sequence < after:
        raise Corrupt(f"the store is behind its last backup ({sequence} < {after} commits)")
    audit_start = 0 if parent is None else int(parent.manifest["audit"]["end"])
    audit, audit_end = _audit_bytes(data_paths(model.config.data_dir)["audit"], audit_start)
    writer = fmt.FrameWriter(work, backup_id, data_key)
    for name, content in files.items():
        writer.add(fmt.file_record(name, content))
    live = _add_ids(writer, fmt.R_LIVE, snap.live_ids())
    for key in snap.tree():
        writer.add(fmt.record(fmt.R_DIR, key))
    for ctx, expiry in snap.ttls():
        writer.add(fmt.record(fmt.R_TTL, fmt.U64.pack(expiry) + ctx))
    for start in range(0, len(audit), fmt.FRAME_TARGET):
        writer.add(fmt.record(fmt.R_AUDIT, audit[start : start + fmt.FRAME_TARGET]))
    _add_ids(writer, fmt.R_DROPPED, snap.aux_keys(DROPPED_TABLE))
    total = live if parent is None else sequence - after
    written = stored = 0
    for vid in snap.changed(after):
        copy = snap.version(vid)
        writer.add(fmt.version_record(vid, copy.envelope, copy.slots))
        written += 1
        stored += len(copy.envelope)
        if progress is not None and written % 256 == 0:
            progress(written, total)
    if parent is None and written != live:
        raise Corrupt(
            f"the store's change log names {written} of its {live} versions"
            " (`slurpfs fsck` says more)"
        )
    names = writer.close()
    if progress is not None:
        progress(written, total)
    counts = snap.counts()
    return {
        "sequence": sequence,
        "parent_sequence": after,
        "audit": {"start": audit_start, "end": audit_end},
        "counts": {
            "versions": written,
            "live": live,
            "contexts": counts["contexts"],
            "directories": counts["directories"],
            "ttls": counts["ttls"],
            "files": len(files),
            "audit_bytes": len(audit),
        },
        "envelope_bytes": stored,
        "files": [
            {
                "name": name,
                "size": (work / name).stat().st_size,
                "blake2b": fmt.blake2b_file(work / name),
            }
            for name in names
        ],
    }


def _add_ids(writer: fmt.FrameWriter, kind: int, ids: Iterable[bytes]) -> int:
    """Version ids as records of up to 4096; how many."""
    n = 0
    chunk: list[bytes] = []
    for vid in ids:
        chunk.append(vid)
        n += 1
        if len(chunk) == LIVE_CHUNK:
            writer.add(fmt.record(kind, b"".join(chunk)))
            chunk = []
    if chunk:
        writer.add(fmt.record(kind, b"".join(chunk)))
    return n


def _finish(
    dest: Path, work: Path, backup_id: str, doc: dict[str, Any], model: ContextStore, why: str
) -> Created:
    raw = fmt.dump_manifest(doc)
    for name, content in ((fmt.MANIFEST, raw), (fmt.SIGNATURE, model.keyring.node.sign(raw))):
        fd = os.open(work / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    final = dest / backup_id
    os.rename(work, final)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    size = sum(int(f["size"]) for f in doc["files"]) + len(raw) + 64
    return Created(
        backup_id, doc["kind"], doc["parent"], why, doc["counts"]["versions"], size, final
    )
