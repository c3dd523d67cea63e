"""The search worker process under a real mount: killed, stopped, orphaned, and at rest.

Real mounts through the ``slurpfs`` CLI, driven with os.* and signals sent by
PID. The worker's PID comes from ``.slurp/status`` (``worker_search_pid``),
the daemon's from the mount's ``user.slurp.pid``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Nodes, assert_no_canary
from fsutil import AUTH, Mounted, is_mounted, mounted_at, running, slurpfs, wait_for
from test_index_support import address, document

from slurpfs.model import BatchItem

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine"),
]

DEV = "developer"
BUILD_CONTEXTS = 3000  # enough that a first index build is still running when we look


def status(m: Mounted) -> dict[str, str]:
    lines = (m.mnt / ".slurp" / "status").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def worker_pid(m: Mounted) -> int:
    pid = int(status(m).get("worker_search_pid", "0"))
    assert pid > 0, "no search worker process"
    return pid


def daemon_pid(m: Mounted) -> int:
    return int(os.getxattr(m.mnt, "user.slurp.pid"))


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (zombies included)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def hits(m: Mounted, query: str) -> list[str]:
    return sorted(n for n in os.listdir(m.mnt / ".search" / query) if not n.startswith("."))


def _words(i: int) -> str:
    """About a kilobyte of words, many distinct across contexts (an index's real work)."""
    return f"bulk context {i} word{i % 97} " + " ".join(
        f"w{(i * 131 + j) % 20011}" for j in range(150)
    )


def imported(nodes: Nodes, root: Path, count: int, *, engine: str = "sqlite") -> Mounted:
    """A data directory holding `count` contexts (imported before the first mount)."""
    node, model = nodes.new(toml=f'[search]\nengine = "{engine}"\n')
    assert f'engine = "{engine}"' in (node.data_dir / "config.toml").read_text()
    items = [BatchItem(address(f"bulk/d{i:05d}"), DEV, document(_words(i))) for i in range(count)]
    for start in range(0, count, 500):
        assert not model.put_many(items[start : start + 500]).failed
    node.close_all()
    return Mounted(node.data_dir, root / "mnt")


def test_a_killed_worker_restarts_while_the_mount_serves(nodes: Nodes, tmp_path: Path) -> None:
    # SIGKILL of the search worker: files keep serving, .search/ answers at once
    # (results, or .error saying it restarts: EAGAIN-style, never a hang), the
    # task shows as restarted in .slurp/status, and search works again.
    m = mounted_at(nodes, tmp_path)
    m.expect_warnings = (  # the supervisor's line for the killed worker
        r"task search failed \(1 in a row\); restarting in \d+ s; the mount goes on serving",
    )
    try:
        d = m.ucxl / AUTH / "src"
        d.mkdir(parents=True)
        (d / DEV).write_bytes(b"the quokka guards the keys\n")
        wait_for(lambda: hits(m, "quokka") == [f"01-src-{DEV}"], what="the save to be indexed")
        first = worker_pid(m)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not running(first), what="the worker to die")
        assert (d / DEV).read_bytes() == b"the quokka guards the keys\n"
        answer = os.listdir(m.mnt / ".search" / "quokka")
        if answer == [".error"]:
            text = (m.mnt / ".search" / "quokka" / ".error").read_text()
            assert "search worker" in text
            assert "try again" in text
        else:
            assert f"01-src-{DEV}" in answer
        wait_for(
            lambda: status(m)["task_search"].startswith("running (restarted 1 times"),
            what="the worker to be restarted",
        )
        wait_for(lambda: hits(m, "quokka") == [f"01-src-{DEV}"], what="search to come back")
        assert worker_pid(m) != first
        (d / DEV).write_bytes(b"the wombat replaced it\n")
        wait_for(lambda: hits(m, "wombat") == [f"01-src-{DEV}"], what="a new save to be indexed")
        pid = daemon_pid(m)
        second = worker_pid(m)
        m.unmount()
        assert not running(second)
        assert not children(pid)
        log = m.log.read_text()
        assert "WorkerDied: the search worker" in log, log
    finally:
        m.sweep()


