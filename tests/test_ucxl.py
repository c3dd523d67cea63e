"""Unit and property tests for the UCXL address grammar (slurpfs.ucxl)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurpfs.errors import AddressTooLong, InvalidAddress
from slurpfs.ucxl import (
    MAX_ADDRESS_BYTES,
    MAX_NAME_BYTES,
    WILDCARD,
    Address,
    Authority,
    Temporal,
    TemporalKind,
    nfc,
    parse,
    validate_component,
    validate_name,
)

BASE = "ucxl://a:r@p:t"
AUTH = Authority("a", "r", "p", "t")
AT_TIME = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
AT_LIMIT = "é" * 127 + "x"  # exactly MAX_NAME_BYTES in UTF-8

T = TypeVar("T")


def outcome(fn: Callable[[T], Address], arg: T) -> Address | InvalidAddress:
    """Call fn, returning the InvalidAddress it raised; any other exception propagates."""
    try:
        return fn(arg)
    except InvalidAddress as exc:
        return exc


# --- hand-written cases ------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        BASE,
        "ucxl://claude:architect@bzzz:auth/src/auth.go",
        "ucxl://any:any@any:any",
        "ucxl://A-b_9:R-1@proj_X:t-2/*^",
        f"{BASE}/*~/x",
        f"{BASE}/~~0",
        f"{BASE}/~~999999999/a",
        f"{BASE}/^^12/a/b",
        f"{BASE}/2026-11-26T10:00:00Z/src",
        f"{BASE}/2024-02-29T23:59:59Z",
        f"{BASE}/0001-01-01T00:00:00Z",
        f"{BASE}/日本語/ファイル",
        f"{BASE}/{AT_LIMIT}",
        f"{BASE}/a b/*/~/^/~x/x~~/*^x/any/-/\u00e9",
        f"{BASE}/2026-11-26t10:00:00z",  # lowercase: not temporal-shaped, a plain name
        "ucxl://" + ":".join(["x" * 63] * 2) + "@" + ":".join(["y" * 63] * 2),
    ],
)
def test_valid_addresses_round_trip(text: str) -> None:
    assert str(parse(text)) == text


def test_parse_fields() -> None:
    address = parse("ucxl://claude:architect@bzzz:auth/~~1/src/auth.go")
    assert address.authority == Authority("claude", "architect", "bzzz", "auth")
    assert address.temporal == Temporal(TemporalKind.BACK, 1)
    assert address.path == ("src", "auth.go")
    assert address.key == "claude:architect@bzzz:auth/src/auth.go"
    assert parse(f"{BASE}/2026-11-26T10:00:00Z").temporal == Temporal(TemporalKind.AT, at=AT_TIME)
    assert parse(BASE) == Address(AUTH)


@pytest.mark.parametrize(
    ("text", "part", "why"),
    [
        ("", "scheme", "ucxl://"),
        ("UCXL://a:r@p:t", "scheme", "ucxl://"),
        ("ucxl:/a:r@p:t", "scheme", "ucxl://"),
        ("ucxl://", "authority", "agent:role@project:task"),
        ("ucxl://a@b", "authority", "agent:role@project:task"),
        ("ucxl://a:r:x@p:t", "authority", "agent:role@project:task"),
        ("ucxl://a:r@p", "authority", "agent:role@project:task"),
        ("ucxl://a:r@p:t@x", "authority", "agent:role@project:task"),
        ("ucxl://:r@p:t", "agent", "1-63 letters"),
        ("ucxl://a:@p:t", "role", "1-63 letters"),
        ("ucxl://a:r@:t", "project", "1-63 letters"),
        ("ucxl://a:r@p:", "task", "1-63 letters"),
        ("ucxl://a.b:r@p:t", "agent", "1-63 letters"),
        ("ucxl://a:r ole@p:t", "role", "1-63 letters"),
        ("ucxl://a:r@pé:t", "project", "1-63 letters"),
        ("ucxl://a:r@p:t\n", "task", "1-63 letters"),
        ("ucxl://a:r@p:" + "x" * 64, "task", "1-63 letters"),
        (f"{BASE}/", "path component", "empty"),
        (f"{BASE}//x", "path component", "empty"),
        (f"{BASE}/x/", "path component", "empty"),
        (f"{BASE}/.git", "path component '.git'", "start with '.'"),
        (f"{BASE}/x/..", "path component '..'", "start with '.'"),
        (f"{BASE}/a\x00b", "path component", "control character U+0000"),
        (f"{BASE}/a\nb", "path component", "control character U+000A"),
        (f"{BASE}/a\x7f", "path component", "control character U+007F"),
        (f"{BASE}/a\x9bb", "path component", "control character U+009B"),  # C1 CSI
        (f"{BASE}/gpj\u202eexe", "path component", "control character U+202E"),  # RLO
        (f"{BASE}/a\u2028b", "path component", "control character U+2028"),
        (f"{BASE}/" + "é" * 128, "path component", "256 bytes"),
        (f"{BASE}/\udcff", "path component", "lone surrogate"),
        (f"{BASE}/x/*^", "path component '*^'", "directly after the authority"),
        (f"{BASE}/x/*~", "path component '*~'", "directly after the authority"),
        (f"{BASE}/x/~~1", "path component '~~1'", "directly after the authority"),
        (f"{BASE}/x/^^", "path component '^^'", "directly after the authority"),
        (f"{BASE}/*^/~~1", "path component '~~1'", "directly after the authority"),
        (f"{BASE}/x/2026-11-26T10:00:00Z", "path component", "directly after the authority"),
        (f"{BASE}/~~", "temporal segment '~~'", "version count"),
        (f"{BASE}/~~01", "temporal segment '~~01'", "leading zeros"),
        (f"{BASE}/^^-1", "temporal segment '^^-1'", "sign"),
        (f"{BASE}/^^+1", "temporal segment '^^+1'", "sign"),
        (f"{BASE}/~~1234567890", "temporal segment", "at most 9 digits"),
        (f"{BASE}/^^x", "temporal segment '^^x'", "decimal"),
        (f"{BASE}/~~\uff11", "temporal segment", "decimal"),
        (f"{BASE}/~~1x/a", "temporal segment '~~1x'", "decimal"),
        (f"{BASE}/2026-13-01T00:00:00Z", "temporal segment", "calendar"),
        (f"{BASE}/2026-02-29T00:00:00Z", "temporal segment", "calendar"),
        (f"{BASE}/2026-11-26T10:00:60Z", "temporal segment", "calendar"),
        (f"{BASE}/2026-11-26T10:00:00.5Z", "temporal segment", "YYYY-MM-DDTHH:MM:SSZ"),
        (f"{BASE}/2026-11-26T10:00:00+00:00", "temporal segment", "YYYY-MM-DDTHH:MM:SSZ"),
        (f"{BASE}/2026-11-26T10:00Z", "temporal segment", "YYYY-MM-DDTHH:MM:SSZ"),
    ],
)
def test_invalid_addresses_name_the_part(text: str, part: str, why: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"invalid UCXL address {repr(text)[:120]}")
    assert part in message
    assert why in message


def test_error_message_quotes_input_truncated() -> None:
    text = f"{BASE}/" + "x/" * 5_000 + ".bad"
    with pytest.raises(InvalidAddress, match=r"start with '\.'") as info:
        parse(text)
    assert len(str(info.value)) < 400


def test_error_message_spec_example() -> None:
    with pytest.raises(InvalidAddress) as info:
        parse("ucxl://a@b")
    assert str(info.value) == (
        "invalid UCXL address 'ucxl://a@b': authority 'a@b' must be agent:role@project:task"
    )


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("a\x1fb", "U+001F"),
        ("a\x85b", "U+0085"),
        ("a\u2066b", "U+2066"),
        (".hidden", "'.'"),
        ("x" * (MAX_NAME_BYTES + 1), "256 bytes"),
        ("\ud800", "surrogate"),
        ("*^", "looks temporal"),
        ("^^", "temporal"),
        ("~~abc", "temporal"),
        ("^^7", "temporal"),
        ("2026-11-26T10:00:00Z", "temporal"),
        ("2026-99-99Tnotes", "temporal"),
    ],
)
def test_validate_component_rejects(name: str, why: str) -> None:
    with pytest.raises(InvalidAddress, match="^invalid path component") as info:
        validate_component(name)
    assert why in str(info.value)


@pytest.mark.parametrize("name", ["x", "x" * MAX_NAME_BYTES, AT_LIMIT, "a b", "~", "*", "~^"])
def test_validate_component_accepts(name: str) -> None:
    validate_component(name)


# --- names that look like other names ----------------------------------------------

COMPOSED = "caf\u00e9"
DECOMPOSED = "cafe\u0301"


def test_a_decomposed_name_is_the_same_address_as_the_composed_one() -> None:
    """Components are NFC whichever way the address is built, so ``café`` typed
    on a keyboard that composes and one that does not name one context."""
    one = parse(f"{BASE}/{COMPOSED}/x")
    assert parse(f"{BASE}/{DECOMPOSED}/x") == one
    assert str(parse(f"{BASE}/{DECOMPOSED}/x")) == f"{BASE}/{COMPOSED}/x"
    assert Address(AUTH, (DECOMPOSED, "x")) == one
    assert Address(AUTH).child(DECOMPOSED).child("x") == one
    assert Address.from_mount_parts(["ucxl", str(AUTH), DECOMPOSED, "x"]) == one
    assert Address.from_key(f"{AUTH}/{DECOMPOSED}/x") == one
    assert one.key == f"{AUTH}/{COMPOSED}/x"
    validate_component(DECOMPOSED)


INVISIBLE = [
    ("a\u200bb", "U+200B (ZERO WIDTH SPACE)"),
    ("a\u200cb", "U+200C (ZERO WIDTH NON-JOINER)"),
    ("a\u200db", "U+200D (ZERO WIDTH JOINER)"),
    ("a\u2060b", "U+2060 (WORD JOINER)"),
    ("\ufeffnotes", "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
    ("a\u00a0b", "U+00A0 (NO-BREAK SPACE)"),
    ("a\u202fb", "U+202F (NARROW NO-BREAK SPACE)"),
    ("a\u2007b", "U+2007 (FIGURE SPACE)"),
    ("soft\u00adhyphen", "U+00AD (SOFT HYPHEN)"),
    ("a\u3164b", "U+3164 (HANGUL FILLER)"),
    ("gpj\u202eexe", "U+202E"),  # bidi override: shows as "exe.jpg"-like
    ("a\u2067b", "U+2067"),
    ("a\u200fb", "U+200F"),
    (" lead", "whitespace (U+0020 (SPACE))"),
    ("trail ", "whitespace (U+0020 (SPACE))"),
    ("trail\u3000", "whitespace (U+3000 (IDEOGRAPHIC SPACE))"),
    ("\u2003lead", "whitespace"),
]


@pytest.mark.parametrize(("name", "why"), INVISIBLE)
def test_invisible_characters_and_spaces_at_either_end_are_refused(name: str, why: str) -> None:
    """Two names that look the same must be the same name: every way in refuses
    these, saying which character (the CLI exits 6 with this message)."""
    with pytest.raises(InvalidAddress, match="^invalid path component") as info:
        validate_component(name)
    assert why in str(info.value)
    with pytest.raises(InvalidAddress, match="^invalid name") as named:
        validate_name(name)
    assert why in str(named.value)
    with pytest.raises(InvalidAddress, match="^invalid UCXL address"):
        parse(f"{BASE}/src/{name}")
    with pytest.raises(InvalidAddress):
        Address(AUTH).child(name)
    with pytest.raises(InvalidAddress):
        Address.from_mount_parts(["ucxl", str(AUTH), name])


@pytest.mark.parametrize("name", ["a b", "notes 2", "日本語", "e\u0301", "x\u00b7y", "ﬁle"])
def test_visible_names_with_inner_spaces_and_marks_are_accepted(name: str) -> None:
    validate_name(name)
    validate_component(name)
    assert Address(AUTH, (name,)).path == (nfc(name),)


# --- Temporal ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temporal", "text"),
    [
        (Temporal(TemporalKind.LATEST), "*^"),
        (Temporal(TemporalKind.FIRST), "*~"),
        (Temporal(TemporalKind.BACK, 3), "~~3"),
        (Temporal(TemporalKind.FORWARD, 0), "^^0"),
        (Temporal(TemporalKind.AT, at=AT_TIME), "2026-11-26T10:00:00Z"),
        (
            Temporal(TemporalKind.AT, at=datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC)),
            "0005-01-02T03:04:05Z",
        ),
    ],
)
def test_temporal_format_and_parse(temporal: Temporal, text: str) -> None:
    assert str(temporal) == text
    assert Temporal.parse(text) == temporal
    assert Temporal.is_temporal(text)


@pytest.mark.parametrize("text", ["", "*", "^*", "~~", "~~01", "^^ 1", "@", "now", "2026-11-26"])
def test_temporal_parse_rejects(text: str) -> None:
    assert not Temporal.is_temporal(text)
    with pytest.raises(InvalidAddress, match="^invalid temporal segment"):
        Temporal.parse(text)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"kind": TemporalKind.BACK, "n": -1}, "not in 0..999999999"),
        ({"kind": TemporalKind.FORWARD, "n": 1_000_000_000}, "not in 0..999999999"),
        ({"kind": TemporalKind.BACK, "at": AT_TIME}, "only AT"),
        ({"kind": TemporalKind.LATEST, "n": 1}, "no version count"),
        ({"kind": TemporalKind.FIRST, "at": AT_TIME}, "no version count or time"),
        ({"kind": TemporalKind.AT}, "needs a time"),
        ({"kind": TemporalKind.AT, "at": datetime(2026, 1, 1)}, "not timezone-aware UTC"),
        (
            {
                "kind": TemporalKind.AT,
                "at": datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2))),
            },
            "not timezone-aware UTC",
        ),
        ({"kind": TemporalKind.AT, "at": AT_TIME.replace(microsecond=1)}, "whole second"),
        ({"kind": TemporalKind.AT, "at": AT_TIME, "n": 2}, "no version count"),
    ],
)
def test_temporal_constructor_checks_invariants(kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidAddress, match="^invalid temporal segment") as info:
        Temporal(**kwargs)  # type: ignore[arg-type]
    assert why in str(info.value)


def test_temporal_normalises_zero_offset_zone() -> None:
    temporal = Temporal(TemporalKind.AT, at=AT_TIME.replace(tzinfo=timezone(timedelta(0))))
    assert temporal.at is not None
    assert temporal.at.tzinfo is UTC
    assert temporal == Temporal(TemporalKind.AT, at=AT_TIME)


# --- Authority -----------------------------------------------------------------


def test_authority_parse_and_format() -> None:
    authority = Authority.parse("claude:architect@bzzz:auth")
    assert authority == Authority("claude", "architect", "bzzz", "auth")
    assert str(authority) == "claude:architect@bzzz:auth"
    assert str(Authority(WILDCARD, WILDCARD, WILDCARD, WILDCARD)) == "any:any@any:any"


@pytest.mark.parametrize(("text", "part"), [("a:r@p", "authority"), ("a:r@p:t!", "task")])
def test_authority_parse_rejects(text: str, part: str) -> None:
    with pytest.raises(InvalidAddress, match="^invalid UCXL authority") as info:
        Authority.parse(text)
    assert part in str(info.value)


def test_authority_constructor_validates() -> None:
    with pytest.raises(InvalidAddress, match="role '' must be 1-63"):
        Authority("a", "", "p", "t")
    with pytest.raises(InvalidAddress, match="project 'a:b'"):
        Authority("a", "r", "a:b", "t")


# --- Address -------------------------------------------------------------------


def test_address_navigation() -> None:
    back = Temporal(TemporalKind.BACK, 1)
    address = Address(AUTH, ("src", "auth.go"), back)
    assert str(address) == f"{BASE}/~~1/src/auth.go"
    assert address.key == "a:r@p:t/src/auth.go"
    assert Address(AUTH).key == "a:r@p:t"
    assert address.without_temporal() == Address(AUTH, ("src", "auth.go"))
    assert Address(AUTH).with_temporal(back) == Address(AUTH, (), back)
    assert address.child("x") == Address(AUTH, ("src", "auth.go", "x"), back)
    assert address.parent() == Address(AUTH, ("src",), back)
    assert Address(AUTH).parent() is None
    assert address.ancestors() == (Address(AUTH, ("src",), back), Address(AUTH, (), back))
    assert Address(AUTH).ancestors() == ()
    assert address.to_mount_parts() == ("ucxl", "a:r@p:t", "~~1", "src", "auth.go")
    assert Address(AUTH, ("d",)).to_mount_parts() == ("ucxl", "a:r@p:t", "d")


@pytest.mark.parametrize("name", [".x", "", "a/b", "*^", "~~2"])
def test_address_child_validates(name: str) -> None:
    with pytest.raises(InvalidAddress, match="^invalid path component"):
        Address(AUTH).child(name)


def test_address_constructor_validates_path() -> None:
    with pytest.raises(InvalidAddress, match="must not start with"):
        Address(AUTH, ("ok", ".bad"))


@pytest.mark.parametrize(
    ("parts", "why"),
    [
        ([], "must start with 'ucxl'"),
        (["x", "a:r@p:t"], "must start with 'ucxl'"),
        (["ucxl"], "authority is missing"),
        (["ucxl", "a:r"], "authority 'a:r'"),
        (["ucxl", "a:r@p:t", "~~x"], "temporal segment '~~x'"),
        (["ucxl", "a:r@p:t", "src", "*^"], "path component '*^'"),
        (["ucxl", "a:r@p:t", "a/b"], "path component 'a/b'"),
        (["ucxl", "a:r@p:t", ""], "path component ''"),
    ],
)
def test_from_mount_parts_rejects(parts: list[str], why: str) -> None:
    with pytest.raises(InvalidAddress, match="^invalid mount path") as info:
        Address.from_mount_parts(parts)
    assert why in str(info.value)


def test_from_mount_parts_refuses_a_str() -> None:
    with pytest.raises(TypeError):
        Address.from_mount_parts("ucxl/a:r@p:t")


@pytest.mark.parametrize(
    ("key", "why"),
    [("", "authority ''"), ("a:r@p:t/", "path component ''"), ("a:r@p:t/*^/x", "'*^'")],
)
def test_from_key_rejects(key: str, why: str) -> None:
    with pytest.raises(InvalidAddress, match="^invalid address key") as info:
        Address.from_key(key)
    assert why in str(info.value)


# --- properties ----------------------------------------------------------------


def _is_component(name: str) -> bool:
    try:
        validate_component(name)
    except InvalidAddress:
        return False
    return True


authority_parts = st.just(WILDCARD) | st.from_regex(r"[A-Za-z0-9_-]{1,63}", fullmatch=True)
authorities = st.builds(
    Authority, authority_parts, authority_parts, authority_parts, authority_parts
)
components = st.one_of(
    st.text(
        st.characters(min_codepoint=0x20, codec="utf-8", exclude_characters="/\x7f"),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from(["x" * MAX_NAME_BYTES, AT_LIMIT, "~", "*", "any", "a b", "\xa0"]),
).filter(_is_component)
temporals = st.one_of(
    st.sampled_from([Temporal(TemporalKind.LATEST), Temporal(TemporalKind.FIRST)]),
    st.builds(
        Temporal,
        st.sampled_from([TemporalKind.BACK, TemporalKind.FORWARD]),
        st.integers(0, 999_999_999),
    ),
    st.datetimes(
        min_value=datetime(1, 1, 1),
        max_value=datetime(9999, 12, 31, 23, 59, 59),
        timezones=st.just(UTC),
    ).map(lambda at: Temporal(TemporalKind.AT, at=at.replace(microsecond=0))),
)
addresses = (
    st.tuples(authorities, st.lists(components, max_size=6).map(tuple), st.none() | temporals)
    .filter(lambda t: len("/".join((str(t[0]), *t[1])).encode()) <= MAX_ADDRESS_BYTES)
    .map(lambda t: Address(*t))
)
grammar_text = st.text(st.sampled_from(list("ar09:@/.*^~-_TZ \x00\x7fé\udcff")))


@settings(max_examples=300, deadline=None)
@given(addresses)
def test_address_round_trips(address: Address) -> None:
    text = str(address)
    assert parse(text) == address
    assert str(parse(text)) == text
    assert Address.from_mount_parts(address.to_mount_parts()) == address
    assert Address.from_key(address.key) == address.without_temporal()
    for ancestor in address.ancestors():
        assert address.key.startswith(ancestor.key)
        assert ancestor.temporal == address.temporal


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text().map(lambda s: "ucxl://" + s),
        grammar_text.map(lambda s: "ucxl://" + s),
        grammar_text.map(lambda s: f"{BASE}/" + s),
    )
)
def test_parse_raises_only_invalid_address(text: str) -> None:
    result = outcome(parse, text)
    if isinstance(result, InvalidAddress):
        assert str(result).startswith("invalid UCXL address")
    else:
        assert str(result) == nfc(text)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.lists(st.text()),
        st.lists(st.text()).map(lambda rest: ["ucxl", *rest]),
        st.lists(grammar_text, max_size=5).map(lambda rest: ["ucxl", "a:r@p:t", *rest]),
    )
)
def test_from_mount_parts_raises_only_invalid_address(parts: list[str]) -> None:
    result = outcome(Address.from_mount_parts, parts)
    if isinstance(result, InvalidAddress):
        assert str(result).startswith("invalid mount path")
    else:
        assert list(result.to_mount_parts()) == [nfc(part) for part in parts]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), grammar_text.map(lambda s: "a:r@p:t/" + s)))
def test_from_key_raises_only_invalid_address(key: str) -> None:
    result = outcome(Address.from_key, key)
    if isinstance(result, InvalidAddress):
        assert str(result).startswith("invalid address key")
    else:
        assert result.key == nfc(key)


def _long_path(size: int) -> tuple[str, ...]:
    """Components after ``a:r@p:t`` making an address key of exactly `size` bytes."""
    left = size - len(str(AUTH))
    parts = []
    while left > 0:
        take = min(MAX_NAME_BYTES, left - 1)
        parts.append("x" * take)
        left -= take + 1
    return tuple(parts)


def test_an_address_at_the_size_limit_is_valid_and_one_byte_more_is_too_long() -> None:
    path = _long_path(MAX_ADDRESS_BYTES)
    at_limit = Address(AUTH, path)
    assert len(at_limit.key.encode()) == MAX_ADDRESS_BYTES
    assert parse(str(at_limit)) == at_limit
    longer = path[:-1] + (path[-1] + "y",)
    # Each way of building an address refuses it, with ENAMETOOLONG and the size.
    with pytest.raises(AddressTooLong, match=f"more than {MAX_ADDRESS_BYTES}"):
        Address(AUTH, longer)
    with pytest.raises(AddressTooLong):
        parse(f"{BASE}/{'/'.join(longer)}")
    with pytest.raises(AddressTooLong):
        Address(AUTH, path[:-1]).child(longer[-1])
    with pytest.raises(AddressTooLong):
        Address.from_mount_parts(("ucxl", str(AUTH), "~~1", *longer))
    assert AddressTooLong.errno == 36  # ENAMETOOLONG
    assert issubclass(AddressTooLong, InvalidAddress)  # the CLI's exit code 6
