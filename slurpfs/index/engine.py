"""The seam between the search service and its engines, and where documents come from.

An engine provides one `RoleIndex` per reader role (``search.engine`` picks
which: ``sqlite``, ``whoosh`` or ``tantivy``). The service never touches engine
objects other than through this protocol, and engines never touch the model:
what they need of the node comes in an `EngineSetup` (see `engine_setup`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from slurpfs.index.document import IndexDoc
from slurpfs.index.results import EngineResult
from slurpfs.index.sealed import SealedIndexStore
from slurpfs.index.setup import EngineSetup, TextLoader, no_text
from slurpfs.index.sqlite_engine import SqliteIndex
from slurpfs.index.tantivy_engine import TantivyIndex
from slurpfs.index.whoosh_engine import WhooshIndex
from slurpfs.model import ContextStore, VersionInfo


class RoleIndex(Protocol):
    """One role's index: every document whose file role that role may read."""

    engine: str
    persistent: bool  # kept (sealed) in the store across restarts
    role: str
    seq: int  # the store change sequence this index reflects

    def write(
        self,
        upserts: Sequence[IndexDoc],
        deletes: Collection[str],
        *,
        seq: int,
        save: bool = True,
        commit: bool = True,
        merge: bool = True,
    ) -> None:
        """Replace documents by key, remove keys, commit, save, make it searchable.

        Without `commit` an engine may keep the changes pending until the next
        write that commits (a build's batches); `seq` and `save` apply then.
        Without `merge` the commit merges no existing segments (`tidy` does later).
        """
        ...

    def tidy(self) -> bool:
        """Merge what commits without `merge` left unmerged; whether anything was."""
        ...

    def save(self) -> None: ...

    def search(
        self, text: str, *, file_roles: frozenset[str] | None, limit: int, snippets: bool = True
    ) -> EngineResult:
        """Top `limit` hits of a checked query, restricted to `file_roles` if given;
        each with its snippet if `snippets` (else `NO_SNIPPET`: a listing needs none)."""
        ...

    def doc_count(self) -> int: ...

    def documents(self) -> dict[str, str]:
        """doc key -> hex version id of every document."""
        ...

    def close(self) -> None: ...


class EngineType(Protocol):
    engine: str
    persistent: bool

    def create(self, role: str, setup: EngineSetup) -> RoleIndex: ...

    def load(self, role: str, setup: EngineSetup) -> RoleIndex | None: ...


ENGINES: dict[str, EngineType] = {
    "sqlite": SqliteIndex,
    "whoosh": WhooshIndex,
    "tantivy": TantivyIndex,
}

INDEX_DIR = "index"
"""The data directory's folder for engines' own (encrypted) files."""


def engine_setup(
    model: ContextStore, sealed: SealedIndexStore, *, roles: int, text: TextLoader = no_text
) -> EngineSetup:
    """The setup of one role's index among `roles` indexes: ``search.cache_bytes``
    is shared equally between them."""
    return EngineSetup(
        sealed=sealed,
        directory=model.config.data_dir / INDEX_DIR,
        cache_bytes=model.config.search.cache_bytes // max(1, roles),
        text=text,
    )


def read_version(model: ContextStore, info: VersionInfo) -> bytes:
    """The plaintext of a version, opened with any role key this node holds.

    The indexer is the node itself, not a caller: access decisions (and their
    audit entries) are made when results are shown, by role index. Checked as a
    read is (`ContextStore.node_read`): the envelope is the version's, authentic,
    and filed where it belongs. Raises `Corrupt` (or a subclass) and `KeyMissing`.
    """
    return model.node_read(info)
