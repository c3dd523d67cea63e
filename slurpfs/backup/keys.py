"""The backup key pair: X25519; backups are sealed to its public half.

The public key lives in the data directory (``backup.pub``): every backup the
node makes is readable with the private key only, never with the node's own
keys. The private key is written once, to a file of the operator's choosing
(0600), and is needed only to restore (or to check a backup's contents); it is
meant to be moved offline.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nacl.public import PrivateKey, PublicKey

from slurpfs.errors import ConfigError, NotFound, SlurpError

PUBLIC_TAG = "slurpfs-backup-public-v1"
PRIVATE_TAG = "slurpfs-backup-private-v1"
PUBLIC_FILE = "backup.pub"


def public_path(data_dir: Path) -> Path:
    return data_dir / PUBLIC_FILE


def init(data_dir: Path, private_out: Path, *, force: bool = False) -> PublicKey:
    """Make a key pair: the public half into the data directory, the private half
    to `private_out` (created 0600; never overwritten)."""
    pub_path = public_path(data_dir)
    if pub_path.exists() and not force:
        raise SlurpError(
            f"{pub_path} exists: this node has a backup key already (--force makes a new"
            " one; backups made with the old key still need the old private key)"
        )
    if not data_dir.is_dir():
        raise NotFound(f"{data_dir} is not a data directory (run `slurpfs init`)")
    private = PrivateKey.generate()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(private_out, flags, 0o600)
    except FileExistsError:
        raise SlurpError(f"{private_out} exists: not overwriting a key file") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{PRIVATE_TAG} {bytes(private).hex()}\n")
        f.flush()
        os.fsync(f.fileno())
    tmp = pub_path.with_name(f".{PUBLIC_FILE}.tmp")
    tmp.write_text(f"{PUBLIC_TAG} {bytes(private.public_key).hex()}\n", encoding="ascii")
    os.replace(tmp, pub_path)
    return private.public_key


def load_public(data_dir: Path) -> PublicKey:
    path = public_path(data_dir)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: run `slurpfs backup keys init` first (backups are"
            " encrypted to the backup key)"
        ) from None
    return PublicKey(_parse(text, PUBLIC_TAG, path))


def load_private(path: Path) -> PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"backup private key {path} not found") from None
    with os.fdopen(fd, "r", encoding="ascii") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode) or mode & 0o077:
            raise ConfigError(f"{path} is readable by group or others; chmod 600 it")
        text = f.read()
    return PrivateKey(_parse(text, PRIVATE_TAG, path))


def _parse(text: str, tag: str, path: Path) -> bytes:
    parts = text.split()
    try:
        if len(parts) != 2 or parts[0] != tag:
            raise ValueError
        raw = bytes.fromhex(parts[1])
        if len(raw) != 32:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{path} is not a slurpfs backup key file ({tag})") from None
    return raw