@contextmanager
def busy_cores() -> Iterator[None]:
    """A busy loop at normal priority on every core until the block ends."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_sigterm_during_a_first_index_build(nodes: Nodes, tmp_path: Path) -> None:
    # A first mount of a few thousand imported contexts: the worker builds the
    # indexes and its progress shows in .slurp/status, .slurp/health and
    # `slurpfs status`. SIGTERM meanwhile, on a machine whose cores are all busy
    # (the worker runs at idle priority, so it gets almost no CPU then): the daemon
    # raises the worker's priority and stops it (the build gives up), exits 0
    # without killing anything, and leaves no process behind.
    # (whoosh: a build long enough to watch and interrupt; sqlite builds these in seconds)
    m = imported(nodes, tmp_path, BUILD_CONTEXTS, engine="whoosh")
    m.mount()
    try:
        wait_for(
            lambda: "building the search indexes: indexed" in status(m).get("search_progress", ""),
            timeout=60,
            what="the build's progress",
        )
        line = status(m)["search_progress"]
        assert f"of {BUILD_CONTEXTS} contexts" in line, line
        health = (m.mnt / ".slurp" / "health").read_text()
        assert "search: warn - building the search indexes: indexed" in health, health
        cli = slurpfs("status", "--data", m.data).stdout.decode()
        assert "search: building the search indexes: indexed" in cli, cli
        error = (m.mnt / ".search" / "word3" / ".error").read_text()
        assert "building the search indexes" in error, error
        daemon, worker = daemon_pid(m), worker_pid(m)
        assert worker in children(daemon)  # (with write-behind the commit worker too)
        with busy_cores():
            os.kill(daemon, signal.SIGTERM)
            wait_for(lambda: not is_mounted(m.mnt), timeout=60, what="the daemon to unmount")
            wait_for(lambda: not running(daemon), timeout=60, what="the daemon to exit")
        assert not running(worker)
        m.check_ended()  # "exiting with status 0", no warning, nothing killed or left behind
        # The build gives up between documents; inside the engine's batch writes or
        # final commit (whoosh: tens of seconds here) the worker abandons it after a
        # moment and exits 0. Or the build ended first. Never a kill.
        log = m.log.read_text()
        assert (
            "stopped opening the search indexes: shutting down" in log
            or "stopping: abandoning the search indexes' build" in log
            or "search ready:" in log
        ), log
        # Nothing saved was lost: the next mount builds (or finishes) and searches.
        m.mount()
        wait_for(
            lambda: status(m).get("search_progress", "").startswith("ready"),
            timeout=300,
            what="the indexes after the abandoned build",
        )
        assert len(hits(m, "word3")) == len(range(3, BUILD_CONTEXTS, 97))
        m.unmount()
    finally:
        m.sweep()


def test_the_worker_dies_with_a_killed_daemon(nodes: Nodes, tmp_path: Path) -> None:
    # SIGKILL of the daemon (no teardown at all): the worker does not outlive it.
    m = mounted_at(nodes, tmp_path)
    try:
        daemon, worker = daemon_pid(m), worker_pid(m)
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: not running(daemon), what="the daemon to die")
        wait_for(lambda: not running(worker), what="the worker to die with it")
        m.check_killed()
    finally:
        m.sweep()


def test_a_canary_indexed_by_the_worker_is_nowhere_at_rest(nodes: Nodes, tmp_path: Path) -> None:
    # Content crosses the worker's socket (to be indexed, and back in snippets):
    # it reaches no file under the data directory, daemon.log included.
    canary = "canary" + secrets.token_hex(12)
    m = mounted_at(nodes, tmp_path)
    try:
        worker_pid(m)  # indexed by a worker process
        d = m.ucxl / AUTH / "secret"
        d.mkdir(parents=True)
        (d / DEV).write_bytes(f"the {canary} sings\n".encode())
        wait_for(lambda: len(hits(m, canary)) == 1, what="the canary to be indexed")
        results = (m.mnt / ".search" / canary / ".results").read_text()
        assert canary in results
        m.unmount()
        assert_no_canary(m.data, canary.encode())
    finally:
        m.sweep()


def _systemd_usable() -> bool:
    if shutil.which("systemd-run") is None or not Path("/run/systemd/system").is_dir():
        return False
    probe = subprocess.run(["systemctl", "is-system-running"], capture_output=True, check=False)
    return probe.stdout.strip() not in (b"offline", b"")


@pytest.mark.skipif(not _systemd_usable(), reason="systemd is not running on this machine")
def test_a_mount_under_systemd_run_stops_its_worker_with_it(nodes: Nodes, tmp_path: Path) -> None:
    node, _ = nodes.new()
    node.close_all()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    unit = f"slurpfs-test-{secrets.token_hex(4)}"
    venv_python = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else "python3"
    subprocess.run(
        ["systemd-run", "--unit", unit, "-p", "KillMode=mixed", "-p", "TimeoutStopSec=30",
         "--setenv=SLURPFS_TEST_WEAK_KDF=1", python, "-m", "slurpfs.cli", "mount",
         "--foreground", "--data", str(node.data_dir), str(mnt)],
        check=True,
    )  # fmt: skip
    m = Mounted(node.data_dir, mnt)
    try:
        wait_for(lambda: is_mounted(mnt), what="the mount under systemd")
        daemon, worker = daemon_pid(m), worker_pid(m)
        subprocess.run(["systemctl", "stop", unit], check=True, timeout=60)
        assert not running(daemon)
        assert not running(worker)
    finally:
        subprocess.run(["systemctl", "stop", unit], check=False, capture_output=True)
        m.sweep()
