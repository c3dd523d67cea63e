"""Shared helpers for the search index tests (no tests here)."""

from __future__ import annotations

from collections.abc import Iterable

from conftest import Nodes

from slurpfs.model import BatchItem, ContextStore
from slurpfs.ucxl import Address, parse

ENGINES = ("whoosh", "tantivy")


def new_model(
    nodes: Nodes,
    engine: str,
    *,
    held: Iterable[str] | None = None,
    toml: str | None = None,
    name: str = "data",
) -> ContextStore:
    """A fresh data directory (fsck-checked at teardown) using `engine` for search."""
    _node, model = nodes.new(name, toml=toml, held=held, overrides={"search.engine": engine})
    return model


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
    assert not report.failed, report.failed
