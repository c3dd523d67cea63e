"""``slurpfs mount`` and ``slurpfs umount``.

``mount [--foreground] [--allow-other] MOUNTPOINT`` checks what it can before
starting anything (FUSE device, mountpoint, stale mount, initialised data
directory, passphrase), then runs the daemon: in the foreground, or forked into
the background, returning 0 only once the mount answers. Errors are one clear
line and a non-zero exit code (see `slurpfs.cli`; mount problems are 10).

``umount MOUNTPOINT`` unmounts and waits for the daemon to exit, returning 0
only if the daemon exited 0. A stale mount (its daemon was killed) is removed.

Handlers receive ``(args, config, passphrase)`` from the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import getpass
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from slurpfs import logs
from slurpfs.config import Config
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import Corrupt, NotInitialised, SlurpError, WrongPassphrase, exit_code
from slurpfs.model import ContextStore
from slurpfs.service import control
from slurpfs.service.daemon import Daemon, MountError, MountOptions

log = logging.getLogger("slurpfs.daemon")

START_TIMEOUT = 120.0
ANSWER_TIMEOUT = 5.0  # seconds `umount` gives the daemon to answer its first question
LOG_NAME = "daemon.log"


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser | None = None,
) -> None:
    """Add ``mount`` and ``umount``; each sets ``handler(args, config, passphrase)``."""
    parents = [common] if common is not None else []
    p = subparsers.add_parser(
        "mount",
        help="mount the context store as a filesystem",
        description="Mount the context store at MOUNTPOINT (in the background unless --foreground).",
        parents=parents,
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users in (each gets the roles configured for them)",
    )
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.set_defaults(handler=mount_command)
    u = subparsers.add_parser(
        "umount",
        help="unmount and wait for the daemon to exit",
        description="Unmount MOUNTPOINT and wait for its daemon to exit.",
        parents=parents,
    )
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    u.set_defaults(handler=umount_command)


# -- mount -----------------------------------------------------------------------------


def mount_command(args: argparse.Namespace, config: Config, passphrase: bytes | None) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    # The daemon leaves the working directory (so it never keeps a filesystem busy).
    data_dir = os.path.abspath(config.data_dir)
    config = config.replace(node=dataclasses.replace(config.node, data_dir=data_dir))
    check_fuse_device()
    check_mountpoint(mountpoint)
    check_apart(mountpoint, Path(data_dir))
    passphrase = check_keys(config, passphrase)
    in_use = control.request(config.data_dir, "ping", timeout=5.0)
    if in_use is not None:
        raise MountError(f"{config.data_dir} is already in use by a daemon ({in_use})")
    options = MountOptions(mountpoint, allow_other=args.allow_other or config.mount.allow_other)
    level = logging.DEBUG if args.debug else logging.INFO
    if args.foreground:
        logs.setup(None, level, config.log.format)
        return serve(config, passphrase, options, ready=lambda: _announce(mountpoint))
    return start_background(config, passphrase, options, level)


def check_fuse_device() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("no /dev/fuse: load the fuse kernel module (modprobe fuse)")


def is_mounted(path: Path) -> bool:
    target = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: bytes) -> bytes:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def check_mountpoint(mountpoint: Path) -> None:
    """MountError unless `mountpoint` is an existing, unmounted directory (a stale mount is cleared)."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        clear_stale_mount(mountpoint)
        st = os.stat(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    del st
    if is_mounted(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is busy: something is already mounted there")


def check_apart(mountpoint: Path, data_dir: Path) -> None:
    """MountError if the mount would hide the data directory: the daemon keeps using
    paths in it (audit log, control socket, key files), which would then lead into
    the mount it serves itself, and hang."""
    mnt = os.path.realpath(mountpoint)
    data = os.path.realpath(data_dir)
    if data == mnt or data.startswith(mnt.rstrip("/") + "/"):
        raise MountError(
            f"mountpoint {mountpoint} would hide the data directory {data_dir}:"
            " mount somewhere outside it"
        )


def clear_stale_mount(mountpoint: Path) -> None:
    """Unmount a mount whose daemon is gone (ENOTCONN), or say how to."""
    print(
        f"slurpfs: {mountpoint} is a stale mount (its daemon is gone); unmounting it",
        file=sys.stderr,
    )
    if not _fusermount(mountpoint, lazy=True):
        raise MountError(
            f"{mountpoint} is a stale mount and could not be unmounted: run"
            f" `fusermount3 -u {mountpoint}` (as root: `umount -l {mountpoint}`)"
        )


def _fusermount(mountpoint: Path, *, lazy: bool = False) -> bool:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        return False
    cmd = [tool, "-u", *(["-z"] if lazy else []), str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.debug("%s failed: %s", " ".join(cmd), result.stderr.strip())
        print(f"slurpfs: {result.stderr.strip()}", file=sys.stderr)
    return result.returncode == 0


def check_keys(config: Config, passphrase: bytes | None) -> bytes | None:
    """Fail early if the data directory is not initialised; ask for a passphrase if needed."""
    keystore = Keystore(config.data_dir, passphrase)
    if not keystore.exists():
        raise NotInitialised(
            f"{config.data_dir} is not initialised: run `slurpfs init --data {config.data_dir}`"
        )
    if passphrase is None:
        try:
            keystore.load()
        except WrongPassphrase:
            if not sys.stdin.isatty():
                raise WrongPassphrase(
                    "the keys are passphrase-protected: set SLURPFS_PASSPHRASE or"
                    " SLURPFS_PASSPHRASE_FILE, or use --passphrase-file"
                ) from None
            passphrase = getpass.getpass("slurpfs passphrase: ").encode()
    return passphrase


def serve(
    config: Config,
    passphrase: bytes | None,
    options: MountOptions,
    *,
    ready: Callable[[], None] | None = None,
) -> int:
    """Open the store and run the daemon in this process until it is unmounted.

    A damaged store, or one that is not the store this node sealed, cannot be
    mounted: MountError (exit 10) with the reason.
    """
    try:
        model = ContextStore.open(config, passphrase)
    except Corrupt as exc:
        raise MountError(f"cannot mount {config.data_dir}: {exc}") from None
    try:
        daemon = Daemon(config, model, options, passphrase=passphrase)
    except BaseException:
        model.close()
        raise
    return daemon.run(ready)


def _announce(mountpoint: Path) -> None:
    print(f"slurpfs: mounted at {mountpoint} (pid {os.getpid()})", file=sys.stderr, flush=True)


def start_background(
    config: Config, passphrase: bytes | None, options: MountOptions, level: int
) -> int:
    """Fork the daemon; return 0 once the mount answers, else its error."""
    log_path = config.data_dir / LOG_NAME
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os._exit(_daemon_child(config, passphrase, options, level, log_path, write_end))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reply = _read_reply(pipe.fileno(), START_TIMEOUT)
    if reply.startswith("ok"):
        _wait_until_answers(options.mountpoint, START_TIMEOUT)
        print(f"slurpfs: mounted at {options.mountpoint} (pid {pid}; log: {log_path})")
        return 0
    _, status = os.waitpid(pid, 0)
    if reply.startswith("err "):
        code, _, message = reply[4:].partition(" ")
        print(f"slurpfs: {message}", file=sys.stderr)
        return int(code)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGBUS, signal.SIGSEGV):
        name = signal.Signals(os.WTERMSIG(status)).name
        print(
            f"slurpfs: cannot mount {config.data_dir}: the store is damaged: reading it"
            f" crashed the daemon ({name}: a page of store/data.mdb points outside the"
            " file); restore the store from a backup or a peer",
            file=sys.stderr,
        )
        return 10
    print(
        f"slurpfs: the daemon exited (status {os.waitstatus_to_exitcode(status)}) before"
        f" mounting; see {log_path}",
        file=sys.stderr,
    )
    return 1


def _daemon_child(
    config: Config,
    passphrase: bytes | None,
    options: MountOptions,
    level: int,
    log_path: Path,
    pipe: int,
) -> int:
    def ready() -> None:
        with contextlib.suppress(OSError):
            os.write(pipe, b"ok\n")
            os.close(pipe)

    try:
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        logs.setup(log_path, level, config.log.format)
        return serve(config, passphrase, options, ready=ready)
    except SlurpError as exc:
        log.error("cannot mount: %s", exc)
        with contextlib.suppress(OSError):
            os.write(pipe, f"err {exit_code(exc)} {exc}\n".encode())
        return exit_code(exc)
    except OSError as exc:
        log.error("cannot mount: %s", exc)
        with contextlib.suppress(OSError):
            os.write(pipe, f"err 10 {exc.strerror or exc}\n".encode())
        return 10
    except BaseException:
        log.exception("the daemon failed")
        return 1


def _read_reply(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return ""
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _wait_until_answers(mountpoint: Path, timeout: float) -> None:
    # The daemon reported "ready" after the kernel mount: the first request is
    # served as soon as its loop runs. Only an interrupted call is worth retrying.
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.stat(mountpoint / ".slurp" / "status")
            return
        except InterruptedError:
            if time.monotonic() > deadline:
                raise MountError(f"the mount at {mountpoint} does not answer") from None
        except OSError as exc:
            raise MountError(f"the mount at {mountpoint} does not answer: {exc}") from None


# -- umount ------------------------------------------------------------------------------


def umount_command(args: argparse.Namespace, config: Config, passphrase: bytes | None) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    try:
        facts = _ask_mount(mountpoint, min(args.timeout, ANSWER_TIMEOUT))
    except FileNotFoundError:
        raise MountError(f"{mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            clear_stale_mount(mountpoint)
            print(f"slurpfs: removed the stale mount at {mountpoint}", file=sys.stderr)
            return 0
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise MountError(f"{mountpoint} is not a slurpfs mount") from None
        raise MountError(f"{mountpoint}: {exc.strerror}") from None
    if facts is None:
        _unmount_unanswered(mountpoint)
    pid, data_dir = facts
    watcher = control.watch(data_dir, args.timeout)
    if not _fusermount(mountpoint):
        if watcher is not None:
            watcher.close()
        raise MountError(f"could not unmount {mountpoint} (is a process using it?)")
    try:
        status = control.read_exit_status(watcher) if watcher is not None else None
    except TimeoutError:
        raise MountError(_still_exiting(mountpoint, pid, args.timeout)) from None
    _wait_for_exit(mountpoint, pid, args.timeout)
    if status is None:
        print(f"slurpfs: the daemon (pid {pid}) exited without reporting a status", file=sys.stderr)
        return 1
    if status != 0:
        print(f"slurpfs: the daemon (pid {pid}) exited with status {status}", file=sys.stderr)
        return 1
    return 0


def _ask_mount(mountpoint: Path, timeout: float) -> tuple[int, Path] | None:
    """The daemon's pid and data directory, from the mount's root attributes.

    None if the daemon does not answer within `timeout` (hung, or stopped): a
    request to it would block for as long, so it is made from a thread that is
    left behind then (the process exits without it). OSError as the mount gave it.
    """
    answer: list[tuple[int, Path] | OSError] = []

    def ask() -> None:
        try:
            pid = int(os.getxattr(mountpoint, "user.slurp.pid"))
            data = Path(os.fsdecode(os.getxattr(mountpoint, "user.slurp.data")))
        except OSError as exc:
            answer.append(exc)
        else:
            answer.append((pid, data))

    asking = threading.Thread(target=ask, name="umount-ask", daemon=True)
    asking.start()
    asking.join(timeout)
    if not answer:
        return None
    if isinstance(answer[0], OSError):
        raise answer[0]
    return answer[0]


def _unmount_unanswered(mountpoint: Path) -> NoReturn:
    """Unmount a mount whose daemon does not answer; then say what is left."""
    print(
        f"slurpfs: the daemon of {mountpoint} does not answer (hung or stopped);"
        " unmounting without it",
        file=sys.stderr,
    )
    if not (_fusermount(mountpoint) or _fusermount(mountpoint, lazy=True)):
        raise MountError(
            f"{mountpoint} could not be unmounted: run `fusermount3 -u {mountpoint}`"
            f" (as root: `umount -l {mountpoint}`)"
        )
    raise MountError(
        f"{mountpoint} is unmounted, but its daemon did not answer and may still be"
        " running: it exits by itself once it runs again; see its log"
    )


def _wait_for_exit(mountpoint: Path, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise MountError(_still_exiting(mountpoint, pid, timeout))
        time.sleep(0.01)


def _still_exiting(mountpoint: Path, pid: int, timeout: float) -> str:
    return (
        f"{mountpoint} is unmounted, but its daemon (pid {pid}) has not finished exiting"
        f" within {timeout:g} s (storing a large search index can take minutes); it exits"
        " by itself when done, see its log (`--timeout` waits longer)"
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != b"Z"
