"""The context model: versions, time travel, exact bytes, cascade, batches, access, tampering."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import (
    MemoryAnchors,
    Node,
    Nodes,
    audit_chain_broken,
    audit_keys,
    cli_env,
    raw_store,
)
from fsutil import fill
from nacl.public import PublicKey, SealedBox

from slurpfs import audit, fsck
from slurpfs.crypto import envelope as env
from slurpfs.errors import (
    AccessDenied,
    AuditUnavailable,
    AuthenticationFailed,
    BadSignature,
    CiphertextTampered,
    Corrupt,
    EnvelopeMisplaced,
    InvalidAddress,
    KeyMissing,
    NotFound,
)
from slurpfs.hlc import HybridClock
from slurpfs.model import BatchItem, ContextStore, ContextTooLarge, data_paths
from slurpfs.store import schema as s
from slurpfs.store.schema import VersionRecord
from slurpfs.ucxl import Address, parse

AUTHORITY = "ucxl://claude:architect@bzzz:auth"
ADDR = parse(f"{AUTHORITY}/src/auth.go")
DEV, ARCH, REV = "developer", "architect", "reviewer"


def at(address: Address, temporal: str) -> Address:
    """`address` with a temporal segment."""
    return parse(f"ucxl://{address.authority}/{temporal}/" + "/".join(address.path))


class FakeWall:
    """A wall clock for the model's HLC that only moves when told to."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> int:
        return int(self.now.timestamp()) * 1_000_000_000 + self.now.microsecond * 1000


def plaintext_free(exc: BaseException, *secrets: bytes) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.args)
    for secret in secrets:
        assert secret.decode() not in text
        assert repr(secret) not in text


# -- put / get / history --------------------------------------------------------------


def test_put_then_get_returns_the_version(model: ContextStore) -> None:
    info = model.put(ADDR, DEV, b"hello")

    ctx = model.get(ADDR, DEV)

    assert ctx.data == b"hello"
    assert ctx.info == info == model.stat(ADDR, DEV)
    assert (info.address, info.role, info.size, info.deleted) == (ADDR.key, DEV, 5, False)
    assert info.author == model.keyring.node.node_id
    assert info.parents == ()
    assert len(info.version_id) == 32
    assert info.version_id == env.blake2b_256(model.store.envelope(info.version_id) or b"")


def test_history_is_oldest_first_and_chained(node: Node, model: ContextStore) -> None:
    versions = [model.put(ADDR, DEV, f"version {i}".encode()) for i in range(4)]

    model = node.reopen(model)
    history = model.history(ADDR, DEV)

    assert history == tuple(versions)
    for older, newer in zip(history, history[1:], strict=False):
        assert newer.parents == (older.version_id,)
        assert newer.hlc > older.hlc
    assert [model.get_version(ADDR, DEV, v.version_id).data for v in history] == [
        f"version {i}".encode() for i in range(4)
    ]
    assert model.history(ADDR, ARCH) == ()


def test_roles_are_separate_contexts_at_one_address(model: ContextStore) -> None:
    model.put(ADDR, DEV, b"for developers")
    model.put(ADDR, ARCH, b"for architects")

    assert model.get(ADDR, DEV).data == b"for developers"
    assert model.get(ADDR, ARCH).data == b"for architects"
    assert sorted(model.list_dir(ADDR).roles) == [ARCH, DEV]


def test_get_version_of_another_context_is_not_found(model: ContextStore) -> None:
    other = parse(f"{AUTHORITY}/src/other.go")
    mine = model.put(ADDR, DEV, b"mine")
    model.put(other, DEV, b"other")

    with pytest.raises(NotFound):
        model.get_version(other, DEV, mine.version_id)
    with pytest.raises(NotFound):
        model.get_version(ADDR, ARCH, mine.version_id)


@pytest.mark.parametrize(
    ("address", "role", "error"),
    [
        (f"{AUTHORITY}/src/developer", DEV, InvalidAddress),  # a role name as a component
        (f"{AUTHORITY}/architect/x", DEV, InvalidAddress),
        (f"{AUTHORITY}/*^/src/auth.go", DEV, InvalidAddress),  # temporal: read-only
        (f"{AUTHORITY}/~~1/src/auth.go", DEV, InvalidAddress),
        (f"{AUTHORITY}/src/auth.go", "tester", NotFound),  # not a configured role
    ],
)
def test_bad_writes_are_refused_and_store_nothing(
    model: ContextStore, address: str, role: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        model.put(parse(address), role, b"x")

    assert model.store.statistics().versions == 0


def test_a_context_over_the_size_limit_is_refused(nodes: Nodes) -> None:
    _, model = nodes.new(overrides={"store.max_context_bytes": 1000})

    model.put(ADDR, DEV, b"x" * 1000)
    with pytest.raises(ContextTooLarge, match="max_context_bytes") as info:
        model.put(ADDR, DEV, b"x" * 1001)

    assert info.value.exit_code == 8
    assert len(model.history(ADDR, DEV)) == 1


# -- exact bytes ----------------------------------------------------------------------

RANDOM_5M = os.urandom(5 << 20)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes(range(256)) * 4, id="binary"),
        pytest.param(b"caf\xe9 \xff\xfe\xc3\x28 \xed\xa0\x80 end", id="invalid-utf8"),
        pytest.param(b"\0\0\0nul\0", id="nul"),
        pytest.param(b"---\r\nsummary: crlf\r\n---\r\nbody  \r\n\r\n\t\n", id="crlf-whitespace"),
        pytest.param("ünïcödé 🙂 text\n".encode(), id="utf8"),
        pytest.param(RANDOM_5M, id="5MiB-random"),
        pytest.param(b"all work and no play\n" * ((5 << 20) // 21), id="5MiB-text"),
    ],
)
def test_bytes_are_stored_exactly(node: Node, model: ContextStore, data: bytes) -> None:
    info = model.put(ADDR, DEV, data)

    model = node.reopen(model)  # no plaintext cache: this decrypts

    ctx = model.get(ADDR, DEV)
    assert ctx.data == data
    assert type(ctx.data) is bytes
    assert ctx.info.size == len(data) == info.size
    assert model.get(at(ADDR, "*~"), DEV).data == data
    assert model.get_version(ADDR, DEV, info.version_id).data == data


