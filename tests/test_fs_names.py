"""Ops-level tests (no kernel) of what may be created in an address directory, of
what a refusal tells its caller (``.slurp/refused``), and of saves that must store
nothing: a save whose write failed, and a save of the head's exact bytes.

A write that returns success never vanishes: a name that is neither a role's nor
a temporary file's would have been a memory-only file, lost at unmount.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from typing import cast

import pyfuse3
import pytest
from conftest import Nodes
from fsutil import AUTH, UID_4242_DEVELOPER, Fields, OpsHarness, make_ops, raises_errno

from slurpfs.errors import NotFound
from slurpfs.fs.refused import PER_UID, UIDS, NameRefused, Refusals
from slurpfs.model import ContextStore
from slurpfs.ucxl import parse

DIR = f"ucxl/{AUTH}/src/auth.go"
ADDR = parse(f"ucxl://{AUTH}/src/auth.go")
DEV = "developer"
ALL_ROLES = "architect, developer, reviewer"

# Every kind of name the scratch rule lists as temporary, as the tools make them.
TEMPORARY = [
    f".{DEV}.swp",  # vim's swap file (any name starting with '.')
    f".{DEV}.Ab12Cd",  # rsync's temporary file
    ".goutputstream-AB12CD",  # GLib's
    "4913",  # vim's test of the directory
    f"{DEV}~",  # backups
    f"#{DEV}#",  # emacs' autosave
    "sedAbC123",  # sed -i
    "XXab12cd",  # perl -pi
    "tmpk8tfrqk9",  # Python's tempfile
    "tmp_ab_cd1",
    f"{DEV}.tmp",
    f"{DEV}.swp",
    f"{DEV}.swx",
    f"{DEV}.swo",
    f"{DEV}.bak",
    f"{DEV}.orig",
    f"{DEV}.rej",
    f"{DEV}.new",
    f"{DEV}.old",
    f"{DEV}.kate-swp",
    f"{DEV}.tmp.1234",
    f"{DEV}___jb_tmp___",
    f"{DEV}___jb_old___",
    f"x.goutputstream-{DEV}",
]
NOT_TEMPORARY = ["README.txt", "develper", "Developer", "notes.md", "tmp1", "sed12345678901"]


async def truncate(fs: OpsHarness, ino: int, size: int, fh: int | None) -> None:
    attr = pyfuse3.EntryAttributes()
    attr.st_size = size
    fields = cast(pyfuse3.SetattrFields, Fields(update_size=True))
    await fs.ops.setattr(ino, attr, fields, fh, fs.ctx)


async def refused(fs: OpsHarness) -> str:
    """``.slurp/refused`` as `fs`'s caller reads it; its size must be what is read."""
    text = await fs.read(".slurp/refused")
    assert (await fs.lookup(".slurp/refused")).st_size == len(text)
    return text.decode()


# -- names that would vanish at unmount --------------------------------------------------


@pytest.mark.parametrize("name", NOT_TEMPORARY)
async def test_a_name_neither_a_role_nor_temporary_is_refused_everywhere(
    fs: OpsHarness, model: ContextStore, name: str
) -> None:
    """README.txt, a mistyped role, a tree copied in: each would have been a
    memory-only file, reported written and gone at unmount. Expected: EPERM at
    create, mknod, symlink, link and as a rename target, nothing created and
    nothing else changed."""
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"kept")
    await fs.write(f"{DIR}/notes.tmp", b"scratch")
    parent = await fs.ino(DIR)
    raw = name.encode()
    with raises_errno(errno.EPERM):
        await fs.write(f"{DIR}/{name}", b"lost at unmount")
    with raises_errno(errno.EPERM):
        await fs.ops.mknod(parent, raw, stat.S_IFREG | 0o644, 0, fs.ctx)
    with raises_errno(errno.EPERM):
        await fs.ops.symlink(parent, raw, b"target", fs.ctx)
    with raises_errno(errno.EPERM):
        await fs.ops.link(await fs.ino(f"{DIR}/notes.tmp"), parent, raw, fs.ctx)
    with raises_errno(errno.EPERM):
        await fs.rename(f"{DIR}/notes.tmp", f"{DIR}/{name}")
    with raises_errno(errno.EPERM):
        await fs.rename(f"{DIR}/{DEV}", f"{DIR}/{name}")
    assert sorted(await fs.listdir(DIR)) == [DEV, "notes.tmp"]
    assert await fs.read(f"{DIR}/notes.tmp") == b"scratch"
    assert await fs.read(f"{DIR}/{DEV}") == b"kept"
    assert len(model.history(ADDR, DEV)) == 1
    await fs.unlink(f"{DIR}/notes.tmp")


