"""A mount's background tasks fail without taking the mount, or unsaved writes, down.

Real mounts through the ``slurpfs`` CLI, driven with os.* only. The failure is a
real one, made from outside the daemon: a damaged record in the store's change
log (written behind the daemon's back, as a bad disk or a foreign writer would),
which the invalidator reads within half a second and cannot decode. No hook in
the product is involved.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import pytest
from conftest import Nodes
from fsutil import (
    AUTH,
    Mounted,
    is_mounted,
    mounted_at,
    raises_oserror,
    slurpfs,
    versions,
    wait_for,
)

from slurpfs.store import schema as s

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine"),
]

DEV = "developer"
DAMAGED = b"\xee" * s.VERSION_ID_LEN  # the version id the damaged change record names


@contextmanager
def store_txn(data: Path) -> Iterator[tuple[lmdb.Transaction, dict[bytes, lmdb._Database]]]:
    """A write transaction on a store a daemon has open (LMDB is multi-process safe)."""
    env = lmdb.open(str(data / "store"), max_dbs=16)
    try:
        dbs = {name: env.open_db(name) for name in s.ALL_DBS}
        with env.begin(write=True) as txn:
            yield txn, dbs
    finally:
        env.close()


def damage_the_change_log(data: Path) -> None:
    """Append a change whose version record cannot be decoded."""
    with store_txn(data) as (txn, dbs):
        raw = txn.get(s.INFO_SEQUENCE, db=dbs[s.DB_INFO])
        seq = (0 if raw is None else struct.unpack(">Q", bytes(raw))[0]) + 1
        txn.put(DAMAGED, b"\x01 not a version record", db=dbs[s.DB_META])
        txn.put(struct.pack(">Q", seq), DAMAGED, db=dbs[s.DB_CHANGES])
        txn.put(s.INFO_SEQUENCE, struct.pack(">Q", seq), db=dbs[s.DB_INFO])


def repair_the_change_log(data: Path) -> None:
    """Remove the damaged record: the change then reads as a purged version's."""
    with store_txn(data) as (txn, dbs):
        assert txn.delete(DAMAGED, db=dbs[s.DB_META])


def status(m: Mounted) -> str:
    return (m.mnt / ".slurp" / "status").read_text()


def steadily(condition: Callable[[], bool], seconds: float) -> Callable[[], bool]:
    """A condition for `wait_for`: `condition` held at every poll for `seconds`."""
    since: list[float] = []

    def check() -> bool:
        if not condition():
            since.clear()
            return False
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] >= seconds

    return check


def test_a_failing_task_restarts_and_the_mount_keeps_serving_and_storing(
    nodes: Nodes, tmp_path: Path
) -> None:
    # A file holds unsaved writes when the invalidator fails. Expected: the mount
    # goes on serving (reads, listings, status), .slurp/status and the health checks
    # show the task restarting, it runs again once the record is repaired, and the
    # file's close stores exactly what was written. (Before, the task's failure
    # cancelled the FUSE loop: the daemon unmounted and the writes were lost.)
    m = mounted_at(nodes, tmp_path)
    m.expect_warnings = (
        r"task invalidator failed \(\d+ in a row\); restarting in \d+ s; the mount goes on serving",
        # (the search worker reads the change log too: if it meets the damaged record,
        # it dies and is restarted the same way)
        r"task search failed \(\d+ in a row\); restarting in \d+ s; the mount goes on serving",
    )
    try:
        d = m.ucxl / AUTH / "src"
        d.mkdir(parents=True)
        (d / DEV).write_bytes(b"stored before\n")
        (d / "other").mkdir()
        (d / "other" / DEV).write_bytes(b"another context\n")
        fd = os.open(d / DEV, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, b"unsaved when the task failed\n")
            damage_the_change_log(m.data)
            wait_for(
                lambda: "task_invalidator: restarting after" in status(m),
                what="the invalidator to fail and be restarted",
            )
            assert "Corrupt" in status(m)
            health = (m.mnt / ".slurp" / "health").read_text()
            assert "tasks: warn - invalidator restarting after" in health, health
            assert (d / "other" / DEV).read_bytes() == b"another context\n"
            assert sorted(os.listdir(d)) == [DEV, "other"]
            repair_the_change_log(m.data)
            # Running again, and for longer than its poll interval (0.5 s): its
            # cycles read past the repaired record.
            wait_for(
                steadily(lambda: "task_invalidator: running (restarted" in status(m), 1.5),
                what="the invalidator to run again",
            )
            assert "tasks: ok" in (m.mnt / ".slurp" / "health").read_text()
            # ... and does its job: a write from outside shows at once.
            (d / "other" / DEV).read_bytes()  # (the kernel caches it now)
            address = f"ucxl://{AUTH}/src/other"
            slurpfs("put", "--data", m.data, address, "--role", DEV, input=b"changed outside\n")
            assert (d / "other" / DEV).read_bytes() == b"changed outside\n"
        finally:
            os.close(fd)
        assert (d / DEV).read_bytes() == b"unsaved when the task failed\n"
        assert versions(d, DEV) == 2
        m.unmount()
        log = m.log.read_text()
        assert "task invalidator failed (1 in a row); restarting in 1 s" in log, log
        got = m.cli("get", f"ucxl://{AUTH}/src", "--role", DEV)
        assert got.stdout == b"unsaved when the task failed\n"
    finally:
        m.sweep()


