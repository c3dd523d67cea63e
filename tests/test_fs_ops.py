"""Ops-level tests: `Operations` handlers called directly, no kernel.

Each test drives the handlers the way the kernel would (lookup, create, open,
write, flush, release, rename, ...) on a real store that is fsck-checked at
teardown (the `model` fixture).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import cast

import pyfuse3
import pytest
import trio
import trio.testing
from conftest import Nodes
from fsutil import (
    AUTH,
    UID_4242_DEVELOPER,
    FakeKernel,
    Fields,
    OpsHarness,
    ctx,
    make_ops,
    raises_errno,
)

from slurpfs import audit
from slurpfs.config import RoleConfig
from slurpfs.crypto import envelope as env
from slurpfs.errors import NotInitialised
from slurpfs.fs.access import RoleMap, read_sup_groups
from slurpfs.fs.inodes import Kind
from slurpfs.fs.invalidate import COALESCE, Invalidator
from slurpfs.fs.ops import Operations
from slurpfs.fs.scratch import ENTRY_BYTES
from slurpfs.model import ContextStore, VersionInfo, data_paths
from slurpfs.service import control, mountcmd
from slurpfs.service.daemon import MountError, TtlCleaner
from slurpfs.store import Commit, VersionRecord
from slurpfs.store.lmdb_store import WriterLock
from slurpfs.ucxl import Address, parse

DIR = f"ucxl/{AUTH}/src/auth.go"
ADDR = parse(f"ucxl://{AUTH}/src/auth.go")
DEV = "developer"


async def test_the_root_lists_the_three_entries(fs: OpsHarness) -> None:
    assert sorted(await fs.listdir("")) == [".search", ".slurp", "ucxl"]
    assert await fs.listdir(".search") == []
    assert "status" in await fs.listdir(".slurp")


async def test_write_read_and_one_version_per_close(fs: OpsHarness, model: ContextStore) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"first\n")
    assert await fs.read(f"{DIR}/{DEV}") == b"first\n"
    await fs.write(f"{DIR}/{DEV}", b"more\n", append=True)
    assert await fs.read(f"{DIR}/{DEV}") == b"first\nmore\n"
    assert [c.size for c in model.history(ADDR, DEV)] == [6, 11]
    attrs = await fs.lookup(f"{DIR}/{DEV}")
    assert attrs.st_size == 11
    assert attrs.st_nlink == 1
    assert await fs.listdir(f"{DIR}/.history/{DEV}") == ["1", "2"]
    assert await fs.read(f"{DIR}/.history/{DEV}/1") == b"first\n"


async def test_empty_create_is_stored_and_open_trunc_needs_no_old_content(
    fs: OpsHarness, model: ContextStore
) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"")
    assert model.get(ADDR, DEV).data == b""
    await fs.write(f"{DIR}/{DEV}", b"replaced")
    assert model.get(ADDR, DEV).data == b"replaced"
    assert len(model.history(ADDR, DEV)) == 2


async def test_a_close_stores_only_what_its_own_handle_wrote(
    fs: OpsHarness, ops: Operations, model: ContextStore
) -> None:
    """One version per save, whatever else closes meanwhile. The kernel flushes at
    every close of every duplicate descriptor: a shell's ``> file`` closes one before
    anything is written, and a reader may close in the middle of a writer's save.
    Expected: neither stores a version; the writer's own close stores exactly its
    bytes; an emptying alone (``: > file``) is stored at release."""
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"old\n")
    ino = await fs.ino(f"{DIR}/{DEV}")

    def sizes() -> list[int]:
        return [v.size for v in model.history(ADDR, DEV)]

    writer = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, fs.ctx)
    await ops.flush(writer.fh)  # the duplicate closed before the first write
    reader = await ops.open(ino, os.O_RDONLY, fs.ctx)
    await ops.write(writer.fh, 0, b"part1-")
    assert await ops.read(reader.fh, 0, 100) == b"part1-"  # shared buffer, as POSIX says
    await ops.flush(reader.fh)
    await ops.release(reader.fh)
    assert sizes() == [4]
    await ops.write(writer.fh, 6, b"part2\n")
    await ops.flush(writer.fh)
    await ops.release(writer.fh)
    assert sizes() == [4, 12]
    assert model.get(ADDR, DEV).data == b"part1-part2\n"

    emptier = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, fs.ctx)
    await ops.flush(emptier.fh)
    assert sizes() == [4, 12]
    await ops.release(emptier.fh)
    assert sizes() == [4, 12, 0]


async def test_o_append_writes_go_to_the_end_whatever_offset_the_kernel_sends(
    fs: OpsHarness, ops: Operations, model: ContextStore
) -> None:
    """Without the writeback cache the kernel sends an O_APPEND write at the size it
    last saw; after another process stored a longer (or shorter) version that size is
    stale. Expected: the bytes land at the end of the current version, no overwrite,
    no hole of zero bytes."""
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"short\n")
    ino = await fs.ino(f"{DIR}/{DEV}")
    for other, stale in ((b"a much longer version\n", 6), (b"x\n", 22)):
        model.put(ADDR, DEV, other)  # as `slurpfs put` would, behind the mount's back
        fi = await ops.open(ino, os.O_WRONLY | os.O_APPEND, fs.ctx)
        assert await ops.write(fi.fh, stale, b"APPENDED\n") == 9
        await ops.flush(fi.fh)
        await ops.release(fi.fh)
        assert model.get(ADDR, DEV).data == other + b"APPENDED\n"


async def test_an_open_file_follows_versions_stored_elsewhere(
    fs: OpsHarness, ops: Operations, model: ContextStore
) -> None:
    """A file stays open (less, tail -f, an editor) while another process or a peer
    stores new versions. Expected: the open reader's next read gives the new bytes,
    as many as the size it is told; an in-place write through another descriptor
    builds on the newest version, so nothing stored meanwhile is lost."""
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"v1\n")
    ino = await fs.ino(f"{DIR}/{DEV}")
    holder = await ops.open(ino, os.O_RDONLY, fs.ctx)
    assert await ops.read(holder.fh, 0, 100) == b"v1\n"

    model.put(ADDR, DEV, b"v2 from elsewhere\n")  # as `slurpfs put` would
    assert (await ops.getattr(ino, fs.ctx)).st_size == 18
    assert await ops.read(holder.fh, 3, 100) == b"from elsewhere\n"

    appender = await ops.open(ino, os.O_WRONLY | os.O_APPEND, fs.ctx)
    patcher = await ops.open(ino, os.O_WRONLY, fs.ctx)
    model.put(ADDR, DEV, b"v3\n")  # again, while all three are open
    assert await ops.write(appender.fh, 18, b"appended\n") == 9
    await ops.flush(appender.fh)
    await ops.release(appender.fh)
    assert model.get(ADDR, DEV).data == b"v3\nappended\n"
    model.put(ADDR, DEV, b"abc\n")
    assert await ops.write(patcher.fh, 0, b"X") == 1  # dd conv=notrunc
    await ops.flush(patcher.fh)
    await ops.release(patcher.fh)
    assert model.get(ADDR, DEV).data == b"Xbc\n"
    assert await ops.read(holder.fh, 0, 100) == b"Xbc\n"
    await ops.release(holder.fh)


async def test_a_save_waits_for_another_writer_off_the_fuse_loop(
    fs: OpsHarness, model: ContextStore
) -> None:
    """While another process holds the store's writer lock (`slurpfs import` sealing
    a batch, say), a save waits for it in a worker thread, not on the FUSE loop.
    Expected: other requests are answered meanwhile; the save completes, as one new
    version, once the lock is free."""
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"one\n")
    await fs.write(f"{DIR}/architect", b"other\n")
    other = WriterLock(model.store.path / "writers.lock")  # as another process would
    assert other.acquire()
    saved = trio.Event()

    async def save() -> None:
        await fs.write(f"{DIR}/{DEV}", b"two\n")
        saved.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(save)
            await trio.testing.wait_all_tasks_blocked()
            assert not saved.is_set()
            assert await fs.read(f"{DIR}/architect") == b"other\n"
            assert await fs.listdir(DIR) == ["architect", DEV]
            other.release()
    finally:
        other.close()
    assert saved.is_set()
    assert [v.size for v in model.history(ADDR, DEV)] == [4, 4]
    assert model.get(ADDR, DEV).data == b"two\n"


@pytest.mark.expect_warnings("internal error; the request fails with EIO")
async def test_a_bug_in_a_handler_fails_that_request_not_the_mount(
    fs: OpsHarness,
    ops: Operations,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception (a bug) must not end the FUSE loop, which would take
    every open buffer of every process with it. Expected: that request fails with
    EIO, an ERROR line carries the traceback, the next request is served."""
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"kept\n")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.tree, "entries", broken)
    with raises_errno(errno.EIO):
        await fs.listdir(DIR)
    assert "internal error; the request fails with EIO" in caplog.text
    assert "RuntimeError: a bug" in caplog.text
    monkeypatch.undo()
    assert await fs.listdir(DIR) == [DEV]
    assert await fs.read(f"{DIR}/{DEV}") == b"kept\n"


