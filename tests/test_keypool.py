"""Data keys sealed ahead of time: each used once, only for its readers, gone at rotation."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Nodes
from fsutil import Mounted, mounted_at, wait_for

from slurpfs import config
from slurpfs.crypto.envelope import distinct_readers, open_envelope, seal
from slurpfs.crypto.keypool import MAX_READER_SETS, KeyPool, ReaderSet
from slurpfs.crypto.keys import Keyring, NodeIdentity, RoleKeyPair
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import ContextStore
from slurpfs.ucxl import parse

NODE = NodeIdentity.generate()
DEV = RoleKeyPair.generate("developer", 1)
ARCH = RoleKeyPair.generate("architect", 1)
BOTH = distinct_readers([DEV.public, ARCH.public, DEV.public])
ADDRESS = "claude:architect@bzzz:auth/src/auth.go"
SECRET = b"prepared-key canary 3f1e"


def seal_with(pool: KeyPool, readers: ReaderSet, plaintext: bytes = SECRET) -> bytes:
    """Seal with a key taken from `pool`; returns the data key used."""
    prepared = pool.take(readers)
    assert prepared is not None
    sealed = seal(
        plaintext, address=ADDRESS, role="developer", parents=(), hlc=1, deleted=False,
        readers=readers, node=NODE, prepared=prepared,
    )  # fmt: skip
    assert sealed.data_key == prepared.data_key
    assert sealed.slots == prepared.slots
    for held in (DEV, ARCH):  # each reader opens it with its own private key alone
        ring = Keyring(NODE, [DEV.public, ARCH.public], [held], ())
        got = open_envelope(sealed.envelope, sealed.slots, ring, address=ADDRESS, role="developer")
        assert got == plaintext
    return sealed.data_key


def test_distinct_readers_drop_repeats_in_order() -> None:
    assert (DEV.public, ARCH.public) == BOTH


def test_a_prepared_key_seals_a_version_every_reader_opens() -> None:
    pool = KeyPool(4)
    pool.want(BOTH)
    assert pool.fill() == 4
    seal_with(pool, BOTH)
    assert (len(pool), pool.taken, pool.missed) == (3, 1, 0)


def test_each_prepared_key_is_handed_out_once() -> None:
    pool = KeyPool(4)
    pool.want(BOTH)
    pool.fill()
    keys = {seal_with(pool, BOTH) for _ in range(4)}
    assert len(keys) == 4
    assert pool.take(BOTH) is None  # empty: the caller seals inline
    assert (pool.taken, pool.missed) == (4, 1)


def test_seal_refuses_a_key_prepared_for_other_readers() -> None:
    pool = KeyPool(1)
    pool.want((DEV.public,))
    pool.fill()
    prepared = pool.take((DEV.public,))
    with pytest.raises(ValueError, match="other readers"):
        seal(
            SECRET, address=ADDRESS, role="developer", parents=(), hlc=1, deleted=False,
            readers=BOTH, node=NODE, prepared=prepared,
        )  # fmt: skip


def test_a_first_take_registers_its_readers_and_a_low_pool_asks_for_more() -> None:
    asked: list[int] = []
    pool = KeyPool(4, on_low=lambda: asked.append(len(pool)))
    assert pool.take(BOTH) is None  # never seen: missed, and now kept
    assert asked == [0]
    assert pool.fill() == 4
    pool.take(BOTH)  # 3 left: above half
    assert asked == [0]
    pool.take(BOTH)  # 2 left: half
    assert asked == [0, 2]
    assert pool.fill() == 2  # back to full


def test_only_the_most_recently_used_reader_sets_are_kept() -> None:
    pool = KeyPool(2)
    sets = [(RoleKeyPair.generate(f"role{i}", 1).public,) for i in range(MAX_READER_SETS + 1)]
    for readers in sets:
        pool.want(readers)
    assert pool.fill() == 2 * MAX_READER_SETS
    assert pool.take(sets[0]) is None  # dropped as the least recently used
    assert pool.take(sets[-1]) is not None


@pytest.fixture
def model(tmp_path: Path) -> ContextStore:
    """A store of its own (the test closes and reopens it)."""
    cfg = config.load(
        environ={"HOME": str(tmp_path)}, overrides={"node.data_dir": str(tmp_path / "d")}
    )
    return ContextStore.init(cfg, None, kdf=KdfParams.weak())


def test_the_model_seals_with_prepared_keys_and_rotation_drops_them(model: ContextStore) -> None:
    address = parse("ucxl://a:b@p:t/doc")
    pool = model.key_pool = KeyPool(2)
    before = model.reader_set("developer")
    pool.want(before)
    pool.fill()
    model.put(address, "developer", b"sealed with a prepared key")
    assert (pool.taken, pool.missed) == (1, 0)
    assert model.statistics().prepared_keys_taken == 1

    model.rotate_role("developer")
    assert len(pool) == 0  # keys sealed to generation 1 are gone with it
    after = model.reader_set("developer")
    assert after != before
    pool.want(after)
    pool.fill()
    info = model.put(address, "developer", b"after rotation")
    assert pool.taken == 2
    slots = {(s.role, s.generation) for s in model.store.slots(info.version_id)}
    assert ("developer", 2) in slots
    assert ("developer", 1) not in slots
    model.key_pool = None
    model.close()
    reopened = ContextStore.open(model.config, None, kdf=KdfParams.weak())  # no plaintext cache
    history = reopened.history(address, "developer")
    got = [reopened.get_version(address, "developer", v.version_id).data for v in history]
    assert got == [b"sealed with a prepared key", b"after rotation"]
    reopened.close()


def _policy(tid: int) -> int | None:
    """The scheduling policy of a thread, None if it ended meanwhile (an idle worker)."""
    try:
        return os.sched_getscheduler(tid)
    except ProcessLookupError:
        return None


def _stat(m: Mounted, name: str) -> int:
    status = (m.mnt / ".slurp" / "status").read_text()
    found = re.search(rf"^model_{name}: (\d+)$", status, re.MULTILINE)
    assert found is not None, status
    return int(found.group(1))


@pytest.fixture
def mnt(nodes: Nodes, tmp_path: Path) -> Iterator[Mounted]:
    m = mounted_at(nodes, tmp_path)
    try:
        yield m
    finally:
        m.sweep()


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_a_mount_prepares_keys_and_its_saves_use_them(mnt: Mounted) -> None:
    wait_for(lambda: _stat(mnt, "prepared_keys_ready") > 0, what="prepared keys")
    # The key thread seals only when a CPU would otherwise idle; nothing else does.
    status = (mnt.mnt / ".slurp" / "status").read_text()
    found = re.search(r"^pid: (\d+)$", status, re.MULTILINE)
    assert found is not None, status
    tasks = [int(t) for t in os.listdir(f"/proc/{found.group(1)}/task")]
    assert sum(_policy(t) == os.SCHED_IDLE for t in tasks) == 1, [_policy(t) for t in tasks]
    d = mnt.ucxl / "claude:architect@bzzz:auth" / "src"
    d.mkdir(parents=True)
    for i in range(3):
        (d / "developer").write_bytes(b"save %d\n" % i)
    # (.slurp/status is rendered at most once a second)
    wait_for(
        lambda: _stat(mnt, "prepared_keys_taken") + _stat(mnt, "prepared_keys_missed") == 3,
        what="three saves counted",
    )
    assert _stat(mnt, "prepared_keys_taken") >= 1  # keys were ready before the first save
    mnt.unmount()
    # Another process, without the mount's plaintext cache, opens every version.
    for i in range(3):
        got = mnt.cli("get", "--role", "developer", f"ucxl://claude:architect@bzzz:auth/^^{i}/src")
        assert got.stdout == b"save %d\n" % i
    assert not any(SECRET in p.read_bytes() for p in Path(mnt.data).rglob("*") if p.is_file()), (
        os.listdir(mnt.data)
    )