@pytest.mark.parametrize("name", TEMPORARY)
async def test_every_temporary_name_is_a_scratch_file(fs: OpsHarness, name: str) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{name}", b"unsaved")
    assert await fs.read(f"{DIR}/{name}") == b"unsaved"
    assert await fs.listdir(DIR) == [name]
    await fs.rename(f"{DIR}/{name}", f"{DIR}/{name}.bak")  # to another temporary name
    await fs.unlink(f"{DIR}/{name}.bak")
    assert await fs.listdir(DIR) == []


async def test_mount_scratch_names_adds_patterns(model: ContextStore) -> None:
    mount = dataclasses.replace(model.config.mount, scratch_names=("*.part", "draft-*"))
    fs = OpsHarness(make_ops(model, model.config.replace(mount=mount)))
    await fs.makedirs(DIR)
    for name in ("movie.part", "draft-1"):
        await fs.write(f"{DIR}/{name}", b"unsaved")
    assert sorted(await fs.listdir(DIR)) == ["draft-1", "movie.part"]
    with raises_errno(errno.EPERM):
        await fs.write(f"{DIR}/notes.md", b"x")
    plain = OpsHarness(make_ops(model))
    with raises_errno(errno.EPERM):
        await plain.write(f"{DIR}/other.part", b"x")


# -- .slurp/refused ------------------------------------------------------------------------


async def test_each_user_reads_only_their_own_refusals(nodes: Nodes) -> None:
    """Expected: the caller reads why (the reason) and what to do (the role names it
    may write there, or `slurpfs import`), sized truly; another uid sees none of it."""
    _, model = nodes.new(toml=UID_4242_DEVELOPER)
    owner = OpsHarness(make_ops(model))
    await owner.makedirs(DIR)
    other = owner.as_user(uid=4242, gid=4242, pid=0)
    nobody = owner.as_user(uid=5555, gid=5555, pid=0)
    assert "refused" in await owner.listdir(".slurp")
    assert await refused(owner) == ""
    with raises_errno(errno.EPERM):
        await owner.write(f"{DIR}/README.txt", b"x")
    with raises_errno(errno.EPERM):
        await other.write(f"{DIR}/develper", b"x")

    mine, theirs = await refused(owner), await refused(other)
    assert f" create {DIR}/README.txt: EPERM (Operation not permitted)\n" in mine
    assert "  why: 'README.txt' is neither a role name nor a temporary file's name" in mine
    assert f"  fix: name the file after a role you may write here: {ALL_ROLES};" in mine
    assert "store a tree of ordinary files with `slurpfs import" in mine
    assert f" create {DIR}/develper: EPERM" in theirs
    assert "  fix: name the file after a role you may write here: developer;" in theirs
    assert "develper" not in mine
    assert "README.txt" not in theirs
    assert await refused(nobody) == ""
    attrs = await nobody.lookup(".slurp/refused")
    assert attrs.st_mode & 0o777 == 0o444
    assert attrs.entry_timeout == attrs.attr_timeout == 0  # asked again by every caller