async def setattr_size(fs: OpsHarness, path: str, size: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_size = size
    fields = cast(pyfuse3.SetattrFields, Fields(update_size=True))
    return await fs.ops.setattr(await fs.ino(path), attr, fields, None, fs.ctx)


async def test_truncate_by_path_commits_once(fs: OpsHarness, model: ContextStore) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"0123456789")
    assert (await setattr_size(fs, f"{DIR}/{DEV}", 4)).st_size == 4
    assert model.get(ADDR, DEV).data == b"0123"
    assert (await setattr_size(fs, f"{DIR}/{DEV}", 0)).st_size == 0
    assert [v.size for v in model.history(ADDR, DEV)] == [10, 4, 0]
    with raises_errno(errno.EFBIG):
        await setattr_size(fs, f"{DIR}/{DEV}", model.config.store.max_context_bytes + 1)


async def test_temporal_views_and_history(fs: OpsHarness, model: ContextStore) -> None:
    await fs.makedirs(DIR)
    for text in (b"one", b"two", b"three"):
        await fs.write(f"{DIR}/{DEV}", text)
    base = f"ucxl/{AUTH}"
    assert await fs.read(f"{base}/~~1/src/auth.go/{DEV}") == b"two"
    assert await fs.read(f"{base}/^^0/src/auth.go/{DEV}") == b"one"
    assert await fs.read(f"{base}/*~/src/auth.go/{DEV}") == b"one"
    assert await fs.read(f"{base}/*^/src/auth.go/{DEV}") == b"three"
    assert await fs.read(f"{DIR}/.history/{DEV}/2") == b"two"
    # Temporal segments resolve but are not listed, and are read-only and uncached.
    assert "~~1" not in await fs.listdir(base)
    attrs = await fs.lookup(f"{base}/~~1/src/auth.go/{DEV}")
    assert attrs.attr_timeout == 0
    assert attrs.st_mode & 0o222 == 0
    with raises_errno(errno.EROFS):
        await fs.ops.open(attrs.st_ino, os.O_WRONLY, fs.ctx)
    with raises_errno(errno.ENOENT):
        await fs.lookup(f"{base}/~~5/src/auth.go/{DEV}")


