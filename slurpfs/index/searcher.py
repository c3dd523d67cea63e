"""What ``.search/`` needs of search: the `Searcher` seam.

`slurpfs.fs.search` (the ``.search/`` tree) asks these questions and nothing
else. `SearchService` answers them in this process; a client of an index kept
in a worker process can answer them too (over its socket), and the tree does
not change.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from slurpfs.index.indexer import IndexerStatistics
from slurpfs.index.results import SearchResult
from slurpfs.index.service import SearchStatistics

__all__ = ["IndexProgress", "Searcher"]


class Searcher(Protocol):
    """Queries over the indexes of a caller's roles (blocking: call from a thread)."""

    @property
    def seq(self) -> int:
        """The store change sequence every index reflects (results are kept while it stands)."""

    def search(
        self,
        query: str,
        caller_roles: Collection[str],
        *,
        role: str | None = None,
        limit: int = ...,
        snippets: bool = ...,
    ) -> SearchResult:
        """Hits a caller holding `caller_roles` may read (`QueryError`, `AccessDenied`)."""

    def statistics(self) -> SearchStatistics:
        """Engine and documents per role index (for the health check and status)."""


class IndexProgress(Protocol):
    """How far indexing is behind the store (the ``search`` health check)."""

    def statistics(self) -> IndexerStatistics: ...
