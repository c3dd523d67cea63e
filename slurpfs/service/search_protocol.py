"""The search worker's messages: what crosses its socket, as JSON (`slurpfs.service.wire`).

Supervisor to worker::

    hello    {config: TOML text, passphrase: base64 | null}   (the worker's setup)
    search   {query, roles: [..], role, limit, snippets}      request -> a result
    changed  {hlc: n | null}   notice: a commit (its HLC), or another process's commits
    forget   {contexts: [[address, role], ..]}  notice: purged without a change record
    stop     {}                notice: finish the batch in hand, close, exit 0

Worker to supervisor::

    hello    {pid}
    status   {progress, search, indexer}   notice, whenever one of them changed

A result is `SearchResult` with version ids in hex and snippets as text and
highlight ranges. Errors of a ``search`` come back by class name (`RemoteError`)
and are raised here as the same class for the kinds ``.search/`` acts on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

from slurpfs.errors import AccessDenied, QueryError, SlurpError
from slurpfs.index.indexer import IndexerStatistics
from slurpfs.index.results import SearchHit, SearchResult, Snippet
from slurpfs.index.searcher import ProgressState, SearchProgress, SearchUnavailable
from slurpfs.index.service import SearchStatistics
from slurpfs.service.wire import RemoteError

__all__ = [
    "indexer_from_wire",
    "local_error",
    "progress_from_wire",
    "progress_to_wire",
    "result_from_wire",
    "result_to_wire",
    "search_from_wire",
    "stats_to_wire",
]

_ERRORS: dict[str, type[SlurpError]] = {
    "QueryError": QueryError,
    "AccessDenied": AccessDenied,
    "KeyMissing": AccessDenied,
    "SearchUnavailable": SearchUnavailable,
}


def local_error(exc: RemoteError) -> SlurpError:
    """The worker's error as the class ``.search/`` knows (else a plain `SlurpError`)."""
    return _ERRORS.get(exc.kind, SlurpError)(str(exc))


def result_to_wire(result: SearchResult) -> dict[str, Any]:
    return {
        "query": result.query,
        "hits": [
            {
                "rank": h.rank,
                "score": h.score,
                "address": h.address,
                "role": h.role,
                "version_id": h.version_id.hex(),
                "hlc": h.hlc,
                "summary": h.summary,
                "snippet": h.snippet.text,
                "highlights": [list(r) for r in h.snippet.highlights],
            }
            for h in result.hits
        ],
        "total": result.total,
        "facets": {name: [list(kv) for kv in counts] for name, counts in result.facets.items()},
        "roles_searched": list(result.roles_searched),
        "elapsed": result.elapsed,
    }


def result_from_wire(data: Mapping[str, Any]) -> SearchResult:
    hits = tuple(
        SearchHit(
            rank=int(h["rank"]),
            score=float(h["score"]),
            address=str(h["address"]),
            role=str(h["role"]),
            version_id=bytes.fromhex(h["version_id"]),
            hlc=int(h["hlc"]),
            summary=str(h["summary"]),
            snippet=Snippet(str(h["snippet"]), tuple((int(a), int(b)) for a, b in h["highlights"])),
        )
        for h in data["hits"]
    )
    facets = {
        str(name): tuple((str(v), int(n)) for v, n in counts)
        for name, counts in data["facets"].items()
    }
    return SearchResult(
        query=str(data["query"]),
        hits=hits,
        total=int(data["total"]),
        facets=facets,
        roles_searched=tuple(str(r) for r in data["roles_searched"]),
        elapsed=float(data["elapsed"]),
    )


def progress_to_wire(progress: SearchProgress) -> dict[str, Any]:
    return {
        "state": progress.state,
        "done": progress.done,
        "total": progress.total,
        "rate": progress.rate,
        "reason": progress.reason,
    }


def progress_from_wire(data: Mapping[str, Any]) -> SearchProgress:
    return SearchProgress(
        state=cast(ProgressState, str(data["state"])),
        done=int(data["done"]),
        total=int(data["total"]),
        rate=float(data["rate"]),
        reason=str(data["reason"]),
    )


def stats_to_wire(stats: SearchStatistics | IndexerStatistics) -> dict[str, Any]:
    """Either statistics as a JSON object (their fields are numbers, strings, a mapping)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def search_from_wire(data: Mapping[str, Any]) -> SearchStatistics:
    return SearchStatistics(
        engine=str(data["engine"]),
        documents={str(k): int(v) for k, v in data["documents"].items()},
        seq=int(data["seq"]),
        indexed=int(data["indexed"]),
        removed=int(data["removed"]),
        skipped=int(data["skipped"]),
        rebuilt=tuple(str(r) for r in data["rebuilt"]),
        searches=int(data["searches"]),
        query_errors=int(data["query_errors"]),
        remote=int(data.get("remote", 0)),
    )


def indexer_from_wire(data: Mapping[str, Any]) -> IndexerStatistics:
    return IndexerStatistics(
        **{f.name: data[f.name] for f in dataclasses.fields(IndexerStatistics)}
    )