async def test_invalid_names_are_einval_with_a_log_line(
    fs: OpsHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="slurpfs")
    with raises_errno(errno.EINVAL):
        await fs.mkdir("ucxl/not-an-authority")
    assert "not-an-authority" in caplog.text
    await fs.makedirs(f"ucxl/{AUTH}/src")
    for bad in (".git", "developer", "~~1", "developer.conflict-0123456789abcdef"):
        with raises_errno(errno.EINVAL):
            await fs.mkdir(f"ucxl/{AUTH}/src/{bad}")
    assert "role name" in caplog.text
    assert "the name of a conflict file" in caplog.text
    # Each name is valid, but the address would be longer than the store keys.
    await fs.mkdir(f"ucxl/{AUTH}/src/{'y' * 255}")
    with raises_errno(errno.ENAMETOOLONG):
        await fs.mkdir(f"ucxl/{AUTH}/src/{'y' * 255}/{'z' * 255}")
    assert "more than 373" in caplog.text
    await fs.ops.rmdir(*await fs.parent(f"ucxl/{AUTH}/src/{'y' * 255}"), fs.ctx)
    assert await fs.listdir(f"ucxl/{AUTH}/src") == []
    with raises_errno(errno.EINVAL):
        await fs.write(f"ucxl/{AUTH}/src/developer.conflict-0123456789abcdef", b"x")
    with raises_errno(errno.EISDIR):
        await fs.write(f"ucxl/{AUTH}/src/.history", b"x")


async def test_scratch_files_and_a_save_by_rename(fs: OpsHarness, model: ContextStore) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"v1")
    await fs.write(f"{DIR}/.{DEV}.swp", b"swap")
    await fs.write(f"{DIR}/{DEV}.tmp.1234", b"v2")
    assert sorted(await fs.listdir(DIR)) == [f".{DEV}.swp", DEV, f"{DEV}.tmp.1234"]
    await fs.rename(f"{DIR}/{DEV}.tmp.1234", f"{DIR}/{DEV}")
    assert await fs.read(f"{DIR}/{DEV}") == b"v2"
    assert len(model.history(ADDR, DEV)) == 2
    await fs.unlink(f"{DIR}/.{DEV}.swp")
    assert await fs.listdir(DIR) == [DEV]
    assert fs.ops.scratch.used == ENTRY_BYTES + 4  # unlinked, but the kernel may still use it
    await fs.forget_all()
    assert fs.ops.scratch.used == 0


async def test_backup_by_rename_hides_the_role_until_the_next_version(
    fs: OpsHarness, model: ContextStore
) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"original")
    ino = await fs.ino(f"{DIR}/{DEV}")
    await fs.rename(f"{DIR}/{DEV}", f"{DIR}/{DEV}~")
    # The moved inode is now the backup, with the old content; the role name is gone.
    assert await fs.ino(f"{DIR}/{DEV}~") == ino
    assert await fs.read(f"{DIR}/{DEV}~") == b"original"
    assert not await fs.exists(f"{DIR}/{DEV}")
    assert await fs.listdir(DIR) == [f"{DEV}~"]
    await fs.write(f"{DIR}/{DEV}", b"saved")
    assert await fs.read(f"{DIR}/{DEV}") == b"saved"
    assert [v.size for v in model.history(ADDR, DEV)] == [8, 5]
    await fs.unlink(f"{DIR}/{DEV}~")
    assert await fs.listdir(DIR) == [DEV]


async def test_renaming_an_untouched_backup_back_stores_nothing(
    fs: OpsHarness, model: ContextStore
) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"original")
    await fs.rename(f"{DIR}/{DEV}", f"{DIR}/{DEV}~")
    await fs.rename(f"{DIR}/{DEV}~", f"{DIR}/{DEV}")
    assert len(model.history(ADDR, DEV)) == 1
    assert await fs.listdir(DIR) == [DEV]


async def test_renames_that_would_move_history_are_exdev(fs: OpsHarness) -> None:
    await fs.makedirs(DIR)
    await fs.makedirs(f"ucxl/{AUTH}/src/other")
    await fs.write(f"{DIR}/{DEV}", b"x")
    with raises_errno(errno.EXDEV):
        await fs.rename(f"{DIR}/{DEV}", f"{DIR}/reviewer")
    with raises_errno(errno.EXDEV):
        await fs.rename(f"{DIR}/{DEV}", f"ucxl/{AUTH}/src/other/{DEV}")
    with raises_errno(errno.EXDEV):
        await fs.rename(f"ucxl/{AUTH}/src/other", f"ucxl/{AUTH}/src/moved")
    with raises_errno(errno.EINVAL):
        await fs.rename(f"{DIR}/{DEV}", f"{DIR}/x", pyfuse3.RENAME_EXCHANGE)