def test_compressible_content_is_stored_compressed(model: ContextStore) -> None:
    text = model.put(ADDR, DEV, b"all work and no play\n" * 50_000)
    noise = model.put(ADDR, ARCH, RANDOM_5M[: 1 << 20])

    assert len(model.store.envelope(text.version_id) or b"") < text.size // 20
    assert len(model.store.envelope(noise.version_id) or b"") >= noise.size


# -- time travel -------------------------------------------------------------------------


def test_temporal_segments_select_versions(model: ContextStore) -> None:
    v = [model.put(ADDR, DEV, f"v{i}".encode()) for i in range(1, 4)]

    def read(temporal: str) -> bytes:
        return model.get(at(ADDR, temporal), DEV).data

    assert read("*^") == b"v3"
    assert read("*~") == b"v1"
    assert read("~~0") == b"v3"
    assert read("~~1") == b"v2"
    assert read("~~2") == b"v1"
    assert read("^^0") == b"v1"
    assert read("^^1") == b"v2"
    assert read("^^2") == b"v3"
    for beyond in ("~~3", "^^3", "~~999"):
        with pytest.raises(NotFound):
            read(beyond)
    assert model.stat(at(ADDR, "~~1"), DEV) == v[1]


def test_temporal_counts_skip_deletions(model: ContextStore) -> None:
    model.put(ADDR, DEV, b"v1")
    model.delete(ADDR, DEV)
    model.put(ADDR, DEV, b"v2")

    assert model.get(at(ADDR, "~~1"), DEV).data == b"v1"
    assert model.get(at(ADDR, "^^1"), DEV).data == b"v2"
    model.delete(ADDR, DEV)
    with pytest.raises(NotFound):
        model.get(at(ADDR, "*^"), DEV)


