"""Placement beyond this machine: a simulation of `slurpfs.net.placement`, no network.

For clusters of N members (random node ids) and a replication factor R it
places the partitions exactly as a node does (`Placement.compute`), hashes a
workload of address keys into them, and reports:

* partitions per node (mean, min, max) and their max/mean;
* bodies per node, counted by address: one body per address ("uniform"), and,
  with a skew, a Zipf-distributed number of versions per address (a few
  contexts rewritten all the time, most written a few times): max/mean and
  p99/mean;
* movement per join and per leave: the bodies that must be copied to a new
  holder, as a fraction of the distinct bodies stored (ideal R/(N+1) for a
  join, R/N for a leave), averaged over several random joins and leaves;
* the time to compute the whole placement (the best of 3).

A second table answers whether the partition count is enough at the largest N:
the same figures for several partition counts.

Run through ``scripts/placement-sim`` (options there) or ``scripts/bench --only
placement``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench_lib.common import Json, Options, Section, table
from slurpfs.net.placement import MAX_PARTITIONS, Placement, moves, partition_of

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Workload:
    """Address keys and the bodies (versions) each one has."""

    keys: tuple[str, ...]
    bodies: npt.NDArray[np.int64]  # per address, aligned with keys
    skew: float  # Zipf exponent of versions per address; 0: one body each


def workload(addresses: int, skew: float, mean_versions: float, seed: int) -> Workload:
    """`addresses` address keys shaped like real ones; with `skew` > 0 the version
    counts follow a Zipf law of that exponent over a random ranking of the
    addresses, scaled to `mean_versions` on average, at least 1 each."""
    rnd = random.Random(seed)
    keys = tuple(
        f"agent{rnd.randrange(50)}:role{rnd.randrange(8)}@project{rnd.randrange(20)}:"
        f"task{rnd.randrange(100)}/dir{rnd.randrange(30)}/context-{i}.md"
        for i in range(addresses)
    )
    if skew <= 0:
        return Workload(keys, np.ones(addresses, dtype=np.int64), 0.0)
    ranks = np.arange(1, addresses + 1, dtype=np.float64)
    shares = ranks**-skew
    extra = shares / shares.sum() * addresses * (mean_versions - 1)
    versions = 1 + np.floor(extra).astype(np.int64)
    order = np.array(rnd.sample(range(addresses), addresses), dtype=np.int64)
    return Workload(keys, versions[order], skew)


def _per_partition(work: Workload, partitions: int) -> Floats:
    where = np.fromiter((partition_of(k, partitions) for k in work.keys), dtype=np.int64)
    return np.bincount(where, weights=work.bodies, minlength=partitions).astype(np.float64)


def _per_node(placement: Placement, per_partition: Floats) -> Floats:
    weights = np.repeat(per_partition, placement.width)
    counted = np.bincount(
        placement.table.ravel(), weights=weights, minlength=len(placement.members)
    )
    return counted.astype(np.float64)


def _balance(loads: Floats) -> tuple[float, float]:
    mean = float(loads.mean())
    return float(loads.max()) / mean, float(np.percentile(loads, 99)) / mean


def _moved(before: Placement, after: Placement, per_partition: Floats) -> float:
    """Body copies to make, as a fraction of the distinct bodies stored."""
    copies = sum(per_partition[m.partition] * len(m.gained) for m in moves(before, after))
    return float(copies / per_partition.sum())


def _ids(count: int, rnd: random.Random) -> list[bytes]:
    return [rnd.randbytes(32) for _ in range(count)]


def scenario(
    nodes: int, factor: int, partitions: int, works: Sequence[Workload], trials: int, seed: int
) -> Json:
    """Every figure for one (N, R, partitions)."""
    rnd = random.Random(seed)
    members = _ids(nodes, rnd)
    timings = []
    for _ in range(3):  # the best of 3: the machine may be shared
        t0 = time.perf_counter()
        placement = Placement.compute(members, factor, partitions)
        timings.append(time.perf_counter() - t0)
    compute_ms = min(timings) * 1000
    held = np.array(list(placement.load().values()), dtype=np.float64)
    part_max, part_p99 = _balance(held)
    result: Json = {
        "nodes": nodes,
        "factor": factor,
        "partitions": partitions,
        "compute_ms": round(compute_ms, 1),
        "partitions_per_node": {
            "mean": round(float(held.mean()), 1),
            "min": int(held.min()),
            "max": int(held.max()),
            "max_over_mean": round(part_max, 3),
        },
        "workloads": [],
    }
    joins = [
        Placement.compute([*members, *_ids(1, rnd)], factor, partitions) for _ in range(trials)
    ]
    leaves = [
        Placement.compute([m for m in members if m != gone], factor, partitions)
        for gone in rnd.sample(members, trials)
    ]
    for work in works:
        per_partition = _per_partition(work, partitions)
        body_max, body_p99 = _balance(_per_node(placement, per_partition))
        join = [_moved(placement, after, per_partition) for after in joins]
        leave = [_moved(placement, after, per_partition) for after in leaves]
        result["workloads"].append(
            {
                "addresses": len(work.keys),
                "bodies": int(work.bodies.sum()),
                "skew": work.skew,
                "hottest_share": round(float(work.bodies.max() / work.bodies.sum()), 4),
                "bodies_max_over_mean": round(body_max, 3),
                "bodies_p99_over_mean": round(body_p99, 3),
                "join_moved": round(float(np.mean(join)), 5),
                "join_moved_max": round(max(join), 5),
                "join_ideal": round(factor / (nodes + 1), 5),
                "leave_moved": round(float(np.mean(leave)), 5),
                "leave_moved_max": round(max(leave), 5),
                "leave_ideal": round(factor / nodes, 5),
            }
        )
    return result


@dataclass(frozen=True)
class Plan:
    """What to simulate."""

    nodes: tuple[int, ...] = (100, 1000)
    factors: tuple[int, ...] = (2, 3)
    partitions: int = 4096
    compare: tuple[int, ...] = (1024, 4096, 16384, 65536)  # partition counts at the largest N
    addresses: int = 100_000
    skew: float = 1.0  # Zipf exponent of versions per address; 0: uniform only
    mean_versions: float = 4.0
    trials: int = 5  # random joins and leaves per scenario
    seed: int = 1


def simulate(plan: Plan) -> Json:
    works = [workload(plan.addresses, 0.0, 1.0, plan.seed)]
    if plan.skew > 0:
        works.append(workload(plan.addresses, plan.skew, plan.mean_versions, plan.seed))
    main = [
        scenario(n, r, plan.partitions, works, plan.trials, plan.seed + n)
        for n in plan.nodes
        for r in plan.factors
    ]
    largest, factor = max(plan.nodes), max(plan.factors)
    compare = [
        scenario(largest, factor, p, works[:1], plan.trials, plan.seed + largest)
        for p in plan.compare
    ]
    return {"plan": plan.__dict__, "scenarios": main, "partition_counts": compare}


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def markdown(results: Json) -> list[str]:
    plan = results["plan"]
    rows = []
    for s in results["scenarios"]:
        for w in s["workloads"]:
            kind = (
                "uniform"
                if not w["skew"]
                else f"Zipf {w['skew']}, hottest {_pct(w['hottest_share'])}"
            )
            rows.append(
                [
                    s["nodes"],
                    s["factor"],
                    f"{s['partitions_per_node']['mean']} ({s['partitions_per_node']['min']}–"
                    f"{s['partitions_per_node']['max']})",
                    s["partitions_per_node"]["max_over_mean"],
                    f"{w['bodies']:,} ({kind})",
                    w["bodies_max_over_mean"],
                    w["bodies_p99_over_mean"],
                    f"{_pct(w['join_moved'])} / {_pct(w['join_ideal'])}",
                    f"{_pct(w['leave_moved'])} / {_pct(w['leave_ideal'])}",
                    s["compute_ms"],
                ]
            )
    lines = [
        f"### Placement (simulation, {plan['partitions']} partitions, "
        f"{plan['addresses']:,} addresses)",
        "",
        *table(
            [
                "N",
                "R",
                "partitions/node (min–max)",
                "partitions max/mean",
                "bodies",
                "bodies max/mean",
                "bodies p99/mean",
                "moved per join / ideal",
                "moved per leave / ideal",
                "placement ms",
            ],
            rows,
        ),
        "",
        f"Moved: body copies to make, as a share of the distinct bodies, mean of "
        f"{plan['trials']} random joins or leaves (ideal R/(N+1) and R/N). Skewed bodies: "
        f"versions per address follow Zipf's law (exponent {plan['skew']}, mean "
        f"{plan['mean_versions']}); the hottest address's R holders carry its share. "
        "Placement ms: the best of 3.",
        "",
    ]
    compare = results["partition_counts"]
    if compare:
        first = compare[0]
        lines += [
            f"#### Partition count at N = {first['nodes']}, R = {first['factor']} (uniform bodies)",
            "",
            *table(
                [
                    "partitions",
                    "partitions/node",
                    "partitions max/mean",
                    "bodies max/mean",
                    "bodies p99/mean",
                    "moved per join",
                    "placement ms",
                ],
                [
                    [
                        c["partitions"],
                        c["partitions_per_node"]["mean"],
                        c["partitions_per_node"]["max_over_mean"],
                        c["workloads"][0]["bodies_max_over_mean"],
                        c["workloads"][0]["bodies_p99_over_mean"],
                        _pct(c["workloads"][0]["join_moved"]),
                        c["compute_ms"],
                    ]
                    for c in compare
                ],
            ),
        ]
    return lines


def run(opts: Options) -> Section:
    """The `placement` section of scripts/bench (quick: 10,000 addresses, 2 trials)."""
    plan = Plan(addresses=10_000, trials=2) if opts.quick else Plan()
    results = simulate(plan)
    return Section(results, markdown(results))


# ---- scripts/placement-sim ----------------------------------------------------------


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"numbers of at least 1 expected: {text!r}")
    return values


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/placement-sim",
        description="Simulate slurpfs placement over large clusters: balance and movement.",
    )
    d = Plan().__dict__
    parser.add_argument("--nodes", type=_counts, default=d["nodes"], help="cluster sizes")
    parser.add_argument("--factors", type=_counts, default=d["factors"], help="values of R")
    parser.add_argument("--partitions", type=int, default=d["partitions"])
    parser.add_argument(
        "--compare", type=_counts, default=d["compare"], help="partition counts at the largest N"
    )
    parser.add_argument("--addresses", type=int, default=d["addresses"])
    parser.add_argument(
        "--skew",
        type=float,
        default=d["skew"],
        help="Zipf exponent of versions per address (0: off)",
    )
    parser.add_argument("--mean-versions", type=float, default=d["mean_versions"])
    parser.add_argument("--trials", type=int, default=d["trials"], help="joins and leaves each")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    if args.addresses < 1 or args.trials < 1 or args.partitions < 1:
        parser.error("--addresses, --trials and --partitions must be at least 1")
    if max(args.partitions, *args.compare) > MAX_PARTITIONS:
        parser.error(f"partition counts go up to {MAX_PARTITIONS:,}")
    if args.mean_versions < 1 or args.skew < 0:
        parser.error("--mean-versions must be at least 1 and --skew not negative")
    if args.trials > min(args.nodes):
        parser.error("--trials cannot exceed the smallest cluster (each leave removes a member)")
    return args


def main(argv: list[str]) -> int:
    """`scripts/placement-sim`: simulate, print the report, optionally write JSON."""
    args = _parse(argv)
    plan = Plan(
        nodes=args.nodes,
        factors=args.factors,
        partitions=args.partitions,
        compare=args.compare,
        addresses=args.addresses,
        skew=args.skew,
        mean_versions=args.mean_versions,
        trials=args.trials,
        seed=args.seed,
    )
    results = simulate(plan)
    print("\n".join(markdown(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