async def test_unlink_stores_a_deletion_and_keeps_history(
    fs: OpsHarness, model: ContextStore
) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"x")
    await fs.unlink(f"{DIR}/{DEV}")
    assert not await fs.exists(f"{DIR}/{DEV}")
    assert await fs.listdir(DIR) == []
    assert await fs.read(f"{DIR}/.history/{DEV}/1") == b"x"
    assert model.all_versions(ADDR, DEV)[-1].deleted


async def test_a_file_unlinked_while_open_has_no_links(fs: OpsHarness, ops: Operations) -> None:
    """fstat of a descriptor whose file was unlinked: st_nlink 0 (POSIX), for a role
    file and for a scratch file; the open descriptor still reads its bytes."""
    await fs.makedirs(DIR)
    for name in (DEV, "notes.tmp"):
        await fs.write(f"{DIR}/{name}", b"still open")
        ino = await fs.ino(f"{DIR}/{name}")
        fi = await ops.open(ino, os.O_RDONLY, fs.ctx)
        assert await ops.read(fi.fh, 0, 100) == b"still open"
        assert (await ops.getattr(ino, fs.ctx)).st_nlink == 1
        await fs.unlink(f"{DIR}/{name}")
        assert (await ops.getattr(ino, fs.ctx)).st_nlink == 0
        assert await ops.read(fi.fh, 0, 100) == b"still open"
        await ops.release(fi.fh)


async def test_rmdir_refuses_non_empty_and_removes_empty(fs: OpsHarness) -> None:
    await fs.makedirs(f"{DIR}/sub")
    with raises_errno(errno.ENOTEMPTY):
        await fs.ops.rmdir(*(await fs.parent(DIR)), fs.ctx)
    await fs.ops.rmdir(*(await fs.parent(f"{DIR}/sub")), fs.ctx)
    assert await fs.listdir(DIR) == []


async def test_scratch_memory_is_bounded(model: ContextStore) -> None:
    """Scratch files live in memory under `mount.scratch_bytes`: bytes, symlink
    targets and a fixed cost per file all count. Expected: ENOSPC past the bound
    (for data, for one file too many, for a long link target), all of it back once
    the files are gone."""
    bound = 2 * ENTRY_BYTES + 16
    config = model.config.replace(mount=model.config.mount.__class__(scratch_bytes=bound))
    fs = OpsHarness(make_ops(model, config))
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/small.tmp", b"0123456789")
    with raises_errno(errno.ENOSPC):
        await fs.write(f"{DIR}/big.tmp", b"01234567890")  # created, but its bytes do not fit
    with raises_errno(errno.ENOSPC):
        await fs.write(f"{DIR}/one-too-many.tmp", b"")
    await fs.unlink(f"{DIR}/big.tmp")
    await fs.forget_all()
    parent, _ = await fs.parent(f"{DIR}/link.tmp")
    with raises_errno(errno.ENOSPC):
        await fs.ops.symlink(parent, b"link.tmp", b"t" * (ENTRY_BYTES + 1), fs.ctx)
    link = await fs.ops.symlink(parent, b"link.tmp", b"target", fs.ctx)
    fs.held[link.st_ino] = fs.held.get(link.st_ino, 0) + 1  # the kernel's reference
    assert fs.ops.scratch.used == bound
    await fs.unlink(f"{DIR}/link.tmp")
    await fs.unlink(f"{DIR}/small.tmp")
    await fs.forget_all()
    assert fs.ops.scratch.used == 0


async def test_xattrs_expose_metadata(fs: OpsHarness, model: ContextStore) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"x")
    ino = await fs.ino(f"{DIR}/{DEV}")
    names = await fs.ops.listxattr(ino, fs.ctx)
    assert sorted(names) == [
        b"user.slurp.address",
        b"user.slurp.author",
        b"user.slurp.hlc",
        b"user.slurp.version",
    ]
    head = model.stat(ADDR, DEV)
    assert (
        await fs.ops.getxattr(ino, b"user.slurp.version", fs.ctx) == head.version_id.hex().encode()
    )
    assert await fs.ops.getxattr(ino, b"user.slurp.address", fs.ctx) == str(ADDR).encode()
    with raises_errno(pyfuse3.ENOATTR):
        await fs.ops.getxattr(ino, b"user.other", fs.ctx)
    # What `cp --preserve=xattr` / `rsync -aX` from another mount do: accepted, not kept.
    await fs.ops.setxattr(ino, b"user.slurp.version", b"x", fs.ctx)
    await fs.ops.removexattr(ino, b"user.slurp.author", fs.ctx)
    assert (
        await fs.ops.getxattr(ino, b"user.slurp.version", fs.ctx) == head.version_id.hex().encode()
    )
    assert len(await fs.ops.listxattr(ino, fs.ctx)) == 4
    with raises_errno(errno.ENOTSUP):  # anything else cannot be stored
        await fs.ops.setxattr(ino, b"user.other", b"x", fs.ctx)


