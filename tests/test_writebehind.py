"""Write-behind (``durability.write_behind``) through real mounts: a ``close`` acknowledged
from the encrypted journal loses nothing to SIGKILL, stores each save exactly once,
keeps no plaintext at rest, reports damaged entries, and ``fsync`` waits for the
group commit, which the commit worker process stores (a killed one loses nothing).
The group commit waits 30 s here (``durability.commit_delay``), so what a test sees
before it happened came from the journal."""

from __future__ import annotations

import errno
import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Nodes, assert_no_canary, find_canary
from fsutil import (
    AUTH,
    Mounted,
    fill,
    mounted_at,
    raises_oserror,
    running,
    slurpfs,
    versions,
    wait_for,
)

from slurpfs.store import journal

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine"),
]

DEV = "developer"
SLOW = {
    "SLURPFS_DURABILITY_WRITE_BEHIND": "true",
    "SLURPFS_DURABILITY_COMMIT_DELAY": "30",
}


@pytest.fixture
def mnt(nodes: Nodes, tmp_path: Path) -> Iterator[Mounted]:
    m = mounted_at(nodes, tmp_path, env=SLOW)
    yield m
    try:
        if m.pid and running(m.pid):
            m.unmount()
    finally:
        m.sweep()


def address(*parts: str) -> str:
    return "ucxl://" + "/".join((AUTH, *parts))


def get(m: Mounted, *parts: str) -> bytes:
    return slurpfs("get", "--data", m.data, address(*parts), "--role", DEV, env=m.env).stdout


def kill(m: Mounted) -> None:
    os.kill(m.pid, signal.SIGKILL)
    wait_for(lambda: not running(m.pid), what="the daemon to end")
    m.check_killed()


def journal_file(m: Mounted) -> Path:
    return m.data / "journal" / journal.FILE_NAME


def entry_offsets(raw: bytes) -> list[tuple[int, int]]:
    """(start, length) of each entry of a journal file."""
    at, out = journal.HEADER_BYTES, []
    while at < len(raw):
        (length,) = struct.unpack_from(">I", raw, at)
        out.append((at, length))
        at += 4 + length
    return out


def test_sigkill_after_close_loses_nothing_and_stores_each_save_once(mnt: Mounted) -> None:
    d = mnt.ucxl / AUTH / "doc"
    d.mkdir(parents=True)
    (d / DEV).write_bytes(b"one\n")
    with open(d / DEV, "rb+") as f:  # fsync: the first save is a version before the kill
        os.fsync(f.fileno())
    (d / DEV).write_bytes(b"two\n")  # acknowledged from the journal
    (d / DEV).write_bytes(b"three\n")
    new = mnt.ucxl / AUTH / "fresh"
    new.mkdir()
    (new / DEV).write_bytes(b"a new context\n")
    assert (d / DEV).read_bytes() == b"three\n"  # the mount serves journaled saves at once
    assert get(mnt, "doc") == b"one\n"  # another process: only the journal holds them
    assert os.listdir(new) == [DEV]  # listed in the mount before it is stored
    assert os.stat(new / DEV).st_size == len(b"a new context\n")
    kill(mnt)
    mnt.env = {}  # the replay does not depend on write-behind being on
    mnt.mount()
    assert (d / DEV).read_bytes() == b"three\n"
    assert versions(d, DEV) == 3
    assert [(d / ".history" / DEV / n).read_bytes() for n in ("1", "2", "3")] == [
        b"one\n",
        b"two\n",
        b"three\n",
    ]
    assert (new / DEV).read_bytes() == b"a new context\n"
    assert versions(new, DEV) == 1
    assert "journal replayed: 3 saves stored" in mnt.log.read_text()
    mnt.remount()  # replayed once: nothing is stored twice
    assert versions(d, DEV) == 3
    assert versions(new, DEV) == 1


def test_the_journal_holds_no_plaintext(mnt: Mounted) -> None:
    canary = b"canary-" + os.urandom(16).hex().encode()
    d = mnt.ucxl / AUTH / "secret"
    d.mkdir(parents=True)
    (d / DEV).write_bytes(b"top\n" + canary + b"\nbottom\n")
    raw = journal_file(mnt).read_bytes()
    assert len(entry_offsets(raw)) == 1  # the save is in the journal, not yet a version
    assert find_canary(raw, canary) is None
    assert_no_canary(mnt.data, canary, exclude=[mnt.data / "daemon.sock"])
    kill(mnt)
    mnt.mount()
    assert canary in (d / DEV).read_bytes()
    assert_no_canary(mnt.data, canary, exclude=[mnt.data / "daemon.sock"])


