"""Query names and query syntax checks, shared by both engines.

A `.search/` name (and the CLI's QUERY) is a query in whoosh syntax followed by
optional ``@key=value`` options::

    tags:security jwt@limit=5@role=developer

Whoosh's parser accepts almost anything (an unclosed quote or an unknown field
silently becomes text) and tantivy's rejects different things with terse
messages, so `check_syntax` applies one set of rules first: balanced quotes,
parentheses and brackets, known field names, operators with operands. Both
engines then see only queries that pass it, and a user gets the same readable
`QueryError` whichever engine runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slurpfs.config import ROLE_NAME
from slurpfs.errors import QueryError
from slurpfs.index.document import QUERY_FIELDS

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_QUERY_CHARS = 1024

_OPTION = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)=([^@]*)\Z")
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):")
_OPERATORS = frozenset({"AND", "OR", "NOT", "ANDNOT", "ANDMAYBE"})
_CLOSING = {"(": ")", "[": "]", "{": "}"}
_WORD_END = re.compile(r'[\s()\[\]{}"]')


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """A query and its options, as parsed from a `.search/` name."""

    text: str
    limit: int = DEFAULT_LIMIT
    role: str | None = None


def parse_query_name(name: str) -> QuerySpec:
    """Split ``QUERY[@limit=N][@role=R]`` into a `QuerySpec`.

    Options come last, in any order, each at most once. Raises `QueryError` for
    an unknown option, a limit that is not 1..MAX_LIMIT or a malformed role
    name. The query itself is checked when it is run (`check_syntax`).
    """
    text = name
    options: dict[str, str] = {}
    while (match := _OPTION.search(text)) is not None:
        key, value = match.group(1), match.group(2)
        if key not in ("limit", "role"):
            raise QueryError(f"unknown option '@{key}=' (options are @limit=N and @role=ROLE)")
        if key in options:
            raise QueryError(f"option '@{key}=' is given twice")
        options[key] = value
        text = text[: match.start()]
    limit = DEFAULT_LIMIT
    if "limit" in options:
        raw = options["limit"]
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise QueryError(f"@limit={raw!r}: the limit must be a number from 1 to {MAX_LIMIT}")
        limit = int(raw)
    role = options.get("role")
    if role is not None and not ROLE_NAME.match(role):
        raise QueryError(f"@role={role!r} is not a role name")
    return QuerySpec(text.strip(), limit, role)


def _where(text: str, pos: int) -> str:
    return f"at character {pos + 1} of {text!r}"


def check_syntax(text: str) -> None:
    """Raise `QueryError` explaining the first problem in the query, if any.

    Rules: not empty; every ``"`` closed; ``( [ {`` closed in order; every
    ``field:`` names a searchable field; AND/OR are between two operands and NOT
    precedes one.
    """
    if not text.strip():
        raise QueryError("the query is empty: give words to search for, e.g. 'tags:security jwt'")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is longer than {MAX_QUERY_CHARS} characters")
    stack: list[tuple[str, int]] = []
    tokens: list[tuple[str, int]] = []  # ("term" | "op" | "not" | "(" | ")", position)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise QueryError(f'the quote {_where(text, i)} is never closed: add a closing "')
            tokens.append(("term", i))
            i = end + 1
        elif c in _CLOSING:
            stack.append((c, i))
            tokens.append(("(", i))
            i += 1
        elif c in ")]}":
            if not stack or _CLOSING[stack[-1][0]] != c:
                raise QueryError(f"{c!r} {_where(text, i)} closes nothing that is open")
            stack.pop()
            tokens.append((")", i))
            i += 1
        else:
            field = _FIELD.match(text, i)
            if field is not None:
                name = field.group(1)
                if name not in QUERY_FIELDS:
                    raise QueryError(
                        f"unknown field {name!r} {_where(text, i)}; fields are: "
                        + ", ".join(QUERY_FIELDS)
                    )
                i = field.end()
                if i >= n or text[i].isspace():
                    raise QueryError(f"field {name!r} {_where(text, field.start())} has no value")
                if text[i] in '"([{':
                    continue  # the value is a phrase or a group: read on as usual
            boundary = _WORD_END.search(text, i)
            stop = n if boundary is None else boundary.start()
            word = text[i:stop]
            if field is None and word in _OPERATORS and not (stack and stack[-1][0] != "("):
                tokens.append(("not" if word == "NOT" else "op", i))
            else:
                tokens.append(("term", i))
            i = max(stop, i + 1)
    if stack:
        c, pos = stack[-1]
        raise QueryError(f"{c!r} {_where(text, pos)} is never closed: add {_CLOSING[c]!r}")
    _check_operators(text, tokens)


def _check_operators(text: str, tokens: list[tuple[str, int]]) -> None:
    previous = "start"
    for kind, pos in tokens:
        if kind == "op" and previous in ("start", "op", "not", "("):
            raise QueryError(
                f"{_word(text, pos)!r} {_where(text, pos)} needs something to search for before it"
            )
        if kind == ")" and previous in ("op", "not"):
            raise QueryError(f"the operator before {_where(text, pos)} has nothing after it")
        previous = kind
    if previous in ("op", "not"):
        last = tokens[-1][1]
        raise QueryError(
            f"{_word(text, last)!r} {_where(text, last)} needs something to search for after it"
        )


def _word(text: str, pos: int) -> str:
    end = _WORD_END.search(text, pos)
    return text[pos : len(text) if end is None else end.start()]