async def test_inode_numbers_are_stable_and_forget_purges(fs: OpsHarness) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"x")
    first = await fs.ino(f"{DIR}/{DEV}")
    before = len(fs.ops.inodes)
    await fs.forget_all()
    assert len(fs.ops.inodes) == 1  # only the root is left
    assert await fs.ino(f"{DIR}/{DEV}") == first
    assert len(fs.ops.inodes) == before
    # readdir hands out entries too: each accepted entry counts as a lookup.
    listed = await fs.list_attrs(DIR)
    node = fs.ops.inodes[listed[0][1].st_ino]
    assert node.lookups == fs.held[node.ino]


async def test_callers_get_their_roles_only(nodes: Nodes) -> None:
    _, model = nodes.new(toml=UID_4242_DEVELOPER)
    owner = OpsHarness(make_ops(model))
    await owner.makedirs(DIR)
    await owner.write(f"{DIR}/{DEV}", b"dev")
    await owner.write(f"{DIR}/architect", b"arch")
    other = owner.as_user(uid=4242, gid=4242, pid=0)
    assert await other.read(f"{DIR}/{DEV}") == b"dev"
    ino = await other.ino(f"{DIR}/architect")
    with raises_errno(errno.EACCES):
        await other.ops.open(ino, os.O_RDONLY, other.ctx)
    with raises_errno(errno.EACCES):
        await other.ops.open(ino, os.O_WRONLY | os.O_TRUNC, other.ctx)
    assert not await other.ops.access(ino, os.R_OK, other.ctx)
    assert await owner.ops.access(ino, os.R_OK, owner.ctx)
    nobody = owner.as_user(uid=5555, gid=5555, pid=0)
    with raises_errno(errno.EACCES):
        await nobody.mkdir(f"{DIR}/sub")
    assert await owner.read(f"{DIR}/architect") == b"arch"


async def test_a_role_without_a_key_on_this_node_is_listed_but_not_opened(nodes: Nodes) -> None:
    _, model = nodes.new(held=["developer"])
    model.put(ADDR, "architect", b"sealed to a key this node lacks")
    fs = OpsHarness(make_ops(model))
    assert "architect" in await fs.listdir(DIR)
    ino = await fs.ino(f"{DIR}/architect")
    with raises_errno(errno.EACCES):
        await fs.ops.open(ino, os.O_RDONLY, fs.ctx)


def _conflict(model: ContextStore, base: VersionRecord, data: bytes) -> VersionRecord:
    """A version concurrent with `base` (same parent) that loses the tie-break (lower HLC)."""
    role = base.role
    readers = [model.keyring.current_public(r) for r in model.config.readers_of(role)]
    hlc = base.hlc - 1
    sealed = env.seal(
        data,
        address=base.address,
        role=role,
        parents=[base.parents[0]],
        hlc=hlc,
        deleted=False,
        readers=readers,
        node=model.keyring.node,
    )
    record = VersionRecord(
        sealed.version_id,
        base.address,
        role,
        (base.parents[0],),
        hlc,
        model.keyring.node.node_id,
        len(data),
        False,
    )
    model.store.commit([Commit(record, sealed.encoded, sealed.slots)])
    return record


async def test_conflicts_are_listed_read_and_resolved_by_unlink(
    fs: OpsHarness, model: ContextStore
) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"base")
    await fs.write(f"{DIR}/{DEV}", b"winner")
    head = model.stat(ADDR, DEV)
    loser = _conflict(model, model.history(ADDR, DEV)[-1], b"loser")
    assert model.stat(ADDR, DEV) == head
    name = f"{DEV}.conflict-{loser.short_id}"
    assert sorted(await fs.listdir(DIR)) == [DEV, name]
    assert await fs.read(f"{DIR}/{name}") == b"loser"
    await fs.unlink(f"{DIR}/{name}")
    assert await fs.listdir(DIR) == [DEV]
    assert await fs.read(f"{DIR}/{DEV}") == b"winner"


async def test_invalidator_tells_the_kernel_about_outside_changes(
    fs: OpsHarness, model: ContextStore
) -> None:
    kernel = FakeKernel()
    invalidator = Invalidator(fs.ops, kernel)
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"mine")
    ino = await fs.ino(f"{DIR}/{DEV}")
    parent = await fs.ino(DIR)
    await invalidator.cycle()
    assert ino not in kernel.inodes, "our own commit needs no invalidation"
    assert await fs.ino(f"ucxl/{AUTH}/src") in kernel.inodes, "a new directory: nlink changed"
    kernel.inodes.clear()
    model.put(ADDR, DEV, b"from another writer")
    await invalidator.cycle()
    assert ino in kernel.inodes
    kernel.inodes.clear()
    model.delete(ADDR, DEV)
    await invalidator.cycle()
    assert kernel.entries == [(parent, DEV.encode())]


