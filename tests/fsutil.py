"""Helpers for filesystem tests.

`OpsHarness` drives `slurpfs.fs.ops.Operations` directly (no kernel): paths are
resolved by `lookup` from the root, files are opened, read, written and released
as the kernel would, and every entry handed out is counted so tests can check
lookup counts. `FakeKernel` records invalidations.

`Mounted` runs the real ``slurpfs`` CLI: mount in the background or foreground,
unmount, and checks that the daemon exited 0 and logged no warning, and that it
left nothing behind (`check_ended`: nothing mounted, no process of its session,
no descriptor or thread more in the test process). A test that mounts must be
marked ``mount``, and every daemon it started must have had its end checked
(`Running`, enforced by an autouse fixture). `mounted_at` mounts a fresh data
directory. `run_as` runs a command as another user and
`developer_only` is a role mapping that gives one user just ``developer``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pyfuse3
import pytest
from conftest import CLI_TIMEOUT, Nodes, ProcessState, check_warnings, cli_env, run_cli

from slurpfs.config import Config
from slurpfs.fs.ops import Operations
from slurpfs.model import ContextStore

ROLE_FILE_OK = "ok"
AUTH = "claude:architect@bzzz:auth"
# vim skips backups (and the write-backup dance) under /tmp, where pytest puts mounts.
BACKUP_EVERYWHERE = "set backupskip="


# -- ops-level -------------------------------------------------------------------------


@dataclass
class Ctx:
    """Stands in for `pyfuse3.RequestContext`."""

    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    pid: int = field(default_factory=os.getpid)
    umask: int = 0o022


def ctx(**kw: int) -> pyfuse3.RequestContext:
    return cast(pyfuse3.RequestContext, Ctx(**kw))


@contextlib.contextmanager
def raises_errno(code: int) -> Iterator[None]:
    with pytest.raises(pyfuse3.FUSEError) as info:
        yield
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value}"


@contextlib.contextmanager
def raises_oserror(code: int) -> Iterator[None]:
    """Like `pytest.raises(OSError)`, for one errno."""
    with pytest.raises(OSError, match=re.escape(os.strerror(code))) as info:
        yield
    assert info.value.errno == code


def make_ops(model: ContextStore, config: Config | None = None) -> Operations:
    """The handlers over `model`, owned by this process's user (as a mount would be)."""
    return Operations(model, config or model.config, owner_uid=os.getuid(), owner_gid=os.getgid())


@contextlib.contextmanager
def checked_ops(model: ContextStore) -> Iterator[Operations]:
    """`make_ops`, and at the end: no file left open, no descriptor or Python thread
    more (a worker still running, a thread of the handlers' own; a search engine's
    threads are its service's)."""
    before = ProcessState.now()
    ops = make_ops(model)
    yield ops
    assert not ops.handles.files, "a test left files open"
    leaks = ProcessState.now().gained_since(before, native=False)
    assert not leaks, "the handlers left: " + "; ".join(leaks)


@contextlib.asynccontextmanager
async def checked_harness(ops: Operations) -> AsyncIterator[OpsHarness]:
    """An `OpsHarness`; at the end the kernel forgets everything it was handed and
    only the root node may be left (no node leaks, whatever the test did)."""
    harness = OpsHarness(ops)
    yield harness
    await harness.forget_all()
    assert [n.ino for n in ops.inodes] == [pyfuse3.ROOT_INODE]


class FakeKernel:
    """Records what the invalidator would tell the kernel."""

    def __init__(self) -> None:
        self.inodes: list[int] = []
        self.entries: list[tuple[int, bytes]] = []

    def invalidate_inode(self, inode: int) -> None:
        self.inodes.append(inode)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.entries.append((parent, name))


