"""The node's health checks (`slurpfs.health`) and ``.slurp/health`` (ops-level, real store).

The HTTP endpoints report the same checks; their tests are in test_http.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import MemoryAnchors, Nodes, audit_chain_broken, audit_keys
from fsutil import OpsHarness, checked_ops, fill

from slurpfs import audit, health
from slurpfs.errors import AuditUnavailable
from slurpfs.fs.ops import Operations
from slurpfs.health import FAIL, OK, WARN, Check
from slurpfs.index import SearchService
from slurpfs.model import ContextStore

NAMES = ["store", "mount", "search", "audit", "disk"]


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


async def health_file(fs: OpsHarness) -> list[str]:
    return (await fs.read(".slurp/health")).decode().splitlines()


async def test_a_fresh_mount_is_ready_and_says_search_is_opening(
    fs: OpsHarness, ops: Operations
) -> None:
    checks = ops.health.checks()

    assert [c.name for c in checks] == NAMES
    status = {c.name: c.status for c in checks}
    assert status == {"store": OK, "mount": OK, "search": WARN, "audit": OK, "disk": OK}
    assert health.overall(checks) == WARN
    assert health.ready(checks)
    lines = await health_file(fs)
    assert lines[0] == "ok, with warnings"
    assert [line.split(":")[0] for line in lines[1:]] == NAMES
    assert lines[3] == "search: warn - opening the search indexes"
    assert lines[1].startswith("store: ok - open: 0 versions; ")


async def test_search_is_ok_once_attached_and_fails_when_it_could_not_open(
    fs: OpsHarness, ops: Operations, model: ContextStore
) -> None:
    with SearchService.open(model) as service:
        ops.search.attach(service)
        search = by_name(ops.health.checks())["search"]
        assert search.status == OK
        assert search.detail.startswith("sqlite: 0 documents in 3 role indexes")  # the default
        assert health.overall(ops.health.checks()) == OK
    ops.search.unavailable("search is unavailable on this mount: broken index")

    search = by_name(ops.health.checks())["search"]

    assert search == Check("search", FAIL, "search is unavailable on this mount: broken index")
    assert health.overall(ops.health.checks()) == FAIL
    assert health.ready(ops.health.checks())  # the mount still serves files
    assert (await health_file(fs))[0] == "unhealthy"


async def test_shutting_down_is_not_ready(fs: OpsHarness, ops: Operations) -> None:
    ops.stopping = True

    checks = ops.health.checks()

    assert by_name(checks)["mount"] == Check("mount", FAIL, "shutting down")
    assert not health.ready(checks)
    assert "mount: FAILING - shutting down" in await health_file(fs)


def test_disk_check_fails_below_the_configured_free_space(nodes: Nodes) -> None:
    free = os.statvfs(nodes.new("roomy")[0].data_dir)
    available = free.f_bavail * free.f_frsize
    _, model = nodes.new("strict", overrides={"health.min_free_bytes": available * 2 + (1 << 40)})
    with checked_ops(model) as ops:
        disk = by_name(ops.health.checks())["disk"]

    assert disk.status == FAIL
    assert "under the data directory; health.min_free_bytes is " in disk.detail
    assert by_name(ops.health.checks())["store"].ok  # ready: files are still served


def test_disk_check_of_a_missing_directory_fails(tmp_path: Path) -> None:
    check = health.disk_check(tmp_path / "gone", 0)

    assert check.status == FAIL
    assert "No such file or directory" in check.detail


def test_store_check_fails_once_the_store_is_closed(nodes: Nodes) -> None:
    node, model = nodes.new()
    assert health.store_check(model).ok
    node.close(model)

    check = health.store_check(model)

    assert check.status == FAIL
    assert check.detail.startswith("the store does not answer: ")


def test_audit_check_fails_while_entries_cannot_be_written(small_disk: Path) -> None:
    # A full disk: the refused append is reported until an append works again.
    path = small_disk / "audit.log"
    log = audit.AuditLog(path, audit_keys(), MemoryAnchors())

    def record() -> None:
        log.record(who="uid 0", action="read", address="a:r@p:t/x", role="developer", allowed=True)

    def until_refused() -> AuditUnavailable:
        for _ in range(1000):  # the first appends may still fit the last page
            try:
                record()
            except AuditUnavailable as exc:
                return exc
        raise AssertionError("a full disk took 1,000 entries")

    record()
    assert log.problem() is None
    fill(small_disk / "filler")
    refused = until_refused()
    assert refused.errno == errno.ENOSPC
    assert log.problem() == str(refused)
    (small_disk / "filler").unlink()
    record()
    assert log.problem() is None
    log.close()


def test_audit_check_fails_when_the_log_was_moved_or_replaced(
    model: ContextStore, tmp_path: Path
) -> None:
    path = model.config.data_dir / "audit.log"  # (created when the store opens)
    assert health.audit_check(model) == Check("audit", OK, "the last entry was written")
    moved = tmp_path / "rotated.log"
    path.rename(moved)

    gone = health.audit_check(model)
    path.write_bytes(b"")
    replaced = health.audit_check(model)
    path.unlink()
    moved.rename(path)  # back, for the teardown fsck

    assert gone.status == replaced.status == FAIL
    assert "removed while in use" in gone.detail
    assert "replaced while in use" in replaced.detail
    assert health.audit_check(model).ok


@pytest.mark.expect_warnings(audit_chain_broken("it ends before entry 3, which the anchor names"))
def test_audit_check_fails_once_the_log_is_found_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    keys, anchors = audit_keys(), MemoryAnchors()
    log = audit.AuditLog(path, keys, anchors)
    for n in range(3):
        log.record(
            who="uid 0", action="read", address=f"a:r@p:t/{n}", role="developer", allowed=True
        )
    assert log.anchor()
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # the anchored last entry cut off

    reopened = audit.AuditLog(path, keys, anchors)

    problem = reopened.problem()
    assert problem is not None
    assert "ends before entry 3, which the anchor names" in problem, problem
    reopened.close()
