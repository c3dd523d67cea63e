"""What a mount shows of its peer's work, through real tools: a conflict resolved
on one node (its ``<role>.conflict-<id>`` file removed) is resolved on the other
node's mount too, and ``tail -f`` on one node follows saves made on the other."""

from __future__ import annotations

import functools
import os
import selectors
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Nodes
from fsutil import Mounted, slurpfs, wait_for
from replica_nodes import (
    AUTH,
    ROLE,
    SYNC_TIMEOUT,
    cluster_of,
    read,
    role_file,
    wait_connected,
    wait_content,
    write,
)

pytestmark = pytest.mark.mount


@pytest.fixture
def pair(nodes: Nodes, tmp_path: Path) -> Iterator[list[Mounted]]:
    yield from cluster_of(nodes, tmp_path, 2, toml="[replication]\nauto_merge = false\n")


def conflict_files(m: Mounted, *parts: str) -> list[str]:
    return sorted(n for n in os.listdir(m.ucxl / AUTH / Path(*parts)) if ".conflict-" in n)


def one_conflict(m: Mounted) -> bool:
    return len(conflict_files(m, "c", "notes")) == 1


def test_removing_a_conflict_file_resolves_it_on_every_node(pair: list[Mounted]) -> None:
    a, b = pair
    write(role_file(a, "c", "notes"), b"one line\n")
    wait_content(role_file(b, "c", "notes"), b"one line\n")
    b.unmount()  # the same line changed on both sides, apart: a conflict
    write(role_file(a, "c", "notes"), b"one line, as a has it\n")
    slurpfs("put", f"{AUTH}/c/notes", "--role", ROLE, "--data", b.data, input=b"b's line\n")
    b.mount()
    wait_connected(pair)
    for m in pair:
        wait_for(functools.partial(one_conflict, m), SYNC_TIMEOUT, f"a conflict on {m.data}")
    (name,) = conflict_files(a, "c", "notes")
    assert conflict_files(b, "c", "notes") == [name]  # named the same on both nodes
    head = read(role_file(a, "c", "notes"))
    assert head == read(role_file(b, "c", "notes"))
    loser = (a.ucxl / AUTH / "c" / "notes" / name).read_bytes()
    assert {head, loser} == {b"one line, as a has it\n", b"b's line\n"}

    os.unlink(b.ucxl / AUTH / "c" / "notes" / name)  # resolved on b, by the rm b's user ran

    assert conflict_files(b, "c", "notes") == []
    wait_for(lambda: conflict_files(a, "c", "notes") == [], SYNC_TIMEOUT, "a to see it resolved")
    for m in pair:
        assert read(role_file(m, "c", "notes")) == head  # the head stays what it was


def lines_from(proc: subprocess.Popen[bytes], count: int, guard: float) -> list[bytes]:
    """The first ``count`` lines ``proc`` prints (a hang guard, not a timing)."""
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + guard
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while out.count(b"\n") < count and time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
    return out.splitlines(keepends=True)


def test_tail_f_on_one_node_follows_saves_made_on_the_other(pair: list[Mounted]) -> None:
    a, b = pair
    text = b"first line\n"
    write(role_file(a, "tail", "log"), text)
    wait_content(role_file(b, "tail", "log"), text)
    tail = subprocess.Popen(
        ["tail", "-f", str(role_file(b, "tail", "log"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert lines_from(tail, 1, SYNC_TIMEOUT) == [b"first line\n"]
        for n in range(2, 4):  # each save on a: the whole file, one line longer
            text += f"line {n}, saved on a\n".encode()
            write(role_file(a, "tail", "log"), text)
            got = lines_from(tail, 1, SYNC_TIMEOUT)
            assert got == [f"line {n}, saved on a\n".encode()]
    finally:
        tail.terminate()
        tail.wait(timeout=10)
        assert tail.stdout is not None
        tail.stdout.close()
    assert read(role_file(b, "tail", "log")) == text