def test_iso_time_reads_as_of_then(model: ContextStore) -> None:
    t0 = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    wall = FakeWall(t0)
    model._clock = HybridClock(wall=wall)
    model.put(ADDR, DEV, b"ten o'clock")
    wall.now = t0 + timedelta(seconds=10)
    model.put(ADDR, DEV, b"ten past")
    wall.now = t0 + timedelta(seconds=10, milliseconds=500)
    model.put(ADDR, DEV, b"half a second later")
    wall.now = t0 + timedelta(seconds=30)
    model.delete(ADDR, DEV)

    def as_of(second: int) -> bytes:
        when = (t0 + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return model.get(at(ADDR, when), DEV).data

    with pytest.raises(NotFound):
        as_of(-1)  # before the first save
    assert as_of(0) == b"ten o'clock"  # inclusive
    assert as_of(5) == b"ten o'clock"  # between two saves
    assert as_of(10) == b"ten past"  # the save at .500 is after 10:00:10.000
    assert as_of(11) == b"half a second later"
    assert as_of(29) == b"half a second later"
    with pytest.raises(NotFound):
        as_of(30)  # deleted then
    with pytest.raises(NotFound):
        as_of(3600)


# -- front matter and the cascade ---------------------------------------------------------

DOC = b"""---
summary: JWT validation for the public API
purpose: keep tokens honest
tags: [security, backend]
technologies: [go, jwt]
insights:
  - keys rotate daily
influences: [ucxl://claude:architect@bzzz:auth/src/session.go]
owner: alice
---
Tokens are validated against the rotating key set because ...
"""


def test_front_matter_is_parsed_and_bytes_kept(node: Node, model: ContextStore) -> None:
    model.put(ADDR, DEV, DOC)
    model = node.reopen(model)

    ctx = model.get(ADDR, DEV)
    fm = ctx.front_matter

    assert ctx.data == DOC
    assert fm.summary == "JWT validation for the public API"
    assert fm.purpose == "keep tokens honest"
    assert fm.tags == ("security", "backend")
    assert fm.technologies == ("go", "jwt")
    assert fm.insights == ("keys rotate daily",)
    assert fm.influences == ("ucxl://claude:architect@bzzz:auth/src/session.go",)
    assert fm.extra == {"owner": "alice"}
    assert fm.body == "Tokens are validated against the rotating key set because ...\n"


@pytest.mark.parametrize(
    "data",
    [
        b"no front matter at all",
        b"---\n- a list, not a mapping\n---\nbody",
        b"---\nsummary: [unclosed\n---\nbody",
        b"---\nsummary: x\n---\n\xff\xfe not utf-8",
        b"---\nsummary: never closed\n",
    ],
)
def test_odd_front_matter_gives_no_fields_and_no_error(model: ContextStore, data: bytes) -> None:
    model.put(ADDR, DEV, data)

    ctx = model.get(ADDR, DEV)

    assert ctx.data == data
    assert ctx.front_matter.summary == ""
    assert ctx.front_matter.tags == ()


def put_cascade(model: ContextStore) -> tuple[Address, Address, Address]:
    root = parse(AUTHORITY)
    src = parse(f"{AUTHORITY}/src")
    model.put(root, DEV, b"---\npurpose: P-root\ntags: [security]\ntechnologies: [go]\n---\n")
    model.put(src, DEV, b"---\nsummary: S-src\ntags: [backend, security]\n---\n")
    model.put(ADDR, DEV, b"---\nsummary: S-leaf\ntags: [jwt]\n---\nbody\n")
    return root, src, ADDR


def test_resolve_cascades_over_ancestors(model: ContextStore) -> None:
    root, src, leaf = put_cascade(model)

    view = model.resolve(leaf, DEV)

    assert view.sources == (root.key, src.key, leaf.key)
    assert view.fields["summary"] == "S-leaf"  # nearest wins
    assert view.fields["purpose"] == "P-root"  # inherited
    assert view.fields["tags"] == ["security", "backend", "jwt"]  # union, farthest first
    assert view.fields["technologies"] == ["go"]


def test_resolve_skips_ancestors_without_a_context(model: ContextStore) -> None:
    root = parse(AUTHORITY)
    model.put(root, DEV, b"---\npurpose: P-root\n---\n")
    model.put(ADDR, DEV, b"---\nsummary: S-leaf\n---\n")

    view = model.resolve(ADDR, DEV)

    assert view.sources == (root.key, ADDR.key)
    assert (view.fields["summary"], view.fields["purpose"]) == ("S-leaf", "P-root")


@pytest.mark.parametrize(("depth", "expected_sources"), [(0, 1), (1, 2), (2, 3), (8, 3)])
def test_resolve_depth_is_bounded(nodes: Nodes, depth: int, expected_sources: int) -> None:
    _, model = nodes.new(overrides={"store.cascade_depth": depth})
    root, src, leaf = put_cascade(model)

    view = model.resolve(leaf, DEV)

    assert view.sources == (root.key, src.key, leaf.key)[3 - expected_sources :]
    assert view.fields["purpose"] == ("P-root" if expected_sources == 3 else "")


def test_resolve_needs_the_context_itself(model: ContextStore) -> None:
    put_cascade(model)

    with pytest.raises(NotFound):
        model.resolve(ADDR.child("missing"), DEV)


def test_resolve_is_access_checked(model: ContextStore) -> None:
    put_cascade(model)

    with pytest.raises(AccessDenied):
        model.resolve(ADDR, DEV, caller_roles=[REV])
    assert model.resolve(ADDR, DEV, caller_roles=[ARCH]).fields["summary"] == "S-leaf"


# -- batches ----------------------------------------------------------------------------


def test_put_many_commits_the_good_items_and_reports_the_bad(nodes: Nodes) -> None:
    node, model = nodes.new(overrides={"store.max_context_bytes": 100})
    good = parse(f"{AUTHORITY}/a")
    seq = model.store.sequence()
    items = [
        BatchItem(good, DEV, b"first", label="a#1"),
        BatchItem(parse(f"{AUTHORITY}/developer"), DEV, b"x", label="named-like-a-role"),
        BatchItem(good, "tester", b"x", label="unknown-role"),
        BatchItem(parse(f"{AUTHORITY}/b"), DEV, b"x" * 101, label="too-big"),
        BatchItem(at(good, "~~1"), DEV, b"x", label="temporal"),
        BatchItem(good, DEV, b"second", label="a#2"),
        BatchItem(parse(f"{AUTHORITY}/c"), ARCH, b"third"),
    ]

    report = model.put_many(items)

    assert [label for label, _ in report.failed] == [
        "named-like-a-role",
        "unknown-role",
        "too-big",
        "temporal",
    ]
    reasons = dict(report.failed)
    assert "role name" in reasons["named-like-a-role"]
    assert "tester" in reasons["unknown-role"]
    assert "max_context_bytes" in reasons["too-big"]
    assert [(v.address, v.role) for v in report.committed] == [
        (good.key, DEV),
        (good.key, DEV),
        (f"{AUTHORITY.removeprefix('ucxl://')}/c", ARCH),
    ]
    first, second, _ = report.committed
    assert second.parents == (first.version_id,)  # one batch, still a chain
    assert model.store.sequence() == seq + 3
    model = node.reopen(model)
    assert model.get(good, DEV).data == b"second"
    assert model.get(parse(f"{AUTHORITY}/c"), ARCH).data == b"third"
    with pytest.raises(NotFound):
        model.get(parse(f"{AUTHORITY}/b"), DEV)


def test_put_many_continues_an_existing_history(model: ContextStore) -> None:
    before = model.put(ADDR, DEV, b"before")

    report = model.put_many([BatchItem(ADDR, DEV, b"batched")])

    assert report.failed == ()
    assert report.committed[0].parents == (before.version_id,)
    assert model.store.leaves(ADDR.key, DEV) == list(report.committed)


# -- identical saves -------------------------------------------------------------------


def test_a_save_of_the_head_bytes_stores_no_version(model: ContextStore) -> None:
    """An editor's save without changes, a copy or sync run again: the rule lives in
    the model, so it holds for every writer (mount, CLI, import). Expected: nothing
    stored, the head (and its time) returned; different bytes of the same size are a
    new version."""
    first = model.put(ADDR, DEV, b"same bytes")
    seq = model.store.sequence()

    again = model.save(ADDR, DEV, b"same bytes")

    assert (again.info, again.stored) == (first, False)
    assert model.put(ADDR, DEV, b"same bytes") == first
    assert model.history(ADDR, DEV) == (first,)
    assert model.store.sequence() == seq  # not even an empty change
    other = model.save(ADDR, DEV, b"same BYTES")
    assert other.stored
    assert [v.version_id for v in model.history(ADDR, DEV)] == [
        first.version_id,
        other.info.version_id,
    ]


def test_the_same_bytes_after_a_deletion_are_stored(model: ContextStore) -> None:
    model.put(ADDR, DEV, b"back again")
    model.delete(ADDR, DEV)

    saved = model.save(ADDR, DEV, b"back again")

    assert saved.stored
    assert [v.deleted for v in model.all_versions(ADDR, DEV)] == [False, True, False]
    assert model.get(ADDR, DEV).data == b"back again"


def test_a_save_that_changes_the_lifetime_is_stored(model: ContextStore) -> None:
    """A TTL is part of what a save says: the same bytes with a TTL, or without one
    on a context that has one, are a new version."""
    model.put(ADDR, DEV, b"kept")
    assert model.save(ADDR, DEV, b"kept", ttl=3600).stored
    assert model.save(ADDR, DEV, b"kept").stored  # permanent again
    assert not model.save(ADDR, DEV, b"kept").stored
    assert len(model.history(ADDR, DEV)) == 3


def test_a_node_without_the_key_stores_what_it_cannot_compare(nodes: Nodes) -> None:
    node, model = nodes.new(held=[DEV])
    model.put(ADDR, ARCH, b"sealed to architects")
    model = node.reopen(model)  # (the writer's own plaintext cache is gone)

    assert model.save(ADDR, ARCH, b"sealed to architects").stored
    assert len(model.history(ADDR, ARCH)) == 2


def test_put_many_reports_items_equal_to_their_head(model: ContextStore) -> None:
    other = parse(f"{AUTHORITY}/other")
    model.put(ADDR, DEV, b"unchanged")
    model.put(other, DEV, b"old")

    report = model.put_many(
        [BatchItem(ADDR, DEV, b"unchanged", label="a"), BatchItem(other, DEV, b"new", label="b")]
    )

    assert report.unchanged == ("a",)
    assert [v.address for v in report.committed] == [other.key]
    assert len(model.history(ADDR, DEV)) == 1
    assert len(model.history(other, DEV)) == 2


# -- access ----------------------------------------------------------------------------

SECRET = b"the launch codes are 0000"


def test_a_node_without_the_key_cannot_read_and_leaks_nothing(nodes: Nodes) -> None:
    node, model = nodes.new(held=[DEV])
    model.put(ADDR, ARCH, SECRET + b" (architects only)")
    model.put(ADDR, REV, SECRET + b" (reviewers)")
    model.put(ADDR, DEV, b"developer notes")
    model = node.reopen(model)

    assert model.held_roles() == {DEV}
    assert model.readable_roles(model.held_roles()) == {DEV}
    for role in (ARCH, REV):
        # The local caller holds what the node holds, so it has no reader role ...
        with pytest.raises(AccessDenied) as denied:
            model.get(ADDR, role)
        plaintext_free(denied.value, SECRET)
        # ... and a caller entitled to the role finds no key on this node.
        with pytest.raises(KeyMissing) as missing:
            model.get(ADDR, role, caller_roles=[ARCH])
        plaintext_free(missing.value, SECRET)
    assert model.get(ADDR, DEV).data == b"developer notes"
    assert model.statistics().denied == 4

    log = data_paths(node.data_dir)["audit"]
    assert SECRET not in log.read_bytes()
    refusals = [e for e in audit.read(log) if not e.allowed]
    assert [(e.role, e.address, e.reason) for e in refusals] == [
        (ARCH, ADDR.key, "caller holds no reader role"),
        (ARCH, ADDR.key, "node holds no key"),
        (REV, ADDR.key, "caller holds no reader role"),
        (REV, ADDR.key, "node holds no key"),
    ]
    assert fsck.check(model).ok


def test_a_caller_without_a_reader_role_is_denied(model: ContextStore) -> None:
    model.put(ADDR, ARCH, SECRET)
    model.put(ADDR, DEV, b"for developers")

    with pytest.raises(AccessDenied) as info:
        model.get(ADDR, ARCH, caller_roles=[DEV])
    assert type(info.value) is AccessDenied  # the caller's fault, not a missing key
    plaintext_free(info.value, SECRET)
    with pytest.raises(AccessDenied):
        model.get(ADDR, DEV, caller_roles=[])
    with pytest.raises(AccessDenied):
        model.get(ADDR, DEV, caller_roles=[REV])
    with pytest.raises(AccessDenied):
        model.get_version(ADDR, ARCH, model.stat(ADDR, ARCH).version_id, caller_roles=[REV])
    assert model.get(ADDR, ARCH, caller_roles=[ARCH]).data == SECRET
    assert model.get(ADDR, DEV, caller_roles=[DEV]).data == b"for developers"


def test_architect_reads_developer_contexts_through_its_own_key(nodes: Nodes) -> None:
    node, model = nodes.new(held=[ARCH])
    model.put(ADDR, DEV, b"developer notes")
    model.put(ADDR, REV, b"review notes")
    model = node.reopen(model)

    assert model.get(ADDR, DEV).data == b"developer notes"
    assert model.get(ADDR, REV, caller_roles=[ARCH]).data == b"review notes"
    slots = {slot.role for slot in model.store.slots(model.stat(ADDR, DEV).version_id)}
    assert slots == {DEV, ARCH}
    with pytest.raises(AccessDenied):
        model.get(ADDR, DEV, caller_roles=[DEV])  # entitled role, but ...
    assert model.readable_roles([ARCH]) == {ARCH, DEV, REV}


def test_every_access_decision_is_audited(node: Node, model: ContextStore) -> None:
    model.put(ADDR, DEV, b"notes")
    model.get(ADDR, DEV, caller_roles=[DEV], who="uid:1000")
    with pytest.raises(AccessDenied):
        model.get(ADDR, DEV, caller_roles=[REV], who="uid:1001")
    model = node.reopen(model)  # the chain resumes after a restart
    model.get(ADDR, DEV, caller_roles=[ARCH], who="uid:1002")

    log = data_paths(node.data_dir)["audit"]
    entries = audit.read(log)
    assert [(e.who, e.action, e.address, e.role, e.allowed) for e in entries] == [
        ("uid:1000", "read", ADDR.key, DEV, True),
        ("uid:1001", "read", ADDR.key, DEV, False),
        ("uid:1002", "read", ADDR.key, DEV, True),
    ]
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[1].reason == "caller holds no reader role"
    assert model.verify_audit().entries == 3
    assert audit.read(log, 2) == entries[1:]


def _audit_lines(model: ContextStore, node: Node) -> tuple[Path, list[bytes]]:
    model.put(ADDR, DEV, b"notes")
    for who in ("a", "b", "c", "d"):
        model.get(ADDR, DEV, who=who)
    node.close(model)
    log = data_paths(node.data_dir)["audit"]
    return log, log.read_bytes().splitlines(keepends=True)


def _forged(
    lines: list[bytes], start: int, *, legacy: bool = False, **changes: object
) -> list[bytes]:
    """What someone who can write the log but has no node key can do: change the
    entry at `start` and recompute every hash from there on (plain BLAKE2b, as the
    unkeyed format did), under `mac` or, with `legacy`, under the old name `hash`."""
    out = lines[:start]
    prev = json.loads(out[-1])["mac"] if out else audit.GENESIS
    for i, raw in enumerate(lines[start:]):
        body = json.loads(raw)
        body.pop("mac", None)
        body["prev"] = prev
        if i == 0:
            body.update(changes)
        prev = hashlib.blake2b(_canonical(body), digest_size=32).hexdigest()
        body["hash" if legacy else "mac"] = prev
        out.append(_canonical(body) + b"\n")
    return out


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ls: [ls[0], ls[1].replace(b'"who":"b"', b'"who":"x"'), *ls[2:]], "line 2: entry altered"),
        (lambda ls: [ls[0], ls[1].replace(b'"allowed":true', b'"allowed":false'), *ls[2:]], "line 2: entry altered"),
        (lambda ls: [ls[0], *ls[2:]], "line 2: chain broken"),
        (lambda ls: ls[1:], "line 1: chain broken"),
        (lambda ls: [ls[0], ls[2], ls[1], ls[3]], "line 2: chain broken"),
        (lambda ls: [*ls[:3], ls[3][:40]], "line 4: not an audit entry"),
        (lambda ls: [*ls, ls[3]], "line 5: chain broken"),
        (lambda ls: ls[:-1], "ends at entry 3 but its anchor says 4: entries were cut off"),
        (lambda ls: ls[:1], "ends at entry 1 but its anchor says 4"),
        (lambda ls: [], "ends at entry 0 but its anchor says 4"),
        (lambda ls: _forged(ls, 1, who="x"), "line 2: entry altered"),
        (lambda ls: _forged(ls, 0, legacy=True), "line 4: entry 4 is not the one the anchor names"),
        (lambda ls: _forged([*ls, ls[3]], 4, seq=5), "line 5: entry altered"),
        (lambda ls: _forged([*ls, ls[3]], 4, seq=5, legacy=True), "line 5: an unkeyed entry after the keyed chain began"),
    ],
    ids=[
        "edited-who", "edited-decision", "removed", "removed-first", "reordered", "truncated",
        "replayed", "cut-last", "cut-last-3", "emptied", "edited-and-rehashed",
        "rewritten-unkeyed", "forged-appended", "unkeyed-appended",
    ],
)  # fmt: skip
def test_audit_verify_detects_tampering(
    node: Node, model: ContextStore, edit: Any, message: str
) -> None:
    log, lines = _audit_lines(model, node)
    assert node.verify_audit() == audit.Verified(entries=4, legacy=0, anchored=4)

    log.write_bytes(b"".join(edit(lines)))

    with pytest.raises(Corrupt, match=message):
        node.verify_audit()
    node.expect_damage()  # the model may refuse a damaged audit log: not under test here


