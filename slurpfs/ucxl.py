"""UCXL addresses: parse, format, temporal segments and mount paths.

An address names a context::

    ucxl://agent:role@project:task[/temporal]/p1/p2/...

Every `Authority`, `Temporal` and `Address` value is valid by construction: the
constructors check the grammar, so code holding one never re-validates it. Every
failure is an `InvalidAddress` whose message quotes the input and says which part
is wrong and why.

Path components are Unicode NFC: every way of building an address normalises
them, so a decomposed ``café`` is the same address as the composed one. Parsing
and formatting are inverses up to that: ``str(parse(s)) == nfc(s)`` for every
accepted ``s`` (``== s`` when ``s`` is NFC already). Names that would look like
another name are refused: control and format characters (Unicode category Cf:
zero-width characters, the BOM, bidirectional controls), no-break and other
invisible spaces, and leading or trailing whitespace (`validate_name`).
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from slurpfs.errors import AddressTooLong, InvalidAddress

WILDCARD = "any"
MAX_NAME_BYTES = 255  # a path component, in UTF-8 bytes
# The whole address key (``agent:role@project:task/p1/p2``, UTF-8). LMDB keys are at
# most 511 bytes, and the longest key holding an address is a history entry:
# address, NUL, role (at most 64 bytes), NUL, HLC (8), author (32), version id (32).
MAX_ADDRESS_BYTES = 511 - (1 + 64 + 1 + 8 + 32 + 32)

_SCHEME = "ucxl://"
_MOUNT_ROOT = "ucxl"
_MAX_COUNT = 999_999_999
_QUOTE_LIMIT = 120

_AUTHORITY_PART = re.compile(r"[A-Za-z0-9_-]{1,63}")
# [0-9], never \d: \d also matches non-ASCII digits such as U+FF11.
_COUNT = re.compile(r"0|[1-9][0-9]{0,8}")
_ISO = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")
_ISO_PREFIX = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T")
# C0 and C1 controls, line and paragraph separators, and the bidirectional controls
# that make a name display as another (U+202E turns "gpj.exe" into "exe.jpg").
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f]")
# Characters that show as nothing, or as a plain space, besides the format characters
# (category Cf: zero-width space and joiners, the BOM, soft hyphen, bidi controls):
# no-break spaces, which `ls` shows as spaces, and the Hangul fillers.
_INVISIBLE = frozenset("\u00a0\u2007\u202f\u115f\u1160\u3164\uffa0")


class _Reason(InvalidAddress):
    """One part's problem; the public entry point re-raises it naming the whole input."""


def _quote(text: str) -> str:
    """repr() of user input, cut short so that hostile input cannot flood a log line."""
    shown = repr(text[:_QUOTE_LIMIT])
    if len(text) > _QUOTE_LIMIT or len(shown) > _QUOTE_LIMIT:
        shown = shown[:_QUOTE_LIMIT] + "..."
    return shown


class TemporalKind(enum.Enum):
    """The five temporal forms; the value is the segment's marker."""

    LATEST = "*^"
    FIRST = "*~"
    BACK = "~~"
    FORWARD = "^^"
    AT = "@"


