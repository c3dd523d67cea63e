"""What the fs layer keeps between requests, and when it lets go (ops-level).

Listings, heads and attributes are kept while the store does not change
(`slurpfs.fs.view`); a commit by anyone, or a change made through the mount,
must show in the very next request. Syncs cover every write made before them,
so back-to-back ``fsync`` requests sync once. The audit line is written once
and stays exactly what ``json.dumps`` gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import MemoryAnchors, audit_keys
from fsutil import AUTH, FakeKernel, OpsHarness

from slurpfs import audit
from slurpfs.fs.invalidate import Invalidator
from slurpfs.model import ContextStore
from slurpfs.ucxl import parse

DIR = f"ucxl/{AUTH}/src/auth.go"
ADDR = parse(f"ucxl://{AUTH}/src/auth.go")
DEV = "developer"
ARCH = "architect"


async def sizes(fs: OpsHarness, path: str) -> dict[str, int]:
    return {os.fsdecode(name): attrs.st_size for name, attrs in await fs.list_attrs(path)}


async def test_commits_of_another_writer_show_in_the_next_request(
    fs: OpsHarness, model: ContextStore
) -> None:
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"one")
    ino = await fs.ino(f"{DIR}/{DEV}")
    for _ in range(2):  # the second round is answered from what the first kept
        assert await sizes(fs, DIR) == {DEV: 3}
        assert (await fs.ops.getattr(ino, fs.ctx)).st_size == 3
    model.put(ADDR, DEV, b"longer")  # not through the mount, nobody told
    assert (await fs.ops.getattr(ino, fs.ctx)).st_size == 6
    model.put(ADDR, ARCH, b"a new role file")
    assert await sizes(fs, DIR) == {ARCH: 15, DEV: 6}
    model.delete(ADDR, DEV)
    assert await sizes(fs, DIR) == {ARCH: 15}
    assert not await fs.exists(f"{DIR}/{DEV}")


async def test_writes_through_the_mount_show_at_once(fs: OpsHarness) -> None:
    await fs.makedirs(DIR)
    assert await sizes(fs, DIR) == {}
    await fs.write(f"{DIR}/{DEV}", b"12345")
    assert await sizes(fs, DIR) == {DEV: 5}
    await fs.write(f"{DIR}/{DEV}", b"678", append=True)
    assert (await fs.lookup(f"{DIR}/{DEV}")).st_size == 8
    await fs.unlink(f"{DIR}/{DEV}")
    assert await sizes(fs, DIR) == {}


async def test_directories_made_and_removed_here_keep_counts_and_listings_right(
    fs: OpsHarness,
) -> None:
    top = f"ucxl/{AUTH}/src"
    await fs.makedirs(top)
    parent = await fs.ino(top)
    nlink = (await fs.ops.getattr(parent, fs.ctx)).st_nlink
    assert await fs.listdir(top) == []
    for name in ("b", "c", "a"):
        await fs.mkdir(f"{top}/{name}")
        listed = await fs.listdir(top)
        assert (await fs.ops.getattr(parent, fs.ctx)).st_nlink == nlink + len(listed)
    assert await fs.listdir(top) == ["a", "b", "c"]  # the store's order
    await fs.ops.rmdir(parent, b"b", fs.ctx)
    assert await fs.listdir(top) == ["a", "c"]
    assert (await fs.ops.getattr(parent, fs.ctx)).st_nlink == nlink + 2
    assert not await fs.exists(f"{top}/b")
    await fs.mkdir(f"{top}/b")
    assert await fs.listdir(top) == ["a", "b", "c"]
    assert sorted(await fs.listdir(f"ucxl/{AUTH}")) == ["src"]


async def test_a_sync_covers_every_write_made_before_it(fs: OpsHarness) -> None:
    gateway = fs.ops.gateway
    await fs.makedirs(DIR)
    parent, name = await fs.parent(f"{DIR}/{DEV}")
    fi, attrs = await fs.ops.create(parent, name, 0o644, os.O_WRONLY, fs.ctx)
    fs.held[attrs.st_ino] = fs.held.get(attrs.st_ino, 0) + 1
    await fs.ops.write(fi.fh, 0, b"durable")
    synced = gateway.syncs
    await fs.ops.fsync(fi.fh, False)  # commits, then syncs
    assert gateway.syncs == synced + 1
    await fs.ops.release(fi.fh)
    dh = await fs.ops.opendir(parent, fs.ctx)
    await fs.ops.fsyncdir(dh, False)  # nothing written since: nothing to sync
    assert gateway.syncs == synced + 1
    await fs.mkdir(f"{DIR}/sub")  # a directory is a store write too
    await fs.ops.fsyncdir(dh, False)
    await fs.ops.releasedir(dh)
    assert gateway.syncs == synced + 2


def test_an_audit_line_is_what_json_dumps_gives(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = audit.AuditLog(path, audit_keys(), MemoryAnchors())
    odd = ["", 'quote " and \\ backslash', "tab\tnewline\n", "é ü 日本 \u2028", "\x00\x1f"]
    for i, text in enumerate(odd):
        log.record(
            who=text, action="read", address=text, role=text, allowed=i % 2 == 0, reason=text
        )
    log.anchor()
    assert log.verify().entries == len(odd)
    log.close()
    for line in path.read_bytes().splitlines():
        body = json.loads(line)
        assert json.dumps(body, sort_keys=True, separators=(",", ":")).encode() == line
    assert [e.who for e in audit.read(path)] == odd


OTHER = f"ucxl/{AUTH}/docs/readme.md"
ELSEWHERE = "claude:tester@bzzz:auth"  # an authority nobody listed yet


async def walked(fs: OpsHarness) -> dict[str, dict[str, int]]:
    """List both directories with their files' sizes (what a tree walk asks for)."""
    return {DIR: await sizes(fs, DIR), OTHER: await sizes(fs, OTHER)}


