"""Integrity of the whole store: emptied, rolled back, replaced or damaged stores are
refused with exit 5 and the reason (never served, never a traceback), and a full
disk is ENOSPC / exit 8."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Nodes, cli_env, raw_store, run_cli, run_cli_process
from fsutil import Mounted, fill, is_mounted, raises_oserror, wait_for

from slurpfs.errors import Corrupt
from slurpfs.model import data_paths
from slurpfs.store import schema as s
from slurpfs.ucxl import parse

ADDR = "ucxl://claude:architect@bzzz:auth/src/auth.go"
AUTH = "claude:architect@bzzz:auth"
DEV = "developer"
OK, NOT_FOUND, DENIED, CORRUPT, FULL, CANNOT_MOUNT = 0, 3, 4, 5, 8, 10


def cli(
    data: Path, *args: str | Path, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return run_cli(*args, "--data", data, input=input)


def succeeds(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert proc.returncode == OK, proc.stderr.decode(errors="replace")
    return proc


def refused(proc: subprocess.CompletedProcess[bytes], code: int, *fragments: str) -> str:
    """The command exited `code`, said why (each fragment), and printed no traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """An initialised data directory holding two versions of one context."""
    path = tmp_path / "data"
    succeeds(run_cli("init", "--data", path))
    succeeds(cli(path, "put", ADDR, "--role", DEV, input=b"first\n"))
    succeeds(cli(path, "put", ADDR, "--role", DEV, input=b"second\n"))
    return path


def store_file(data: Path) -> Path:
    return data / "store" / "data.mdb"


# -- emptied, rolled back, replaced ------------------------------------------------------


def test_an_emptied_store_is_refused_and_not_recreated(data: Path) -> None:
    store_file(data).write_bytes(b"")

    refused(cli(data, "fsck"), CORRUPT, "data.mdb is empty (0 bytes)")
    refused(cli(data, "get", ADDR, "--role", DEV), CORRUPT, "data.mdb is empty")
    status = cli(data, "status", "--json")
    refused(status, CORRUPT)
    assert "is empty" in json.loads(status.stdout)["error"]
    assert store_file(data).stat().st_size == 0  # no new, empty store was made in it


