"""YAML front matter: the structured fields at the top of a context document.

The stored bytes are never rewritten: parsing is read-only and tolerant. A
document without front matter, or whose front matter is not a YAML mapping,
simply has no fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

LIST_FIELDS = ("tags", "technologies", "insights", "influences", "influenced_by")
TEXT_FIELDS = ("summary", "purpose")
# libyaml's loader when PyYAML was built with it (about 9x faster); same safe subset.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_FENCE = re.compile(rb"\A---[ \t]*\r?\n(.*?)(?:\r?\n)(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.S)


@dataclass(frozen=True)
class FrontMatter:
    summary: str = ""
    purpose: str = ""
    tags: tuple[str, ...] = ()
    technologies: tuple[str, ...] = ()
    insights: tuple[str, ...] = ()
    influences: tuple[str, ...] = ()
    influenced_by: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    body: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in TEXT_FIELDS}
        out.update({name: list(getattr(self, name)) for name in LIST_FIELDS})
        return out


def _as_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if v is not None)
    return (str(value),)


def parse(data: bytes) -> FrontMatter:
    """Front matter and body of a document; never raises on bad input."""
    match = _FENCE.match(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return FrontMatter()
    if match is None:
        return FrontMatter(body=text)
    try:
        loaded = yaml.load(match.group(1).decode("utf-8"), Loader=_LOADER)
    except yaml.YAMLError:
        return FrontMatter(body=text)
    if not isinstance(loaded, dict):
        return FrontMatter(body=text)
    body = data[match.end() :].decode("utf-8")
    known = set(LIST_FIELDS) | set(TEXT_FIELDS)
    return FrontMatter(
        summary=str(loaded.get("summary") or ""),
        purpose=str(loaded.get("purpose") or ""),
        tags=_as_list(loaded.get("tags")),
        technologies=_as_list(loaded.get("technologies")),
        insights=_as_list(loaded.get("insights")),
        influences=_as_list(loaded.get("influences")),
        influenced_by=_as_list(loaded.get("influenced_by")),
        extra={str(k): v for k, v in loaded.items() if k not in known},
        body=body,
    )


def cascade(layers: list[FrontMatter]) -> dict[str, Any]:
    """Merge front matter CSS-like: `layers` farthest ancestor first, nearest last.

    Text fields: the nearest non-empty value wins. List fields: union, in order
    of first appearance from the farthest layer on.
    """
    merged: dict[str, Any] = {name: "" for name in TEXT_FIELDS}
    merged.update({name: [] for name in LIST_FIELDS})
    for layer in layers:
        for name in TEXT_FIELDS:
            value = getattr(layer, name)
            if value:
                merged[name] = value
        for name in LIST_FIELDS:
            for item in getattr(layer, name):
                if item not in merged[name]:
                    merged[name].append(item)
    return merged