@dataclass(frozen=True, slots=True)
class Temporal:
    """A temporal segment: which version of a context an address means.

    Invariants: `n` is 0..999999999 and non-zero only for BACK/FORWARD; `at` is set
    exactly for AT, is timezone-aware UTC with whole seconds. Violations raise
    `InvalidAddress`.
    """

    kind: TemporalKind
    n: int = 0
    at: datetime | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise InvalidAddress(f"invalid temporal segment of kind {self.kind.name}: {problem}")
        if self.at is not None and self.at.tzinfo is not UTC:
            # Any zero-offset zone is accepted; store one tzinfo so values look alike.
            object.__setattr__(self, "at", self.at.replace(tzinfo=UTC))

    def _problem(self) -> str | None:
        if self.kind in (TemporalKind.BACK, TemporalKind.FORWARD):
            if not 0 <= self.n <= _MAX_COUNT:
                return f"version count {self.n} is not in 0..{_MAX_COUNT}"
            if self.at is not None:
                return "only AT takes a time"
        elif self.kind is TemporalKind.AT:
            if self.at is None:
                return "AT needs a time"
            if self.at.utcoffset() != timedelta(0):
                return f"time {self.at.isoformat()} is not timezone-aware UTC"
            if self.at.microsecond:
                return f"time {self.at.isoformat()} is not a whole second"
            if self.n:
                return "AT takes no version count"
        elif self.n or self.at is not None:
            return f"{self.kind.value!r} takes no version count or time"
        return None

    def __str__(self) -> str:
        if self.kind in (TemporalKind.BACK, TemporalKind.FORWARD):
            return f"{self.kind.value}{self.n}"
        if self.at is not None:
            # tzinfo is UTC and microsecond 0 (__post_init__), so this is YYYY-MM-DDTHH:MM:SS.
            return self.at.isoformat().removesuffix("+00:00") + "Z"
        marker: str = self.kind.value
        return marker

    @classmethod
    def parse(cls, text: str) -> Temporal:
        """Parse ``*^``, ``*~``, ``~~N``, ``^^N`` or ``YYYY-MM-DDTHH:MM:SSZ``.

        N is decimal without sign or leading zeros, at most 9 digits; the time must
        exist on the calendar. ``str(Temporal.parse(t)) == t``. Raises `InvalidAddress`.
        """
        try:
            return _parse_temporal(text)
        except _Reason as exc:
            raise InvalidAddress(f"invalid temporal segment {_quote(text)}: {exc}") from None

    @staticmethod
    def is_temporal(text: str) -> bool:
        """True iff `Temporal.parse` accepts `text`."""
        try:
            _parse_temporal(text)
        except _Reason:
            return False
        return True


def _parse_temporal(text: str) -> Temporal:
    if text in ("*^", "*~"):
        return Temporal(TemporalKind(text))
    for kind in (TemporalKind.BACK, TemporalKind.FORWARD):
        if text.startswith(kind.value):
            digits = text[len(kind.value) :]
            if not _COUNT.fullmatch(digits):
                raise _Reason(
                    f"version count after {kind.value!r} must be a decimal number without"
                    " sign or leading zeros, at most 9 digits"
                )
            return Temporal(kind, n=int(digits))
    match = _ISO.fullmatch(text)
    if match is None:
        raise _Reason("must be '*^', '*~', '~~N', '^^N' or a UTC time YYYY-MM-DDTHH:MM:SSZ")
    year, month, day, hour, minute, second = (int(group) for group in match.groups())
    try:
        at = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise _Reason("time is not a real calendar time") from None
    return Temporal(TemporalKind.AT, at=at)


def _looks_temporal(segment: str) -> bool:
    """Whether a segment is, or is trying to be, a temporal segment.

    Broader than `Temporal.is_temporal` so that a malformed temporal segment is
    reported as one instead of being taken for a path component.
    """
    return (
        segment in ("*^", "*~")
        or segment.startswith(("~~", "^^"))
        or _ISO_PREFIX.match(segment) is not None
    )


