"""What ``.search/`` needs of search: the `Searcher` seam.

`slurpfs.fs.search` (the ``.search/`` tree) asks these questions and nothing
else. `SearchService` answers them in this process; a client of an index kept
in a worker process can answer them too (over its socket), and the tree does
not change.
"""

from __future__ import annotations

import errno
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, Protocol

from slurpfs.errors import SlurpError
from slurpfs.index.indexer import IndexerStatistics
from slurpfs.index.results import SearchResult
from slurpfs.index.service import SearchStatistics

__all__ = ["IndexProgress", "ProgressState", "SearchProgress", "SearchUnavailable", "Searcher"]


class SearchUnavailable(SlurpError):
    """Search cannot answer now (its indexes are being built, or its worker restarts):
    the message says why; asking again later may succeed."""

    errno = errno.EAGAIN


ProgressState = Literal["starting", "building", "catching up", "ready", "restarting", "unavailable"]


@dataclass(frozen=True, slots=True)
class SearchProgress:
    """Where search stands: building or catching up, and how fast (the status lines)."""

    state: ProgressState
    done: int = 0  # contexts (building) or changes (catching up) indexed so far
    total: int = 0  # ... of this many
    rate: float = 0.0  # per second, since this phase began
    reason: str = ""  # why restarting or unavailable

    @property
    def eta(self) -> float | None:
        """Seconds until done at the current rate (None when unknown)."""
        if self.rate <= 0 or self.total <= self.done:
            return None
        return (self.total - self.done) / self.rate

    def describe(self) -> str:
        """One line for a person, e.g. ``building the search indexes: indexed 300 of
        10000 contexts (250/s, ETA 39 s)``."""
        if self.state == "ready":
            return "ready"
        if self.state in ("restarting", "unavailable"):
            return f"{self.state}: {self.reason}" if self.reason else self.state
        if self.state == "starting":
            return "starting the search worker"
        what = "contexts" if self.state == "building" else "changes"
        text = f"{self.state} the search indexes: indexed {self.done} of {self.total} {what}"
        eta = self.eta
        if self.rate > 0:
            text += f" ({self.rate:.0f}/s" + (f", ETA {eta:.0f} s)" if eta is not None else ")")
        return text


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

    def progress(self) -> SearchProgress:
        """Building, catching up, ready, or why search cannot answer now."""
