"""Compaction: the version-retention policy, LMDB compacting copies, `slurpfs compact`.

Retention keeps the last N versions and everything newer than D of each context,
and never a leaf (head or conflict), a deletion, or the version before a
deletion; what it drops is audited, and the store stays fsck-clean and backs up
and restores. One test runs compaction while a reader loop reads through a mount.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from conftest import WEAK_KDF, Nodes
from fsutil import AUTH, Mounted, mounted_at, slurpfs, wait_for

from slurpfs import audit, compact, fsck
from slurpfs.backup import create, restore
from slurpfs.backup import keys as backup_keys
from slurpfs.model import ContextStore, data_paths
from slurpfs.ucxl import parse

DEV = "developer"
KEEP3 = "[retention]\nkeep_versions = 3\n"


def _addr(name: str):  # type: ignore[no-untyped-def]
    return parse(f"ucxl://{AUTH}/{name}")


def _ids(model: ContextStore, name: str) -> list[bytes]:
    return [r.version_id for r in model.store.history(_addr(name).key, DEV)]


def test_retention_keeps_what_it_must(nodes: Nodes, tmp_path: Path) -> None:
    node, model = nodes.new(toml=KEEP3)
    for i in range(10):
        model.put(_addr("plain"), DEV, f"plain {i}".encode())
    for i in range(6):
        model.put(_addr("deleted"), DEV, f"deleted {i}".encode())
    model.delete(_addr("deleted"), DEV)
    model.put(_addr("deleted"), DEV, b"again")
    model.put(_addr("deleted"), DEV, b"again 2")
    for i in range(6):
        model.put(_addr("forked"), DEV, f"forked {i}".encode())
    old = model.store.history(_addr("forked").key, DEV)[1]
    leaves = tuple(r.version_id for r in model.store.leaves(_addr("forked").key, DEV))
    fork = model._seal(  # a concurrent version on an old parent: a conflict leaf
        _addr("forked").key, DEV, b"fork", (old.version_id,), leaves, deleted=False, expires_ms=None
    )
    model.store.commit([fork])
    for i in range(3):
        model.put(_addr("forked"), DEV, f"forked more {i}".encode())
    plain, deleted, forked = (_ids(model, n) for n in ("plain", "deleted", "forked"))

    plan = compact.plan_retention(model)
    assert compact.apply_retention(model, plan) == len(plan.drops) == 7 + 5 + 6
    assert _ids(model, "plain") == plain[-3:]
    # the version before the deletion (deleted[5]) and the deletion (deleted[6]) stay
    assert _ids(model, "deleted") == deleted[5:]
    # the fork is newer, so it became the head and the old head (forked[5]) the
    # conflict leaf: kept although older than the last three
    assert _ids(model, "forked") == [forked[5], *forked[-3:]]
    assert fork.record.version_id not in forked[-3:]
    assert [c.version_id for c in model.conflicts(_addr("forked"), DEV)] == [forked[5]]
    assert model.get(_addr("plain"), DEV).data == b"plain 9"
    assert compact.plan_retention(model).drops == []  # nothing more to drop
    node.close_all()
    entries = audit.read(data_paths(node.data_dir)["audit"])
    drops = [e for e in entries if e.action == "drop"]
    assert len(drops) == 18
    assert all(e.who == "node" and "retention" in e.reason for e in drops)
    assert node.fsck().ok

    # a store with dropped parents backs up and restores (ingest knows they were dropped)
    model = node.open()
    out = tmp_path / "bk"
    backup_keys.init(node.data_dir, out)
    made = create.create(model, tmp_path / "dest")
    node.close_all()
    new = tmp_path / "new"
    restore.restore(
        tmp_path / "dest",
        made.id,
        new,
        backup_keys.load_private(out),
        passphrase=None,
        kdf=WEAK_KDF,
    )
    slurpfs("fsck", "--data", new)
    got = slurpfs("history", f"ucxl://{AUTH}/plain", "--role", DEV, "--data", new, "--json")
    assert [v["version"] for v in json.loads(got.stdout)] == [v.hex() for v in plain[-3:]]


def test_retention_by_age_keeps_recent_versions(nodes: Nodes) -> None:
    _, model = nodes.new(toml="[retention]\nkeep_versions = 1\nkeep_days = 1\n")
    for i in range(5):
        model.put(_addr("recent"), DEV, f"{i}".encode())
    assert compact.plan_retention(model).drops == []
    later = compact.plan_retention(model, now=os.path.getmtime(__file__) + 10**9)
    assert len(later.drops) == 4


def test_compact_cli_dry_run_then_copy(nodes: Nodes) -> None:
    node, model = nodes.new(toml=KEEP3)
    for i in range(40):
        model.put(_addr("big"), DEV, os.urandom(6000).hex().encode() + f"{i}".encode())
    before = _ids(model, "big")
    node.close_all()
    data = node.data_dir
    mdb = data_paths(data)["store"] / "data.mdb"
    size = mdb.stat().st_size
    dry = json.loads(slurpfs("compact", "--dry-run", "--copy", "--data", data, "--json").stdout)
    assert dry["retention"]["versions"] == 37
    assert dry["retention"]["dropped"] == 0
    assert mdb.stat().st_size == size
    model = node.open()
    assert _ids(model, "big") == before
    node.close_all()
    done = json.loads(slurpfs("compact", "--copy", "--data", data, "--json").stdout)
    assert done["retention"]["dropped"] == 37
    assert done["copy"] == "done"
    assert done["file_bytes_after"] < size / 4
    assert mdb.stat().st_mode & 0o777 == 0o600
    model = node.open()  # the seal still matches the copied store
    assert _ids(model, "big") == before[-3:]
    report = fsck.check(model)
    assert report.ok, report.problems
    node.close_all()
    slurpfs("audit", "verify", "--data", data)


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine")
def test_compaction_under_reads_through_the_mount_loses_nothing(
    nodes: Nodes, tmp_path: Path
) -> None:
    m = mounted_at(nodes, tmp_path, toml=KEEP3)
    names = [f"doc{i}" for i in range(8)]
    for name in names:
        d = m.ucxl / AUTH / name
        d.mkdir(parents=True)
        for v in range(6):
            (d / DEV).write_bytes(f"{name} version {v}\n".encode())
    reads = [0]
    failures: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for name in names:
                got = (m.ucxl / AUTH / name / DEV).read_bytes()
                if got != f"{name} version 5\n".encode():
                    failures.append(got.decode(errors="replace"))
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        wait_for(lambda: reads[0] >= 3, what="reads")
        out = json.loads(m.cli("compact", "--copy", "--json").stdout)
        start = reads[0]
        wait_for(lambda: reads[0] >= start + 3, what="reads after compaction")
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert out["retention"]["dropped"] == 8 * 3
    assert out["copy"] == "waits for an unmount"
    m.unmount()
    done = json.loads(m.cli("compact", "--copy", "--json").stdout)
    assert done["copy"] == "done"
    r = Mounted(m.data, tmp_path / "mnt2")
    r.mount()
    try:
        for name in names:
            hist = r.ucxl / AUTH / name / ".history" / DEV
            got = [(hist / n).read_bytes() for n in sorted(os.listdir(hist), key=int)]
            assert got == [f"{name} version {v}\n".encode() for v in (3, 4, 5)]
    finally:
        r.unmount()
    slurpfs("fsck", "--data", m.data)
    slurpfs("audit", "verify", "--data", m.data)


def test_dry_run_reports_the_gain_of_a_zstd_dictionary_per_role(nodes: Nodes) -> None:
    node, model = nodes.new()
    for i in range(120):  # small documents that share their structure, as contexts do
        body = (
            f"---\nsummary: handler {i} validates tokens\ntags: [security, backend]\n"
            f"technologies: [go, jwt]\n---\nThe handler {i} checks the rotating key set, "
            f"then the claims of request {i * 7919 % 1000} before it answers.\n"
        )
        model.put(_addr(f"doc{i}"), DEV, body.encode())
    node.close_all()
    out = json.loads(slurpfs("compact", "--dry-run", "--data", node.data_dir, "--json").stdout)
    gains = {g["role"]: g for g in out["dictionaries"]}
    dev = gains[DEV]
    assert dev["documents"] == 120
    assert dev["reason"] == ""
    assert dev["ratio_after"] > dev["ratio_before"] > 1
    assert gains["architect"]["reason"] == "fewer than 32 small documents"
