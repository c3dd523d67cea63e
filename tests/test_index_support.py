"""Shared helpers for the search index tests (no tests here)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from slurpfs import config
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import BatchItem, ContextStore
from slurpfs.ucxl import Address, parse

ENGINES = ("whoosh", "tantivy")


def make_model(
    tmp_path: Path,
    engine: str,
    *,
    held: Sequence[str] | None = None,
    roles_toml: str | None = None,
) -> ContextStore:
    """A fresh data directory with the given search engine (and optionally roles)."""
    path = None
    if roles_toml is not None:
        path = tmp_path / "config.toml"
        path.write_text(roles_toml, encoding="utf-8")
    cfg = config.load(
        path,
        environ={"HOME": str(tmp_path)},
        overrides={"node.data_dir": str(tmp_path / "data"), "search.engine": engine},
    )
    return ContextStore.init(cfg, None, kdf=KdfParams.weak(), held=held)


def reopen(model: ContextStore) -> ContextStore:
    """The same data directory opened afresh (as after a restart)."""
    model.close()
    return ContextStore.open(model.config, None, kdf=KdfParams.weak())


def address(path: str, authority: str = "claude:architect@bzzz:auth") -> Address:
    return parse(f"ucxl://{authority}/{path}")


def document(
    body: str,
    *,
    summary: str = "",
    tags: Iterable[str] = (),
    technologies: Iterable[str] = (),
) -> bytes:
    lines = ["---"]
    if summary:
        lines.append(f"summary: {summary}")
    lines.append(f"tags: [{', '.join(tags)}]")
    lines.append(f"technologies: [{', '.join(technologies)}]")
    lines.append("---")
    lines.append(body)
    return ("\n".join(lines) + "\n").encode()


def put_many(model: ContextStore, items: Iterable[tuple[Address, str, bytes]]) -> None:
    report = model.put_many(BatchItem(a, r, d) for a, r, d in items)
    assert not report.failed


def files_containing(root: Path, needle: bytes, *, newer_than: float = 0.0) -> Iterator[Path]:
    """Regular files under `root` (modified after `newer_than`) that contain `needle`."""
    for dirpath, _dirs, names in os.walk(root, onerror=lambda _e: None):
        for name in names:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
                if not path.is_file() or path.is_symlink() or st.st_mtime < newer_than:
                    continue
                if needle in path.read_bytes():
                    yield path
            except OSError:
                continue  # vanished, or not ours to read


def now() -> float:
    return time.time()
