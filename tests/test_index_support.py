"""Shared helpers for the search index tests (no tests here)."""

from __future__ import annotations

from collections.abc import Iterable

from conftest import Nodes

from slurpfs.model import BatchItem, ContextStore
from slurpfs.ucxl import Address, parse

ENGINES = ("sqlite", "whoosh", "tantivy")


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


SECRET = document(
    "The HSM holds the xylophonesecret master key. Rotating key material is shared.",
    summary="secret key ceremony",
    tags=["secrettag", "security"],
    technologies=["secrettech"],
)


def seed(model: ContextStore) -> None:
    """Three developer contexts, one architect-only context (on its own project)."""
    put_many(
        model,
        [
            (
                address("src/auth.go"),
                "developer",
                document(
                    "Tokens are validated against the rotating key set because keys leak.",
                    summary="JWT validation for the public API",
                    tags=["security", "backend"],
                    technologies=["go", "jwt"],
                ),
            ),
            (
                address("src/session.go"),
                "developer",
                document(
                    "Sessions expire after an hour; the key set is shared with auth.",
                    summary="session lifetime",
                    tags=["backend"],
                    technologies=["go"],
                ),
            ),
            (
                address("docs/readme", "alice:developer@web:ui"),
                "developer",
                document("Rotating banners on the landing page.", tags=["frontend"]),
            ),
            (address("hsm/ceremony", "claude:architect@vault:keys"), "architect", SECRET),
        ],
    )
