"""Backups: create (full, incremental), list, verify, restore (and --at), prune.

Restores go through the real CLI or the package's API into new data directories;
what they hold is compared with the original store context by context and
version by version (ids, plaintext, leaves, tree, TTLs), and checked with fsck
and the audit log's verification. One test backs up a store while a writer loop
runs through a real mount and mounts the restored store.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import WEAK_KDF, Nodes
from fsutil import AUTH, Mounted, mounted_at, slurpfs, wait_for
from nacl.bindings import crypto_sign_ed25519_sk_to_curve25519
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from slurpfs import config, fsck
from slurpfs.backup import catalog, create, prune, restore
from slurpfs.backup import format as fmt
from slurpfs.backup import keys as backup_keys
from slurpfs.errors import SlurpError
from slurpfs.model import ContextStore, verify_audit
from slurpfs.ucxl import parse

DEV = "developer"
ARCH = "architect"


def _addr(*parts: str) -> Any:
    return parse(f"ucxl://{AUTH}/" + "/".join(parts))


def _key(tmp_path: Path, data_dir: Path) -> PrivateKey:
    out = tmp_path / "backup.key"
    backup_keys.init(data_dir, out)
    return backup_keys.load_private(out)


def _open(data_dir: Path) -> ContextStore:
    cfg = config.load(None, {"HOME": os.environ["HOME"]}, {"node.data_dir": str(data_dir)})
    return ContextStore.open(cfg, None, kdf=WEAK_KDF)


def _restore(dest: Path, backup_id: str, new: Path, key: PrivateKey, **kw: Any) -> None:
    restore.restore(dest, backup_id, new, key, passphrase=None, kdf=WEAK_KDF, **kw)


def dump(model: ContextStore) -> dict[str, Any]:
    """Everything a restore must reproduce, comparable with ==."""
    contexts = {}
    for address, role, leaves in model.store.iter_contexts():
        history = model.store.history(address, role)
        contexts[(address, role)] = (
            [bytes(v) for v in leaves],
            [(r.version_id, r.deleted, model.node_read(r)) for r in history],
        )
    with model.store.snapshot() as snap:
        ttls = sorted(snap.ttls())
    return {"contexts": contexts, "tree": sorted(model.store.iter_tree()), "ttls": ttls}


def _checked(data_dir: Path) -> dict[str, Any]:
    """The restored store's dump, after fsck and the audit log's verification pass."""
    with _open(data_dir) as model:
        report = fsck.check(model)
        assert report.ok, report.problems
        out = dump(model)
    cfg = config.load(None, {"HOME": os.environ["HOME"]}, {"node.data_dir": str(data_dir)})
    out["audit"] = verify_audit(cfg, kdf=WEAK_KDF).entries
    return out


def test_incremental_chain_of_five_restores_like_a_full_backup(
    nodes: Nodes, tmp_path: Path
) -> None:
    node, model = nodes.new()
    key = _key(tmp_path, node.data_dir)
    dest = tmp_path / "dest"
    made = []
    for step in range(5):
        for i in range(4):
            model.put(_addr("src", f"f{i}.go"), DEV, f"step {step} file {i}\n".encode())
        model.put(_addr("docs", f"d{step}"), ARCH, f"arch {step}".encode(), ttl=3600 + step)
        if step == 2:
            model.delete(_addr("src", "f3.go"), DEV)
            model.mkdir(_addr("empty", "dir"))
        model.get(_addr("src", "f0.go"), DEV)  # an audit entry
        made.append(create.create(model, dest))
    full = create.create(model, dest, full=True)
    assert [m.kind for m in made] == ["full"] + ["incremental"] * 4
    assert [m.parent for m in made[1:]] == [m.id for m in made[:-1]]
    assert full.kind == "full"
    assert full.why_full == "asked for a full backup"
    assert sum(m.versions for m in made) == full.versions == model.store.statistics().versions
    original = dump(model)
    node.close_all()
    original["audit"] = node.verify_audit().entries
    assert original["audit"] >= 5

    _restore(dest, made[-1].id, tmp_path / "chain", key)
    _restore(dest, full.id, tmp_path / "full", key)
    chained, whole = _checked(tmp_path / "chain"), _checked(tmp_path / "full")
    assert chained == whole == original
    assert len(original["ttls"]) == 5
    assert ("empty", "dir") in {(p.rpartition("/")[2], c) for p, c in original["tree"]}


def test_backup_and_restore_through_the_cli(nodes: Nodes, tmp_path: Path) -> None:
    node, model = nodes.new()
    model.put(_addr("a"), DEV, b"first")
    node.close_all()
    data, dest, new, keyfile = node.data_dir, tmp_path / "dest", tmp_path / "new", tmp_path / "bk"
    slurpfs("backup", "keys", "init", "--private-key", keyfile, "--data", data)
    assert os.stat(keyfile).st_mode & 0o777 == 0o600
    first = json.loads(slurpfs("backup", "create", dest, "--data", data, "--json").stdout)
    slurpfs("put", f"ucxl://{AUTH}/a", "--role", DEV, "--data", data, input=b"second")
    second = json.loads(slurpfs("backup", "create", dest, "--data", data, "--json").stdout)
    assert (first["kind"], second["kind"], second["parent"]) == ("full", "incremental", first["id"])
    listed = json.loads(slurpfs("backup", "list", dest, "--json").stdout)
    assert [r["id"] for r in listed] == [first["id"], second["id"]]
    assert "2 backups verified: clean" in slurpfs("backup", "verify", dest).stdout.decode()
    out = json.loads(
        slurpfs("backup", "restore", dest, "--key", keyfile, "--data", new, "--json").stdout
    )
    assert (out["backup"], out["chain"], out["versions"]) == (second["id"], 2, 2)
    assert slurpfs("get", f"ucxl://{AUTH}/a", "--role", DEV, "--data", new).stdout == b"second"
    slurpfs("fsck", "--data", new)
    slurpfs("audit", "verify", "--data", new)
    refused = slurpfs("backup", "restore", dest, "--key", keyfile, "--data", new, check=False)
    assert refused.returncode == 1
    assert b"not empty" in refused.stderr


def test_a_flipped_byte_in_any_backup_file_fails_verify_naming_it(
    nodes: Nodes, tmp_path: Path
) -> None:
    node, model = nodes.new()
    _key(tmp_path, node.data_dir)
    dest = tmp_path / "dest"
    model.put(_addr("a"), DEV, b"one" * 1000)
    create.create(model, dest)
    model.put(_addr("a"), DEV, b"two" * 1000)
    create.create(model, dest)
    node.close_all()
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    assert len(files) == 6
    for victim in files:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(dest, copy)
        target = copy / victim.relative_to(dest)
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        target.write_bytes(bytes(raw))
        result = slurpfs("backup", "verify", copy, check=False)
        said = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 5, said
        named = target if victim.name != fmt.SIGNATURE else target.with_name(fmt.MANIFEST)
        assert str(named) in said, said
    clean = slurpfs("backup", "verify", dest)
    assert b"clean" in clean.stdout


def test_a_missing_parent_fails_verify_and_restore(nodes: Nodes, tmp_path: Path) -> None:
    node, model = nodes.new()
    key = _key(tmp_path, node.data_dir)
    dest = tmp_path / "dest"
    model.put(_addr("a"), DEV, b"one")
    first = create.create(model, dest)
    model.put(_addr("a"), DEV, b"two")
    second = create.create(model, dest)
    node.close_all()
    shutil.rmtree(first.path)
    result = slurpfs("backup", "verify", dest, check=False)
    assert result.returncode == 5
    assert f"incremental on {first.id}, which is not in" in result.stdout.decode()
    with pytest.raises(SlurpError, match="which is not in"):
        _restore(dest, second.id, tmp_path / "new", key)


def test_a_backup_is_unreadable_without_the_backup_private_key(
    nodes: Nodes, tmp_path: Path
) -> None:
    node, model = nodes.new()
    canary = b"CANARY-7f3a9c1e-backup-plaintext"
    model.put(_addr("secret"), DEV, canary * 40)
    dest = tmp_path / "dest"
    _key(tmp_path, node.data_dir)
    made = create.create(model, dest)
    ring = model.keyring
    node_seed = bytes(ring.node.signing_key)
    privates = [ring.private(r, ring.current_public(r).generation) for r in ring.held_roles()]
    role_keys = [bytes(p) for p in privates if p is not None]
    assert len(role_keys) == 3
    node.close_all()
    everything = b"".join(p.read_bytes() for p in made.path.iterdir())
    for secret in (canary, node_seed, *role_keys):
        assert secret not in everything
        assert base64.b64encode(secret)[:24] not in everything
        assert secret.hex().encode() not in everything
    entry = catalog.load(dest, made.id)
    sealed = base64.b64decode(entry.manifest["sealed_key"])
    node_x25519 = crypto_sign_ed25519_sk_to_curve25519(bytes(ring.node.signing_key._signing_key))
    for candidate in (node_x25519, *role_keys):
        with pytest.raises(CryptoError):
            SealedBox(PrivateKey(candidate)).decrypt(sealed)
    with pytest.raises(SlurpError, match="made for another backup key"):
        _restore(dest, made.id, tmp_path / "new", PrivateKey.generate())


def test_restore_at_a_time_between_two_versions_gives_the_earlier(
    nodes: Nodes, tmp_path: Path
) -> None:
    node, model = nodes.new()
    _key(tmp_path, node.data_dir)
    first = model.put(_addr("a"), DEV, b"earlier")
    between = first.mtime + 0.002
    wait_for(lambda: time.time() > between + 0.002, what="the clock to pass the cut")
    model.put(_addr("a"), DEV, b"later")
    model.put(_addr("b"), DEV, b"only later")
    made = create.create(model, tmp_path / "dest")
    node.close_all()
    at = dt.datetime.fromtimestamp(between, dt.UTC).isoformat()
    slurpfs(
        "backup", "restore", made.path, "--key", tmp_path / "backup.key",
        "--at", at, "--data", tmp_path / "new",
    )  # fmt: skip
    new = tmp_path / "new"
    assert slurpfs("get", f"ucxl://{AUTH}/a", "--role", DEV, "--data", new).stdout == b"earlier"
    missing = slurpfs("get", f"ucxl://{AUTH}/b", "--role", DEV, "--data", new, check=False)
    assert missing.returncode == 3
    restored = _checked(new)
    assert [h[0] for h in restored["contexts"][(f"{AUTH}/a", DEV)][1]] == [first.version_id]


def test_prune_keeps_the_newest_per_period_and_their_chains(nodes: Nodes, tmp_path: Path) -> None:
    node, model = nodes.new()
    _key(tmp_path, node.data_dir)
    dest = tmp_path / "dest"
    start = dt.datetime(2026, 9, 1, 3, 0, tzinfo=dt.UTC)
    made = {}
    for day in range(0, 70, 3):  # every third day for ten weeks
        for hour in (0, 12):
            model.put(_addr("a"), DEV, f"{day} {hour}".encode())
            when = start + dt.timedelta(days=day, hours=hour)
            made[when] = create.create(model, dest, now=when, full=(day % 9 == 0 and hour == 0))
    node.close_all()
    policy = prune.Policy(daily=2, weekly=2, monthly=2)
    dry = prune.prune(dest, policy, dry_run=True)
    assert len(catalog.ids(dest)) == len(made)
    result = prune.prune(dest, policy)
    assert result == dry
    kept = set(catalog.ids(dest))
    newest = {}  # the newest backup of each day, ISO week and month
    for when in sorted(made):
        for period in (when.date(), when.isocalendar()[:2], (when.year, when.month)):
            newest[period] = made[when]
    days = sorted(p for p in newest if isinstance(p, dt.date))[-2:]
    weeks = sorted(p for p in newest if isinstance(p, tuple) and p[1] > 12)[-2:]
    months = sorted(p for p in newest if isinstance(p, tuple) and p[1] <= 12)[-2:]
    periods: list[dt.date | tuple[int, int]] = [*days, *weeks, *months]
    expected = {newest[p].id for p in periods}
    parents = {b.id: b.parent for b in made.values()}
    for backup_id in list(expected):
        parent = parents[backup_id]
        while parent is not None:
            expected.add(parent)
            parent = parents[parent]
    assert kept == expected
    for backup_id in kept:  # every kept backup still restores: its chain is whole
        catalog.chain(dest, backup_id)
    assert result.removed
    assert not set(result.removed) & kept
    with pytest.raises(SlurpError, match="keeps nothing"):
        prune.Policy(0, 0, 0)


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine")
def test_backup_while_a_writer_runs_through_the_mount_is_a_consistent_point(
    nodes: Nodes, tmp_path: Path
) -> None:
    m = mounted_at(nodes, tmp_path)
    keyfile = tmp_path / "bk"
    m.cli("backup", "keys", "init", "--private-key", keyfile)
    files = [m.ucxl / AUTH / name / DEV for name in ("one", "two")]
    for f in files:
        f.parent.mkdir(parents=True)
    acked = [0]
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            for f in files:  # "one" then "two": a cut may split an iteration only there
                f.write_bytes(f"write {i} of {f.parent.name}\n".encode())
            acked[0] = i

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: acked[0] >= 5, what="five writes")
        before = acked[0]
        made = json.loads(m.cli("backup", "create", tmp_path / "dest", "--json").stdout)
        after = acked[0]
        wait_for(lambda: acked[0] >= after + 3, what="writes after the backup")
    finally:
        stop.set()
        thread.join()
    m.unmount()
    new = tmp_path / "new"
    slurpfs("backup", "restore", made["path"], "--key", keyfile, "--data", new)
    with _open(m.data) as model:
        original = dump(model)
    restored = _checked(new)
    counts = []
    for name in ("one", "two"):
        ctx = (f"{AUTH}/{name}", DEV)
        got, full_history = restored["contexts"][ctx][1], original["contexts"][ctx][1]
        assert got == full_history[: len(got)]  # every version up to the point, none after
        counts.append(len(got))
    assert before <= counts[1] <= counts[0] <= counts[1] + 1 <= after + 1
    assert counts[0] < len(original["contexts"][(f"{AUTH}/one", DEV)][1])

    r = Mounted(new, tmp_path / "mnt2")
    r.mount()
    try:
        for name, n in zip(("one", "two"), counts, strict=True):
            hist = r.ucxl / AUTH / name / ".history" / DEV
            assert sorted(os.listdir(hist), key=int) == [str(i) for i in range(1, n + 1)]
            for i in range(1, n + 1):
                assert (hist / str(i)).read_bytes() == f"write {i} of {name}\n".encode()
            assert (r.ucxl / AUTH / name / DEV).read_bytes() == f"write {n} of {name}\n".encode()
    finally:
        r.unmount()
    slurpfs("fsck", "--data", new)
    slurpfs("audit", "verify", "--data", new)


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine")
def test_scheduled_backups_run_in_the_mounts_worker(nodes: Nodes, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    toml = (
        f'[backup]\ndest = "{dest}"\nschedule = "* * * * * */2"\n'  # every 2 s (croniter: seconds)
        "keep_daily = 1\nkeep_weekly = 0\nkeep_monthly = 0\n"
    )
    node, model = nodes.new(toml=toml)
    keyfile = tmp_path / "bk"
    backup_keys.init(node.data_dir, keyfile)
    model.put(_addr("before"), DEV, b"stored before the mount")
    node.close_all()
    m = Mounted(node.data_dir, tmp_path / "mnt")
    m.mount()
    status = m.mnt / ".slurp" / "status"

    def field(name: str) -> str:
        for line in status.read_text().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return value
        return ""

    try:
        wait_for(lambda: field("maintenance_backups_made") not in ("", "0"), 60, "a backup")
        (m.ucxl / AUTH / "during").mkdir()
        (m.ucxl / AUTH / "during" / DEV).write_bytes(b"written through the mount")
        made = int(field("maintenance_backups_made"))
        wait_for(lambda: int(field("maintenance_backups_made")) >= made + 2, 60, "two more")
        assert field("task_maintenance").startswith("running")
        assert field("maintenance_backup_last") in catalog.ids(dest)
        assert "maintenance_backups_made" in (m.mnt / ".slurp" / "metrics").read_text()
    finally:
        m.unmount()
    kinds = {catalog.load(dest, i).manifest["kind"] for i in catalog.ids(dest)}
    assert kinds == {"full", "incremental"} or kinds == {"full"}
    assert slurpfs("backup", "verify", dest).returncode == 0
    new = tmp_path / "new"
    slurpfs("backup", "restore", dest, "--key", keyfile, "--data", new)
    got = slurpfs("get", f"ucxl://{AUTH}/during", "--role", DEV, "--data", new)
    assert got.stdout == b"written through the mount"


def test_a_failed_restore_leaves_nothing_and_passphrase_keys_restore(tmp_path: Path) -> None:
    data, dest, new, keyfile = tmp_path / "d", tmp_path / "dest", tmp_path / "new", tmp_path / "k"
    secret = {"SLURPFS_PASSPHRASE": "correct horse"}
    slurpfs("init", "--data", data, env=secret)
    slurpfs("put", f"ucxl://{AUTH}/a", "--role", DEV, "--data", data, input=b"kept", env=secret)
    slurpfs("backup", "keys", "init", "--private-key", keyfile, "--data", data)
    slurpfs("backup", "create", dest, "--data", data, env=secret)
    failed = slurpfs("backup", "restore", dest, "--key", keyfile, "--data", new, check=False)
    assert failed.returncode == 4, failed.stderr
    assert b"passphrase" in failed.stderr
    assert sorted(os.listdir(tmp_path)) == ["d", "dest", "k"]  # nothing half-restored
    slurpfs("backup", "restore", dest, "--key", keyfile, "--data", new, env=secret)
    got = slurpfs("get", f"ucxl://{AUTH}/a", "--role", DEV, "--data", new, env=secret)
    assert got.stdout == b"kept"
    assert (
        slurpfs("get", f"ucxl://{AUTH}/a", "--role", DEV, "--data", new, check=False).returncode
        == 4
    )


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine")
def test_a_failing_scheduled_backup_shows_in_health_and_the_mount_goes_on(
    nodes: Nodes, tmp_path: Path
) -> None:
    dest = tmp_path / "not-a-directory"
    dest.write_bytes(b"")
    toml = f'[backup]\ndest = "{dest}"\nschedule = "* * * * * */2"\n'
    node, _ = nodes.new(toml=toml)
    backup_keys.init(node.data_dir, tmp_path / "bk")
    node.close_all()
    m = Mounted(
        node.data_dir,
        tmp_path / "mnt",
        expect_warnings=("the scheduled backup failed: .*",),
    )
    m.mount()
    health = m.mnt / ".slurp" / "health"
    try:
        wait_for(lambda: "the last scheduled backup failed" in health.read_text(), 60, "health")
        text = health.read_text()
        assert "not-a-directory" in text
        (m.ucxl / AUTH / "still").mkdir(parents=True)
        (m.ucxl / AUTH / "still" / DEV).write_bytes(b"the mount serves files")
        assert (m.ucxl / AUTH / "still" / DEV).read_bytes() == b"the mount serves files"
    finally:
        m.unmount()


def test_a_stray_or_missing_data_file_fails_verify_naming_it(nodes: Nodes, tmp_path: Path) -> None:
    node, model = nodes.new()
    _key(tmp_path, node.data_dir)
    model.put(_addr("a"), DEV, b"one")
    made = create.create(model, tmp_path / "dest")
    node.close_all()
    stray = made.path / "data-00001.slb"
    stray.write_bytes(b"SLBK")
    result = slurpfs("backup", "verify", tmp_path / "dest", check=False)
    assert result.returncode == 5
    assert f"{stray}: not named by the manifest" in result.stdout.decode()
    stray.unlink()
    (made.path / "data-00000.slb").unlink()
    result = slurpfs("backup", "verify", made.path, check=False)
    assert result.returncode == 5
    assert f"{made.path / 'data-00000.slb'}: missing" in result.stdout.decode()
