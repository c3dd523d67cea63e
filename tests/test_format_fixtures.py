"""Old formats keep opening: a data directory written by format 1 is checked in.

`tests/fixtures/format1` was made once by `ContextStore.init` with a passphrase
(weak Argon2id parameters, stored in the key files) and a few contexts; its LMDB
file is a compacted copy. Git does not keep file modes, so the tests copy it and
restore the 0600/0700 modes the keystore insists on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fsutil import Mounted, is_mounted

from slurpfs import config, fsck
from slurpfs.errors import WrongPassphrase
from slurpfs.model import ContextStore
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