def test_a_damaged_entry_is_reported_and_the_intact_ones_replayed(mnt: Mounted) -> None:
    dirs = [mnt.ucxl / AUTH / f"doc{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        (d / DEV).write_bytes(b"save %d\n" % i)
    kill(mnt)
    path = journal_file(mnt)
    raw = bytearray(path.read_bytes())
    start, length = entry_offsets(bytes(raw))[1]
    raw[start + 4 + length // 2] ^= 0x40  # one bit of the second entry's ciphertext
    path.write_bytes(bytes(raw))
    mnt.expect_warnings = (r"journal: .*damaged entry at byte \d+.*",)
    mnt.mount()
    assert (dirs[0] / DEV).read_bytes() == b"save 0\n"
    assert (dirs[2] / DEV).read_bytes() == b"save 2\n"
    assert not (dirs[1] / DEV).exists()
    log = mnt.log.read_text()
    assert f"damaged entry at byte {start}" in log
    kept = journal.damaged_files(mnt.data / "journal")
    assert len(kept) == 1
    health = (mnt.mnt / ".slurp" / "health").read_text()
    assert "journal: warn" in health, health
    assert kept[0].name in health, health
    kept[0].unlink()  # read and dealt with
    wait_for(
        lambda: "journal: ok" in (mnt.mnt / ".slurp" / "health").read_text(),
        what="the journal check to clear",
    )


def test_fsync_waits_for_the_group_commit(mnt: Mounted) -> None:
    d = mnt.ucxl / AUTH / "synced"
    d.mkdir(parents=True)
    (d / DEV).write_bytes(b"journaled first\n")
    fd = os.open(d / DEV, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"saved and synced\n")
        os.fsync(fd)
        # Another process sees the fsynced save at once (the journal's is before it).
        assert get(mnt, "synced") == b"saved and synced\n"
        assert versions(d, DEV) == 2
    finally:
        os.close(fd)


def test_fsync_of_the_directory_waits_for_the_group_commit(mnt: Mounted) -> None:
    """An editor's save ends with ``fsync`` of the directory: the saves closed before
    it are versions, on stable storage, when it returns (as after a file's ``fsync``)."""
    d = mnt.ucxl / AUTH / "dirsynced"
    d.mkdir(parents=True)
    (d / DEV).write_bytes(b"first\n")
    fsync(d / DEV)
    (d / DEV).write_bytes(b"closed, then the directory synced\n")
    assert get(mnt, "dirsynced") == b"first\n"  # another process: still journaled
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert get(mnt, "dirsynced") == b"closed, then the directory synced\n"
    assert versions(d, DEV) == 2


def test_history_in_the_mount_shows_journaled_saves(mnt: Mounted) -> None:
    d = mnt.ucxl / AUTH / "listed"
    d.mkdir(parents=True)
    (d / DEV).write_bytes(b"first\n")
    (d / DEV).write_bytes(b"second\n")
    assert versions(d, DEV) == 2  # .history waits for the group commit
    assert (d / ".history" / DEV / "2").read_bytes() == b"second\n"
    assert get(mnt, "listed") == b"second\n"


def test_temporal_views_in_the_mount_count_journaled_saves(mnt: Mounted) -> None:
    # Three saves still in the journal (the group commit waits 30 s): a temporal
    # segment counts them as versions, exactly as with a synchronous close.
    d = mnt.ucxl / AUTH / "timed"
    d.mkdir(parents=True)
    for text in (b"one\n", b"two\n", b"three\n"):
        (d / DEV).write_bytes(text)
    auth = mnt.ucxl / AUTH
    assert (auth / "~~1" / "timed" / DEV).read_bytes() == b"two\n"
    assert (auth / "^^0" / "timed" / DEV).read_bytes() == b"one\n"
    (d / DEV).write_bytes(b"four\n")  # journaled; the segment looked up again sees it
    assert (auth / "~~1" / "timed" / DEV).read_bytes() == b"three\n"


def test_identical_saves_store_no_version(mnt: Mounted) -> None:
    d = mnt.ucxl / AUTH / "same"
    d.mkdir(parents=True)
    (d / DEV).write_bytes(b"unchanged\n")
    for _ in range(3):
        (d / DEV).write_bytes(b"unchanged\n")
    mnt.remount()  # unmounting waits for the group commit
    assert versions(d, DEV) == 1
    assert get(mnt, "same") == b"unchanged\n"


def test_a_head_moved_by_another_process_meanwhile_makes_a_conflict(mnt: Mounted) -> None:
    d = mnt.ucxl / AUTH / "raced"
    d.mkdir(parents=True)
    (d / DEV).write_bytes(b"base\n")
    with open(d / DEV, "rb") as f:
        os.fsync(f.fileno())
    (d / DEV).write_bytes(b"mine\n")  # journaled on "base"
    slurpfs("put", "--data", mnt.data, address("raced"), "--role", DEV, input=b"theirs\n")
    mnt.remount()  # the group commit runs at the latest at unmount
    conflicts = [n for n in os.listdir(d) if n.startswith(DEV + ".conflict-")]
    assert len(conflicts) == 1, os.listdir(d)
    both = {(d / DEV).read_bytes(), (d / conflicts[0]).read_bytes()}
    assert both == {b"mine\n", b"theirs\n"}


def test_a_full_disk_fails_the_close_and_keeps_what_was_journaled(
    small_disk: Path, nodes: Nodes, tmp_path: Path
) -> None:
    node, _ = nodes.new("small/data")
    node.close_all()
    m = Mounted(node.data_dir, tmp_path / "mnt", env=SLOW)
    m.mount()
    try:
        kept, refused = m.ucxl / AUTH / "kept", m.ucxl / AUTH / "refused"
        kept.mkdir(parents=True)
        refused.mkdir()
        (kept / DEV).write_bytes(b"journaled before the disk filled\n")
        fds = [
            os.open(refused / DEV, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644),
            os.open(kept / DEV, os.O_WRONLY | os.O_TRUNC),  # over the journaled save
        ]
        filler = small_disk / "filler"
        fill(filler)
        for fd in fds:
            try:
                os.write(fd, os.urandom(256 << 10))
            finally:
                with raises_oserror(errno.ENOSPC):  # the journal could not take it
                    os.close(fd)
        filler.unlink()
        assert (kept / DEV).read_bytes() == b"journaled before the disk filled\n"
        m.expect_warnings = (
            r"could not store 'developer' at release: the write-behind journal \S+ is full: .*",
            r"audit log \S+/audit\.log: only \d+ of \d+ bytes of an entry could be written"
            r" \(disk full\?\); access refused until it can be recorded",
            r"indexing failed, retrying in \S+ s: .*",
        )
        m.remount()
        assert (kept / DEV).read_bytes() == b"journaled before the disk filled\n"
        assert versions(kept, DEV) == 1
        assert not (refused / DEV).exists()  # a close that failed stored nothing
        assert "write-behind journal" in m.log.read_text()
        m.unmount()
    finally:
        m.sweep()


def status(m: Mounted) -> dict[str, str]:
    lines = (m.mnt / ".slurp" / "status").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def commit_worker_ready(m: Mounted, *, not_pid: int = 0) -> int:
    """The commit worker's PID once it serves (it has opened the store); with
    `not_pid`, a worker other than that one (the status may name a killed worker
    until the daemon has seen it end)."""

    def serving() -> int:
        fields = status(m)
        pid = int(fields.get("worker_commit_pid", "0") or 0)
        return pid if fields.get("commit_worker_ready") == "1" and pid != not_pid else 0

    wait_for(lambda: serving() > 0, what="the commit worker")
    return serving()


def batches(m: Mounted, n: int) -> None:
    """Wait until .slurp/status (rendered anew every moment) counts `n` worker batches."""
    wait_for(
        lambda: status(m)["commit_worker_batches"] == str(n), what=f"{n} commit worker batches"
    )


def fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def test_the_group_commit_runs_in_the_commit_worker(mnt: Mounted) -> None:
    commit_worker_ready(mnt)
    dirs = [mnt.ucxl / AUTH / f"batch{i}" for i in range(5)]
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        (d / DEV).write_bytes(b"save %d\n" % i)
    (dirs[0] / DEV).write_bytes(b"save 0, again\n")
    fsync(dirs[0] / DEV)
    batches(mnt, 1)  # one request for all six
    assert status(mnt)["writebehind_batches"] == "1"
    assert get(mnt, "batch0") == b"save 0, again\n"
    assert [get(mnt, f"batch{i}") for i in range(1, 5)] == [b"save %d\n" % i for i in range(1, 5)]
    assert versions(dirs[0], DEV) == 2
    assert [versions(d, DEV) for d in dirs[1:]] == [1] * 4
    assert (dirs[0] / DEV).read_bytes() == b"save 0, again\n"


def test_a_killed_commit_worker_loses_nothing(mnt: Mounted) -> None:
    mnt.expect_warnings = (  # the supervisor's line for the killed worker
        r"task commit failed \(1 in a row\); restarting in \d+ s; the mount goes on serving",
    )
    first = commit_worker_ready(mnt)
    d = mnt.ucxl / AUTH / "survives"
    d.mkdir(parents=True)
    (d / DEV).write_bytes(b"one\n")
    (d / DEV).write_bytes(b"two\n")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not running(first), what="the commit worker to die")
    fsync(d / DEV)  # the daemon stores them itself meanwhile
    assert get(mnt, "survives") == b"two\n"
    assert versions(d, DEV) == 2
    second = commit_worker_ready(mnt, not_pid=first)  # restarted
    assert running(second)
    (d / DEV).write_bytes(b"three\n")
    fsync(d / DEV)
    batches(mnt, 1)  # (the first two were stored by the daemon)
    assert versions(d, DEV) == 3
    assert get(mnt, "survives") == b"three\n"
    mnt.remount()
    assert versions(d, DEV) == 3
