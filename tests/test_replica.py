"""Replication between real mounts on loopback: each node a `slurpfs mount`
process with its own data directory, its replication worker talking to the
others' over libp2p. What a test writes goes through one mount with os.*
calls (or the CLI); what it checks is read through another mount, or from the
other node's store with the CLI."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Nodes
from fsutil import Mounted, raises_oserror, running, slurpfs, wait_for
from replica_nodes import (
    AUTH,
    ROLE,
    SYNC_TIMEOUT,
    address,
    cluster_of,
    free_port,
    make_cluster,
    peers_json,
    read,
    role_file,
    unclustered,
    wait_connected,
    wait_content,
    worker_pid,
    write,
)

pytestmark = pytest.mark.mount


@pytest.fixture
def pair(nodes: Nodes, tmp_path: Path) -> Iterator[list[Mounted]]:
    yield from cluster_of(nodes, tmp_path, 2)


def replicated_entries(m: Mounted) -> list[dict[str, object]]:
    entries = json.loads(m.cli("audit", "show", "-n", "500", "--json").stdout)
    return [e for e in entries if e["action"] == "replicate"]


def holds(path: Path, text: str) -> bool:
    return text in path.read_text()


def holds_role(m: Mounted, role: str) -> bool:
    """Whether `m`'s mount reads `role` (its daemon took the grant up)."""
    status = (m.mnt / ".slurp" / "status").read_text()
    return any(
        line.startswith("roles_held:") and role in line.split(":", 1)[1].strip().split(", ")
        for line in status.splitlines()
    )


def cli_get(m: Mounted, *parts: str) -> subprocess.CompletedProcess[bytes]:
    return m.cli("get", f"{AUTH}/{'/'.join(parts)}", "--role", ROLE, check=False)


def test_saves_and_deletions_through_one_mount_show_through_the_other(
    pair: list[Mounted],
) -> None:
    a, b = pair
    write(role_file(a, "src", "one.go"), b"package one\n")
    wait_content(role_file(b, "src", "one.go"), b"package one\n")
    write(role_file(b, "src", "one.go"), b"package one // edited on b\n")
    wait_content(role_file(a, "src", "one.go"), b"package one // edited on b\n")

    os.unlink(role_file(b, "src", "one.go"))  # a deletion is a version: it replicates
    wait_for(lambda: read(role_file(a, "src", "one.go")) is None, SYNC_TIMEOUT, "the deletion")
    history = json.loads(a.cli("history", f"{AUTH}/src/one.go", "--role", ROLE, "--json").stdout)
    assert [v["deleted"] for v in history] == [False, False, True]  # the same on both nodes
    assert history == json.loads(
        b.cli("history", f"{AUTH}/src/one.go", "--role", ROLE, "--json").stdout
    )

    # What a node shows of its peer, and what its audit log recorded of the peer's versions.
    assert " up " in (a.mnt / ".slurp" / "peers").read_text()
    health = (a.mnt / ".slurp" / "health").read_text()
    assert "peers: ok - 1 of 1 peers up" in health, health
    status = (b.mnt / ".slurp" / "status").read_text()
    assert "task_replication_peers_up: 1" in status, status
    assert [e["address"] for e in replicated_entries(a)] == [f"{AUTH}/src/one.go"] * 2
    assert [e["who"] for e in replicated_entries(b)] == [
        f"node:{json.loads(a.cli('status', '--json').stdout)['node_id'][:16]}"
    ]
    states = sorted(p["state"] for p in peers_json(b)["peers"])  # type: ignore[attr-defined]
    assert states == ["me", "up"]


def test_three_nodes_each_see_what_every_other_wrote(nodes: Nodes, tmp_path: Path) -> None:
    for mounts in cluster_of(nodes, tmp_path, 3):
        for i, m in enumerate(mounts):
            write(role_file(m, "three", f"from{i}"), f"written on node {i}\n".encode())
        for m in mounts:
            for i in range(3):
                wait_content(role_file(m, "three", f"from{i}"), f"written on node {i}\n".encode())


def test_a_store_emptied_and_accepted_is_refilled_from_its_peer(
    nodes: Nodes, tmp_path: Path
) -> None:
    a, b = make_cluster(nodes, tmp_path, 2)
    empty = tmp_path / "empty.mdb"
    shutil.copyfile(b.data / "store" / "data.mdb", empty)  # b's store before anything
    a.expect_warnings = (r"peer n1 was rolled back: .*",)
    try:
        a.mount()
        b.mount()
        wait_connected([a, b])
        files = {f"f{i}": f"content {i}\n".encode() for i in range(20)}
        for name, data in files.items():
            write(role_file(a, "refill", name), data)
        wait_content(role_file(b, "refill", "f19"), b"content 19\n")
        b.unmount()

        shutil.copyfile(empty, b.data / "store" / "data.mdb")
        assert cli_get(b, "refill", "f0").returncode != 0  # refused: behind its seal
        accepted = b.cli("fsck", "--accept-rollback")
        assert b"clean" in accepted.stdout
        assert cli_get(b, "refill", "f0").returncode != 0  # now empty, and accepted as such
        b.mount()
        for name, data in files.items():
            wait_content(role_file(b, "refill", name), data)
        a.unmount()
        b.unmount()
    finally:
        a.sweep()
        b.sweep()