async def test_other_refusals_a_bare_errno_explains_badly_are_recorded(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    """EINVAL for a name (``git init`` makes ``.git``), EXDEV, EACCES: recorded with
    the reason and a fix, and logged. Lookups of missing names record nothing."""
    caplog.set_level(logging.INFO, logger="slurpfs")
    _, model = nodes.new(toml=UID_4242_DEVELOPER)
    owner = OpsHarness(make_ops(model))
    await owner.makedirs(DIR)
    await owner.makedirs(f"ucxl/{AUTH}/src/other")
    await owner.write(f"{DIR}/{DEV}", b"dev")
    await owner.write(f"{DIR}/architect", b"arch")
    other = owner.as_user(uid=4242, gid=4242, pid=0)
    assert not await owner.exists(f"{DIR}/missing")
    with raises_errno(errno.EINVAL):
        await owner.mkdir(f"{DIR}/.git")
    with raises_errno(errno.EXDEV):
        await owner.rename(f"{DIR}/{DEV}", f"ucxl/{AUTH}/src/other/{DEV}")
    ino = await other.ino(f"{DIR}/architect")
    with raises_errno(errno.EACCES):
        await other.ops.open(ino, os.O_RDONLY, other.ctx)

    mine = await refused(owner)
    assert f" mkdir {DIR}/.git: EINVAL (Invalid argument)\n" in mine
    assert "must not start with '.'" in mine
    assert "store a tree of ordinary files with `slurpfs import" in mine
    assert f" rename ucxl/{AUTH}/src/other/{DEV}: EXDEV" in mine
    assert "  fix: copy it instead (cp, then rm); mv does so by itself" in mine
    assert "missing" not in mine
    theirs = await refused(other)
    assert f" open {DIR}/architect: EACCES (Permission denied)\n" in theirs
    assert "needs one of the roles ['architect']" in theirs
    assert "[roles.NAME]" in theirs
    assert "refused mkdir of" in caplog.text
    assert "refused open of" in caplog.text


def test_refusals_are_bounded_per_uid_and_in_uids() -> None:
    refusals = Refusals(clock=lambda: 0.0)
    for i in range(PER_UID + 5):
        refusals.record(1, "create", f"p{i}", NameRefused(f"reason {i}", "fix"))
    text = refusals.render(1)
    assert text.count("  why: ") == PER_UID
    assert text.startswith("1970-01-01T00:00:00Z create p5: EPERM")
    for uid in range(2, UIDS + 2):
        refusals.record(uid, "create", "p", NameRefused("r", "f"))
    assert refusals.render(1) == ""  # the uid heard from longest ago went first
    assert refusals.render(UIDS + 1) != ""


# -- names: NFC, nothing invisible ---------------------------------------------------------

INVISIBLE = ["a\u200bb", "\ufeffa", "a\u00a0b", "a\u202fb", "a\u2060b", "a\u202eb"]
SPACED = [" lead", "trail ", "trail\u3000"]


async def test_a_decomposed_name_is_the_same_directory(fs: OpsHarness, model: ContextStore) -> None:
    await fs.makedirs(f"ucxl/{AUTH}")
    nfd, nfc = "cafe\u0301", "caf\u00e9"
    await fs.mkdir(f"ucxl/{AUTH}/{nfd}")
    assert await fs.listdir(f"ucxl/{AUTH}") == [nfc]
    assert await fs.ino(f"ucxl/{AUTH}/{nfd}") == await fs.ino(f"ucxl/{AUTH}/{nfc}")
    with raises_errno(errno.EEXIST):
        await fs.mkdir(f"ucxl/{AUTH}/{nfc}")
    await fs.write(f"ucxl/{AUTH}/{nfd}/{DEV}", b"one context")
    assert await fs.read(f"ucxl/{AUTH}/{nfc}/{DEV}") == b"one context"
    assert model.get(parse(f"ucxl://{AUTH}/{nfd}"), DEV).data == b"one context"
    assert model.list_dir(parse(f"ucxl://{AUTH}")).dirs == (nfc,)


@pytest.mark.parametrize("bad", INVISIBLE + SPACED)
async def test_invisible_characters_and_outer_spaces_are_einval(
    fs: OpsHarness, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="slurpfs")
    await fs.makedirs(DIR)
    with raises_errno(errno.EINVAL):
        await fs.mkdir(f"{DIR}/{bad}")
    # a name that looks temporary, but not like itself
    scratch = f"{bad}.swp" if bad in INVISIBLE else f"{bad}~" if bad[0] == " " else f".{bad}"
    with raises_errno(errno.EINVAL):
        await fs.write(f"{DIR}/{scratch}", b"x")
    assert await fs.listdir(DIR) == []
    text = await refused(fs)
    assert f" mkdir {DIR}/{bad}: EINVAL" in text
    assert f" create {DIR}/{scratch}: EINVAL" in text
    odd = next(c for c in bad if not c.isalpha())
    why = "whitespace" if bad in SPACED else f"character U+{ord(odd):04X}"
    assert why in text
    assert why in caplog.text


# -- saves that store nothing --------------------------------------------------------------


async def test_a_handle_whose_write_failed_stores_nothing(nodes: Nodes) -> None:
    """A copy over the size limit used to store the prefix that fit as the new head.
    Expected: EFBIG for the write, for every later write and for the close (which
    reports it again); nothing stored, the file as it was; the same for a failed
    ftruncate; a new file whose write failed does not appear."""
    _, model = nodes.new(overrides={"store.max_context_bytes": 1000})
    fs = OpsHarness(make_ops(model))
    ops = fs.ops
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"v1")
    ino = await fs.ino(f"{DIR}/{DEV}")

    fi = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, fs.ctx)
    assert await ops.write(fi.fh, 0, b"x" * 600) == 600
    with raises_errno(errno.EFBIG):
        await ops.write(fi.fh, 600, b"y" * 600)
    with raises_errno(errno.EFBIG):
        await ops.write(fi.fh, 600, b"y")  # it stays failed
    with raises_errno(errno.EFBIG):
        await ops.flush(fi.fh)
    await ops.release(fi.fh)
    assert await fs.read(f"{DIR}/{DEV}") == b"v1"
    assert (await fs.lookup(f"{DIR}/{DEV}")).st_size == 2

    fi = await ops.open(ino, os.O_RDWR, fs.ctx)
    assert await ops.write(fi.fh, 2, b"-appended") == 9
    with raises_errno(errno.EFBIG):
        await truncate(fs, ino, 2000, fi.fh)
    with raises_errno(errno.EFBIG):
        await ops.flush(fi.fh)
    await ops.release(fi.fh)
    assert [v.size for v in model.history(ADDR, DEV)] == [2]

    parent, _ = await fs.parent(f"{DIR}/architect")
    fi, attrs = await ops.create(parent, b"architect", 0o644, os.O_WRONLY, fs.ctx)
    fs.held[attrs.st_ino] = fs.held.get(attrs.st_ino, 0) + 1
    with raises_errno(errno.EFBIG):
        await ops.write(fi.fh, 0, b"z" * 1001)
    with raises_errno(errno.EFBIG):
        await ops.flush(fi.fh)
    await ops.release(fi.fh)
    assert await fs.listdir(DIR) == [DEV]
    with pytest.raises(NotFound):
        model.stat(ADDR, "architect")


async def test_a_save_of_the_same_bytes_stores_nothing_and_keeps_the_time(
    fs: OpsHarness, model: ContextStore
) -> None:
    """vim :w without changes, cp again, rsync's temporary file renamed over it,
    truncate to the same size. Expected: no new version, the head's mtime kept;
    different bytes, or the same bytes after a deletion, are a new version."""
    path = f"{DIR}/{DEV}"
    await fs.makedirs(DIR)
    await fs.write(path, b"same\n")
    before = (await fs.lookup(path)).st_mtime_ns
    await fs.write(path, b"same\n")
    await fs.write(f"{DIR}/.{DEV}.Ab12Cd", b"same\n")
    await fs.rename(f"{DIR}/.{DEV}.Ab12Cd", path)
    await truncate(fs, await fs.ino(path), 5, None)
    assert len(model.history(ADDR, DEV)) == 1
    assert (await fs.lookup(path)).st_mtime_ns == before
    assert await fs.listdir(DIR) == [DEV]
    await fs.write(path, b"other\n")
    assert len(model.history(ADDR, DEV)) == 2
    await fs.unlink(path)
    await fs.write(path, b"other\n")
    assert [v.deleted for v in model.all_versions(ADDR, DEV)] == [False, False, True, False]