def test_an_unkeyed_log_in_place_of_a_keyed_one_fails(node: Node, model: ContextStore) -> None:
    """A node whose log began keyed (its anchor says so, here at entry 0) cannot be
    given a log in the old unkeyed format, whose hashes anyone can compute."""
    node.close(model)
    log = data_paths(node.data_dir)["audit"]
    log.write_bytes((Path(__file__).parent / "fixtures" / "audit-format1.log").read_bytes())

    with pytest.raises(Corrupt, match="line 1: an unkeyed entry after the keyed chain began"):
        node.verify_audit()
    node.expect_damage()


@pytest.mark.expect_warnings(
    audit_chain_broken(r"it is \d+ bytes shorter than this process left it"),
    # (the reopened process finds the anchored offset past the end, or inside a line:
    # which one depends on the lengths of the lines, so on the paths they name)
    audit_chain_broken(
        r"(?:it ends before entry 3, which the anchor names"
        r"|the line at byte \d+ is not an audit entry)"
    ),
)
def test_a_process_that_finds_the_log_cut_under_it_anchors_its_own_last_entry(
    node: Node, model: ContextStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A mount's daemon keeps the log open; someone cuts off entries it appended since
    the last anchor. Expected: its next append notices (the file is shorter than it
    left it), anchors its own last entry as evidence and logs an error; verify fails
    naming the anchor, and keeps failing after later processes append: they find the
    anchored entry gone, log it, and never move the anchor again."""
    model.put(ADDR, DEV, b"notes")
    model.get(ADDR, DEV)
    assert model.anchor_audit()
    for who in ("a", "b"):
        model.get(ADDR, DEV, who=who)  # entries 2 and 3: not anchored yet
    log = data_paths(node.data_dir)["audit"]
    log.write_bytes(log.read_bytes().splitlines(keepends=True)[0])

    model.get(ADDR, DEV, who="c")

    assert "does not continue its anchored chain" in caplog.text
    with pytest.raises(Corrupt, match="ends at entry 2 but its anchor says 3"):
        model.verify_audit()
    model = node.reopen(model)
    for who in ("d", "e", "f"):
        model.get(ADDR, DEV, who=who)
    node.close(model)  # would anchor entry 5 if it trusted the log
    with pytest.raises(Corrupt, match="line 3: entry 3 is not the one the anchor names"):
        node.verify_audit()
    assert [e.who for e in audit.read(log)] == ["local", "c", "d", "e", "f"]
    node.expect_damage()


def _anchor_table(node: Node) -> Any:
    """The store's `aux:audit` table, opened behind the model's back."""
    node.close_all()
    return lmdb.open(str(node.data_dir / "store"), max_dbs=64)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(
            "removed",
            "keyed entries but the store holds no anchor",
            marks=pytest.mark.expect_warnings(
                audit_chain_broken("it holds keyed entries but the store has no anchor for it")
            ),
        ),
        pytest.param(
            "altered",
            "does not authenticate",
            marks=pytest.mark.expect_warnings(
                audit_chain_broken(
                    "the audit log's anchor in the store does not authenticate"
                    r" \(altered, or not made with this node's key\)"
                )
            ),
        ),
    ],
)
def test_a_removed_or_altered_anchor_fails_verify_and_stays_failing(
    node: Node, model: ContextStore, damage: str, message: str
) -> None:
    _audit_lines(model, node)
    env = _anchor_table(node)
    try:
        table = env.open_db(b"aux:" + audit.ANCHOR_TABLE)
        with env.begin(write=True) as txn:
            if damage == "removed":
                assert txn.delete(audit.ANCHOR_KEY, db=table)
            else:
                raw = bytearray(txn.get(audit.ANCHOR_KEY, db=table))
                raw[12] ^= 0x01  # the seq: as if entries before it were all there was
                txn.put(audit.ANCHOR_KEY, bytes(raw), db=table)
    finally:
        env.close()

    with pytest.raises(Corrupt, match=message):
        node.verify_audit()
    model = node.open()
    model.get(ADDR, DEV)
    node.close(model)  # does not write an anchor over the evidence
    with pytest.raises(Corrupt, match=message):
        node.verify_audit()
    # The store's seal names the anchored entry: fsck reports the store's side too.
    problems = node.fsck().problems
    assert any(("no audit anchor" if damage == "removed" else message) in p for p in problems)
    node.expect_damage()


def test_the_unanchored_tail_of_a_process_that_died_can_be_cut_unnoticed(
    node: Node, model: ContextStore
) -> None:
    """The documented window (ARCHITECTURE.md): entries appended after the newest
    anchor by a process that then died without anchoring them (SIGKILL, power loss)
    can be cut off while no process has the log open, and verify passes; the next
    process that opens the log checks it from the anchor on and anchors it at close,
    and from then on a cut fails verify."""
    _audit_lines(model, node)  # 4 entries, anchored at close
    died = subprocess.run(
        [sys.executable, "-c", DIES_AFTER_TWO_READS, str(node.data_dir)],
        env=cli_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert died.returncode == 0, died.stderr.decode()
    log = data_paths(node.data_dir)["audit"]
    lines = log.read_bytes().splitlines(keepends=True)
    assert node.verify_audit() == audit.Verified(entries=6, legacy=0, anchored=4)

    log.write_bytes(b"".join(lines[:5]))

    assert node.verify_audit() == audit.Verified(entries=5, legacy=0, anchored=4)
    node.close(node.open())
    assert node.verify_audit() == audit.Verified(entries=5, legacy=0, anchored=5)
    log.write_bytes(b"".join(lines[:4]))
    with pytest.raises(Corrupt, match="ends at entry 4 but its anchor says 5"):
        node.verify_audit()
    node.expect_damage()


DIES_AFTER_TWO_READS = f"""
import os, sys
from slurpfs import config
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import ContextStore
from slurpfs.ucxl import parse

cfg = config.load(None, {{"HOME": "/nonexistent"}}, {{"node.data_dir": sys.argv[1]}})
model = ContextStore.open(cfg, kdf=KdfParams.weak())
for _ in range(2):
    model.get(parse({str(ADDR)!r}), {DEV!r})
os._exit(0)  # no close: the entries are never anchored
"""


# -- tampering ---------------------------------------------------------------------------


def assert_refused(
    node: Node, address: Address, role: str, error: type[Corrupt]
) -> tuple[Corrupt, fsck.FsckReport]:
    """A fresh model refuses the version with `error`, never returns data; fsck reports it."""
    model = node.open()
    try:
        with pytest.raises(error) as info:
            model.get(address, role)
        plaintext_free(info.value, SECRET)
        assert model.statistics().corrupt == 1
        report = fsck.check(model)
    finally:
        node.close(model)
    assert not report.ok
    entries = audit.read(data_paths(node.data_dir)["audit"])
    assert [(e.action, e.address, e.allowed) for e in entries if e.action == "verify"] == [
        ("verify", address.key, False)
    ]
    return info.value, report


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize("where", ["magic", "header", "ciphertext", "signature", "truncated"])
def test_a_flipped_byte_in_a_stored_envelope_is_never_served(
    node: Node, model: ContextStore, where: str
) -> None:
    info = model.put(ADDR, DEV, SECRET)
    raw = model.store.envelope(info.version_id)
    assert raw is not None
    ciphertext = env.Envelope.decode(raw).ciphertext
    position = {
        "magic": 0,
        "header": 20,
        "ciphertext": raw.index(ciphertext) + len(ciphertext) // 2,
        "signature": len(raw) - 1,
    }
    tampered = raw[:-7] if where == "truncated" else flip(raw, position[where])

    with raw_store(node) as (txn, dbs):
        txn.put(info.version_id, tampered, db=dbs[s.DB_ENVELOPES])

    _, report = assert_refused(node, ADDR, DEV, Corrupt)
    assert any(info.short_id in p for p in report.problems)


def rekey(txn: Any, dbs: dict[bytes, Any], old: VersionRecord, envelope: bytes) -> bytes:
    """Store `envelope` in place of version `old` under its own content address."""
    new_id = env.blake2b_256(envelope)
    slots = [
        (bytes(k), bytes(v)) for k, v in txn.cursor(db=dbs[s.DB_SLOTS]) if k[:32] == old.version_id
    ]
    for key, value in slots:
        txn.delete(key, db=dbs[s.DB_SLOTS])
        txn.put(new_id + key[32:], value, db=dbs[s.DB_SLOTS])
    txn.delete(old.version_id, db=dbs[s.DB_ENVELOPES])
    txn.delete(old.version_id, db=dbs[s.DB_META])
    txn.put(new_id, envelope, db=dbs[s.DB_ENVELOPES])
    moved = VersionRecord(
        new_id, old.address, old.role, old.parents, old.hlc, old.author, old.size, old.deleted
    )
    txn.put(new_id, moved.pack(), db=dbs[s.DB_META])
    txn.delete(
        s.history_key(old.address, old.role, old.hlc, old.author, old.version_id),
        db=dbs[s.DB_HISTORY],
    )
    txn.put(
        s.history_key(old.address, old.role, old.hlc, old.author, new_id), b"", db=dbs[s.DB_HISTORY]
    )
    txn.put(s.context_key(old.address, old.role), new_id, db=dbs[s.DB_LEAVES])
    return new_id


@pytest.mark.parametrize(
    ("where", "error"),
    [("ciphertext", CiphertextTampered), ("nonce", BadSignature)],
)
def test_a_tampered_envelope_under_its_new_content_address_fails_authentication(
    node: Node, model: ContextStore, where: str, error: type[Corrupt]
) -> None:
    """Even with every index consistently rewritten, the signature layer catches it."""
    info = model.put(ADDR, DEV, SECRET)
    raw = model.store.envelope(info.version_id)
    assert raw is not None
    decoded = env.Envelope.decode(raw)
    offset = (
        raw.index(decoded.ciphertext) + 3
        if where == "ciphertext"
        else raw.index(decoded.header.nonce)
    )

    with raw_store(node) as (txn, dbs):
        rekey(txn, dbs, info, flip(raw, offset))

    assert_refused(node, ADDR, DEV, error)


def test_forged_key_slots_fail_authentication(node: Node, model: ContextStore) -> None:
    info = model.put(ADDR, DEV, SECRET)
    publics = {r: model.keyring.current_public(r) for r in (DEV, ARCH)}

    with raw_store(node) as (txn, dbs):
        for role, pub in publics.items():
            forged = SealedBox(PublicKey(pub.public)).encrypt(os.urandom(32))
            txn.put(s.slot_key(info.version_id, role, pub.generation), forged, db=dbs[s.DB_SLOTS])
            # without the node-local slots, the forged SealedBox slots are all there is
            txn.delete(s.slot_key(info.version_id, role, pub.generation), db=dbs[s.DB_LOCAL_SLOTS])

    assert_refused(node, ADDR, DEV, AuthenticationFailed)


def test_forged_key_slots_beside_intact_local_slots_read_but_fsck_reports(
    node: Node, model: ContextStore
) -> None:
    info = model.put(ADDR, DEV, SECRET)
    pub = model.keyring.current_public(DEV)
    with raw_store(node) as (txn, dbs):
        forged = SealedBox(PublicKey(pub.public)).encrypt(os.urandom(32))
        txn.put(s.slot_key(info.version_id, DEV, pub.generation), forged, db=dbs[s.DB_SLOTS])
    reopened = node.open()
    # The node-local slot still opens the real data key, and the AEAD proves the content.
    assert reopened.get(ADDR, DEV).data == SECRET
    report = fsck.check(reopened)
    assert any("failed" in p or "authentic" in p.lower() for p in report.problems), report.problems


def test_damaged_local_slots_and_tags_fall_back_to_the_full_check(
    node: Node, model: ContextStore
) -> None:
    info = model.put(ADDR, DEV, SECRET)
    with raw_store(node) as (txn, dbs):
        for role in (DEV, ARCH):
            gen = model.keyring.current_public(role).generation
            txn.put(
                s.slot_key(info.version_id, role, gen), os.urandom(72), db=dbs[s.DB_LOCAL_SLOTS]
            )
        txn.put(info.version_id, os.urandom(16), db=dbs[s.DB_VERIFIED])
    reopened = node.open()
    assert reopened.get(ADDR, DEV).data == SECRET  # via the signature and the SealedBox slot
    assert reopened.statistics().corrupt == 0


def test_metadata_disagreeing_with_the_signed_header_is_corrupt(
    node: Node, model: ContextStore
) -> None:
    info = model.put(ADDR, DEV, SECRET)
    lying = VersionRecord(
        info.version_id, info.address, info.role, info.parents, info.hlc, info.author,
        info.size + 1, info.deleted,
    )  # fmt: skip

    with raw_store(node) as (txn, dbs):
        txn.put(info.version_id, lying.pack(), db=dbs[s.DB_META])

    error, report = assert_refused(node, ADDR, DEV, Corrupt)
    assert "metadata" in str(error)
    assert any("metadata" in p for p in report.problems)


@pytest.mark.parametrize(
    ("victim", "victim_role"),
    [(parse(f"{AUTHORITY}/src/other.go"), DEV), (ADDR, REV)],
    ids=["other-address", "other-role"],
)
def test_an_envelope_replayed_under_another_context_is_refused(
    node: Node, model: ContextStore, victim: Address, victim_role: str
) -> None:
    source = model.put(ADDR, DEV, SECRET)
    model.put(victim, victim_role, b"what should be here")

    with raw_store(node) as (txn, dbs):
        # The other context's head now names the source's version (envelope, metadata
        # and slots are all authentic: only the place is wrong).
        txn.put(s.context_key(victim.key, victim_role), source.version_id, db=dbs[s.DB_LEAVES])

    assert_refused(node, victim, victim_role, Corrupt)


def test_an_envelope_replayed_into_another_history_is_refused(
    node: Node, model: ContextStore
) -> None:
    victim = parse(f"{AUTHORITY}/src/other.go")
    source = model.put(ADDR, DEV, SECRET)
    model.put(victim, DEV, b"what should be here")

    with raw_store(node) as (txn, dbs):
        key = s.history_key(victim.key, DEV, 0, source.author, source.version_id)
        txn.put(key, b"", db=dbs[s.DB_HISTORY])  # hlc 0: the victim's "first" version

    assert_refused(node, at(victim, "*~"), DEV, Corrupt)


def test_a_relabelled_metadata_record_is_refused(node: Node, model: ContextStore) -> None:
    victim = parse(f"{AUTHORITY}/src/other.go")
    source = model.put(ADDR, DEV, SECRET)
    model.put(victim, DEV, b"what should be here")
    relabelled = VersionRecord(
        source.version_id, victim.key, DEV, source.parents, source.hlc, source.author,
        source.size, source.deleted,
    )  # fmt: skip

    with raw_store(node) as (txn, dbs):
        txn.put(source.version_id, relabelled.pack(), db=dbs[s.DB_META])
        txn.put(s.context_key(victim.key, DEV), source.version_id, db=dbs[s.DB_LEAVES])

    error, _ = assert_refused(node, victim, DEV, EnvelopeMisplaced)
    assert ADDR.key in str(error)


def test_a_lost_store_is_corrupt_not_a_fresh_empty_one(node: Node, model: ContextStore) -> None:
    """The LMDB store of an initialised node is gone (deleted, a bad restore).
    Expected: opening fails with Corrupt naming the store (exit 5), rather than
    quietly starting an empty store that fsck would call clean."""
    model.put(ADDR, DEV, b"kept")
    node.close_all()
    store = data_paths(model.config.data_dir)["store"]
    for name in ("data.mdb", "lock.mdb"):
        (store / name).unlink()
    with pytest.raises(Corrupt, match="store is missing"):
        node.open()
    assert not (store / "data.mdb").exists()
    node.expect_damage()


def test_a_torn_audit_log_tail_is_a_clear_error(node: Node, model: ContextStore) -> None:
    log, lines = _audit_lines(model, node)
    log.write_bytes(b"".join(lines)[:-25])  # power loss in the middle of an append

    with pytest.raises(Corrupt, match="audit log .* last entry is damaged"):
        node.open()
    node.expect_damage()


def test_a_full_disk_refuses_the_access_and_keeps_the_audit_chain(small_disk: Path) -> None:
    # Appends go on until the disk is full (the first may still fit the last page);
    # then each refuses with ENOSPC and leaves no fragment of a line behind, so once
    # there is room again the chain goes on and verifies whole.
    path = small_disk / "audit.log"
    log = audit.AuditLog(path, audit_keys(), MemoryAnchors())

    def record() -> None:
        log.record(who="uid 0", action="read", address="a:r@p:t/x", role="developer", allowed=True)

    def until_refused() -> tuple[int, AuditUnavailable]:
        for n in range(1000):
            try:
                record()
            except AuditUnavailable as exc:
                return n, exc
        raise AssertionError("a full disk took 1,000 entries")

    record()
    fill(small_disk / "filler")
    fitted, refusal = until_refused()
    assert refusal.errno == errno.ENOSPC
    assert "access refused until it can be recorded" in str(refusal)
    assert path.read_bytes().endswith(b"}\n")
    (small_disk / "filler").unlink()
    record()
    log.anchor()
    assert log.verify().entries == 1 + fitted + 1
    log.close()


def test_processes_sharing_the_audit_log_keep_one_chain(node: Node, model: ContextStore) -> None:
    """A mount's daemon keeps its model (and audit log) open while `slurpfs put` and
    `slurpfs get`, other processes, append to the same log. Expected: each process
    continues the chain from the other's last entry, so the entries are numbered
    1..N in order and `audit verify` passes (before, each process extended its own
    idea of the tail and the chain forked)."""
    model.put(ADDR, DEV, b"one")
    model.get(ADDR, DEV)
    for command in (["put", str(ADDR), "--role", DEV, "-"], ["get", str(ADDR), "--role", DEV]):
        done = subprocess.run(
            [sys.executable, "-m", "slurpfs.cli", *command, "--data", str(node.data_dir)],
            env=cli_env(),
            input=b"two",
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        model.get(ADDR, DEV)  # the long-lived process appends after the other one
    log = data_paths(model.config.data_dir)["audit"]
    entries = audit.read(log)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert [(e.who, e.action) for e in entries] == [
        ("local", "read"),
        ("local", "write"),
        ("local", "read"),
        ("local", "read"),
        ("local", "read"),
    ]
    # Each process anchored what it knew when it closed (the CLI) or was asked to
    # (the daemon, at its periodic sync): the anchor only moves forward.
    assert model.verify_audit() == audit.Verified(entries=5, legacy=0, anchored=4)
    assert model.anchor_audit()
    assert not model.anchor_audit()  # nothing new
    assert model.verify_audit() == audit.Verified(entries=5, legacy=0, anchored=5)
