"""The keystore: file modes, passphrases, refusals, swaps, rotation and destruction."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nacl.pwhash import argon2id

from slurpfs.crypto.envelope import open_envelope, seal, unwrap_data_key, wrap_data_key
from slurpfs.crypto.keys import Keyring, NodeIdentity
from slurpfs.crypto.keystore import KdfParams, Keystore
from slurpfs.errors import (
    AlreadyExists,
    ConfigError,
    Corrupt,
    KeyMissing,
    NotFound,
    NotInitialised,
    WrongPassphrase,
)

ROLES = ("developer", "architect")
PASS = b"correct horse battery staple"
WEAK = KdfParams.weak()


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Prove modes come from os.open/mkdir, not from a friendly umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def make(tmp_path: Path, passphrase: bytes | None = None) -> tuple[Keystore, Keyring]:
    ks = Keystore(tmp_path, passphrase, WEAK)
    return ks, ks.create(ROLES)


def same(a: Keyring, b: Keyring) -> bool:
    return (
        a.node.node_id == b.node.node_id
        and a.roles() == b.roles()
        and a.held_roles() == b.held_roles()
        and [(p.role, p.generation, bytes(p.private)) for p in a.held_pairs()]
        == [(p.role, p.generation, bytes(p.private)) for p in b.held_pairs()]
        and a.trusted_nodes == b.trusted_nodes
    )


@pytest.mark.parametrize("passphrase", [None, PASS], ids=["plain", "argon2id"])
@pytest.mark.usefixtures("umask_zero")
def test_create_load_and_modes(tmp_path: Path, passphrase: bytes | None) -> None:
    ks, ring = make(tmp_path, passphrase)
    assert ks.exists()
    assert ring.roles() == ring.held_roles() == frozenset(ROLES)
    keys = tmp_path / "keys"
    assert mode(keys) == mode(keys / "roles") == 0o700
    files = [keys / "node.key", keys / "public.json", *sorted((keys / "roles").iterdir())]
    assert [f.name for f in files[2:]] == ["architect.1.key", "developer.1.key"]
    assert all(mode(f) == 0o600 for f in files)
    assert not [f for f in keys.rglob(".*")]  # no temp files left behind
    loaded = Keystore(tmp_path, passphrase, WEAK).load()
    assert same(ring, loaded)
    for pair in ring.held_pairs():  # key material is not stored in the clear under a passphrase
        raw = (keys / "roles" / f"{pair.role}.1.key").read_bytes()
        assert (bytes(pair.private) in raw) is (passphrase is None)
        assert raw[4] == (0 if passphrase is None else 1)


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    make(tmp_path, PASS)
    with pytest.raises(WrongPassphrase):
        Keystore(tmp_path, b"wrong", WEAK).load()
    with pytest.raises(WrongPassphrase):
        Keystore(tmp_path, None).load()


def test_passphrase_on_plain_keystore_is_refused(tmp_path: Path) -> None:
    make(tmp_path, None)
    with pytest.raises(ConfigError, match="not passphrase-protected"):
        Keystore(tmp_path, PASS, WEAK).load()
    with pytest.raises(ConfigError):
        Keystore(tmp_path, b"")


def test_kdf_runs_once_per_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ks = Keystore(tmp_path, PASS, WEAK)
    ks.create([f"role{i}" for i in range(10)])
    calls: list[bytes] = []
    real: Callable[..., bytes] = argon2id.kdf

    def counting(*args: object, **kwargs: object) -> bytes:
        calls.append(b"")
        return real(*args, **kwargs)

    monkeypatch.setattr(argon2id, "kdf", counting)
    assert len(Keystore(tmp_path, PASS, WEAK).load().held_roles()) == 10
    assert len(calls) == 1


def test_not_initialised_and_already_exists(tmp_path: Path) -> None:
    ks = Keystore(tmp_path, None)
    assert not ks.exists()
    with pytest.raises(NotInitialised):
        ks.load()
    ks.create(ROLES)
    with pytest.raises(AlreadyExists):
        ks.create(ROLES)
    # an interrupted create (no public.json yet) is never silently overwritten
    (tmp_path / "keys" / "public.json").unlink()
    assert not ks.exists()
    with pytest.raises(AlreadyExists, match="key files already present"):
        ks.create(ROLES)


@pytest.mark.parametrize(
    ("relpath", "bad_mode"),
    [
        ("roles/developer.1.key", 0o644),
        ("node.key", 0o640),
        ("node.key", 0o604),
        (".", 0o755),
        ("roles", 0o750),
        ("public.json", 0o666),
    ],
)
def test_group_or_world_access_is_refused(tmp_path: Path, relpath: str, bad_mode: int) -> None:
    ks, _ = make(tmp_path)
    path = tmp_path / "keys" / relpath
    os.chmod(path, bad_mode)
    with pytest.raises(ConfigError) as exc:
        ks.load()
    assert str(path) in str(exc.value)


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    ks, _ = make(tmp_path)
    key = tmp_path / "keys" / "roles" / "developer.1.key"
    real = tmp_path / "elsewhere.key"
    key.rename(real)
    key.symlink_to(real)
    with pytest.raises(ConfigError, match="symlink"):
        ks.load()


@pytest.mark.parametrize("passphrase", [None, PASS], ids=["plain", "argon2id"])
def test_swapped_key_files_fail(tmp_path: Path, passphrase: bytes | None) -> None:
    ks, _ = make(tmp_path, passphrase)
    roles = tmp_path / "keys" / "roles"
    dev, arch = roles / "developer.1.key", roles / "architect.1.key"
    dev_bytes = dev.read_bytes()
    dev.write_bytes(arch.read_bytes())
    with pytest.raises(Corrupt, match="developer.1.key"):
        ks.load()
    dev.write_bytes(dev_bytes)
    node = tmp_path / "keys" / "node.key"
    node.write_bytes(dev_bytes)
    with pytest.raises((Corrupt, WrongPassphrase)):
        Keystore(tmp_path, passphrase, WEAK).load()


def test_public_json_mismatch_is_corrupt(tmp_path: Path) -> None:
    ks, _ = make(tmp_path)
    path = tmp_path / "keys" / "public.json"
    doc = json.loads(path.read_text())
    doc["roles"]["developer"][0]["public"] = NodeIdentity.generate().node_id_hex
    path.write_text(json.dumps(doc))
    with pytest.raises(Corrupt, match="does not match"):
        ks.load()
    doc["extra"] = 1
    path.write_text(json.dumps(doc))
    with pytest.raises(Corrupt, match="malformed"):
        ks.load()


def test_held_subset_and_add_role(tmp_path: Path) -> None:
    ks = Keystore(tmp_path, None)
    ring = ks.create(ROLES, held=["developer"])
    assert ring.held_roles() == {"developer"}
    assert ring.roles() == set(ROLES)
    assert ring.private("architect", 1) is None
    assert ring.current_public("architect").generation == 1
    assert not (tmp_path / "keys" / "roles" / "architect.1.key").exists()
    ring = ks.add_role("reviewer")
    assert "reviewer" in ring.held_roles()
    with pytest.raises(AlreadyExists):
        ks.add_role("developer")
    with pytest.raises(ConfigError):
        ks.add_role("../evil")
    with pytest.raises(KeyMissing):
        ring.current_public("nobody")


def test_rotate_rewrap_destroy(tmp_path: Path) -> None:
    ks, ring = make(tmp_path, PASS)
    addr = "a:developer@p:t/src/x.go"
    s = seal(
        b"context", address=addr, role="developer", parents=[], hlc=1, deleted=False,
        readers=[ring.current_public("developer")], node=ring.node,
    )  # fmt: skip
    new, old = ks.rotate("developer")
    assert (new.generation, old.generation if old else None) == (2, 1)
    ring = ks.load()
    assert ring.current_public("developer") == new.public
    assert ring.generations("developer") == (1, 2)
    # reads keep working during the rotation, then slots are re-wrapped
    assert open_envelope(s.envelope, s.slots, ring, address=addr, role="developer") == b"context"
    slots = (wrap_data_key(unwrap_data_key(s.slots, ring), new.public),)
    ks.destroy_generation("developer", 1)
    assert not (tmp_path / "keys" / "roles" / "developer.1.key").exists()
    ring = ks.load()
    assert ring.generations("developer") == (2,)
    assert ring.private("developer", 1) is None
    assert open_envelope(s.envelope, slots, ring, address=addr, role="developer") == b"context"
    with pytest.raises(KeyMissing):
        open_envelope(s.envelope, s.slots, ring, address=addr, role="developer")
    with pytest.raises(ConfigError, match="current"):
        ks.destroy_generation("developer", 2)
    with pytest.raises(NotFound):
        ks.destroy_generation("developer", 1)
    with pytest.raises(NotFound):
        ks.rotate("nobody")


def test_rotating_a_role_this_node_does_not_hold_is_refused(tmp_path: Path) -> None:
    """Rotation re-wraps the role's data keys, which needs its current private key;
    without it the node would only make itself a key that opens no existing version.
    Expected: KeyMissing naming the role, and nothing written."""
    ks = Keystore(tmp_path, None)
    ks.create(ROLES, held=["developer"])
    before = ks.load()
    with pytest.raises(KeyMissing, match="does not hold role 'architect'"):
        ks.rotate("architect")
    after = ks.load()
    assert after.held_roles() == before.held_roles() == {"developer"}
    assert after.generations("architect") == before.generations("architect") == (1,)


def test_drop_private(tmp_path: Path) -> None:
    ks, _ = make(tmp_path)
    ks.rotate("architect")
    ring = ks.drop_private("architect")
    assert ring.held_roles() == {"developer"}
    assert "architect" in ring.roles()
    assert not list((tmp_path / "keys" / "roles").glob("architect.*"))
    assert same(ring, ks.load())
    with pytest.raises(NotFound):
        ks.drop_private("nobody")


def test_trust_node(tmp_path: Path) -> None:
    ks, ring = make(tmp_path)
    other = NodeIdentity.generate().node_id
    assert ring.is_trusted(ring.node.node_id)
    assert not ring.is_trusted(other)
    ks.trust_node(other)
    ks.trust_node(other)
    ring = ks.load()
    assert ring.trusted_nodes == {other}
    assert ring.is_trusted(other)
    ks.distrust_node(other)
    assert not ks.load().is_trusted(other)
    with pytest.raises(ConfigError):
        ks.trust_node(b"short")
