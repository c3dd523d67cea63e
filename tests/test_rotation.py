"""Key rotation: new generation, slots re-wrapped, old private key destroyed."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Nodes, run_cli_process

from slurpfs import config, fsck
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import ContextStore
from slurpfs.ucxl import parse


@pytest.fixture
def model(tmp_path: Path) -> ContextStore:
    cfg = config.load(
        environ={"HOME": str(tmp_path)}, overrides={"node.data_dir": str(tmp_path / "d")}
    )
    return ContextStore.init(cfg, None, kdf=KdfParams.weak())


def test_rotation_rewraps_every_version_and_destroys_the_old_key(model: ContextStore) -> None:
    addresses = [parse(f"ucxl://a:b@p:t/doc{i}") for i in range(5)]
    for i, address in enumerate(addresses):
        model.put(address, "developer", b"version one of %d" % i)
        model.put(address, "developer", b"version two of %d" % i)
    old_key = model.config.data_dir / "keys" / "roles" / "developer.1.key"
    assert old_key.exists()

    report = model.rotate_role("developer")

    assert (report.old_generation, report.new_generation, report.rewrapped) == (1, 2, 10)
    assert not old_key.exists()
    assert model.keyring.current_public("developer").generation == 2
    assert model.store.versions_sealed_to("developer", 1) == []
    # A fresh process (no plaintext cache) reads every version through the new key.
    model.close()
    reopened = ContextStore.open(model.config, None, kdf=KdfParams.weak())
    for i, address in enumerate(addresses):
        history = reopened.history(address, "developer")
        got = [reopened.get_version(address, "developer", v.version_id).data for v in history]
        assert got == [b"version one of %d" % i, b"version two of %d" % i]
    # New writes are sealed to the new generation only.
    info = reopened.put(addresses[0], "developer", b"after rotation")
    slots = {(s.role, s.generation) for s in reopened.store.slots(info.version_id)}
    assert ("developer", 2) in slots
    assert ("developer", 1) not in slots
    assert fsck.check(reopened).ok
    reopened.close()


def test_a_process_reads_a_generation_another_process_rotated_to(nodes: Nodes) -> None:
    """A daemon's keyring is a snapshot: `keys rotate` in another process (or a grant
    replicated in) puts a new generation on disk and re-wraps the slots to it. The
    open model reads the keys again the first time a version needs a generation it
    has not loaded, instead of refusing the read (EACCES through a mount)."""
    node, reader = nodes.new("d", held=["developer"])  # no other reader role to fall back on
    address = parse("ucxl://a:b@p:t/rotated")
    reader.put(address, "developer", b"sealed to generation one")
    data = str(node.data_dir)

    rotated = run_cli_process("keys", "rotate", "developer", "--data", data)
    assert rotated.returncode == 0, rotated.stderr
    put = ("put", "ucxl://a:b@p:t/after", "--role", "developer", "--data", data)
    assert run_cli_process(*put, input=b"sealed to generation two").returncode == 0

    assert reader.get(parse("ucxl://a:b@p:t/after"), "developer").data == (
        b"sealed to generation two"
    )
    assert reader.get(address, "developer").data == b"sealed to generation one"
    assert reader.keyring.current_public("developer").generation == 2