@dataclass(frozen=True, slots=True)
class Authority:
    """``agent:role@project:task``; each part is 1-63 of ``[A-Za-z0-9_-]`` or ``any``.

    The constructor validates the parts and raises `InvalidAddress`.
    """

    agent: str
    role: str
    project: str
    task: str

    def __post_init__(self) -> None:
        try:
            _check_authority_parts(self.agent, self.role, self.project, self.task)
        except _Reason as exc:
            raise InvalidAddress(f"invalid UCXL authority {_quote(str(self))}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.agent}:{self.role}@{self.project}:{self.task}"

    @classmethod
    def parse(cls, text: str) -> Authority:
        """Parse ``agent:role@project:task``; ``str(Authority.parse(a)) == a``.

        Raises `InvalidAddress` naming the malformed part.
        """
        try:
            return _parse_authority(text)
        except _Reason as exc:
            raise InvalidAddress(f"invalid UCXL authority {_quote(text)}: {exc}") from None


def _check_authority_parts(*values: str) -> None:
    for label, value in zip(("agent", "role", "project", "task"), values, strict=True):
        if not _AUTHORITY_PART.fullmatch(value):
            raise _Reason(f"{label} {_quote(value)} must be 1-63 letters, digits, '-' or '_'")


def _parse_authority(text: str) -> Authority:
    pairs = [half.split(":") for half in text.split("@")]
    if len(pairs) != 2 or any(len(pair) != 2 for pair in pairs):
        raise _Reason(f"authority {_quote(text)} must be agent:role@project:task")
    (agent, role), (project, task) = pairs
    _check_authority_parts(agent, role, project, task)
    return Authority(agent, role, project, task)


def nfc(name: str) -> str:
    """`name` in Unicode normalisation form C (the form every address component has)."""
    return name if unicodedata.is_normalized("NFC", name) else unicodedata.normalize("NFC", name)


def _char_name(ch: str) -> str:
    return f"U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')})"


def _check_characters(name: str) -> None:
    """The rules for the characters of any name: nothing invisible or confusable."""
    control = _CONTROL.search(name)
    if control is not None:
        raise _Reason(f"must not contain control character U+{ord(control.group()):04X}")
    if name != name.strip():
        end = name[0] if name[0].isspace() else name[-1]
        raise _Reason(f"must not start or end with whitespace ({_char_name(end)})")
    if name.isascii():
        return
    for ch in name:
        if ch in _INVISIBLE or unicodedata.category(ch) == "Cf":
            raise _Reason(f"must not contain the invisible character {_char_name(ch)}")


def validate_name(name: str) -> None:
    """Check the characters of a name made in an address directory (a path component
    or an editor's scratch file); raise `InvalidAddress` saying why it is bad.

    Refused: control characters, format characters (Unicode category Cf: zero-width
    space and joiners, the BOM, bidirectional controls), no-break and other
    invisible spaces, and whitespace at either end. Two names that look the same
    must be the same name.
    """
    try:
        _check_characters(name)
    except _Reason as exc:
        raise InvalidAddress(f"invalid name {_quote(name)}: {exc}") from None


def _check_component(name: str) -> None:
    """Check one component, already in NFC (`nfc`)."""
    if not name:
        raise _Reason("must not be empty (no '//' and no trailing '/')")
    if "/" in name:
        raise _Reason("must not contain '/'")
    _check_characters(name)
    if name.startswith("."):
        raise _Reason("must not start with '.'")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate: what os.fsdecode makes of bytes that are not UTF-8.
        raise _Reason("is not valid UTF-8 (it contains a lone surrogate)") from None
    if size > MAX_NAME_BYTES:
        raise _Reason(f"is {size} bytes in UTF-8, more than {MAX_NAME_BYTES}")
    if _looks_temporal(name):
        raise _Reason("looks temporal; a temporal segment goes directly after the authority")


def validate_component(name: str) -> None:
    """Check one address path component; raise `InvalidAddress` saying why it is bad.

    A component (in NFC: `name` is normalised first) is non-empty, at most
    `MAX_NAME_BYTES` in UTF-8, has no ``/``, passes `validate_name` (no control,
    format or invisible character, no whitespace at either end), does not start
    with ``.``, and is not (and does not resemble) a temporal segment, so that a
    mount path always reads one way.
    """
    try:
        _check_component(nfc(name))
    except _Reason as exc:
        raise InvalidAddress(f"invalid path component {_quote(name)}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Address:
    """A UCXL address: authority, optional temporal segment, path components.

    The constructor normalises every component to NFC, validates it
    (`validate_component`) and raises `InvalidAddress`. Derived addresses
    (`parent`, `child`, ...) keep the temporal.
    """

    authority: Authority
    path: tuple[str, ...] = ()
    temporal: Temporal | None = None

    def __post_init__(self) -> None:
        path = tuple(map(nfc, self.path))
        for name in path:
            validate_component(name)
        _check_size(self.authority, path)
        object.__setattr__(self, "path", path)

    def __str__(self) -> str:
        segments = [_SCHEME + str(self.authority)]
        if self.temporal is not None:
            segments.append(str(self.temporal))
        segments.extend(self.path)
        return "/".join(segments)

    @property
    def key(self) -> str:
        """Canonical store key: ``agent:role@project:task/p1/p2``, no scheme or temporal."""
        return "/".join((str(self.authority), *self.path))

    def without_temporal(self) -> Address:
        """The same address meaning the latest version."""
        return self.with_temporal(None)

    def with_temporal(self, t: Temporal | None) -> Address:
        """The same authority and path with temporal segment `t`."""
        return _trusted(self.authority, self.path, t)

    def child(self, name: str) -> Address:
        """The address one component deeper (`name` in NFC); `InvalidAddress` for a bad name."""
        name = nfc(name)
        validate_component(name)
        path = (*self.path, name)
        _check_size(self.authority, path)
        return _trusted(self.authority, path, self.temporal)

    def parent(self) -> Address | None:
        """The address one component up; None for an authority-only address."""
        if not self.path:
            return None
        return _trusted(self.authority, self.path[:-1], self.temporal)

    def ancestors(self) -> tuple[Address, ...]:
        """Every proper ancestor, nearest first, ending with the authority-only address."""
        return tuple(
            _trusted(self.authority, self.path[:depth], self.temporal)
            for depth in range(len(self.path) - 1, -1, -1)
        )

    def to_mount_parts(self) -> tuple[str, ...]:
        """Path components under the mount point: ``("ucxl", authority, [temporal], *path)``."""
        temporal = () if self.temporal is None else (str(self.temporal),)
        return (_MOUNT_ROOT, str(self.authority), *temporal, *self.path)

    @classmethod
    def from_mount_parts(cls, parts: Sequence[str]) -> Address:
        """Inverse of `to_mount_parts`; raises `InvalidAddress` naming the bad part.

        A temporal segment is recognised only directly after the authority.
        """
        if isinstance(parts, str):
            raise TypeError("from_mount_parts takes a sequence of path components, not a str")
        try:
            if not parts or parts[0] != _MOUNT_ROOT:
                raise _Reason(f"must start with {_MOUNT_ROOT!r}")
            if len(parts) < 2:
                raise _Reason("authority is missing")
            return _from_segments(parts[1], parts[2:], allow_temporal=True)
        except _Reason as exc:
            shown = _quote("/".join(parts))
            raise InvalidAddress(f"invalid mount path {shown}: {exc}") from None

    @classmethod
    def from_key(cls, key: str) -> Address:
        """Inverse of `key` (the result has no temporal); raises `InvalidAddress`."""
        try:
            authority, *path = key.split("/")
            return _from_segments(authority, path, allow_temporal=False)
        except _Reason as exc:
            raise InvalidAddress(f"invalid address key {_quote(key)}: {exc}") from None


def _check_size(authority: Authority, path: tuple[str, ...]) -> None:
    size = len(str(authority).encode()) + sum(len(name.encode()) + 1 for name in path)
    if size > MAX_ADDRESS_BYTES:
        raise AddressTooLong(
            f"address {_quote('/'.join((str(authority), *path)))} is {size} bytes"
            f" in UTF-8, more than {MAX_ADDRESS_BYTES}"
        )


def _trusted(authority: Authority, path: tuple[str, ...], temporal: Temporal | None) -> Address:
    # An Address from parts already checked: re-running __post_init__ on every prefix
    # would make `ancestors` quadratic in the depth.
    address = object.__new__(Address)
    object.__setattr__(address, "authority", authority)
    object.__setattr__(address, "path", path)
    object.__setattr__(address, "temporal", temporal)
    return address


def _from_segments(authority_text: str, rest: Sequence[str], *, allow_temporal: bool) -> Address:
    authority = _parse_authority(authority_text)
    temporal = None
    names = list(rest)
    if allow_temporal and names and _looks_temporal(names[0]):
        try:
            temporal = _parse_temporal(names[0])
        except _Reason as exc:
            raise _Reason(f"temporal segment {_quote(names[0])}: {exc}") from None
        del names[0]
    for i, name in enumerate(names):
        names[i] = nfc(name)
        try:
            _check_component(names[i])
        except _Reason as exc:
            raise _Reason(f"path component {_quote(name)}: {exc}") from None
    _check_size(authority, tuple(names))
    return _trusted(authority, tuple(names), temporal)


def parse(text: str) -> Address:
    """Parse a full ``ucxl://agent:role@project:task[/temporal]/p1/...`` address.

    The scheme is exactly ``ucxl://``; empty components (``//``, a trailing ``/``)
    are errors; components are normalised to NFC. ``str(parse(s)) == nfc(s)``.
    Raises `InvalidAddress` naming the bad part.
    """
    try:
        if not text.startswith(_SCHEME):
            raise _Reason(f"scheme must be {_SCHEME!r}")
        authority, *rest = text[len(_SCHEME) :].split("/")
        return _from_segments(authority, rest, allow_temporal=True)
    except _Reason as exc:
        raise InvalidAddress(f"invalid UCXL address {_quote(text)}: {exc}") from None