async def test_the_invalidator_reads_the_store_only_where_the_kernel_looked(
    fs: OpsHarness, model: ContextStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer's catch-up streams thousands of versions nobody has looked up. Expected:
    the invalidator (on the FUSE loop) reads a head only for an address the kernel
    holds something of; it read one per changed context before."""
    kernel = FakeKernel()
    invalidator = Invalidator(fs.ops, kernel)
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"mine")
    ino = await fs.ino(f"{DIR}/{DEV}")
    await invalidator.cycle()
    kernel.inodes.clear()
    for i in range(20):
        model.put(parse(f"ucxl://claude:tester@bzzz:auth/far/n{i}"), DEV, b"elsewhere")
    model.put(ADDR, DEV, b"from another writer")
    read: list[str] = []
    stat = model.stat

    def counted(address: Address, role: str) -> VersionInfo:
        read.append(address.key)
        return stat(address, role)

    monkeypatch.setattr(model, "stat", counted)
    await invalidator.cycle()
    assert kernel.inodes == [ino]
    assert read == [ADDR.key]


async def test_a_stream_of_peer_batches_shares_invalidation_cycles(
    fs: OpsHarness,
    model: ContextStore,
    monkeypatch: pytest.MonkeyPatch,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A catch-up sends a `changed` notice per ingested batch (`nudge`). Expected: a lone
    batch is invalidated at once; batches coming close together wait for one cycle,
    `COALESCE` after the last that found changes; a poke never waits. Before, every
    notice ran a cycle of its own. (Times are the mock clock's, moved by hand.)"""
    kernel = FakeKernel()
    invalidator = Invalidator(fs.ops, kernel, interval=3600)
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"mine")
    ino = await fs.ino(f"{DIR}/{DEV}")
    await invalidator.cycle()
    kernel.inodes.clear()
    found: list[float] = []  # when each cycle that found changes started
    cycle = invalidator.cycle

    async def recorded() -> int:
        started, before = trio.current_time(), invalidator.seq
        told = await cycle()
        if invalidator.seq != before:
            found.append(started)
        return told

    async def settled(count: int) -> None:
        """Let every task (and the cycle's thread) run until nothing moves."""
        for _ in range(50):
            await trio.testing.wait_all_tasks_blocked()
            if len(found) > count:
                break
            await trio.to_thread.run_sync(time.sleep, 0.01)

    async def batch(data: bytes) -> float:
        model.put(ADDR, DEV, data)
        invalidator.nudge()
        return trio.current_time()

    monkeypatch.setattr(invalidator, "cycle", recorded)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        sent = await batch(b"peer 0")
        await settled(1)
        assert found == [sent]
        assert kernel.inodes == [ino]
        for i in range(1, 6):
            await batch(f"peer {i}".encode())
            await settled(1)
        assert found == [sent], "a stream waits"
        mock_clock.jump(COALESCE)
        await settled(2)
        assert found == [sent, sent + COALESCE]
        mock_clock.jump(1)
        sent = await batch(b"after a quiet second")
        await settled(3)
        assert found[2:] == [sent]
        mock_clock.jump(COALESCE / 2)
        model.put(ADDR, DEV, b"a writer that waits")
        poked = trio.current_time()
        await invalidator.poke()
        assert found[3:] == [poked]
        nursery.cancel_scope.cancel()


async def test_a_context_purged_by_its_ttl_leaves_the_mount(
    fs: OpsHarness, model: ContextStore
) -> None:
    """A TTL purge leaves no change record for the invalidator to find. Expected: the
    purge tells the kernel to drop the entry and the inode, and an open through an
    entry the kernel still held is ENOENT (it served an empty file before)."""
    kernel = FakeKernel()
    invalidator = Invalidator(fs.ops, kernel)
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"for a while")
    ino = await fs.ino(f"{DIR}/{DEV}")
    parent = await fs.ino(DIR)
    model.put(ADDR, DEV, b"for a while", ttl=1)
    await invalidator.cycle()
    kernel.inodes.clear()

    purged: list[tuple[str, str]] = []
    assert model.expire(now=model.stat(ADDR, DEV).mtime + 10, purged=purged) == 2
    assert purged == [(ADDR.key, DEV)]
    await invalidator.forget(purged)
    assert kernel.entries == [(parent, DEV.encode())]
    assert ino in kernel.inodes
    with raises_errno(errno.ENOENT):
        await fs.ops.open(ino, os.O_RDONLY, fs.ctx)


async def test_the_ttl_task_reports_what_it_purged(fs: OpsHarness, model: ContextStore) -> None:
    """The daemon's TTL task purges what has expired and hands the contexts on (to the
    invalidator and the search indexes); nothing is handed on when nothing expired."""
    await fs.makedirs(DIR)
    model.put(ADDR, DEV, b"for a moment", ttl=0.001)
    model.put(ADDR, "architect", b"for good")
    reported: list[list[tuple[str, str]]] = []
    first = trio.Event()

    async def purged(contexts: list[tuple[str, str]]) -> None:
        reported.append(contexts)
        model.put(ADDR, DEV, b"again, for good")
        first.set()

    cleaner = TtlCleaner(fs.ops.gateway, purged, interval=0.01)
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cleaner.run)
            await first.wait()
            await trio.sleep(0.05)  # a few more passes, with nothing left to purge
            nursery.cancel_scope.cancel()
    assert reported == [[(ADDR.key, DEV)]]
    assert model.get(ADDR, "architect").data == b"for good"


async def test_status_files_report_their_true_size(fs: OpsHarness) -> None:
    fs.ops.virtual.register("status", lambda: "pid: 1\n" * 3)
    attrs = await fs.lookup(".slurp/status")
    data = await fs.read(".slurp/status")
    assert attrs.st_size == len(data) == 21
    with raises_errno(errno.EROFS):
        await fs.ops.open(attrs.st_ino, os.O_WRONLY, fs.ctx)


