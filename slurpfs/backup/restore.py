"""Restoring a backup into a new data directory, optionally as of a point in time.

The chain (full backup first) is checked (signatures, checksums), opened with
the backup private key, and its versions go in through `slurpfs.ingest`, the one
way in for versions made elsewhere: each is checked (id, signature, ciphertext,
key slots, parents) as a peer's would be. Besides versions, a restore writes
back the configuration and the node's keystore (so the restored node is the same
node, with the same identity and role keys), the directory tree, the TTLs and the
audit log, newly anchored in the new store. The new store gets a new epoch and
seal: it is another store of the same node, which peers refill like any
restored store. With `at`, only versions written at or before that time are
restored (parents are always older than their children, so the history stays
whole) and the audit log ends at its last entry from then.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey

from slurpfs import config as config_mod
from slurpfs.audit import Anchor, AuditKeys, StoreAnchorSlot
from slurpfs.backup import catalog
from slurpfs.backup import format as fmt
from slurpfs.backup.catalog import data_key, records
from slurpfs.backup.verify import check_files
from slurpfs.crypto import envelope as env
from slurpfs.crypto.keystore import KdfParams, Keystore
from slurpfs.errors import Corrupt, SlurpError
from slurpfs.ingest import Incoming, Ingest
from slurpfs.model import ContextStore, data_paths
from slurpfs.store import Store
from slurpfs.store import schema as s
from slurpfs.store.lmdb_store import DROPPED_TABLE

Progress = Callable[[int, int], None]
BATCH = 512


@dataclass(frozen=True, slots=True)
class Restored:
    data_dir: Path
    backups: int  # in the chain
    versions: int
    contexts: int
    audit_entries: int


@dataclass
class _State:
    files: dict[str, bytes]
    live: set[bytes]
    dirs: list[bytes]
    ttls: list[tuple[bytes, int]]
    audit: bytearray
    dropped: set[bytes]


def _read_state(chain: list[catalog.Entry], keys: list[bytes]) -> _State:
    state = _State({}, set(), [], [], bytearray(), set())
    for n, (entry, key) in enumerate(zip(chain, keys, strict=True)):
        target = n == len(chain) - 1
        if len(state.audit) != int(entry.manifest["audit"]["start"]):
            raise Corrupt(f"backup {entry.id}: its audit log part does not follow its parent's")
        for kind, payload in records(entry, key):
            if kind == fmt.R_VERSION:
                break
            if kind == fmt.R_AUDIT:
                state.audit += payload
            elif not target:
                continue
            elif kind == fmt.R_FILE:
                name, content = fmt.parse_file(payload)
                state.files[name] = content
            elif kind == fmt.R_LIVE:
                state.live.update(payload[i : i + 32] for i in range(0, len(payload), 32))
            elif kind == fmt.R_DROPPED:
                state.dropped.update(payload[i : i + 32] for i in range(0, len(payload), 32))
            elif kind == fmt.R_DIR:
                state.dirs.append(payload)
            elif kind == fmt.R_TTL:
                state.ttls.append((payload[8:], fmt.U64.unpack(payload[:8])[0]))
    return state


def _cut_audit(audit: bytes, at_ms: int | None) -> bytes:
    if at_ms is None:
        return audit
    end = 0
    for line in audit.splitlines(keepends=True):
        if float(json.loads(line)["time"]) * 1000 > at_ms:
            break
        end += len(line)
    return audit[:end]


def _write_files(new_dir: Path, files: dict[str, bytes]) -> None:
    if "keys/public.json" not in files:
        raise Corrupt("the backup holds no keystore (keys/public.json)")
    for name, content in files.items():
        path = new_dir / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise Corrupt(f"the backup names a file outside the data directory: {name!r}")
        for parent in reversed(path.relative_to(new_dir).parents[:-1]):
            (new_dir / parent).mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)


def _anchor_audit(new_dir: Path, audit: bytes, node_keys: AuditKeys, store: Store) -> int:
    """Write the log and anchor its last entry in the new store; its entry count."""
    path = data_paths(new_dir)["audit"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(audit)
    lines = audit.splitlines(keepends=True)
    if not lines:
        return 0
    last = json.loads(lines[-1])
    if "mac" in last:
        anchor = Anchor(int(last["seq"]), len(audit) - len(lines[-1]), str(last["mac"]))
        StoreAnchorSlot(store).replace(None, node_keys.seal_anchor(anchor))
    return len(lines)


def restore(
    dest: Path,
    backup_id: str,
    new_dir: Path,
    private: PrivateKey,
    *,
    passphrase: bytes | None,
    kdf: KdfParams,
    at_ms: int | None = None,
    progress: Progress | None = None,
    environ: Mapping[str, str] | None = None,
) -> Restored:
    """Restore backup `backup_id` of `dest` into `new_dir` (new or empty)."""
    chain = catalog.chain(dest, backup_id)
    for entry in chain:
        check_files(entry)
    keys = [data_key(entry, private) for entry in chain]
    if new_dir.exists() and any(new_dir.iterdir()):
        raise SlurpError(f"{new_dir} is not empty: restore into a new data directory")
    new_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Built beside the target and renamed into place once whole: a restore that fails
    # (a wrong passphrase, a damaged frame) leaves nothing that looks like a data directory.
    work = Path(tempfile.mkdtemp(prefix=f".{new_dir.name}.restoring-", dir=new_dir.parent))
    try:
        done = _restore_into(work, chain, keys, passphrase, kdf, at_ms, progress, environ)
        if new_dir.exists():
            new_dir.rmdir()  # empty, checked above
        os.rename(work, new_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dataclasses.replace(done, data_dir=new_dir)


def _restore_into(
    new_dir: Path,
    chain: list[catalog.Entry],
    keys: list[bytes],
    passphrase: bytes | None,
    kdf: KdfParams,
    at_ms: int | None,
    progress: Progress | None,
    environ: Mapping[str, str] | None,
) -> Restored:
    backup_id = chain[-1].id
    state = _read_state(chain, keys)
    if len(state.audit) != int(chain[-1].manifest["audit"]["end"]):
        raise Corrupt(f"backup {backup_id}: its audit log parts do not add up")
    _write_files(new_dir, state.files)
    cfg = config_mod.load(None, environ or {}, {"node.data_dir": str(new_dir)})
    node = Keystore(new_dir, passphrase, kdf).load().node
    store = Store(data_paths(new_dir)["store"], map_size=cfg.store.map_size)
    try:
        entries = _anchor_audit(
            new_dir, _cut_audit(bytes(state.audit), at_ms), AuditKeys.for_node(node), store
        )
    finally:
        store.close()
    with ContextStore.open(cfg, passphrase, kdf=kdf) as model:
        if state.dropped:  # parents the retention policy removed: not missing
            model.store.aux_write(DROPPED_TABLE, dict.fromkeys(state.dropped, fmt.U64.pack(0)))
        restored, contexts = _ingest(model, chain, keys, state.live, at_ms, progress)
        if at_ms is None and restored != len(state.live):
            raise Corrupt(
                f"backup {backup_id}: its chain holds {restored} of the {len(state.live)}"
                " versions it names"
            )
        for key in state.dirs:
            parent, _, child = key.partition(b"\0")
            model.store.mkdir(
                child.decode() if not parent else f"{parent.decode()}/{child.decode()}"
            )
        model.store.set_ttls((ctx, exp) for ctx, exp in state.ttls if ctx in contexts)
        model.sync()
    return Restored(new_dir, len(chain), restored, len(contexts), entries)


def _ingest(
    model: ContextStore,
    chain: list[catalog.Entry],
    keys: list[bytes],
    live: set[bytes],
    at_ms: int | None,
    progress: Progress | None,
) -> tuple[int, set[bytes]]:
    ingest = Ingest(model)
    batch: list[Incoming] = []
    contexts: set[bytes] = set()
    done = 0

    def flush() -> None:
        nonlocal done
        if batch:
            done += len(ingest.accept(batch).stored)
            batch.clear()
            if progress is not None:
                progress(done, len(live))

    for entry, key in zip(chain, keys, strict=True):
        for kind, payload in records(entry, key):
            if kind != fmt.R_VERSION:
                continue
            item = fmt.parse_version(payload)
            if item.version_id not in live:
                continue  # purged or dropped by retention after it was backed up
            body = not item.envelope.startswith(env.STUB_MAGIC)  # a stub: held elsewhere
            decode = env.Envelope.decode if body else env.Stub.decode
            header = decode(item.envelope).header
            if at_ms is not None and (header.hlc >> 16) > at_ms:
                continue
            contexts.add(s.context_key(header.address, header.role))
            batch.append(Incoming(item.version_id, item.envelope, item.slots, body=body))
            if len(batch) >= BATCH:
                flush()
    flush()
    return done, contexts
