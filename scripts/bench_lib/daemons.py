"""FUSE daemons as children of the benchmark: start, wait for the mount, settle, stop, reap.

Every daemon a section starts runs in the foreground as our child. `running` yields
once the mount answers and, in its ``finally``, unmounts (the daemon's own stop
command first, then ``fusermount3 -u``, lazily as the last resort) and reaps the
daemon by its PID, escalating to SIGTERM and SIGKILL if it does not exit. The
daemon's exit status and the WARNING/ERROR lines of its log go into `info`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from bench_lib.common import Json


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any ``SLURPFS_*`` setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURPFS_")}
    env.update(settings)
    return env


def slurpfs(*args: str) -> list[str]:
    """The argv of a `slurpfs` command run by this Python."""
    return [sys.executable, "-m", "slurpfs.cli", *args]


def unmount(
    mnt: Path,
    env: Mapping[str, str],
    stop: Sequence[str] | None = None,
    *,
    lazy: bool = False,
    label: str = "bench",
) -> None:
    """Unmount `mnt`: `stop` (unless lazy), then fusermount; retries EBUSY briefly."""
    commands = [list(stop)] if stop and not lazy else []
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool):
            commands.append([tool, "-u", *(["-z"] if lazy else []), str(mnt)])
    for argv in commands:
        for _ in range(20):  # EBUSY right after the last close is common
            if not os.path.ismount(mnt):
                return
            done = subprocess.run(argv, capture_output=True, env=dict(env), check=False)
            if done.returncode == 0 or not os.path.ismount(mnt):
                return
            time.sleep(0.25)
    print(f"{label}: could not unmount {mnt}", file=sys.stderr)


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    mnt: Path,
    log: Path,
    info: Json,
    *,
    env: Mapping[str, str],
    stop: Sequence[str] | None = None,
    mount_timeout: float = 30.0,
    exit_timeout: float = 30.0,
    label: str = "bench",
) -> Iterator[int]:
    """Run `argv` (a daemon in the foreground) until the block ends; yields its PID."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=dict(env))
    try:
        deadline = time.monotonic() + mount_timeout
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited {proc.returncode} before mounting: "
                                   f"{log.read_text(errors='replace')[-800:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mnt} was not mounted after {mount_timeout:.0f} s")
            time.sleep(0.05)
        yield proc.pid
    finally:
        unmount(mnt, env, stop, label=label)
        try:
            proc.wait(timeout=exit_timeout)
        except subprocess.TimeoutExpired:
            print(f"{label}: pid {proc.pid} still running after unmount; SIGTERM", file=sys.stderr)
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=exit_timeout / 2)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if os.path.ismount(mnt):  # the daemon died without unmounting
            unmount(mnt, env, lazy=True, label=label)
        lines = log.read_text(errors="replace").splitlines()
        bad = [x for x in lines if "WARNING" in x or "ERROR" in x or "Traceback" in x]
        info.update(
            daemon_exit=proc.returncode, daemon_log_problems=len(bad), daemon_log_sample=bad[:5]
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, *, limit_s: float, window_s: float) -> float | None:
    """Wait until the daemon is idle: under 5% of a CPU over `window_s`.

    Returns the seconds it took, or None if it was still busy after `limit_s`
    (background work such as indexing would otherwise be timed with the tools).
    """
    t0 = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - t0 < limit_s:
        time.sleep(window_s)
        now = cpu_seconds(pid)
        if now - last < 0.05 * window_s:
            return round(time.monotonic() - t0, 1)
        last = now
    return None


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return [p for line in f if (p := line.split()[4]).startswith(prefix)]


def remove(base: Path, *, label: str = "bench") -> None:
    """Delete a work directory, unless something is still mounted below it."""
    left = mounts_under(base)
    if left:
        print(f"{label}: not removing {base}: still mounted: {left}", file=sys.stderr)
        return
    shutil.rmtree(base, ignore_errors=True)