WRITER = textwrap.dedent(
    """
    import sys
    base = sys.argv[1]
    i = 0
    while True:
        try:
            with open(f"{base}/k{i}/developer", "w") as f:
                f.write(f"write {i}\\n")
        except OSError:
            break
        print(i, flush=True)
        i += 1
    """
)


class WriteLoop:
    """A process writing k0, k1, ... through a mount, recording each index in a
    file once its close returned (an acknowledged write)."""

    def __init__(self, base: Path, record: Path) -> None:
        self.record = record
        with open(record, "w") as out:  # (the test process keeps no descriptor of it)
            self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(base)], stdout=out)

    @property
    def done(self) -> list[int]:
        return [int(x) for x in self.record.read_text().split()]

    def until(self, count: int) -> None:
        wait_for(lambda: len(self.done) >= count, SYNC_TIMEOUT, f"{count} writes")

    def finish(self) -> list[int]:
        assert self.proc.wait(timeout=60) == 0
        return self.done


def kill_daemon(m: Mounted) -> None:
    os.kill(m.pid, signal.SIGKILL)
    wait_for(lambda: not running(m.pid), SYNC_TIMEOUT, "the daemon to die")
    with pytest.raises(OSError, match="connect") as gone:  # (either way the kernel says)
        os.stat(m.mnt)
    assert gone.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    m.check_killed()


def test_nodes_killed_during_a_write_loop_catch_up_with_every_acknowledged_write(
    nodes: Nodes, tmp_path: Path
) -> None:
    for a, b in cluster_of(nodes, tmp_path, 2):
        base = a.ucxl / AUTH / "loop"
        for i in range(400):  # the directories first: the loop writes only files
            (base / f"k{i}").mkdir(parents=True)
        loop = WriteLoop(base, a.data.parent / "acknowledged")
        loop.until(20)
        kill_daemon(b)  # the reader dies mid-stream ...
        loop.until(60)
        b.mount()  # ... and comes back (over its stale mount)
        loop.until(100)
        assert " ERROR " not in a.log.read_text()  # a's worker lived through a peer lost mid-push
        kill_daemon(a)  # then the writer's node dies under the loop
        acknowledged = loop.finish()
        assert len(acknowledged) >= 100
        a.mount()
        for i in acknowledged:
            wait_content(role_file(b, "loop", f"k{i}"), f"write {i}\n".encode())


def test_a_ttl_set_on_one_node_expires_the_context_on_the_other(pair: list[Mounted]) -> None:
    a, b = pair
    put = ("put", f"{AUTH}/ttl/note", "--role", ROLE, "--ttl", "4", "--data", a.data)
    slurpfs(*put, input=b"short-lived\n")
    # (`slurpfs put` tells a's daemon, which tells its replication worker.) b stores
    # it (its audit log says so) and drops it when the TTL is over; whether a read on b
    # falls in between depends on the machine's load, so it is not asserted here
    # (every other test reads peers' saves through the mount).
    wait_for(
        lambda: any("ttl/note" in str(e["address"]) for e in replicated_entries(b)),
        SYNC_TIMEOUT,
        "b to store it",
    )
    wait_for(lambda: cli_get(b, "ttl", "note").returncode != 0, SYNC_TIMEOUT, "the expiry on b")
    assert b"no context" in cli_get(b, "ttl", "note").stderr


QUORUM = """
[replication]
write_quorum = 1
quorum_timeout = 2.0
down_after = 1.0
"""


def test_write_quorum_makes_fsync_wait_for_a_peer_and_fail_when_none_answers(
    nodes: Nodes, tmp_path: Path
) -> None:
    for a, b in cluster_of(nodes, tmp_path, 2, toml=QUORUM):
        a.expect_warnings = (r"write quorum not reached for version \S+: .*",)
        path = role_file(a, "q", "durable")
        write(path, b"acknowledged by b\n", fsync=True)
        # fsync returned: b holds it already (no waiting here)
        assert cli_get(b, "q", "durable").stdout == b"acknowledged by b\n"

        b.unmount()
        peers, health = a.mnt / ".slurp" / "peers", a.mnt / ".slurp" / "health"
        wait_for(functools.partial(holds, peers, " down "), SYNC_TIMEOUT, "b down")
        with raises_oserror(errno.EIO):
            write(path, b"nobody to acknowledge\n", fsync=True)
        assert read(path) == b"nobody to acknowledge\n"  # stored here all the same
        log = a.log.read_text()
        assert "write quorum not reached" in log
        assert "replication.write_quorum = 1" in log
        wait_for(
            functools.partial(holds, health, "peers: FAILING - n1 down for"),
            SYNC_TIMEOUT,
            "the peers check to fail",
        )
        b.mount()  # (for the fixture's checked unmount)
        wait_connected([a, b])
        wait_content(role_file(b, "q", "durable"), b"nobody to acknowledge\n")


