"""The scripts around the package: the test run's mount sweep, the mount helper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Nodes, cli_env
from fsutil import Mounted, is_mounted, wait_for

from slurpfs import mounthelper
from slurpfs.service import control

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def mount(nodes: Nodes, name: str, mnt: Path) -> Mounted:
    node, _ = nodes.new(name)
    node.close_all()  # the daemon opens the store
    m = Mounted(node.data_dir, mnt)
    m.mount()
    return m


def daemon_gone(m: Mounted) -> bool:
    return control.request(m.data, "ping", timeout=1.0) is None


@pytest.mark.mount
def test_the_sweep_unmounts_only_what_is_under_its_root(nodes: Nodes, tmp_path: Path) -> None:
    """scripts/test ends with this sweep of its own temporary root: a mount beside
    that root (even one whose path starts with the same characters) stays."""
    ours = mount(nodes, "ours", tmp_path / "run" / "test_x" / "mnt")
    other = mount(nodes, "other", tmp_path / "run-other" / "mnt")  # the prefix "run" too
    try:
        swept = subprocess.run(
            [SCRIPTS / "sweep-mounts", tmp_path / "run"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

        assert swept.stdout == f"sweep-mounts: unmounting {ours.mnt}\n"
        assert not is_mounted(ours.mnt)
        assert is_mounted(other.mnt)
        wait_for(lambda: daemon_gone(ours), what="the swept mount's daemon to exit")
        ours.check_ended()  # the sweep's unmount ended the daemon cleanly
        other.unmount()
    finally:
        ours.sweep()
        other.sweep()


def test_the_sweep_refuses_the_root_directory() -> None:
    swept = subprocess.run(
        [SCRIPTS / "sweep-mounts", "/"], capture_output=True, text=True, timeout=60, check=False
    )

    assert swept.returncode == 2
    assert "refusing" in swept.stderr


@pytest.mark.parametrize("script", ["install", "demo", "test", "sweep-mounts"])
def test_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", SCRIPTS / script], check=True, timeout=60)


# -- mount -t fuse.slurpfs -------------------------------------------------------------

HELPER = Path("/sbin/mount.fuse.slurpfs")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/d", "/m"], ["mount", "--data", "/d", "/m"]),
        (
            ["/d", "/m", "-o", "rw,allow_other,noauto,nofail,_netdev,x-systemd.automount"],
            ["mount", "--data", "/d", "/m", "--allow-other"],
        ),
        (
            ["/d", "/m", "-n", "-oconfig=/etc/s.toml,passphrase_file=/etc/p", "-s"],
            [
                "mount",
                "--data",
                "/d",
                "/m",
                "--config",
                "/etc/s.toml",
                "--passphrase-file",
                "/etc/p",
            ],
        ),
    ],
)
def test_the_mount_helper_translates_mount_arguments(argv: list[str], expected: list[str]) -> None:
    assert mounthelper.translate(argv) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/d", "/m", "-o", "ro"], "unsupported mount option 'ro'"),
        (["/d", "/m", "-o", "allow_othr"], "unsupported mount option 'allow_othr'"),
        (["/d", "/m", "-o", "config="], "unsupported mount option 'config='"),
        (["/d"], "usage: mount.fuse.slurpfs DATA_DIR MOUNTPOINT"),
    ],
)
def test_the_mount_helper_refuses_what_it_cannot_do(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mounthelper.main(argv) == 2
    assert message in capsys.readouterr().err


def test_mount_t_fuse_slurpfs_mounts_and_umount_unmounts(nodes: Nodes, tmp_path: Path) -> None:
    """The real mount(8) and umount(8), through the helper scripts/install links."""
    ours = Path(sys.executable).parent / "mount.fuse.slurpfs"
    if not HELPER.exists() or HELPER.resolve() != ours.resolve():
        pytest.skip(f"{HELPER} is not this installation's helper (run scripts/install)")
    node, _ = nodes.new()
    node.close_all()
    m = Mounted(node.data_dir, tmp_path / "mnt")
    m.mnt.mkdir()
    m._log_start = 0
    try:
        subprocess.run(
            ["mount", "-t", "fuse.slurpfs", node.data_dir, m.mnt, "-o", "noatime,nofail"],
            check=True,
            timeout=120,
            env=cli_env(),
        )

        assert sorted(os.listdir(m.mnt)) == [".search", ".slurp", "ucxl"]
        assert "fuse.slurpfs" in Path("/proc/self/mounts").read_text()
        subprocess.run(["umount", m.mnt], check=True, timeout=120)
        wait_for(lambda: b"exiting with status" in m.log.read_bytes(), what="the daemon to exit")
        assert not is_mounted(m.mnt)
        m.check_log()
    finally:
        m.sweep()