class OpsHarness:
    """Path-level helpers over an `Operations` instance, as the kernel would call it."""

    def __init__(self, ops: Operations, context: pyfuse3.RequestContext | None = None) -> None:
        self.ops = ops
        self.ctx = context or ctx()
        # Lookups handed to the kernel, minus forgets: what a kernel would hold.
        self.held: dict[int, int] = {}
        ops.readdir_reply = self._reply
        self._listing: list[tuple[bytes, pyfuse3.EntryAttributes]] = []

    def _reply(
        self, token: pyfuse3.ReaddirToken, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
    ) -> bool:
        self._listing.append((name, attr))
        self.held[attr.st_ino] = self.held.get(attr.st_ino, 0) + 1
        return True

    def as_user(self, **kw: int) -> OpsHarness:
        other = OpsHarness(self.ops, ctx(**kw))
        other.held = self.held
        return other

    @staticmethod
    def split(path: str) -> list[bytes]:
        return [os.fsencode(p) for p in path.split("/") if p]

    async def lookup(self, path: str) -> pyfuse3.EntryAttributes:
        ino = pyfuse3.ROOT_INODE
        attrs = await self.ops.getattr(ino, self.ctx)
        for name in self.split(path):
            attrs = await self.ops.lookup(ino, name, self.ctx)
            self.held[attrs.st_ino] = self.held.get(attrs.st_ino, 0) + 1
            ino = attrs.st_ino
        return attrs

    async def ino(self, path: str) -> int:
        return (await self.lookup(path)).st_ino

    async def parent(self, path: str) -> tuple[int, bytes]:
        parts = self.split(path)
        parent = await self.ino("/".join(os.fsdecode(p) for p in parts[:-1]))
        return parent, parts[-1]

    async def exists(self, path: str) -> bool:
        try:
            await self.lookup(path)
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    async def read(self, path: str) -> bytes:
        ino = await self.ino(path)
        fi = await self.ops.open(ino, os.O_RDONLY, self.ctx)
        try:
            out = b""
            while True:
                chunk = await self.ops.read(fi.fh, len(out), 1 << 16)
                if not chunk:
                    return out
                out += chunk
        finally:
            await self.ops.release(fi.fh)

    async def write(self, path: str, data: bytes, *, append: bool = False) -> None:
        """open(O_WRONLY|O_CREAT|O_TRUNC or O_APPEND), write, close: as ``>`` / ``>>``."""
        parent, name = await self.parent(path)
        try:
            attrs = await self.ops.lookup(parent, name, self.ctx)
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
            fi, attrs = await self.ops.create(
                parent, name, 0o644, os.O_WRONLY | os.O_CREAT, self.ctx
            )
            self.held[attrs.st_ino] = self.held.get(attrs.st_ino, 0) + 1
            offset = 0
        else:
            self.held[attrs.st_ino] = self.held.get(attrs.st_ino, 0) + 1
            flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
            fi = await self.ops.open(attrs.st_ino, flags, self.ctx)
            offset = attrs.st_size if append else 0
        try:
            if data:
                assert await self.ops.write(fi.fh, offset, data) == len(data)
            await self.ops.flush(fi.fh)
        finally:
            await self.ops.release(fi.fh)

    async def listdir(self, path: str) -> list[str]:
        return [os.fsdecode(n) for n, _ in await self.list_attrs(path)]

    async def list_attrs(self, path: str) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        ino = await self.ino(path)
        fh = await self.ops.opendir(ino, self.ctx)
        self._listing = []
        self.ops.readdir_reply = (
            self._reply
        )  # (another harness on the same ops may have set its own)
        try:
            await self.ops.readdir(fh, 0, cast(pyfuse3.ReaddirToken, None))
        finally:
            await self.ops.releasedir(fh)
        return list(self._listing)

    async def mkdir(self, path: str) -> pyfuse3.EntryAttributes:
        parent, name = await self.parent(path)
        attrs = await self.ops.mkdir(parent, name, 0o755, self.ctx)
        self.held[attrs.st_ino] = self.held.get(attrs.st_ino, 0) + 1
        return attrs

    async def makedirs(self, path: str) -> None:
        done = ""
        for part in path.split("/"):
            done = f"{done}/{part}" if done else part
            if not await self.exists(done):
                await self.mkdir(done)

    async def unlink(self, path: str) -> None:
        parent, name = await self.parent(path)
        await self.ops.unlink(parent, name, self.ctx)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        p_old, n_old = await self.parent(old)
        p_new, n_new = await self.parent(new)
        await self.ops.rename(p_old, n_old, p_new, n_new, flags, self.ctx)

    async def forget_all(self) -> None:
        """Forget everything handed out, as the kernel does when it drops its caches."""
        await self.ops.forget(list(self.held.items()))
        self.held.clear()


