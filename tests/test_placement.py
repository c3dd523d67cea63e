"""Placement: partitions of addresses and their holders by rendezvous hashing."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from slurpfs.net.placement import (
    DEFAULT_PARTITIONS,
    Move,
    Placement,
    _best,
    holders,
    moves,
    partition_of,
    ranking,
    weight,
)
from slurpfs.ucxl import parse

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PARTITIONS = 64  # small tables keep the properties fast; the code does not care

node_ids = st.binary(min_size=32, max_size=32)
member_sets = st.lists(node_ids, min_size=1, max_size=30, unique=True)
factors = st.one_of(st.none(), st.integers(min_value=1, max_value=6))


def node(i: int) -> bytes:
    return bytes([i]) * 32


def fmix64(k: int) -> int:
    """MurmurHash3's fmix64, written out from its definition."""
    mask = (1 << 64) - 1
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & mask
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & mask
    return k ^ (k >> 33)


def blake64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# ---- the hashes every node must agree on ------------------------------------------


def test_a_partition_is_the_top_bits_of_the_address_keys_hash() -> None:
    key = "claude:architect@bzzz:auth/src/auth.go"
    h = blake64(b"slurpfs/partition/v1\0" + key.encode())

    assert partition_of(key) == h >> 52  # 4096 partitions: the first 12 bits
    assert partition_of(key, 256) == h >> 56
    assert partition_of(key, 1) == 0
    assert partition_of(key, 1000) == (h * 1000) >> 64


def test_an_address_in_any_spelling_lands_in_one_partition() -> None:
    """The hashed form is `Address.key`: NFC, no scheme, no temporal segment."""
    plain = parse("ucxl://claude:architect@bzzz:auth/caf\u00e9/notes")
    temporal = parse("ucxl://claude:architect@bzzz:auth/~~1/caf\u00e9/notes")
    decomposed = parse("ucxl://claude:architect@bzzz:auth/cafe\u0301/notes")

    assert plain.key == temporal.key == decomposed.key
    assert partition_of(plain.key) == partition_of(decomposed.key)


def test_weights_follow_the_documented_formula() -> None:
    for member in (node(1), node(200), b"\x07" * 32):
        seed = blake64(b"slurpfs/placement-node/v1\0" + member)
        for p in (0, 1, 4095, 70_000):
            key = blake64(b"slurpfs/placement-partition/v1\0" + p.to_bytes(4, "big"))
            assert weight(member, p) == fmix64(seed ^ key)


def test_known_answers_never_change() -> None:
    """Pinned outputs: any change here would re-place every body of a running cluster."""
    ids = [node(i) for i in range(1, 6)]
    assert partition_of("alice:dev@proj:task/notes") == 1647
    assert partition_of("a:b@c:d") == 3915
    assert weight(ids[0], 0) == 2042300911463220695
    assert weight(ids[1], 4095) == 6228013704132644481
    assert holders(0, ids, 3) == (ids[2], ids[1], ids[3])
    assert holders(4095, ids, 3) == (ids[0], ids[1], ids[4])
    assert holders(1234, ids, None) == (ids[3], ids[0], ids[4], ids[2], ids[1])


# ---- holders ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(member_sets, factors, st.randoms(use_true_random=False))
def test_placement_is_the_same_in_any_member_order(
    members: list[bytes], factor: int | None, rnd: random.Random
) -> None:
    shuffled = members[:]
    rnd.shuffle(shuffled)
    a = Placement.compute(members, factor, PARTITIONS)
    b = Placement.compute(shuffled + members[:2], factor, PARTITIONS)  # duplicates too

    assert a == b
    for p in range(PARTITIONS):
        assert a.holders(p) == holders(p, shuffled, factor)  # the table = one partition at a time


@settings(max_examples=60, deadline=None)
@given(member_sets, factors)
def test_a_partition_has_factor_distinct_holders_or_every_member(
    members: list[bytes], factor: int | None
) -> None:
    placement = Placement.compute(members, factor, PARTITIONS)
    expected = len(members) if factor is None else min(factor, len(members))

    for p in range(PARTITIONS):
        held = placement.holders(p)
        assert len(held) == len(set(held)) == expected
        assert set(held) <= set(members)
        assert held == ranking(p, members)[:expected]
    if factor is None or factor >= len(members):
        assert all(set(placement.holders(p)) == set(members) for p in range(PARTITIONS))


