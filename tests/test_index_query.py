"""Query names and the shared syntax check."""

from __future__ import annotations

import pytest

from slurpfs.errors import QueryError
from slurpfs.index import DEFAULT_LIMIT, MAX_LIMIT, QuerySpec, check_syntax, parse_query_name
from slurpfs.index.results import Snippet, highlight_words, snippet_from_marked


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("tags:security jwt", QuerySpec("tags:security jwt", DEFAULT_LIMIT, None)),
        ("tags:security jwt@limit=5", QuerySpec("tags:security jwt", 5, None)),
        (
            "tags:security jwt@limit=5@role=developer",
            QuerySpec("tags:security jwt", 5, "developer"),
        ),
        ("jwt@role=architect@limit=1", QuerySpec("jwt", 1, "architect")),
        # '@' inside the query (an address) is not an option
        (
            "influences:claude:architect@bzzz:auth",
            QuerySpec("influences:claude:architect@bzzz:auth"),
        ),
        (f"x@limit={MAX_LIMIT}", QuerySpec("x", MAX_LIMIT)),
    ],
)
def test_parse_query_name(name: str, spec: QuerySpec) -> None:
    assert parse_query_name(name) == spec


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("jwt@limit=0", "from 1 to"),
        ("jwt@limit=ten", "from 1 to"),
        (f"jwt@limit={MAX_LIMIT + 1}", "from 1 to"),
        ("jwt@sort=score", "unknown option '@sort='"),
        ("jwt@limit=1@limit=2", "given twice"),
        ("jwt@role=Not A Role", "not a role name"),
    ],
)
def test_bad_query_names_say_why(name: str, says: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_query_name(name)
    assert says in str(info.value)
    assert info.value.errno == 22  # EINVAL
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "text",
    [
        "jwt",
        "tags:security jwt",
        '"rotating key" AND tags:backend',
        "(jwt OR oauth) AND NOT legacy",
        "+jwt -legacy",
        "project:bzzz path:auth",
        'influences:"ucxl://claude:architect@bzzz:auth/src/session.go"',
        "summary:[a TO m]",
        "NOT legacy",
    ],
)
def test_valid_queries_pass(text: str) -> None:
    check_syntax(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ('"unterminated', "never closed"),
        ("(jwt oauth", "'(' at character 1"),
        ("jwt)", "closes nothing"),
        ("[a TO b)", "closes nothing"),
        ("foo:bar", "unknown field 'foo'"),
        ("tags: security", "has no value"),
        ("jwt AND", "after it"),
        ("AND jwt", "before it"),
        ("jwt OR OR oauth", "before it"),
        ("jwt NOT", "after it"),
        ("x" * 2000, "longer than"),
    ],
)
def test_bad_queries_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(QueryError) as info:
        check_syntax(text)
    assert says in str(info.value)


def test_snippet_marks_highlights() -> None:
    snippet = snippet_from_marked("the \ue000rotating\ue001   key\n\n set")
    assert snippet == Snippet("the rotating key set", ((4, 12),))
    assert snippet.marked() == "the [rotating] key set"


def test_highlight_words_finds_whole_words_ignoring_case() -> None:
    text = "Keys rotate. The ROTATING key set; prerotating is not a match.\x00"
    snippet = highlight_words(text, {"rotating", "key"})
    assert snippet is not None
    assert snippet.marked() == "Keys rotate. The [ROTATING] [key] set; prerotating is not a match."
    assert highlight_words(text, {"absent"}) is None


def test_highlight_window_is_one_bounded_line() -> None:
    text = ("filler " * 200) + "needle " + ("tail " * 200)
    snippet = highlight_words(text, {"needle"})
    assert snippet is not None
    assert snippet.text.startswith("… ")
    assert snippet.text.endswith(" …")
    assert len(snippet.text) < 260
    assert "[needle]" in snippet.marked()


def test_highlights_see_control_characters_as_spaces_wherever_they_are() -> None:
    # The raw text is searched, only the snippet's window cleaned: a control
    # character still separates words, and a word holding one never matches.
    far = ("filler " * 300) + "x\x07needle\x1fend " + ("tail " * 50)
    snippet = highlight_words(far, {"needle", "x\x07needle"})
    assert snippet is not None
    assert "x [needle] end" in snippet.marked()
    assert "\x07" not in snippet.text
    accented = highlight_words("café NEEDLE", {"needle"})
    assert accented is not None
    assert accented.marked() == "café [NEEDLE]"
    assert highlight_words("plain ascii text", {"needle"}) is None