def test_nodes_joined_and_granted_on_the_command_line_replicate(
    nodes: Nodes, tmp_path: Path
) -> None:
    """The whole path a user takes: invite on a mounted node, join from a new one,
    grant it a role; the joiner's mount then reads what the inviter wrote."""
    a, b = unclustered(nodes, tmp_path, "a", "b")
    try:
        a.mount()
        invite = a.cli("peers", "invite", "--listen", address(free_port()))
        wait_for(lambda: bool(peers_json(a)["listening"]), SYNC_TIMEOUT, "a's worker to listen")
        join = b.cli(
            "peers", "join", invite.stdout.decode().strip(), "--listen", address(free_port())
        )
        assert b"joined the cluster" in join.stderr
        b_id = json.loads(b.cli("keys", "list", "--json").stdout)["node_id"]
        a.cli("keys", "grant", ROLE, "--to", b_id[:16])
        write(role_file(a, "joined", "first"), b"written before b mounted\n")
        b.mount()
        wait_connected([a, b])
        wait_for(functools.partial(holds_role, b, ROLE), SYNC_TIMEOUT, "the grant to reach b")
        wait_content(role_file(b, "joined", "first"), b"written before b mounted\n")
        write(role_file(b, "joined", "second"), b"written on b\n")
        wait_content(role_file(a, "joined", "second"), b"written on b\n")
        listed = peers_json(b)
        assert sorted(m["name"] for m in listed["members"]) == sorted(  # type: ignore[attr-defined]
            p["name"]
            for p in listed["peers"]  # type: ignore[attr-defined]
        )
        a.unmount()
        b.unmount()
    finally:
        a.sweep()
        b.sweep()


def no_conflict_files(m: Mounted) -> bool:
    return not any(".conflict-" in p.name for p in (m.ucxl / AUTH / "merge" / "notes").iterdir())


def test_edits_made_apart_are_merged_once_and_the_merge_shows_on_both_mounts(
    pair: list[Mounted],
) -> None:
    """b edits the last line while unmounted (so apart from a), a edits the first:
    when b is back, one node (the designated merger) merges the two leaves into a
    version with both edits and both as parents; both mounts show it, with no
    `.conflict-` file left and exactly one merge version in the history."""
    a, b = pair
    lines = [f"line {i}\n" for i in range(12)]
    base = "".join(lines).encode()
    write(role_file(a, "merge", "notes"), base)
    wait_content(role_file(b, "merge", "notes"), base)

    b.unmount()
    write(role_file(a, "merge", "notes"), "".join(["line 0 (a)\n", *lines[1:]]).encode())
    b_edit = "".join([*lines[:-1], "line 11 (b)\n"]).encode()
    slurpfs("put", f"{AUTH}/merge/notes", "--role", ROLE, "--data", b.data, input=b_edit)
    b.mount()

    merged = "".join(["line 0 (a)\n", *lines[1:-1], "line 11 (b)\n"]).encode()
    for m in (a, b):
        wait_content(role_file(m, "merge", "notes"), merged, f"the merge on {m.data}")
        wait_for(functools.partial(no_conflict_files, m), SYNC_TIMEOUT, "the conflict to go")
    history = json.loads(a.cli("history", f"{AUTH}/merge/notes", "--role", ROLE, "--json").stdout)
    assert len(history) == 4  # base, a's edit, b's edit, one merge
    assert len(history[-1]["parents"]) == 2, history[-1]


BUSY = "while True: pass"


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """`count` processes spinning at the normal priority (a machine busy with other
    work); stopped by their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)


def seen_down(m: Mounted, since: int) -> list[str]:
    """The "peer ... is down" lines `m`'s daemon log holds past offset `since`."""
    text = m.log.read_bytes()[since:].decode(errors="replace")
    return [line for line in text.splitlines() if line.endswith(" is down")]


def test_a_fresh_node_catches_up_on_a_busy_machine_without_losing_its_peer(
    nodes: Nodes, tmp_path: Path
) -> None:
    """A node that starts empty pulls a store of hundreds of contexts while ordinary
    processes keep every core busy: it reads everything and neither node sees the
    other go down. Its replication worker runs at its daemon's priority (at nice 10,
    with five nodes on a busy machine, workers answered pings seconds late: peers went
    down every few seconds and each pull in flight was cut off)."""
    a, b = make_cluster(nodes, tmp_path, 2)
    files = {f"f{i}": f"context {i}\n".encode() * 100 for i in range(400)}
    try:
        a.mount()
        for name, data in files.items():
            write(role_file(a, "busy", name), data)
        since = a.log.stat().st_size
        b_since = b.log.stat().st_size if b.log.exists() else 0
        with busy_cores(4 * (os.cpu_count() or 1)):
            b.mount()
            for name, data in files.items():
                wait_content(role_file(b, "busy", name), data)
            worker = worker_pid(b)  # (long past setting its priority)
            assert os.getpriority(os.PRIO_PROCESS, worker) == os.getpriority(os.PRIO_PROCESS, b.pid)
            assert not seen_down(b, b_since), seen_down(b, b_since)
            assert not seen_down(a, since), seen_down(a, since)
        a.unmount()
        b.unmount()
    finally:
        a.sweep()
        b.sweep()