@settings(max_examples=60, deadline=None)
@given(member_sets, factors)
def test_partitions_of_and_load_agree_with_the_holders(
    members: list[bytes], factor: int | None
) -> None:
    placement = Placement.compute(members, factor, PARTITIONS)
    load = placement.load()

    for member in members:
        held = placement.partitions_of(member)
        assert held == tuple(p for p in range(PARTITIONS) if member in placement.holders(p))
        assert load[member] == len(held)
    assert sum(load.values()) == PARTITIONS * placement.width
    assert placement.partitions_of(b"\xff" * 33) == ()  # not a member: holds nothing


def test_equal_weights_go_to_the_smaller_node_id_on_both_paths() -> None:
    """Equal weights (equal seeds: never met with real hashes) and a weight of 0 (which
    the argmin passes use as 'taken') rank as the scalar rule does: smaller id first."""
    largest = (1 << 64) - 1
    rows = [
        [5, 3, 3, 9, 3, 7, 8, 6, 4, 2, 2, 10],  # ties at the top and in the middle
        [largest, 1, 1, largest, 0, 4, 4, 5, 6, 7, 8, 9],  # weight 0 (= ~largest) present
    ]
    for row in rows:
        inverted = np.array([row], dtype=np.uint64)  # the table sorts ~weight ascending
        expected = sorted(range(len(row)), key=lambda i: (row[i], i))
        assert _best(inverted.copy(), 2).tolist() == [expected[:2]]  # argmin passes
        assert _best(inverted.copy(), len(row)).tolist() == [expected]  # a full sort


def test_an_address_is_held_by_its_partitions_holders() -> None:
    placement = Placement.compute([node(i) for i in range(1, 11)], 3, version=b"v" * 32)
    key = "claude:architect@bzzz:auth/src/auth.go"

    assert placement.partitions == DEFAULT_PARTITIONS
    assert placement.version == b"v" * 32
    assert placement.holders_of_address(key) == placement.holders(partition_of(key))
    assert all(placement.holds(h, partition_of(key)) for h in placement.holders_of_address(key))


# ---- movement -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(member_sets, node_ids, st.integers(min_value=1, max_value=6))
def test_a_join_moves_only_partitions_the_joiner_now_holds(
    members: list[bytes], joiner: bytes, factor: int
) -> None:
    assume(joiner not in members)
    before = Placement.compute(members, factor, PARTITIONS)
    after = Placement.compute([*members, joiner], factor, PARTITIONS)
    changed = moves(before, after)

    assert {m.partition for m in changed} == set(after.partitions_of(joiner))
    for move in changed:
        assert move.gained == (joiner,)
        if len(members) >= factor:  # a full set: the last holder makes way
            assert move.lost == (move.old[-1],)
            assert [n for n in move.old if n != move.lost[0]] == [
                n for n in move.new if n != joiner
            ]  # everyone else keeps their order
        else:
            assert move.lost == ()
    for p in set(range(PARTITIONS)) - {m.partition for m in changed}:
        assert before.holders(p) == after.holders(p)


@settings(max_examples=60, deadline=None)
@given(st.lists(node_ids, min_size=2, max_size=30, unique=True), st.data())
def test_a_leave_moves_only_the_leavers_partitions_and_keeps_the_failover_order(
    members: list[bytes], data: st.DataObject
) -> None:
    factor = data.draw(st.integers(min_value=1, max_value=6))
    leaver = data.draw(st.sampled_from(members))
    before = Placement.compute(members, factor, PARTITIONS)
    rest = [n for n in members if n != leaver]
    after = Placement.compute(rest, factor, PARTITIONS)
    changed = moves(before, after)

    assert {m.partition for m in changed} == set(before.partitions_of(leaver))
    for move in changed:
        assert move.lost == (leaver,)
        kept = tuple(n for n in move.old if n != leaver)
        assert move.new[: len(kept)] == kept  # the others keep their rank: failover is stable
        # the one gained (when there are enough members) is the next candidate in the old order
        expected = (ranking(move.partition, members)[factor],) if len(rest) >= factor else ()
        assert move.gained == expected == move.new[len(kept) :]
    for p in set(range(PARTITIONS)) - {m.partition for m in changed}:
        assert before.holders(p) == after.holders(p)


def test_a_move_writes_to_the_union_and_drops_after_the_new_holders() -> None:
    a, b, c, d = (node(i) for i in range(1, 5))
    move = Move(7, old=(a, b, c), new=(a, d, b))

    assert move.gained == (d,)
    assert move.lost == (c,)
    assert move.writers == (a, d, b, c)