async def test_the_audit_trail_is_for_the_mount_owner_only(nodes: Nodes) -> None:
    """`.slurp/audit` names every user, role and address accessed: with
    ``--allow-other``, another user must not read it. Expected: mode 0400, EACCES
    (and ``access`` false) for uid 4242, the owner reads it; other status files
    stay readable by everyone."""
    _, model = nodes.new(toml=UID_4242_DEVELOPER)
    owner = OpsHarness(make_ops(model))
    await owner.makedirs(DIR)
    await owner.write(f"{DIR}/{DEV}", b"dev")
    other = owner.as_user(uid=4242, gid=4242, pid=0)
    attrs = await other.lookup(".slurp/audit")
    assert attrs.st_mode & 0o777 == 0o400
    with raises_errno(errno.EACCES):
        await other.ops.open(attrs.st_ino, os.O_RDONLY, other.ctx)
    assert not await other.ops.access(attrs.st_ino, os.R_OK, other.ctx)
    assert b'"action": "write"' in await owner.read(".slurp/audit")
    assert b"data_dir:" in await other.read(".slurp/status")


async def test_fsync_and_statfs_work(fs: OpsHarness) -> None:
    await fs.makedirs(DIR)
    parent, name = await fs.parent(f"{DIR}/{DEV}")
    fi, attrs = await fs.ops.create(parent, name, 0o644, os.O_WRONLY, fs.ctx)
    fs.held[attrs.st_ino] = 1
    await fs.ops.write(fi.fh, 0, b"synced")
    await fs.ops.fsync(fi.fh, False)
    await fs.ops.release(fi.fh)
    dh = await fs.ops.opendir(parent, fs.ctx)
    await fs.ops.fsyncdir(dh, False)
    await fs.ops.releasedir(dh)
    stats = await fs.ops.statfs(ctx())
    assert stats.f_namemax == 255
    assert fs.ops.inodes[attrs.st_ino].kind is Kind.ROLE


# -- access, control socket, mount checks -------------------------------------------------


def test_role_map_maps_users_groups_and_supplementary_groups() -> None:
    roles = {
        "developer": RoleConfig("developer", users=("1001",)),
        "reviewer": RoleConfig("reviewer", groups=("2002",)),
        "architect": RoleConfig("architect", users=("root",)),
    }
    held = {"developer", "reviewer", "architect"}
    groups = {7: frozenset({2002})}
    mapping = RoleMap(
        roles, held, owner_uid=4000, sup_groups=lambda pid: groups.get(pid, frozenset())
    )
    assert mapping.roles(4000, 4000, 1) == held  # the mounting user: every held role
    assert mapping.roles(1001, 1001, 1) == {"developer"}
    assert mapping.roles(0, 0, 1) == {"architect"}  # by user name
    assert mapping.roles(3003, 2002, 1) == {"reviewer"}  # primary group
    assert mapping.roles(3003, 3003, 7) == {"reviewer"}  # supplementary group
    assert mapping.roles(3003, 3003, 1) == frozenset()
    assert os.getgid() in read_sup_groups(os.getpid()) | {os.getgid()}


async def test_control_socket_notify_and_watch(tmp_path: Path) -> None:
    assert not await trio.to_thread.run_sync(control.notify_daemon, tmp_path, 1.0)
    changed: list[int] = []

    async def on_changed() -> None:
        changed.append(1)

    server = control.ControlServer(tmp_path, on_changed, lambda: "1 /mnt")
    server.claim()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert await trio.to_thread.run_sync(control.notify_daemon, tmp_path, 5.0)
        assert changed == [1]
        assert (
            await trio.to_thread.run_sync(control.request, tmp_path, "ping", 5.0) == "pong 1 /mnt"
        )
        watcher = await trio.to_thread.run_sync(control.watch, tmp_path, 5.0)
        assert watcher is not None
        with pytest.raises(OSError, match="already in use"):
            await trio.to_thread.run_sync(server.claim)
        nursery.cancel_scope.cancel()
    server.report_exit(0)
    assert control.read_exit_status(watcher) == 0
    assert not control.socket_path(tmp_path).exists()


def test_mount_checks_fail_clearly(tmp_path: Path, model: ContextStore) -> None:
    with pytest.raises(MountError, match="does not exist"):
        mountcmd.check_mountpoint(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(MountError, match="not a directory"):
        mountcmd.check_mountpoint(tmp_path / "file")
    mountcmd.check_mountpoint(tmp_path)
    empty = model.config.replace(node=model.config.node.__class__(data_dir=str(tmp_path / "x")))
    with pytest.raises(NotInitialised, match="slurpfs init"):
        mountcmd.check_keys(empty, None)
    assert mountcmd.check_keys(model.config, None) is None


def test_no_fuse_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == "/dev/fuse" else real(p))
    with pytest.raises(MountError, match="modprobe fuse"):
        mountcmd.check_fuse_device()


async def test_keep_cache_only_while_the_version_is_unchanged(
    fs: OpsHarness, model: ContextStore
) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"v1")
    ino = await fs.ino(f"{DIR}/{DEV}")

    async def open_close() -> bool:
        fi = await fs.ops.open(ino, os.O_RDONLY, fs.ctx)
        await fs.ops.release(fi.fh)
        return bool(fi.keep_cache)

    assert not await open_close()  # just written here: the page cache is not trusted
    assert await open_close()  # same version as the last open: keep the pages
    model.put(ADDR, DEV, b"v2 from elsewhere")
    assert not await open_close()
    assert await open_close()