async def other_directory_kept(fs: OpsHarness) -> None:
    """The other directory's listing and heads are still in the memo: reading them
    again misses nothing."""
    misses = fs.ops.view.misses
    assert await sizes(fs, OTHER) == {DEV: 3}
    assert fs.ops.view.misses == misses


async def two_directories(fs: OpsHarness) -> None:
    for path, data in ((DIR, b"one"), (OTHER, b"two")):
        await fs.makedirs(path)
        await fs.write(f"{path}/{DEV}", data)
    await walked(fs)


async def test_a_commit_elsewhere_drops_only_what_it_changed(
    fs: OpsHarness, model: ContextStore
) -> None:
    await two_directories(fs)
    model.put(ADDR, ARCH, b"a new role file")  # another writer: a new file in a listed dir
    assert await sizes(fs, DIR) == {ARCH: 15, DEV: 3}
    await other_directory_kept(fs)
    model.put(ADDR, DEV, b"longer")
    assert await walked(fs) == {DIR: {ARCH: 15, DEV: 6}, OTHER: {DEV: 3}}
    model.delete(ADDR, DEV)
    assert await sizes(fs, DIR) == {ARCH: 15}
    assert not await fs.exists(f"{DIR}/{DEV}")
    await other_directory_kept(fs)


async def test_directories_a_commit_elsewhere_creates_show_up_the_tree(
    fs: OpsHarness, model: ContextStore
) -> None:
    await two_directories(fs)
    top = f"ucxl/{AUTH}"
    assert sorted(await fs.listdir(top)) == ["docs", "src"]
    src = await fs.ino(f"{top}/src")
    nlink = (await fs.ops.getattr(src, fs.ctx)).st_nlink
    assert not await fs.exists(f"{top}/src/new")
    assert not await fs.exists(f"ucxl/{ELSEWHERE}")
    model.put(parse(f"ucxl://{AUTH}/src/new/deep/x.go"), DEV, b"x")
    model.put(parse(f"ucxl://{ELSEWHERE}/t"), DEV, b"t")
    assert await fs.listdir(f"{top}/src") == ["auth.go", "new"]
    assert (await fs.ops.getattr(src, fs.ctx)).st_nlink == nlink + 1
    assert await fs.read(f"{top}/src/new/deep/x.go/{DEV}") == b"x"
    assert ELSEWHERE in await fs.listdir("ucxl")
    await other_directory_kept(fs)


async def test_a_conflict_made_elsewhere_shows_in_the_next_listing(
    fs: OpsHarness, model: ContextStore
) -> None:
    invalidator = Invalidator(fs.ops, FakeKernel())
    await two_directories(fs)
    base = model.stat(ADDR, DEV)
    model.put(ADDR, DEV, b"theirs")
    model.save(ADDR, DEV, b"mine!!!", based_on=(base.version_id,))  # concurrent with theirs
    await invalidator.cycle()  # reads the records first: the view takes them from it
    (loser,) = model.conflicts(ADDR, DEV)
    names = await fs.listdir(DIR)
    assert sorted(names) == sorted([DEV, f"{DEV}.conflict-{loser.short_id}"])
    await other_directory_kept(fs)


async def test_writes_through_the_mount_keep_the_rest_of_the_memo(fs: OpsHarness) -> None:
    await two_directories(fs)
    await fs.write(f"{DIR}/{DEV}", b"changed here")
    assert await sizes(fs, DIR) == {DEV: 12}
    await other_directory_kept(fs)


async def test_attributes_of_files_and_directories_elsewhere_are_kept(
    fs: OpsHarness, model: ContextStore
) -> None:
    """A peer's catch-up commits into other directories all the time. Expected: the
    attributes the mount built for a file or directory stay (the very same object)
    until a change at its own address; before, any commit rebuilt all of them."""
    await two_directories(fs)
    file = await fs.ino(f"{OTHER}/{DEV}")
    directory = await fs.ino(OTHER)
    kept = {ino: await fs.ops.getattr(ino, fs.ctx) for ino in (file, directory)}
    model.put(ADDR, ARCH, b"elsewhere")
    model.put(parse(f"ucxl://{ELSEWHERE}/far/away"), DEV, b"elsewhere")
    assert await sizes(fs, DIR) == {ARCH: 9, DEV: 3}
    for ino, attrs in kept.items():
        assert await fs.ops.getattr(ino, fs.ctx) is attrs
    model.put(parse(f"ucxl://{OTHER[5:]}"), DEV, b"changed")
    model.put(parse(f"ucxl://{OTHER[5:]}/sub"), DEV, b"a new subdirectory")
    assert (await fs.ops.getattr(file, fs.ctx)).st_size == 7
    nlink = (await fs.ops.getattr(directory, fs.ctx)).st_nlink
    assert nlink == kept[directory].st_nlink + 1
    assert sorted(await fs.listdir(OTHER)) == [DEV, "sub"]