def test_sigterm_stores_an_open_file_while_a_task_is_failing(nodes: Nodes, tmp_path: Path) -> None:
    # SIGTERM while a task waits to be restarted and a file holds unsaved writes:
    # the daemon stops its tasks (the waiting one included), stores the file and
    # exits 0.
    m = mounted_at(nodes, tmp_path)
    m.expect_warnings = (
        r"task invalidator failed \(\d+ in a row\); restarting in \d+ s; the mount goes on serving",
    )
    try:
        d = m.ucxl / AUTH
        d.mkdir()
        fd = os.open(d / DEV, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"written, never closed")
        damage_the_change_log(m.data)
        wait_for(lambda: "task_invalidator: restarting" in status(m), what="the failure")
        pid = int(os.getxattr(m.mnt, "user.slurp.pid"))
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not is_mounted(m.mnt), what="the daemon to unmount")
        with raises_oserror(errno.ENOTCONN):
            os.close(fd)
        wait_for(lambda: "exiting with status 0" in m.log.read_text(), what="the exit")
        m.check_ended()
        repair_the_change_log(m.data)
        got = m.cli("get", f"ucxl://{AUTH}", "--role", DEV)
        assert got.stdout == b"written, never closed"
    finally:
        m.sweep()


@pytest.fixture
def fusectl() -> Iterator[Path | None]:
    """The FUSE control file system, or None; mounted for the test if it was not
    (and unmounted after it). It lists a directory per live FUSE connection."""
    root = Path("/sys/fs/fuse/connections")

    def mounted() -> bool:
        lines = Path("/proc/mounts").read_text().splitlines()
        return any(line.split()[1:3] == [str(root), "fusectl"] for line in lines)

    ours = False
    if root.is_dir() and not mounted() and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", root], check=False)
        ours = mounted()
    try:
        yield root if mounted() else None
    finally:
        if ours:
            subprocess.run(["umount", root], check=False)


def test_a_connection_ended_by_the_kernel_stores_open_files(
    nodes: Nodes, tmp_path: Path, fusectl: Path | None
) -> None:
    # The kernel ends the FUSE connection (an abort through fusectl, as after a
    # forced unmount) while a file holds unsaved writes and is never closed. The
    # FUSE loop then ends without any release: the teardown stores the buffer.
    if fusectl is None:
        pytest.skip("no FUSE control file system (/sys/fs/fuse/connections) here")
    node, _ = nodes.new()
    node.close_all()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "slurpfs.cli", "mount", "--foreground"]
        + ["--data", str(node.data_dir), str(mnt)],
        stderr=subprocess.PIPE,
        env={**os.environ, "SLURPFS_TEST_WEAK_KDF": "1"},
        text=True,
    )
    try:
        wait_for(lambda: (mnt / ".slurp").exists(), what="the foreground mount")
        d = mnt / "ucxl" / AUTH
        d.mkdir()
        fd = os.open(d / DEV, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"written, then the connection was aborted")
        (fusectl / str(os.stat(mnt).st_dev) / "abort").write_text("1")
        assert daemon.wait(timeout=60) == 0
        with raises_oserror(errno.ENOTCONN):
            os.close(fd)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)
    _, stderr = daemon.communicate()
    assert "WARNING" not in stderr, stderr
    assert "ERROR" not in stderr, stderr
    got = slurpfs("get", "--data", node.data_dir, f"ucxl://{AUTH}", "--role", DEV)
    assert got.stdout == b"written, then the connection was aborted"
