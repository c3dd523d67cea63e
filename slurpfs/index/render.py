"""How search results look: `.search/` entries and files, and the CLI's output.

Shared by the FUSE layer and the CLI so that both show the same thing.

* `link_name` / `link_target`: one symlink per hit in ``.search/<query>/``,
  named so that ``ls`` lists them in rank order, pointing relatively at the
  role file (``../../ucxl/<authority>/<p1>/…/<role>``).
* `results_text`: the ``.results`` file, one block per hit.
* `facets_text`: the ``.facets`` file.
* `error_text`: the ``.error`` file of a query that does not parse.
"""

from __future__ import annotations

import json
from typing import Any

from slurpfs.errors import SlurpError
from slurpfs.index.results import SearchHit, SearchResult, one_line
from slurpfs.ucxl import Address

_NAME_BYTES = 255


def _safe(text: str) -> str:
    return text.replace("/", "∕").replace("\0", "")


def link_name(hit: SearchHit, width: int = 3) -> str:
    """``<rank>-<last path component>-<role>``, rank zero-padded to `width` digits.

    Unique within one result (the rank is), sorts in rank order, at most 255 bytes.
    """
    parts = hit.address.split("/")
    label = _safe(parts[-1] if len(parts) > 1 else parts[0])
    name = f"{hit.rank:0{width}d}-{label}-{hit.role}"
    while len(name.encode()) > _NAME_BYTES:
        label = label[:-1]
        name = f"{hit.rank:0{width}d}-{label}-{hit.role}"
    return name


def link_target(hit: SearchHit) -> str:
    """The relative symlink target from ``<mount>/.search/<query>/`` to the hit's file."""
    parts = Address.from_key(hit.address).to_mount_parts()
    return "/".join(("..", "..", *parts, hit.role))


def link_width(limit: int) -> int:
    """Digits of the rank in link names for a result of at most `limit` hits."""
    return max(2, len(str(limit)))


def results_text(result: SearchResult, *, mark: tuple[str, str] = ("[", "]")) -> str:
    """The ``.results`` file: a header, then rank, score, address, role and snippet per hit."""
    lines = [
        f"# query: {one_line(result.query)}",
        f"# {result.total} match{'es' if result.total != 1 else ''}, {len(result.hits)} shown",
    ]
    for hit in result.hits:
        lines.append(f"{hit.rank}\t{hit.score:.3f}\t{hit.url}\t{hit.role}")
        snippet = hit.snippet.marked(*mark)
        if snippet:
            lines.append(f"\t{snippet}")
    return "\n".join(lines) + "\n"


def facets_text(result: SearchResult) -> str:
    """The ``.facets`` file: ``facet<TAB>value<TAB>count`` lines, most frequent first."""
    lines = [f"# query: {one_line(result.query)}", f"# counts over {result.total} matches"]
    for name, values in result.facets.items():
        lines.extend(f"{name}\t{value}\t{count}" for value, count in values)
    return "\n".join(lines) + "\n"


def error_text(query: str, exc: SlurpError) -> str:
    """The ``.error`` file of a query that cannot run."""
    return f"query: {one_line(query)}\nerror: {exc}\n"


def result_json(result: SearchResult) -> dict[str, Any]:
    """A result as JSON-ready data (the CLI's ``--json``)."""
    return {
        "query": result.query,
        "total": result.total,
        "roles_searched": list(result.roles_searched),
        "searched_as": {index: list(roles) for index, roles in result.searched_as.items()},
        "elapsed": round(result.elapsed, 6),
        "hits": [
            {
                "rank": h.rank,
                "score": round(h.score, 6),
                "address": h.url,
                "role": h.role,
                "version": h.version_id.hex(),
                "hlc": h.hlc,
                "summary": h.summary,
                "snippet": h.snippet.text,
                "highlights": [list(r) for r in h.snippet.highlights],
            }
            for h in result.hits
        ],
        "facets": {name: dict(values) for name, values in result.facets.items()},
    }


def result_lines(result: SearchResult, *, color: bool) -> str:
    """What ``slurpfs search`` prints: one line per hit and its snippet, then facets."""
    mark = ("\x1b[1m", "\x1b[0m") if color else ("[", "]")
    out: list[str] = []
    for hit in result.hits:
        out.append(f"{hit.rank:>3}  {hit.score:7.3f}  {hit.url}  [{hit.role}]")
        snippet = hit.snippet.marked(*mark)
        if snippet:
            out.append(f"     {snippet}")
    shown = f"{len(result.hits)} of {result.total}" if result.hits else "no"
    out.append(f"{shown} matches ({result.elapsed * 1000:.1f} ms)")
    out.append("searched: " + "; ".join(_searched(i, r) for i, r in result.searched_as.items()))
    for name, values in result.facets.items():
        if values:
            out.append(f"{name}: " + ", ".join(f"{v} ({n})" for v, n in values[:10]))
    return "\n".join(out)


def _searched(index: str, roles: tuple[str, ...]) -> str:
    """``developer`` or ``architect, developer, reviewer (through architect's index)``."""
    if roles == (index,):
        return index
    return f"{', '.join(roles)} (through {index}'s index)"


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)