@pytest.mark.expect_warnings(
    r"accepted \S+/store/data\.mdb as it is now: 2 commits \(its seal named 3\); sealed again"
)
def test_a_rolled_back_store_is_refused_until_accepted(data: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.mdb"
    shutil.copyfile(store_file(data), old)
    succeeds(cli(data, "put", ADDR, "--role", DEV, input=b"third\n"))
    shutil.copyfile(old, store_file(data))

    refused(cli(data, "get", ADDR, "--role", DEV), CORRUPT, "was rolled back", "2 commits")
    refused(cli(data, "fsck"), CORRUPT, "was rolled back", "--accept-rollback")
    # The way out is explicit: accept the store as it is, then it serves again.
    accepted = succeeds(cli(data, "fsck", "--accept-rollback"))
    assert b"clean" in accepted.stdout
    assert succeeds(cli(data, "get", ADDR, "--role", DEV)).stdout == b"second\n"
    succeeds(cli(data, "fsck"))


def test_another_store_in_place_of_this_one_is_refused(data: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    succeeds(run_cli("init", "--data", other))
    for n in range(3):  # more commits than this node's store: only the epoch tells
        succeeds(cli(other, "put", ADDR, "--role", DEV, input=b"x%d" % n))
    shutil.copyfile(store_file(other), store_file(data))

    refused(cli(data, "get", ADDR, "--role", DEV), CORRUPT, "not the store this node sealed")
    refused(cli(data, "fsck"), CORRUPT, "not the store this node sealed")


@pytest.mark.parametrize("damage", ["removed", "altered", "emptied"])
def test_a_missing_or_forged_seal_is_refused(data: Path, damage: str) -> None:
    seal = data / "store.seal"
    if damage == "removed":
        seal.unlink()
        reason = "seal " + str(seal) + " is missing"
    elif damage == "altered":
        raw = bytearray(seal.read_bytes())
        for slot in (0, 77):
            raw[slot + 13 + 16 + 7] ^= 0x01  # the sequence, in both slots
        seal.write_bytes(bytes(raw))
        reason = "does not authenticate"
    else:
        seal.write_bytes(b"")
        reason = "does not authenticate"

    refused(cli(data, "get", ADDR, "--role", DEV), CORRUPT, reason)
    refused(cli(data, "fsck"), CORRUPT, reason)


def test_a_store_put_back_with_as_many_commits_is_reported_by_fsck(
    data: Path, tmp_path: Path
) -> None:
    # Only reads happen after the copy: the commit sequence is the same, but the
    # audit anchor the store holds moved on, and the seal names where.
    old = tmp_path / "old.mdb"
    shutil.copyfile(store_file(data), old)
    for _ in range(3):
        succeeds(cli(data, "get", ADDR, "--role", DEV))
    shutil.copyfile(old, store_file(data))

    report = cli(data, "fsck", "--json")
    refused(report, CORRUPT)
    problems = json.loads(report.stdout)["problems"]
    assert any("was put back to an older copy" in p for p in problems), problems


def test_a_head_moved_back_to_an_older_version_is_refused(nodes: Nodes) -> None:
    node, model = nodes.new()
    address = parse(ADDR)
    first = model.put(address, DEV, b"first\n")
    model.put(address, DEV, b"second\n")
    node.close_all()
    with raw_store(node) as (txn, dbs):
        txn.put(s.context_key(address.key, DEV), first.version_id, db=dbs[s.DB_LEAVES])

    model = node.open()
    with pytest.raises(Corrupt, match="not its newest version"):
        model.get(address, DEV)
    node.close(model)
    report = node.fsck()
    assert any("has a child version" in p for p in report.problems), report.problems
    proc = run_cli("get", "--data", node.data_dir, ADDR, "--role", DEV)
    refused(proc, CORRUPT, "leaves record was altered")
    assert b"first" not in proc.stdout
    node.expect_damage()


def test_an_old_data_directory_is_sealed_on_first_open(nodes: Nodes) -> None:
    # A data directory from before stores were sealed: no seal, no epoch.
    node, model = nodes.new()
    model.put(parse(ADDR), DEV, b"kept\n")
    node.close_all()
    data_paths(node.data_dir)["seal"].unlink()
    with raw_store(node) as (txn, dbs):
        txn.delete(s.INFO_EPOCH, db=dbs[s.DB_INFO])

    model = node.open()
    assert model.get(parse(ADDR), DEV).data == b"kept\n"
    node.close(model)
    assert data_paths(node.data_dir)["seal"].stat().st_mode & 0o777 == 0o600
    assert node.fsck().ok


# -- keys ----------------------------------------------------------------------------------


def test_fsck_reports_a_missing_key_file_of_a_held_role_but_not_a_dropped_one(
    data: Path,
) -> None:
    (data / "keys" / "roles" / "developer.1.key").unlink()
    refused(cli(data, "get", ADDR, "--role", "reviewer"), NOT_FOUND)
    report = cli(data, "fsck", "--json")
    refused(report, CORRUPT)
    problems = json.loads(report.stdout)["problems"]
    assert any("keys/roles/developer.1.key is missing" in p for p in problems), problems

    succeeds(cli(data, "keys", "drop", DEV))  # destroyed on purpose: not damage
    succeeds(cli(data, "fsck"))


# -- structural damage -----------------------------------------------------------------------


def test_random_bytes_in_place_of_the_store_are_exit_5_naming_the_file(data: Path) -> None:
    size = store_file(data).stat().st_size
    store_file(data).write_bytes(random.Random(7).randbytes(size))
    for args in (("get", ADDR, "--role", DEV), ("fsck",), ("status",)):
        proc = cli(data, *args, "--json")
        refused(proc, CORRUPT, f"{store_file(data)} is not a readable LMDB file")
        assert json.loads(proc.stdout)["exit_code"] == CORRUPT


def test_a_truncated_store_is_exit_5_not_a_crash(data: Path) -> None:
    with store_file(data).open("r+b") as f:
        f.truncate(store_file(data).stat().st_size // 2)
    refused(cli(data, "get", ADDR, "--role", DEV), CORRUPT, "is truncated")
    refused(cli(data, "fsck"), CORRUPT, "is truncated")


def test_an_undecodable_directory_key_is_reported_by_fsck(nodes: Nodes) -> None:
    node, model = nodes.new()
    model.put(parse(ADDR), DEV, b"notes\n")
    node.close_all()
    with raw_store(node) as (txn, dbs):
        txn.put(b"\xff\xfe\0name", b"", db=dbs[s.DB_TREE])

    report = node.fsck()
    assert any("directory key fffe" in p for p in report.problems), report.problems
    node.expect_damage()


@pytest.mark.mount
def test_a_damaged_store_does_not_mount(data: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store_file(data).write_bytes(b"")
    proc = run_cli_process("mount", "--data", data, mnt)
    refused(proc, CANNOT_MOUNT, "cannot mount", "data.mdb is empty")
    assert not is_mounted(mnt)


def _pages(raw: bytes) -> Iterator[tuple[int, int]]:
    """(offset, number of bytes of structure) of each page's header, pointers and nodes."""
    psize = 4096
    for base in range(0, len(raw), psize):
        flags, lower = struct.unpack_from("<HH", raw, base + 10)
        yield base, 16  # page number, flags, lower, upper (a meta page: its header)
        if flags & 0x03:  # branch or leaf: the node pointers and each node's header
            yield base + 16, max(0, min(lower, psize) - 16)
            for i in range(16, min(lower, psize), 2):
                (ptr,) = struct.unpack_from("<H", raw, base + i)
                if 16 <= ptr <= psize - 8:
                    yield base + ptr, 8


def structural_offsets(raw: bytes, count: int, seed: int = 12) -> list[int]:
    """`count` offsets: three in four in LMDB's structure, the rest anywhere."""
    structure = [offset + i for offset, n in _pages(raw) for i in range(n)]
    rng = random.Random(seed)
    picked = rng.sample(structure, min(len(structure), count * 3 // 4))
    return sorted(set(picked + rng.sample(range(len(raw)), count - len(picked))))


FUZZ_WORKER = r"""
import io, json, os, shutil, sys, tempfile
from slurpfs import cli
pristine, work, address, mask_seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
offsets = [int(x) for x in sys.argv[5].split(",")]
original = open(os.path.join(pristine, "store", "data.mdb"), "rb").read()
commands = {
    "get": ["get", address, "--role", "developer", "--json"],
    "fsck": ["fsck", "--json"],
    "status": ["status", "--json"],
}
import random
rng = random.Random(mask_seed)
for offset in offsets:
    damaged = bytearray(original)
    damaged[offset] ^= rng.randrange(1, 256)
    for name, args in commands.items():
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        with open(os.path.join(work, "store", "data.mdb"), "wb") as f:
            f.write(damaged)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                code = cli.main([*args, "--data", work], dict(os.environ))
            except BaseException as exc:  # escaped main: what a traceback would show
                code = repr(exc)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            out.seek(0)
            err.seek(0)
            result = [offset, name, code, out.read().decode(errors="replace"),
                      err.read().decode(errors="replace")[-2000:]]
        print(json.dumps(result), flush=True)
"""


@pytest.mark.slow
def test_flipped_bytes_in_the_store_end_in_a_documented_exit_code(
    data: Path, tmp_path: Path
) -> None:
    # One byte of data.mdb changed at a time, in a sample weighted to LMDB's own
    # structure (page headers, node pointers, node headers). Expected for `get`,
    # `fsck` and `status` (with --json): a documented exit code, never a traceback,
    # and a failure is a JSON error object on stdout. Each command runs in its own
    # process, as from a shell (the CLI's crash guard is part of what is tested).
    succeeds(cli(data, "put", f"ucxl://{AUTH}/src/other.go", "--role", DEV, input=b"other\n"))
    offsets = structural_offsets(store_file(data).read_bytes(), 150)
    worker = subprocess.run(
        [
            sys.executable, "-c", FUZZ_WORKER, str(data), str(tmp_path / "work"), ADDR, "3",
            ",".join(map(str, offsets)),
        ],
        capture_output=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr.decode(errors="replace")[-3000:]
    results = [json.loads(line) for line in worker.stdout.splitlines()]
    assert len(results) == 3 * len(offsets)
    outcomes: dict[Any, int] = {}
    for offset, name, code, out, err in results:
        where = f"byte {offset}, {name}: exit {code}\n{err}"
        assert code in (OK, NOT_FOUND, DENIED, CORRUPT), where
        assert "Traceback" not in err, where
        if name != "get" or code != OK:
            document = json.loads(out)  # a report, or the error object
            if code != OK and "error" in document:
                assert document["exit_code"] == code, where
            elif code != OK:  # fsck's own report of what it found
                assert document["ok"] is False, where
                assert document["problems"], where
        outcomes[code] = outcomes.get(code, 0) + 1
    # Many pages of a small store are free (old copies): most flips there change
    # nothing anyone reads. Enough of the sample must have hit what is read.
    assert outcomes.get(CORRUPT, 0) >= len(offsets) // 10, outcomes


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted ext4 file system of 8 MiB at ``tmp_path/ext4``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    image, root = tmp_path / "ext4.img", tmp_path / "ext4"
    with image.open("wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    root.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", image, root], check=False, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no loop device here: {mounted.stderr.decode().strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", root], check=False)


def test_put_on_a_full_disk_exits_8_and_loses_nothing(ext4_disk: Path, tmp_path: Path) -> None:
    data = ext4_disk / "data"
    succeeds(run_cli("init", "--data", data))
    succeeds(cli(data, "put", ADDR, "--role", DEV, input=b"stored before\n"))
    big = os.urandom(600 << 10)
    for n in range(40):
        proc = cli(data, "put", f"ucxl://{AUTH}/big{n}", "--role", DEV, input=big)
        if proc.returncode != OK:
            break
    else:
        raise AssertionError("8 MiB took 40 puts of 600 KiB")
    refused(proc, FULL, "No space left on device")
    assert succeeds(cli(data, "get", ADDR, "--role", DEV)).stdout == b"stored before\n"
    for m in range(n):
        assert succeeds(cli(data, "get", f"ucxl://{AUTH}/big{m}", "--role", DEV)).stdout == big


@pytest.mark.mount
def test_a_mount_on_a_full_ext4_disk_is_enospc_and_loses_nothing(
    ext4_disk: Path, nodes: Nodes, tmp_path: Path
) -> None:
    # ext4 lets a write run out of room halfway (here: 128 KiB left for a 512 KiB
    # save), which LMDB reports as EIO. Expected: fsync and close of a save that no longer fits fail with ENOSPC,
    # what was stored before reads back, and the store is fsck-clean (at teardown).
    node, _ = nodes.new(str(ext4_disk.relative_to(tmp_path) / "data"))
    node.close_all()
    m = Mounted(node.data_dir, tmp_path / "mnt")
    m.mount()
    try:
        d = m.ucxl / AUTH / "src"
        d.mkdir(parents=True)
        (d / DEV).write_bytes(b"stored before the disk filled\n")
        fd = os.open(d / DEV, os.O_WRONLY | os.O_TRUNC)
        filler = ext4_disk / "filler"
        fill(filler)
        os.truncate(filler, filler.stat().st_size - (128 << 10))  # room for part of it
        new = os.urandom(512 << 10)
        try:
            os.write(fd, new)
            with raises_oserror(errno.ENOSPC):
                os.fsync(fd)
        finally:
            with raises_oserror(errno.ENOSPC):
                os.close(fd)
        (ext4_disk / "filler").unlink()
        # The commit may have gone through before the sync failed (then the new
        # content is stored whole); either way nothing stored before is lost.
        stored = m.cli("get", f"ucxl://{AUTH}/src", "--role", DEV).stdout
        assert stored in (b"stored before the disk filled\n", new)
        history = m.cli("history", f"ucxl://{AUTH}/src", "--role", DEV, "--json").stdout
        assert len(json.loads(history)) == (1 if stored != new else 2)
        m.expect_warnings = (  # (whichever of these the daemon met: timing decides)
            r"could not store 'developer' at release: commit failed: No space left on device"
            r" \(the store \S+/data\.mdb\)",
            r"audit log \S+/audit\.log: only \d+ of \d+ bytes of an entry could be written"
            r" \(disk full\?\); access refused until it can be recorded",
            r"indexing failed, retrying in \S+ s: .*",
            r"search indexes not opened: no space left for the search index of role '\w+';"
            r" trying again in \S+ s",
        )
        m.unmount()
    finally:
        m.sweep()


@pytest.mark.mount
def test_search_waits_out_a_full_disk_and_is_built_once_there_is_room(
    ext4_disk: Path, nodes: Nodes, tmp_path: Path
) -> None:
    # Expected: the first index build meets the full disk, the daemon says so (a
    # warning; the reason in .slurp/status) and tries again; once there is room
    # (reads wait for it too: each is audited first) the index is built and searches
    # answer, without a remount.
    node, model = nodes.new(str(ext4_disk.relative_to(tmp_path) / "data"))
    for n in range(40):
        model.put(parse(f"ucxl://{AUTH}/notes/n{n}"), DEV, f"quokka number {n}\n".encode())
    node.close_all()
    filler = ext4_disk / "filler"
    fill(filler)
    os.truncate(filler, filler.stat().st_size - (64 << 10))  # room for the daemon, not the index
    m = Mounted(node.data_dir, tmp_path / "mnt")
    m.mount()
    try:
        status = m.mnt / ".slurp" / "status"
        wait_for(lambda: "search waits for disk space" in status.read_text(), 60, "the full disk")
        filler.unlink()
        assert (m.ucxl / AUTH / "notes" / "n7" / DEV).read_bytes() == b"quokka number 7\n"
        wait_for(lambda: "search_ready: 1" in status.read_text(), 120, "the index build")
        assert len([n for n in os.listdir(m.mnt / ".search" / "quokka") if n[0] != "."]) == 40
        m.expect_warnings = (
            r"search indexes not opened: no space left for the search index of role '\w+';"
            r" trying again in \S+ s",
            r"indexing failed, retrying in \S+ s: .*",
            # (a worker whose mapped store page found no room dies of SIGBUS: restarted)
            r"task search failed \(\d+ in a row\); restarting in \S+ s; the mount goes on serving",
        )
        m.unmount()
    finally:
        m.sweep()
