"""Rebalancing's pure parts: who placement counts, the HELD and HAS frames, and how the
daemon shows what its replication worker reports (``replication`` health check,
``.slurp/peers``, status lines). The moves themselves are tested with real
processes in tests/test_cluster_scale.py."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from slurpfs.config import loads
from slurpfs.errors import Corrupt
from slurpfs.health import FAIL, OK, WARN
from slurpfs.metrics import Metrics
from slurpfs.net.placement import Placement
from slurpfs.net.rebalance import (
    Held,
    decode_has_answer,
    decode_held,
    effective_members,
    encode_has_answer,
    encode_held,
    placement_digest,
)
from slurpfs.service.replication import ReplicationClient, render_peers_table
from slurpfs.service.wire import Message

NODES = [bytes([i]) * 32 for i in range(1, 10)]  # nine
ME = NODES[0]


def test_a_member_down_past_down_after_is_left_out_and_one_down_briefly_is_not() -> None:
    down = {NODES[1]: 100.0, NODES[2]: 158.0}
    counted, frozen = effective_members(NODES, ME, down, now=160.0, down_after=10.0)
    assert not frozen
    assert NODES[1] not in counted
    assert NODES[2] in counted
    assert len(counted) == len(NODES) - 1


def test_with_a_quarter_of_the_members_down_nobody_is_left_out() -> None:
    down: dict[bytes, float | None] = {n: 0.0 for n in NODES[1:4]}  # 3 of 9
    down[NODES[4]] = None  # up
    counted, frozen = effective_members(NODES, ME, down, now=1000.0, down_after=10.0)
    assert frozen
    assert counted == tuple(sorted(NODES))


def test_nobody_down_counts_everyone_and_is_not_frozen() -> None:
    up: dict[bytes, float | None] = {n: None for n in NODES[1:]}
    assert effective_members(NODES, ME, up, now=0.0, down_after=1.0) == (tuple(NODES), False)


def test_held_round_trips_and_a_bad_bitmap_is_refused() -> None:
    held = Held(b"d" * 16, 1234, 5, 4096, frozenset({0, 7, 8, 4095}))
    back = decode_held(encode_held(held))
    assert back == held
    assert decode_held(encode_held(Held(b"x" * 16, 0, 0, 13, frozenset({12})))).complete == {12}
    with pytest.raises(Corrupt):
        decode_held(encode_held(held)[:-1])
    with pytest.raises(Corrupt):
        decode_held(b"short")


def test_has_answers_round_trip_and_a_wrong_length_is_refused() -> None:
    flags = [True, False, True, True, False, False, False, False, True]
    assert decode_has_answer(encode_has_answer(flags), len(flags)) == flags
    with pytest.raises(Corrupt):
        decode_has_answer(encode_has_answer(flags), 20)


def test_the_placement_digest_names_the_members_counted() -> None:
    five = Placement.compute(NODES[:5], 2, 64, b"log")
    four = Placement.compute(NODES[:4], 2, 64, b"log")
    assert placement_digest(b"log", five) == placement_digest(b"log", five)
    assert placement_digest(b"log", five) != placement_digest(b"log", four)
    assert placement_digest(b"log", five) != placement_digest(b"other", five)


# -- what the daemon shows ------------------------------------------------------------------


def rebalance(**fields: Any) -> dict[str, Any]:
    base = {
        "placement": "ab" * 16, "frozen": False, "left_out": 0, "holding": 1638,
        "lacking": 0, "surplus": 0, "under_replicated": 0, "under_replicated_partitions": 0,
        "fetched": 10, "fetched_bytes": 40960, "dropped": 3, "fetch_failures": 0,
    }  # fmt: skip
    return base | fields


def client(report: dict[str, Any]) -> ReplicationClient:
    async def nothing() -> None:
        return None

    made = ReplicationClient(loads(""), None, nothing)
    made.state = "running"
    made.report.update(report)
    return made


def peer(name: str, state: str, bodies: int | None) -> dict[str, Any]:
    return {"node_id": name * 8, "name": name, "state": state, "bodies": bodies}


def test_the_replication_check_fails_while_addresses_are_short_of_r_copies() -> None:
    short = client({"bodies": {"copies": 9, "caches": 1}, "under_replicated": 4,
                    "rebalance": rebalance(under_replicated=4, under_replicated_partitions=3,
                                           left_out=1)})  # fmt: skip
    check = short.check_replication()
    assert check.status == FAIL
    assert "4 addresses" in check.detail
    assert "1 members down" in check.detail


def test_the_replication_check_warns_while_bodies_move_and_is_ok_after() -> None:
    moving = client({"bodies": {"copies": 9, "caches": 0}, "under_replicated": 0,
                     "rebalance": rebalance(lacking=2)})  # fmt: skip
    assert moving.check_replication().status == WARN
    done = client({"bodies": {"copies": 9, "caches": 2}, "under_replicated": 0,
                   "rebalance": rebalance()})  # fmt: skip
    check = done.check_replication()
    assert check.status == OK
    assert "9 copies and 2 caches" in check.detail
    assert client({}).check_replication().status == WARN  # no report yet


def test_peers_shows_body_counts_and_under_replicated_addresses() -> None:
    shown = client({"bodies": {"copies": 9, "caches": 1}, "under_replicated": 2,
                    "rebalance": rebalance(under_replicated=2, surplus=1),
                    "peers": [peer("a", "me", 9), peer("b", "up", 11), peer("c", "down", None)]})  # fmt: skip
    text = shown.render()
    assert "bodies: 9 copies, 1 caches; under-replicated addresses: 2" in text
    assert "moving: 0 partitions to fetch here, 1 to hand over" in text
    header, *rows = text.splitlines()[2:]
    assert header.split()[-1] == "BODIES"
    assert [r.split()[-1] for r in rows] == ["9", "11", "-"]
    snapshot = shown.snapshot()
    assert snapshot["bodies"] == {"copies": 9, "caches": 1}
    assert snapshot["under_replicated"] == 2
    shown.metrics = Metrics(process=False)
    shown.report["under_replicated"] = 3
    deliver_status(shown)
    scraped = shown.metrics.render().decode()
    assert "slurpfs_replication_under_replicated 3.0" in scraped
    assert 'slurpfs_replication_bodies{kind="cache"} 1.0' in scraped
    lines = shown.status_lines()
    assert lines["task_replication_under_replicated"] == 3
    assert lines["task_replication_body_copies"] == 9
    # Before the worker reports bodies: the table as before, no body line.
    assert "bodies:" not in render_peers_table({"peers": [peer("a", "me", None)]})


def deliver_status(made: ReplicationClient) -> None:
    """Deliver the client's own report again as a worker ``status`` notice."""
    trio.run(made.handle, Message("status", dict(made.report)))


