"""How the sqlite engine runs a query: whoosh's parse tree as an FTS5 MATCH expression.

The query language is whoosh's (`slurpfs.index.query` checks it first), so the
query is parsed by whoosh's own parser, configured exactly as the whoosh engine
configures it (the same schema and plugins: both engines read a query alike),
and the tree is then written out as one FTS5 expression:

* a word or phrase that names no field searches the catch-all parts
  (`CATCH_ALL_PARTS`) as the column set ``{content summary purpose insights
  path}``, and the keywords ``tags`` and ``technologies``;
* keyword fields (``tags``, ``technologies``: lower-cased) and address fields
  (``agent``, ``role``, ``project``, ``task``: exact) are columns holding each
  whole value as one token, `keyword_token` (``k`` and the value's UTF-8 in
  hex): a word of a tag never matches a tag of several words, as in whoosh,
  and a prefix of a value is a prefix of its token;
* ``AND``/``OR``/``NOT``/``ANDNOT``/``-word``, phrases (``"a b"``, with ``~N`` as
  ``NEAR``) and prefixes (``word*``) map to their FTS5 forms; other wildcards
  (``te?t``) are expanded through the index's vocabulary (or, for keyword and
  address fields, the values indexed);
* ``*`` alone and ``NOT x`` alone match every document (but x), by SQL;
* what FTS5 cannot express (an exclusion inside an ``OR``,
  ranges, fuzzy terms) is a `QueryError` saying so.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

from whoosh import qparser, query

from slurpfs.errors import QueryError
from slurpfs.index.document import FIELD_BOOSTS
from slurpfs.index.whoosh_engine import CATCH_ALL_PARTS, SEARCHED_FIELDS, schema
from slurpfs.index.whoosh_query import CATCH_ALL

TEXT_COLUMNS = ("content", "summary", "purpose", "insights", "influences", "path")
KEYWORD_COLUMNS = ("tags", "technologies")  # lower-cased whole values
EXACT_COLUMNS = ("agent", "role", "project", "task")  # whole values as written
COLUMNS = TEXT_COLUMNS + KEYWORD_COLUMNS + EXACT_COLUMNS
"""The FTS5 table's columns, in order (`WEIGHTS` follows it)."""
WEIGHTS = tuple(FIELD_BOOSTS.get(name, 1.0) for name in COLUMNS)
MAX_EXPANSION = 256  # terms a wildcard may expand to
_CATCH_ALL_FILTER = "{" + " ".join(CATCH_ALL_PARTS) + "}"
_WILD = re.compile(r"[*?]")

Expander = Callable[[str, str], list[str]]
"""(field, prefix) -> the values of that field in the index that start with the prefix
(words of a text field, whole values of a keyword or address field): for wildcards."""


def keyword_token(value: str) -> str:
    """The one token a keyword or address value is indexed as."""
    return "k" + value.encode().hex()


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Translated:
    """A query as FTS5 sees it, and the words a snippet marks.

    `match` None matches nothing, unless `everything`: then the query matches every
    document (``*``), or every document `match` does not match (``NOT x`` alone).
    """

    match: str | None
    words: frozenset[str]
    everything: bool = False


class Translator:
    """Parses whoosh syntax and writes FTS5 expressions. Thread-safe once built."""

    def __init__(self) -> None:
        self._parser = qparser.MultifieldParser(
            list(SEARCHED_FIELDS),
            schema(),
            fieldboosts={k: v for k, v in FIELD_BOOSTS.items() if k in SEARCHED_FIELDS},
        )
        self._parser.add_plugin(qparser.PlusMinusPlugin())

    def translate(self, text: str, expand: Expander) -> Translated:
        """The FTS5 expression of a query that passed `check_syntax`; `QueryError`
        if whoosh cannot parse it or FTS5 cannot express it."""
        try:
            parsed = self._parser.parse(text)
        except (NotImplementedError, IndexError):
            raise QueryError(
                f"the query {text!r} cannot be parsed: try simpler groups and operators"
            ) from None
        words: set[str] = set()
        writer = _Writer(text, expand, words)
        if _is_everything(parsed):
            return Translated(None, frozenset(), everything=True)
        if isinstance(parsed, query.Not):  # every document but these
            return Translated(writer.write(parsed.query), frozenset(), everything=True)
        return Translated(writer.write(parsed), frozenset(words))


def _is_everything(q: query.Query) -> bool:
    if isinstance(q, query.Every):
        return True
    return isinstance(q, (query.Or, query.DisjunctionMax)) and all(
        _is_everything(s) for s in q.subqueries
    )


