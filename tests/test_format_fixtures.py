"""Old formats keep opening: a data directory written by format 1 is checked in.

`tests/fixtures/format1` was made once by `ContextStore.init` with a passphrase
(weak Argon2id parameters, stored in the key files) and a few contexts; its LMDB
file is a compacted copy. Git does not keep file modes, so the tests copy it and
restore the 0600/0700 modes the keystore insists on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from fsutil import Mounted, is_mounted

from slurpfs import config, fsck
from slurpfs.audit import Verified
from slurpfs.errors import Corrupt, WrongPassphrase
from slurpfs.model import ContextStore, verify_audit
from slurpfs.ucxl import parse

FIXTURE = Path(__file__).parent / "fixtures" / "format1"
PASSPHRASE = b"fixture-passphrase"
AUTH = "ucxl://claude:architect@bzzz:auth"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "format1"
    shutil.copytree(FIXTURE, data)
    for path in [data, *data.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    return data


def _config(data: Path) -> config.Config:
    return config.load(
        data / "config.toml",
        environ={"HOME": str(data.parent)},
        overrides={"node.data_dir": str(data)},
    )


def test_format1_opens_reads_and_checks_clean(data_dir: Path) -> None:
    with ContextStore.open(_config(data_dir), PASSPHRASE) as model:
        auth_go = parse(f"{AUTH}/src/auth.go")
        assert model.get(auth_go, "developer").data.endswith(b"second version\n")
        assert model.get(parse(f"{AUTH}/~~1/src/auth.go"), "developer").data.endswith(
            b"first version\n"
        )
        assert model.get(auth_go, "architect").data == b"architect notes\n"
        assert model.get(parse(f"{AUTH}/docs/binary.bin"), "reviewer").data == bytes(range(256))
        assert model.list_dir(parse(f"{AUTH}/docs/gone")).roles == ()
        assert model.is_dir(parse("ucxl://gpt:developer@hive:search/empty"))
        report = fsck.check(model)
        assert report.ok, report.problems
        assert report.versions == 6


def test_format1_refuses_a_wrong_passphrase(data_dir: Path) -> None:
    with pytest.raises(WrongPassphrase):
        ContextStore.open(_config(data_dir), b"not the passphrase")


@pytest.mark.mount
def test_format1_mounts(data_dir: Path, tmp_path: Path) -> None:
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_bytes(PASSPHRASE)
    passphrase_file.chmod(0o600)
    mounted = Mounted(
        data_dir, tmp_path / "mnt", env={"SLURPFS_PASSPHRASE_FILE": str(passphrase_file)}
    )
    mounted.mount()
    try:
        role_file = mounted.ucxl / "claude:architect@bzzz:auth" / "src" / "auth.go" / "developer"
        assert role_file.read_bytes().endswith(b"second version\n")
        assert (
            (role_file.parent / ".history" / "developer" / "1")
            .read_bytes()
            .endswith(b"first version\n")
        )
    finally:
        mounted.unmount()
    assert not is_mounted(mounted.mnt)


# -- the audit log before it was keyed ------------------------------------------------

LEGACY_LOG = Path(__file__).parent / "fixtures" / "audit-format1.log"


@pytest.fixture
def legacy_log(data_dir: Path) -> Path:
    """The format-1 data directory with the unkeyed audit log a format-1 slurpfs wrote
    (four entries: plain BLAKE2b `hash`, no anchor in the store)."""
    log = data_dir / "audit.log"
    shutil.copyfile(LEGACY_LOG, log)
    return log


def test_an_unkeyed_audit_log_verifies_as_legacy_and_the_keyed_chain_continues_it(
    data_dir: Path, legacy_log: Path
) -> None:
    cfg = _config(data_dir)
    assert verify_audit(cfg, PASSPHRASE) == Verified(entries=4, legacy=4, anchored=None)

    with ContextStore.open(cfg, PASSPHRASE) as model:  # anchors the legacy tail
        model.get(parse(f"{AUTH}/src/auth.go"), "developer")

    assert verify_audit(cfg, PASSPHRASE) == Verified(entries=5, legacy=4, anchored=5)
    lines = legacy_log.read_bytes().splitlines(keepends=True)
    first_keyed = json.loads(lines[4])
    assert "mac" in first_keyed
    assert first_keyed["prev"] == json.loads(lines[3])["hash"]
    assert first_keyed["seq"] == 5


def test_the_legacy_part_cannot_change_once_the_keyed_chain_continues_it(
    data_dir: Path, legacy_log: Path
) -> None:
    """Before, anyone who could write the log could change an entry and recompute the
    hashes after it. Expected: the first keyed entry's MAC covers the hash of the last
    legacy one, so rewriting the legacy part breaks the chain there."""
    cfg = _config(data_dir)
    with ContextStore.open(cfg, PASSPHRASE) as model:
        model.get(parse(f"{AUTH}/src/auth.go"), "developer")
    lines = legacy_log.read_bytes().splitlines(keepends=True)
    prev = json.loads(lines[0])["hash"]
    forged = [lines[0]]
    for i, raw in enumerate(lines[1:4]):
        body = json.loads(raw)
        del body["hash"]
        body["prev"] = prev
        if i == 1:
            body["allowed"] = True  # the denied read becomes an allowed one
        prev = hashlib.blake2b(_canonical(body), digest_size=32).hexdigest()
        forged.append(_canonical({**body, "hash": prev}) + b"\n")
    legacy_log.write_bytes(b"".join([*forged, lines[4]]))

    with pytest.raises(Corrupt, match="line 5: chain broken"):
        verify_audit(cfg, PASSPHRASE)


def test_audit_verify_of_a_legacy_log_says_it_is_unkeyed(
    data_dir: Path, legacy_log: Path, tmp_path: Path
) -> None:
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_bytes(PASSPHRASE)
    passphrase_file.chmod(0o600)
    env = {"SLURPFS_PASSPHRASE_FILE": str(passphrase_file)}

    text = run_cli("audit", "verify", "--data", data_dir, env=env)
    as_json = run_cli("audit", "verify", "--data", data_dir, "--json", env=env)

    assert text.returncode == 0, text.stderr
    assert b"4 entries, all in the unkeyed legacy format" in text.stdout
    assert json.loads(as_json.stdout) == {"ok": True, "entries": 4, "legacy": 4, "anchored": None}


def _canonical(body: dict[str, object]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