async def test_an_open_served_from_the_page_cache_still_decides_and_audits_access(
    nodes: Nodes,
) -> None:
    """Re-opening an unchanged file decrypts nothing, but each open is still an
    access decision in the audit log, a denied caller still gets EACCES, and a
    read the page cache cannot serve is answered from the store."""
    _, model = nodes.new(toml=UID_4242_DEVELOPER)
    owner = OpsHarness(make_ops(model))
    await owner.makedirs(DIR)
    await owner.write(f"{DIR}/architect", b"arch only")
    ino = await owner.ino(f"{DIR}/architect")
    log = data_paths(model.config.data_dir)["audit"]

    async def open_read(read: bool = True) -> tuple[bool, bytes]:
        fi = await owner.ops.open(ino, os.O_RDONLY, owner.ctx)
        try:
            return bool(fi.keep_cache), await owner.ops.read(fi.fh, 0, 100) if read else b""
        finally:
            await owner.ops.release(fi.fh)

    assert await open_read() == (False, b"arch only")  # first open after the write
    decisions = len(audit.read(log))
    cache = model.statistics().cache
    # The kernel serves these reads from its page cache: open is the only request,
    # and it neither decrypts nor even looks for the plaintext.
    assert await open_read(read=False) == (True, b"")
    assert await open_read(read=False) == (True, b"")
    after = model.statistics().cache
    assert (after.hits, after.misses) == (cache.hits, cache.misses)
    entries = audit.read(log)
    assert len(entries) == decisions + 2  # one decision per open
    assert all(e.allowed and e.role == "architect" for e in entries[-2:])
    # A read the page cache cannot serve (pages dropped) is answered from the store.
    assert await open_read() == (True, b"arch only")

    other = owner.as_user(uid=4242, gid=4242, pid=0)
    with raises_errno(errno.EACCES):
        await other.ops.open(ino, os.O_RDONLY, other.ctx)
    denied = audit.read(log)[-1]
    assert not denied.allowed
    assert denied.role == "architect"


async def test_every_change_decision_is_audited_allowed_or_denied(nodes: Nodes) -> None:
    """Writes, truncations, deletions and renames are access decisions like reads:
    each goes into the audit log, allowed or denied, naming who, the action, the
    role and the address. Expected: a denied caller gets EACCES and leaves a denied
    entry for each attempt; the owner's changes leave allowed entries."""
    _, model = nodes.new(toml=UID_4242_DEVELOPER)
    owner = OpsHarness(make_ops(model))
    await owner.makedirs(DIR)
    await owner.write(f"{DIR}/architect", b"arch only")
    log = data_paths(model.config.data_dir)["audit"]
    written = audit.read(log)[-1]
    assert (written.who, written.action, written.role, written.allowed) == (
        "uid:0",
        "write",
        "architect",
        True,
    )
    assert written.address == ADDR.key

    other = owner.as_user(uid=4242, gid=4242, pid=0)
    ino = await other.ino(f"{DIR}/architect")
    before = len(audit.read(log))
    with raises_errno(errno.EACCES):
        await other.ops.open(ino, os.O_WRONLY | os.O_TRUNC, other.ctx)
    with raises_errno(errno.EACCES):
        await other.ops.open(ino, os.O_WRONLY | os.O_APPEND, other.ctx)
    with raises_errno(errno.EACCES):
        await setattr_size(other, f"{DIR}/architect", 0)
    with raises_errno(errno.EACCES):
        await other.unlink(f"{DIR}/architect")
    with raises_errno(errno.EACCES):
        await other.rename(f"{DIR}/architect", f"{DIR}/architect~")
    denied = audit.read(log)[before:]
    assert [(e.action, e.allowed, e.who, e.role) for e in denied] == [
        ("write", False, "uid:4242", "architect"),
        ("write", False, "uid:4242", "architect"),
        ("write", False, "uid:4242", "architect"),
        ("delete", False, "uid:4242", "architect"),
        ("rename", False, "uid:4242", "architect"),
    ]
    assert model.get(ADDR, "architect").data == b"arch only"

    await owner.unlink(f"{DIR}/architect")
    deleted = audit.read(log)[-1]
    assert (deleted.action, deleted.allowed, deleted.who) == ("delete", True, "uid:0")
    assert model.verify_audit().entries == len(audit.read(log, 1_000_000))


async def test_attributes_of_a_file_open_for_reading_follow_a_write_elsewhere(
    fs: OpsHarness, model: ContextStore
) -> None:
    """While a reader holds the file open (served from the page cache, so nothing is
    loaded), getattr answers from the kept attributes, and still sees a version
    another process stores meanwhile."""
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"first")
    ino = await fs.ino(f"{DIR}/{DEV}")
    await fs.read(f"{DIR}/{DEV}")  # the kernel now holds this version
    fi = await fs.ops.open(ino, os.O_RDONLY, fs.ctx)
    try:
        assert fi.keep_cache
        assert (await fs.ops.getattr(ino, fs.ctx)).st_size == len(b"first")
        model.put(ADDR, DEV, b"a longer second version")
        assert (await fs.ops.getattr(ino, fs.ctx)).st_size == len(b"a longer second version")
    finally:
        await fs.ops.release(fi.fh)
