"""Nothing of the index reaches a disk in plaintext: whoosh's traps, and the canary."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Nodes, assert_no_canary, find_canary
from test_index_support import ENGINES, address, document, new_model, put_many
from whoosh.filedb.filestore import FileStorage, RamStorage
from whoosh.filedb.structfile import BufferFile

from slurpfs.index import SearchService, whoosh_engine
from slurpfs.index.whoosh_engine import MemoryStorage

DOCS = 2_100


def new_files(root: Path, since: float) -> Iterator[Path]:
    """Regular files under `root` changed since `since`.

    Other processes' files that cannot be read are skipped, and so are mount points
    (another test's FUSE mount, possibly stale, is not the temp directory's disk).
    """
    for top, dirs, files in os.walk(root, onerror=lambda exc: None):
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(top, d))]
        for name in files:
            path = Path(top, name)
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since:
                    yield path
            except OSError:
                continue


def test_whoosh_ram_storage_spills_to_the_temp_dir_and_ours_does_not() -> None:
    # The trap: whoosh's RamStorage hands out a FileStorage in the system temp dir.
    theirs = RamStorage().temp_storage()
    assert isinstance(theirs, FileStorage)
    theirs.destroy()
    ours = MemoryStorage().temp_storage("MAIN.tmp")
    assert isinstance(ours, MemoryStorage)
    assert not isinstance(ours, FileStorage)


def test_runs_closed_through_raw_file_are_kept() -> None:
    # The trap: the posting pool closes runs via raw_file(), bypassing onclose.
    theirs = RamStorage()
    raw = theirs.create_file("lost.run").raw_file()
    raw.write(b"sorted postings")
    raw.close()
    assert not theirs.file_exists("lost.run")  # whoosh drops the run silently
    storage = MemoryStorage()
    temp = storage.temp_storage()
    raw = temp.create_file("kept.run").raw_file()
    raw.write(b"sorted postings")
    raw.close()
    assert temp.open_file("kept.run").read() == b"sorted postings"
    assert storage.runs_spilled == 1


def test_segment_parts_share_the_buffer_and_read_as_whoosh_reads_them() -> None:
    # whoosh's BufferFile copies every subset: a segment's parts were copied whole
    # at each reader open. Ours are views of the one buffer, read the same way.
    data = bytes(range(256)) * 64 + b"line one\nline two\nlast"
    ours = MemoryStorage({"seg": data}).open_file("seg")
    theirs = BufferFile(data, name="seg")
    for outer_a, outer_b in ((ours, theirs), (ours.subset(300, 9_000), theirs.subset(300, 9_000))):
        a, b = outer_a.subset(7, 8_000), outer_b.subset(7, 8_000)
        assert isinstance(a._buf, memoryview)
        assert a._buf.obj is data  # a view of the one buffer: nothing copied
        assert a.get(10, 20) == b.get(10, 20)
        assert list(a.get_array(40, "i", 8)) == list(b.get_array(40, "i", 8))
        for f in (a, b):
            f.seek(123)
        assert (a.read(5), a.tell(), a.read_varint()) == (b.read(5), b.tell(), b.read_varint())
        a.seek(-30, os.SEEK_END)
        b.seek(-30, os.SEEK_END)
        assert (a.readline(), a.read(), a.read(3), a.tell()) == (
            b.readline(), b.read(), b.read(3), b.tell()
        )  # fmt: skip
        a.seek(0)
        b.seek(0)
        assert list(a) == list(b)
        a.close()
        assert a.is_closed
    long_line = b"x" * 10_000 + b"\n" + b"y" * 9_000
    ours = MemoryStorage({"long": long_line}).open_file("long").subset(1, len(long_line) - 1)
    theirs = BufferFile(long_line).subset(1, len(long_line) - 1)
    assert [ours.readline(), ours.readline(), ours.readline()] == [
        theirs.readline(), theirs.readline(), theirs.readline()
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_canary_is_searchable_and_nowhere_on_disk(
    nodes: Nodes, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pool of 1 MiB makes whoosh spill sorted runs many times over these documents.
    monkeypatch.setattr(whoosh_engine, "POOL_LIMIT_MB", 1)
    started = time.time() - 1
    canary = "canary" + secrets.token_hex(8)
    model = new_model(nodes, engine, held=["developer"])
    items = [
        (
            address(f"bulk/d{i:05d}"),
            "developer",
            document(
                f"unique{i:05d}x common words about keys sessions and tokens {i}",
                summary=f"generated context {i}",
                tags=[f"t{i % 7}"],
            ),
        )
        for i in range(DOCS)
    ]
    items[1234] = (items[1234][0], "developer", document(f"the secret is {canary} here"))
    put_many(model, items)
    with SearchService.open(model) as search:
        (hit,) = search.search(canary, ["developer"]).hits
        assert hit.address.endswith("bulk/d01234")
        assert canary in hit.snippet.text
        assert search.search("common", ["developer"]).total == DOCS - 1
        for i in range(0, DOCS, 97):  # every spilled run made it into the index
            if i != 1234:
                assert search.search(f"unique{i:05d}x", ["developer"]).total == 1
        if engine == "whoosh":
            assert search._indexes["developer"].runs_spilled > 1  # type: ignore[attr-defined]
        assert not multiprocessing.active_children()  # never procs > 1
    model.sync()
    assert assert_no_canary(model.config.data_dir, canary.encode()) > 0
    leaks = [
        str(path)
        for path in new_files(Path(tempfile.gettempdir()), started)
        if not path.is_relative_to(model.config.data_dir)
        and find_canary(path.read_bytes(), canary.encode()) is not None
    ]
    assert leaks == []
