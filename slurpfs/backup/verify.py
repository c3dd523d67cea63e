"""Checking backups without restoring them and without the backup private key.

Structure (the manifest parses, names exactly the files present, each data file
is whole frames with the right header), checksums (size and BLAKE2b-256 of every
data file), signatures (the node's, over the manifest, which names the
checksums) and the chain (each incremental backup continues its parent). With
the backup private key, every frame is also opened and every record parsed.
Every failure names the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nacl.public import PrivateKey

from slurpfs.backup import catalog
from slurpfs.backup import format as fmt
from slurpfs.errors import Corrupt, SlurpError


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_files(entry: catalog.Entry) -> None:
    """Corrupt, naming the file, unless every data file is as the manifest says."""
    listed = {str(f["name"]): f for f in entry.manifest["files"]}
    present = {p.name for p in entry.path.iterdir()} - {fmt.MANIFEST, fmt.SIGNATURE}
    extra = sorted(present - set(listed))
    if extra:
        raise Corrupt(f"{entry.path / extra[0]}: not named by the manifest")
    for index, (name, meta) in enumerate(listed.items()):
        path = entry.path / name
        if name != fmt.data_name(index):
            raise Corrupt(f"{entry.path / fmt.MANIFEST}: data file {index} is named {name!r}")
        if not path.is_file():
            raise Corrupt(f"{path}: missing")
        if path.stat().st_size != int(meta["size"]):
            raise Corrupt(f"{path}: {path.stat().st_size} bytes, the manifest says {meta['size']}")
        if fmt.blake2b_file(path) != meta["blake2b"]:
            raise Corrupt(f"{path}: its checksum does not match the manifest (damaged or altered)")
        for _ in fmt.frame_lengths(path, index):
            pass


def verify(
    dest: Path,
    backup_ids: list[str] | None = None,
    *,
    node: str | None = None,
    private: PrivateKey | None = None,
) -> Report:
    """Check the given backups (default: all in `dest`) and the chains they need."""
    report = Report()
    wanted = backup_ids or catalog.ids(dest)
    done: set[str] = set()
    for backup_id in wanted:
        try:
            for entry in catalog.chain(dest, backup_id):
                if entry.id in done:
                    continue
                done.add(entry.id)
                _check_one(entry, node, private)
                report.checked.append(entry.id)
        except SlurpError as exc:
            report.problems.append(f"backup {backup_id}: {exc}")
    return report


def _check_one(entry: catalog.Entry, node: str | None, private: PrivateKey | None) -> None:
    if node is not None and entry.node != node:
        raise Corrupt(
            f"{entry.path / fmt.MANIFEST}: signed by node {entry.node[:16]}..., not {node[:16]}..."
        )
    check_files(entry)
    if private is None:
        return
    for kind, payload in catalog.records(entry, catalog.data_key(entry, private)):
        if kind == fmt.R_VERSION:
            fmt.parse_version(payload)
