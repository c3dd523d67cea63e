"""Search: per-role encrypted indexes over the contexts, and queries.

* `SearchService` — opens (or builds) one index per held role, keeps them in
  step with the store (`catch_up`), answers `search` for a caller's roles.
* `Indexer` — the daemon task feeding commits into the service.
* `parse_query_name` — ``QUERY@limit=N@role=R`` names of `.search/`.
* `render` — `.search/` entries and files, CLI output.
* `check_index` — the fsck hook.
"""

from slurpfs.index.check import check_index
from slurpfs.index.indexer import Indexer, IndexerStatistics
from slurpfs.index.query import DEFAULT_LIMIT, MAX_LIMIT, QuerySpec, check_syntax, parse_query_name
from slurpfs.index.results import SearchHit, SearchResult, Snippet
from slurpfs.index.sealed import IndexConflict, IndexCorrupt, IndexOutdated, IndexRollback
from slurpfs.index.service import SearchService, SearchStatistics

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "IndexConflict",
    "IndexCorrupt",
    "IndexOutdated",
    "IndexRollback",
    "Indexer",
    "IndexerStatistics",
    "QuerySpec",
    "SearchHit",
    "SearchResult",
    "SearchService",
    "SearchStatistics",
    "Snippet",
    "check_index",
    "check_syntax",
    "parse_query_name",
]
