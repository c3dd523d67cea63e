"""Crash safety: a writer killed with SIGKILL mid-stream loses nothing that it reported."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

import pytest
from conftest import Node, Nodes, cli_env

from slurpfs import fsck
from slurpfs.model import ContextStore
from slurpfs.ucxl import Address, parse

# Shared by the writer process and the test, so both derive the same bytes.
CONTENT = '''
import hashlib

def content(i: int) -> bytes:
    """Deterministic content of commit `i`; every 5th is large, so commits take a while."""
    seed = hashlib.blake2b(i.to_bytes(8, "big")).digest()
    size = 300_000 if i % 5 == 0 else 64 * (1 + i % 40)
    return (seed * (size // len(seed) + 1))[:size] + b"#%d" % i

def address_text(i: int) -> str:
    return f"ucxl://crash:test@slurp:fs/doc{i % 7}/part{i % 3}"
'''

WRITER = (
    CONTENT
    + """
import sys
from slurpfs import config
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import ContextStore
from slurpfs.ucxl import parse

data_dir, first = sys.argv[1], int(sys.argv[2])
cfg = config.load(None, {"HOME": "/nonexistent"}, {"node.data_dir": data_dir})
model = ContextStore.open(cfg, kdf=KdfParams.weak())
i = first
while True:
    address = parse(address_text(i))
    role = ("developer", "architect", "reviewer")[i % 3]
    info = model.put(address, role, content(i))
    if i % 4 == 0:
        assert model.get(address, role).data == content(i)  # reads append to the audit log
    # Printed only after put returned: from here on the commit must survive.
    sys.stdout.write(f"{i} {role} {info.version_id.hex()}\\n")
    sys.stdout.flush()
    i += 1
"""
)

_namespace: dict[str, object] = {}
exec(CONTENT, _namespace)
content = cast(Callable[[int], bytes], _namespace["content"])
address_text = cast(Callable[[int], str], _namespace["address_text"])

LINE_DEADLINE = 60.0


class Writer:
    """The writer subprocess and a thread that turns its output into a queue of lines."""

    def __init__(self, data_dir: Path, first: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(data_dir), str(first)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the writer died

    def commits(self, n: int) -> list[tuple[int, str, bytes]]:
        """The next `n` reported commits, waiting for each up to a deadline."""
        deadline = time.monotonic() + LINE_DEADLINE
        out: list[tuple[int, str, bytes]] = []
        while len(out) < n:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"writer reported {len(out)} of {n} commits in {LINE_DEADLINE}s")
            if line is None:
                self.proc.wait()
                pytest.fail(
                    f"writer died: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                )
            i, role, vid = line.split()
            out.append((int(i), role.decode(), bytes.fromhex(vid.decode())))
        return out

    def kill(self) -> list[tuple[int, str, bytes]]:
        """SIGKILL; returns the commits reported but not yet collected."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=LINE_DEADLINE) == -signal.SIGKILL
        self._reader.join(timeout=LINE_DEADLINE)
        rest = []
        while (line := self.lines.get_nowait()) is not None:
            i, role, vid = line.split()
            rest.append((int(i), role.decode(), bytes.fromhex(vid.decode())))
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return rest


def verify(node: Node, reported: list[tuple[int, str, bytes]]) -> int:
    """fsck is clean and every reported commit is there with its exact content."""
    model: ContextStore = node.open()
    try:
        report = fsck.check(model)
        assert report.ok, report.problems
        for i, role, vid in reported:
            address: Address = parse(address_text(i))
            assert model.get_version(address, role, vid).data == content(i), i
        for address_key, role, leaves in model.store.iter_contexts():
            assert len(leaves) == 1, (address_key, role)  # one writer: never a conflict
        versions = report.versions
    finally:
        node.close(model)
    # The hash chain survived too, with an entry for every reported read.
    reads = sum(1 for i, _, _ in reported if i % 4 == 0)
    assert node.verify_audit().entries >= reads
    return versions


def test_commits_reported_before_sigkill_survive(nodes: Nodes) -> None:
    rounds = (1, 40, 3, 150)  # commits to wait for before each kill
    node, model = nodes.new()
    node.close(model)
    reported: list[tuple[int, str, bytes]] = []
    next_i = 0

    for n in rounds:
        writer = Writer(node.data_dir, next_i)
        try:
            reported += writer.commits(n)
        finally:
            reported += writer.kill()
        next_i = reported[-1][0] + 1

        versions = verify(node, reported)

        # Each writer may have committed one more than it reported before it died.
        assert len(reported) <= versions <= len(reported) + len(rounds)
    assert len(reported) >= sum(rounds)