def test_movement_is_close_to_the_ideal_fraction() -> None:
    """At 50 members and R = 3, a join takes ~R/(N+1) of the partitions."""
    members = [hashlib.sha256(bytes([i])).digest() for i in range(50)]
    before = Placement.compute(members, 3)
    after = Placement.compute([*members, node(255)], 3)
    moved = len(moves(before, after)) / DEFAULT_PARTITIONS

    assert 0.5 * 3 / 51 < moved < 1.5 * 3 / 51


def test_changing_the_factor_lists_every_partition_whose_set_changes() -> None:
    members = [node(i) for i in range(1, 8)]
    two = Placement.compute(members, 2, PARTITIONS)
    three = Placement.compute(members, 3, PARTITIONS)
    changed = moves(two, three)

    assert len(changed) == PARTITIONS
    assert all(m.lost == () and len(m.gained) == 1 for m in changed)
    assert moves(two, two) == ()


# ---- refusals ---------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        holders(0, [], 3)
    with pytest.raises(ValueError, match="at least 1"):
        Placement.compute([node(1)], 0)
    with pytest.raises(ValueError, match="at least 1"):
        holders(0, [node(1)], True)
    with pytest.raises(ValueError, match="partitions must be"):
        Placement.compute([node(1)], 1, 0)
    with pytest.raises(ValueError, match="not in 0..63"):
        Placement.compute([node(1)], 1, PARTITIONS).holders(64)
    with pytest.raises(ValueError, match="out of range"):
        weight(node(1), -1)
    with pytest.raises(TypeError, match="node id"):
        holders(0, [node(1), b""], 1)
    with pytest.raises(ValueError, match="partition by partition"):
        moves(Placement.compute([node(1)], 1, 64), Placement.compute([node(1)], 1, 128))


# ---- from a cluster -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    node_id: bytes


@dataclass(frozen=True)
class _Settings:
    factor: int | None
    partitions: int


@dataclass(frozen=True)
class _Cluster:
    """The shape of `slurpfs.net.members.Cluster` that placement reads."""

    ids: tuple[bytes, ...]
    factor: int | None

    def members(self) -> tuple[_Member, ...]:
        return tuple(_Member(i) for i in self.ids)

    def settings(self) -> _Settings:
        return _Settings(self.factor, 128)

    def digest(self) -> bytes:
        return hashlib.sha256(b"".join(self.ids)).digest()


def test_a_clusters_signed_settings_and_digest_make_its_placement() -> None:
    cluster = _Cluster(tuple(node(i) for i in range(1, 6)), 2)
    placement = Placement.of_cluster(cluster)

    assert placement.version == cluster.digest()
    assert placement.partitions == 128
    assert placement == Placement.compute(cluster.ids, 2, 128)


# ---- the simulation script ------------------------------------------------------------------


def test_the_simulation_reports_balance_and_movement(tmp_path: Path) -> None:
    """scripts/placement-sim runs without a network and its figures add up."""
    out = tmp_path / "sim.json"
    run = subprocess.run(
        [
            sys.executable,
            SCRIPTS / "placement-sim",
            "--nodes",
            "20,40",
            "--factors",
            "2",
            "--addresses",
            "2000",
            "--trials",
            "3",
            "--compare",
            "64,256",
            "--json",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = json.loads(out.read_text())

    assert "| N | R | partitions/node" in run.stdout
    assert "#### Partition count at N = 40, R = 2" in run.stdout
    assert [(s["nodes"], s["factor"]) for s in results["scenarios"]] == [(20, 2), (40, 2)]
    for s in results["scenarios"]:
        assert s["partitions_per_node"]["mean"] == 4096 * 2 / s["nodes"]
        uniform, skewed = s["workloads"]
        assert uniform["bodies"] == 2000
        assert skewed["bodies"] > 2000
        assert uniform["bodies_max_over_mean"] >= uniform["bodies_p99_over_mean"] >= 1
        # a join moves about R/(N+1) of the bodies, a leave R/N (well within 2x here)
        assert 0.5 < uniform["join_moved"] / uniform["join_ideal"] < 2
        assert 0.5 < uniform["leave_moved"] / uniform["leave_ideal"] < 2
    assert [c["partitions"] for c in results["partition_counts"]] == [64, 256]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "numbers of at least 1"),
        (["--factors", "two"], "not a comma-separated list"),
        (["--partitions", "2000000"], "partition counts go up to"),
        (["--nodes", "3", "--trials", "5"], "--trials cannot exceed"),
    ],
)
def test_the_simulation_refuses_bad_options(args: list[str], message: str) -> None:
    run = subprocess.run(
        [sys.executable, SCRIPTS / "placement-sim", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert run.returncode == 2
    assert message in run.stderr
    assert run.stdout == ""