class _Writer:
    def __init__(self, text: str, expand: Expander, words: set[str]) -> None:
        self._text = text
        self._expand = expand
        self._words = words

    def _refuse(self, what: str) -> QueryError:
        return QueryError(f"the query {self._text!r} cannot be run: {what}")

    def write(self, q: query.Query) -> str | None:  # noqa: PLR0911 (one case per node type)
        """`q` as an FTS5 expression; None if it matches nothing."""
        if q is query.NullQuery:
            return None
        if isinstance(q, query.Not):
            raise self._refuse("NOT or '-' needs a word to search for beside it")
        if isinstance(q, query.AndNot):
            return self._and([q.a], [q.b])
        if isinstance(q, query.AndMaybe):
            return self.write(q.a)  # the optional side only ranks in whoosh
        if isinstance(q, query.Require):
            return self._and([q.a, q.b], [])
        if isinstance(q, query.And) and not isinstance(q, query.Sequence):
            positive = [s for s in q.subqueries if not isinstance(s, query.Not)]
            negative = [s.query for s in q.subqueries if isinstance(s, query.Not)]
            return self._and(positive, negative)
        if isinstance(q, (query.Or, query.DisjunctionMax)):
            parts = [p for p in (self.write(s) for s in q.subqueries) if p is not None]
            return None if not parts else " OR ".join(f"({p})" for p in parts)
        if isinstance(q, query.Phrase):
            return self._phrase(q)
        if isinstance(q, (query.FuzzyTerm, query.Variations)):
            raise self._refuse("fuzzy terms ('word~') are not supported by the sqlite engine")
        if isinstance(q, query.Prefix):
            return self._prefix(q.fieldname, q.text)
        if isinstance(q, query.Wildcard):
            return self._wildcard(q.fieldname, q.text)
        if isinstance(q, query.Term):
            return self._term(q.fieldname, q.text)
        if isinstance(q, query.Every):
            raise self._refuse("'*' alone matches everything: give words to search for")
        raise self._refuse(f"{type(q).__name__} queries are not supported by the sqlite engine")

    def _and(self, positive: list[query.Query], negative: list[query.Query]) -> str | None:
        if not positive:
            raise self._refuse("NOT or '-' needs a word to search for beside it")
        parts = [self.write(s) for s in positive]
        if any(p is None for p in parts):
            return None
        out = " AND ".join(f"({p})" for p in parts)
        for s in negative:
            excluded = self.write(s)
            if excluded is not None:
                out = f"({out}) NOT ({excluded})"
        return out

    def _column(self, field: str) -> str:
        return _CATCH_ALL_FILTER if field == CATCH_ALL else field

    def _term(self, field: str, text: str) -> str:
        if field in KEYWORD_COLUMNS or field in EXACT_COLUMNS:
            return f"{field} : {keyword_token(text)}"
        self._words.add(text)
        return f"{self._column(field)} : {_quoted(text)}"

    def _phrase(self, q: query.Phrase) -> str:
        field, words = q.fieldname, [str(w) for w in q.words]
        if field in KEYWORD_COLUMNS or field in EXACT_COLUMNS:
            return self._term(field, " ".join(words))
        self._words.update(words)
        if q.slop > 1 and len(words) > 1:
            near = " ".join(_quoted(w) for w in words)
            return f"{self._column(field)} : NEAR({near}, {int(q.slop)})"
        return f"{self._column(field)} : {_quoted(' '.join(words))}"

    def _prefix(self, field: str, text: str) -> str:
        if field in KEYWORD_COLUMNS or field in EXACT_COLUMNS:
            return f"{field} : {keyword_token(text)}*"
        return f"{self._column(field)} : {_quoted(text)}*"

    def _wildcard(self, field: str, pattern: str) -> str | None:
        if field not in EXACT_COLUMNS:
            pattern = pattern.lower()  # text and keyword fields are lower-cased
        start = _WILD.search(pattern)
        prefix = pattern if start is None else pattern[: start.start()]
        if not prefix:
            raise self._refuse(f"the wildcard {pattern!r} must start with a letter or digit")
        values = self._expand(_CATCH_ALL_FILTER if field == CATCH_ALL else field, prefix)
        terms = [t for t in values if fnmatch.fnmatchcase(t, pattern)]
        if len(terms) > MAX_EXPANSION:
            raise self._refuse(
                f"the wildcard {pattern!r} matches more than {MAX_EXPANSION} words: "
                "make it more specific"
            )
        if not terms:
            return None
        return " OR ".join(f"({self._term(field, t)})" for t in terms)
