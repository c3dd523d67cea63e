"""Search results: what a query returns, engine-neutral.

Engines produce `EngineResult` for one role index; `SearchService` merges those
into one `SearchResult` for a caller. Snippets carry their highlights as
character ranges so that each front end marks them its own way (brackets in
`.results`, bold on a terminal, nothing in JSON).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

# Private-use characters that mark highlights while engines format snippets;
# they are removed from the text before marking, so they never clash.
MARK_OPEN = "\ue000"
MARK_CLOSE = "\ue001"
SNIPPET_CHARS = 240
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\ue000\ue001]")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Snippet:
    """One line of text from the hit, and where the query's terms are in it."""

    text: str
    highlights: tuple[tuple[int, int], ...] = ()  # [start, end) character ranges

    def marked(self, open: str = "[", close: str = "]") -> str:
        """The text with every highlight wrapped in `open` ... `close`."""
        out: list[str] = []
        at = 0
        for start, end in self.highlights:
            out += [self.text[at:start], open, self.text[start:end], close]
            at = end
        out.append(self.text[at:])
        return "".join(out)


NO_SNIPPET = Snippet("")
"""The snippet of every hit of a search asked for no snippets."""


def clean_text(text: str) -> str:
    """Text safe to mark: control characters and the marks themselves become spaces."""
    return _CONTROL.sub(" ", text)


def one_line(text: str) -> str:
    """`text` as a single line: control characters and whitespace runs become one space."""
    return _SPACE.sub(" ", clean_text(text)).strip()


def snippet_from_marked(marked: str) -> Snippet:
    """A `Snippet` from text whose highlights are wrapped in MARK_OPEN/MARK_CLOSE.

    Whitespace runs become one space (a snippet is one line).
    """
    text: list[str] = []
    ranges: list[tuple[int, int]] = []
    length = 0
    start: int | None = None
    for part in re.split(f"([{MARK_OPEN}{MARK_CLOSE}])", marked):
        if part == MARK_OPEN:
            start = length
        elif part == MARK_CLOSE:
            if start is not None and length > start:
                ranges.append((start, length))
            start = None
        elif part:
            piece = _SPACE.sub(" ", part)
            if text and text[-1].endswith(" ") and piece.startswith(" "):
                piece = piece[1:]
            if not text and start is None:
                piece = piece.lstrip()
            text.append(piece)
            length += len(piece)
    joined = "".join(text)
    stripped = joined.rstrip()
    return Snippet(
        stripped, tuple((a, min(b, len(stripped))) for a, b in ranges if a < len(stripped))
    )


def plain_snippet(*candidates: str) -> Snippet:
    """The first non-empty candidate, cut to one line of SNIPPET_CHARS characters."""
    for text in candidates:
        line = _SPACE.sub(" ", clean_text(text)).strip()
        if line:
            if len(line) > SNIPPET_CHARS:
                line = line[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " …"
            return Snippet(line)
    return Snippet("")


def highlight_words(text: str, words: Collection[str]) -> Snippet | None:
    """A one-line window of `text` around the first of `words`, each occurrence marked.

    Words match whole alphanumeric runs, ignoring case (as the index tokenises).
    None if no word occurs in `text`.
    """
    # Cleaned text holds no control characters, so a word with one never matches.
    words = [w for w in words if w and not _CONTROL.search(w)]
    if not words or not text:
        return None
    if text.isascii() and all(w.isascii() for w in words):
        # Most hits of a word matched elsewhere (summary, tags) lack it here, and
        # the pattern below scans a 16 KiB excerpt 20 times slower than `in`.
        lowered = text.lower()
        if not any(w.lower() in lowered for w in words):
            return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    pattern = re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])", re.IGNORECASE)
    # clean_text only turns non-word characters into spaces: it keeps every
    # position and word boundary, so the raw text is searched and only the
    # window the snippet can come from is cleaned.
    first = pattern.search(text)
    if first is None:
        return None
    start = max(0, first.start() - SNIPPET_CHARS // 4)
    window_end = first.start() + SNIPPET_CHARS  # the snippet ends before this
    text = text[:start] + clean_text(text[start:window_end]) + text[window_end:]
    if start:
        space = text.find(" ", start, first.start())
        start = space + 1 if space >= 0 else start
    end = min(len(text), start + SNIPPET_CHARS)
    if end < len(text):
        space = text.rfind(" ", first.end(), end)
        end = space if space > 0 else end
    out = ["… " if start else ""]
    at = start
    for match in pattern.finditer(text, start, end):
        out += [text[at : match.start()], MARK_OPEN, match.group(), MARK_CLOSE]
        at = match.end()
    out += [text[at:end], " …" if end < len(text) else ""]
    return snippet_from_marked("".join(out))


@dataclass(frozen=True, slots=True)
class EngineHit:
    """One document matched in one role index."""

    score: float
    address: str
    file_role: str
    version: str  # hex
    hlc: int
    summary: str
    snippet: Snippet  # NO_SNIPPET when the search was asked for none


@dataclass(frozen=True, slots=True)
class EngineResult:
    """The top hits of one role index, with the total and facet counts of every match."""

    hits: list[EngineHit]
    total: int
    facets: Mapping[str, Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One result, as the caller sees it."""

    rank: int  # 1-based
    score: float
    address: str  # address key: agent:role@project:task/p1/p2
    role: str  # the role file that matched
    version_id: bytes
    hlc: int
    summary: str
    snippet: Snippet  # NO_SNIPPET when the search was asked for none

    @property
    def url(self) -> str:
        return "ucxl://" + self.address


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Hits in rank order, plus counts over every hit the caller may see.

    `total` and `facets` count all matching contexts the caller may read, not
    only the `limit` shown; nothing in a result comes from a context outside the
    caller's roles.
    """

    query: str
    hits: tuple[SearchHit, ...]
    total: int
    facets: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    # The roles whose contexts were searched, and through which role's index each
    # was (an architect's index holds the roles architect reads).
    roles_searched: tuple[str, ...] = ()
    searched_as: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    elapsed: float = 0.0
