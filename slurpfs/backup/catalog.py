"""The backups in a destination directory, their manifests and chains."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from slurpfs.backup import format as fmt
from slurpfs.crypto.keys import verify_signature
from slurpfs.errors import Corrupt, NotFound, SlurpError

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True, slots=True)
class Entry:
    """One backup: its directory and (signature-checked) manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.manifest["id"])

    @property
    def parent(self) -> str | None:
        parent = self.manifest.get("parent")
        return None if parent is None else str(parent)

    @property
    def created(self) -> dt.datetime:
        return dt.datetime.fromisoformat(str(self.manifest["created"]))

    @property
    def node(self) -> str:
        return str(self.manifest["node"])


def new_id(now: dt.datetime) -> str:
    """Ids sort in the order the backups were made."""
    return now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def ids(dest: Path) -> list[str]:
    """Names of the backups in `dest` (directories with a manifest), oldest first."""
    if not dest.is_dir():
        raise NotFound(f"backup destination {dest} is not a directory")
    return sorted(
        p.name
        for p in dest.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / fmt.MANIFEST).exists()
    )


def load(dest: Path, backup_id: str) -> Entry:
    """The backup's manifest, its signature checked (Corrupt naming the file)."""
    path = dest / backup_id
    try:
        raw = (path / fmt.MANIFEST).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no backup {backup_id} in {dest}") from None
    try:
        sig = (path / fmt.SIGNATURE).read_bytes()
    except FileNotFoundError:
        raise Corrupt(f"{path / fmt.SIGNATURE}: missing") from None
    doc = fmt.load_manifest(raw, path / fmt.MANIFEST)
    try:
        node = bytes.fromhex(str(doc["node"]))
    except (KeyError, ValueError):
        raise Corrupt(f"{path / fmt.MANIFEST}: names no node") from None
    if not verify_signature(node, raw, sig):
        raise Corrupt(
            f"{path / fmt.MANIFEST}: its signature ({fmt.SIGNATURE}) does not verify"
            " (the manifest or the signature was altered)"
        )
    if doc.get("id") != backup_id:
        raise Corrupt(f"{path / fmt.MANIFEST}: names backup {doc.get('id')!r}, not {backup_id}")
    return Entry(path, doc)


def chain(dest: Path, backup_id: str) -> list[Entry]:
    """The backups a restore of `backup_id` reads: its full backup first, it last."""
    out = [load(dest, backup_id)]
    while out[-1].parent is not None:
        child = out[-1]
        parent_id = child.parent
        assert parent_id is not None
        try:
            parent = load(dest, parent_id)
        except NotFound:
            raise Corrupt(
                f"backup {child.id} is incremental on {parent_id}, which is not in {dest}"
            ) from None
        if (
            parent.node != child.node
            or parent.manifest["epoch"] != child.manifest["epoch"]
            or parent.manifest["sequence"] != child.manifest["parent_sequence"]
        ):
            raise Corrupt(f"backup {child.id} does not continue its parent {parent_id}")
        out.append(parent)
    out.reverse()
    return out


def data_key(entry: Entry, private: PrivateKey) -> bytes:
    """The backup's data key, opened with the backup private key."""
    if entry.manifest["backup_key"] != bytes(private.public_key).hex():
        raise SlurpError(
            f"backup {entry.id} was made for another backup key"
            f" ({entry.manifest['backup_key'][:16]}...), not this private key's"
        )
    try:
        return SealedBox(private).decrypt(base64.b64decode(entry.manifest["sealed_key"]))
    except (CryptoError, ValueError):
        raise Corrupt(f"{entry.path / fmt.MANIFEST}: its sealed data key does not open") from None


def records(entry: Entry, key: bytes) -> Iterator[tuple[int, bytes]]:
    names = [str(f["name"]) for f in entry.manifest["files"]]
    return fmt.read_stream(entry.path, entry.id, names, key)