# -- real mounts -------------------------------------------------------------------------


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `condition` until it holds or `timeout` passes (no bare sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


class Running:
    """The test being run and the daemons it started whose end is not checked yet
    (kept by the autouse fixture `mounts_checked`)."""

    test: pytest.Item | None = None
    unchecked: list[Mounted] = []  # (one list for the whole run)

    @classmethod
    def require_mount_marker(cls, what: str) -> None:
        test = cls.test
        assert test is None or test.get_closest_marker("mount") is not None, (
            f"{test.nodeid if test else 'this test'} {what}: mark it @pytest.mark.mount"
        )


def slurpfs(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input: bytes | None = None,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    if "mount" in map(str, args):
        Running.require_mount_marker("runs `slurpfs mount`")
    result = subprocess.run(
        [sys.executable, "-m", "slurpfs.cli", *map(str, args)],
        input=input if input is not None else b"",
        capture_output=True,
        env=cli_env(env),
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"slurpfs {' '.join(map(str, args))} exited {result.returncode}:\n"
            f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
        )
    return result


def is_mounted(path: Path) -> bool:
    target = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def session_members(sid: int) -> list[str]:
    """The running processes of session `sid` ("pid (name)"): a background daemon
    calls setsid, so what it starts stays in its session even once orphaned."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                name, _, rest = f.read().partition(b" (")[2].rpartition(b")")
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
        state, _ppid, _pgrp, session = rest.split()[:4]
        if int(session) == sid and state != b"Z":
            found.append(f"{entry} ({name.decode(errors='replace')})")
    return found


def check_ended(pid: int, mountpoint: Path, before: ProcessState, *, killed: bool = False) -> None:
    """After the daemon `pid` was unmounted or stopped: it and every process of its
    session are gone, nothing is mounted at `mountpoint` (a `killed` daemon leaves a
    stale mount), and the test process holds no descriptor or thread it did not hold
    at `before` (when it mounted)."""
    with contextlib.suppress(AssertionError):  # (a hang guard: reported below)
        wait_for(lambda: not session_members(pid), what=f"the daemon {pid} to end")
    problems = [f"process {p} of its session still runs" for p in session_members(pid)]
    if not killed and is_mounted(mountpoint):
        problems.append(f"{mountpoint} is still mounted")
    problems += [f"the test process gained {g}" for g in ProcessState.now().gained_since(before)]
    assert not problems, f"the daemon {pid} of {mountpoint} left: " + "; ".join(problems)


# A daemon.log line (``<date> <time> LEVEL logger: message``) of a warning or worse.
_LOUD_LINE = r"^\S+ \S+ (?:WARNING|ERROR|CRITICAL) \S+: (.*)$"


@dataclass
class Mounted:
    """A data directory mounted through the CLI. `unmount` checks a clean exit."""

    data: Path
    mnt: Path
    env: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    # The messages of the WARNING/ERROR lines the daemon may log (regular expressions
    # matched whole); any other fails `check_log`. A daemon's timing is not the test's,
    # so a pattern need not match: the test asserts the lines it must find.
    expect_warnings: tuple[str, ...] = ()
    pid: int = 0  # the daemon's, once mounted
    _before: ProcessState | None = None

    @property
    def log(self) -> Path:
        return self.data / "daemon.log"

    @property
    def ucxl(self) -> Path:
        return self.mnt / "ucxl"

    def cli(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return slurpfs(*args, "--data", self.data, env=self.env, check=check)

    def mount(self) -> None:
        Running.require_mount_marker("mounts")
        with contextlib.suppress(FileExistsError):  # (a stale mount cannot even be stat'ed)
            self.mnt.mkdir(parents=True)
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        assert self not in Running.unchecked, "the end of the last daemon was not checked"
        self._before = ProcessState.now()
        Running.unchecked.append(self)
        self.cli("mount", *self.extra, self.mnt)
        assert is_mounted(self.mnt)
        self.pid = int(os.getxattr(self.mnt, "user.slurp.pid"))

    def unmount(self) -> None:
        result = run_cli("umount", self.mnt, env=self.env)  # (in this process: it forks nothing)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert not is_mounted(self.mnt)
        self.check_ended()

    def check_ended(self) -> None:
        """The daemon exited 0 without a warning and left nothing behind (`check_ended`)."""
        assert self._before is not None, "never mounted"
        check_ended(self.pid, self.mnt, self._before)
        self.check_log()
        Running.unchecked.remove(self)

    def check_killed(self) -> None:
        """The daemon was killed: it left nothing behind but its stale mount."""
        assert self._before is not None, "never mounted"
        check_ended(self.pid, self.mnt, self._before, killed=True)
        Running.unchecked.remove(self)

    def check_log(self) -> None:
        text = self.log.read_bytes()[self._log_start :].decode(errors="replace")
        assert "exiting with status 0" in text, text
        loud = [m.group(1) for m in re.finditer(_LOUD_LINE, text, re.MULTILINE)]
        check_warnings(loud, self.expect_warnings, "the daemon logged", each_seen=False)

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def sweep(self) -> None:
        """Leave nothing mounted whatever happened (teardown after a failure)."""
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False, capture_output=True)


def mounted_at(
    nodes: Nodes,
    root: Path,
    *,
    toml: str | None = None,
    extra: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Mounted:
    """A fresh data directory mounted at ``root/mnt`` (`env` goes to every CLI call)."""
    node, _ = nodes.new(toml=toml)
    node.close_all()  # the daemon opens the store
    m = Mounted(node.data_dir, root / "mnt", env=dict(env or {}), extra=extra)
    m.mount()
    return m


def developer_only(user: str) -> str:
    """Configuration (TOML) with the default roles, mapping `user` to ``developer`` alone."""
    return textwrap.dedent(
        f"""
        [roles.developer]
        readers = ["architect"]
        users = ["{user}"]
        [roles.architect]
        readers = []
        [roles.reviewer]
        readers = ["architect"]
        """
    )


def run_as(user: str, *cmd: str | Path) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` as `user` (we are root in mount tests)."""
    return subprocess.run(
        ["runuser", "-u", user, "--", *map(str, cmd)], capture_output=True, check=False
    )


def role_path(root: Path, authority: str, *parts: str) -> Path:
    return root / "ucxl" / authority / Path(*parts) if parts else root / "ucxl" / authority


def versions(address_dir: Path, role: str) -> int:
    return len(os.listdir(address_dir / ".history" / role))


def fill(path: Path) -> None:
    """Write `path` until the file system holding it is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):  # ENOSPC: go on with smaller writes
                while os.write(fd, b"\0" * size):
                    pass
        with raises_oserror(errno.ENOSPC):
            os.write(fd, b"\0")
    finally:
        os.close(fd)


@dataclass
class Fields:
    """Stands in for `pyfuse3.SetattrFields` (whose flags cannot be set from Python)."""

    update_size: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


# uid 4242 holds only `developer`; `architect` reads every role.
UID_4242_DEVELOPER = """
[roles.developer]
readers = ["architect"]
users = ["4242"]
[roles.architect]
readers = []
[roles.reviewer]
readers = ["architect"]
"""
