"""What one context contributes to a search index: the fields of an `IndexDoc`.

Both engines index the same fields, built here and nowhere else:

* full text: ``content`` (the body after the front matter), ``summary``,
  ``purpose``, ``insights``, ``influences``, ``path``;
* keywords (exact, lower-cased, counted as facets): ``tags``, ``technologies``;
* address parts (exact): ``agent``, ``role`` (the authority's role), ``project``,
  ``task``;
* stored for results: the address key, the *file* role, version id, HLC,
  summary and an excerpt of the body to cut snippets from.

A document is identified in an index by `doc_key` (address and file role): a
context has at most one document per index, its head version.
"""

from __future__ import annotations

from dataclasses import dataclass

from slurpfs import frontmatter
from slurpfs.store import VersionRecord

# Text beyond this many characters is not indexed (a context may be 256 MiB).
MAX_INDEXED_CHARS = 1 << 20
# Snippets are cut from the first EXCERPT_CHARS characters of the body.
EXCERPT_CHARS = 16 << 10

TEXT_FIELDS = ("content", "summary", "purpose", "insights", "influences", "path")
KEYWORD_FIELDS = ("tags", "technologies")
ADDRESS_FIELDS = ("agent", "role", "project", "task")
QUERY_FIELDS = TEXT_FIELDS + KEYWORD_FIELDS + ADDRESS_FIELDS
"""Every field a query may name (``field:term``)."""

DEFAULT_FIELDS = ("content", "summary", "purpose", "insights", "tags", "technologies", "path")
"""Fields searched by a term that names no field."""

FIELD_BOOSTS = {"summary": 2.0, "purpose": 1.5, "tags": 1.5, "technologies": 1.5}

FACETS = ("tags", "technologies", "project")
"""Facet names, in the order results list them."""


def doc_key(address: str, role: str) -> str:
    """The unique id of a context's document in an index."""
    return f"{address}\0{role}"


def split_doc_key(key: str) -> tuple[str, str]:
    address, _, role = key.partition("\0")
    return address, role


def _keywords(values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        word = " ".join(value.split()).lower()
        if word and word not in out:
            out.append(word)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class IndexDoc:
    """The searchable form of one context version (plaintext: memory only)."""

    address: str
    file_role: str
    version: str  # hex version id
    hlc: int
    agent: str
    role: str  # the authority's role
    project: str
    task: str
    path: str
    content: str
    excerpt: str
    summary: str
    purpose: str
    insights: str
    influences: str
    tags: tuple[str, ...]
    technologies: tuple[str, ...]

    @property
    def key(self) -> str:
        return doc_key(self.address, self.file_role)


def extract(info: VersionRecord, data: bytes) -> IndexDoc:
    """The index document of a version's plaintext.

    Front matter feeds the structured fields; a body that is not UTF-8 (binary
    content) contributes no text, only the address fields.
    """
    fm = frontmatter.parse(data)
    authority, _, path = info.address.partition("/")
    agent_role, _, project_task = authority.partition("@")
    agent, _, arole = agent_role.partition(":")
    project, _, task = project_task.partition(":")
    body = fm.body[:MAX_INDEXED_CHARS]
    return IndexDoc(
        address=info.address,
        file_role=info.role,
        version=info.version_id.hex(),
        hlc=info.hlc,
        agent=agent,
        role=arole,
        project=project,
        task=task,
        path=path,
        content=body,
        excerpt=body[:EXCERPT_CHARS],
        summary=fm.summary,
        purpose=fm.purpose,
        insights="\n".join(fm.insights),
        influences="\n".join(fm.influences),
        tags=_keywords(fm.tags),
        technologies=_keywords(fm.technologies),
    )