def test_bodies_dropped_are_shown_by_cause_with_the_daemons_own_evictions() -> None:
    shown = client({"bodies": {"copies": 9, "caches": 1}, "under_replicated": 0,
                    "rebalance": rebalance(dropped=5),
                    "dropped": {"moved": 5, "handed_off": 7, "cache_evicted": 1}})  # fmt: skip
    shown.evicted_here = lambda: 2  # the daemon's reads evicted two caches
    assert shown.snapshot()["dropped"] == {"moved": 5, "handed_off": 7, "cache_evicted": 3}
    assert "dropped: 5 moved to their new holders, 7 handed off to their holders, 3 caches" \
        " evicted" in shown.render()  # fmt: skip
    lines = shown.status_lines()
    assert lines["task_replication_bodies_dropped_moved"] == 5
    assert lines["task_replication_bodies_dropped_handed_off"] == 7
    assert lines["task_replication_bodies_dropped_cache_evicted"] == 3
    shown.metrics = Metrics(process=False)
    shown.metrics.add_statistics(shown.status_lines)
    scraped = shown.metrics.render().decode()
    assert "slurpfs_task_replication_bodies_dropped_handed_off_total 7.0" in scraped
    # A worker that reports no drops yet (an older one): no line, no number made up.
    assert client({}).snapshot()["dropped"] is None
