"""Section `scale`: five mounted nodes on loopback with replication.factor 2, then a sixth.

A founds a cluster, B to E join it (``peers invite`` / ``peers join`` / ``keys
grant``) and A signs ``peers settings --factor 2``: each body is held by the 2
holders of its address. With every node unmounted, A gets `--docs` contexts of
about 4 KiB (at most `MAX_DOCS`); all five are mounted and rebalance (A hands
each body to its holders and drops what it does not hold) until every node
reports no under-replicated address and nothing left to move. Then:

* **remote read**: through B's mount, the first read of contexts whose bodies B
  does not hold (the daemon asks the replication worker, which fetches the body
  from a holder, verifies it and serves it), against the first read of
  contexts B holds (local), p50 and p99 of each (goal: remote p50 < 10 ms);
* **join**: F joins and is mounted; every node rebalances again. Bodies and
  bytes F fetched, as a fraction of every copy in the cluster (rendezvous
  hashing moves about 1/N of them: 1/6), and how long the move took.

The machine may be shared: the 1-minute load average is recorded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench_lib import corpus, daemons
from bench_lib.common import Json, Options, Section
from bench_lib.mount import ENV
from bench_lib.replication import _cli, _free_port, _import, _path, _until

FACTOR = 2
NODES = 5
MAX_DOCS = 2000
SAMPLE = 200  # contexts read per kind (remote, local)
GOAL_REMOTE_P50_MS = 10.0
SETTLE_LIMIT_S = 300.0


def run(opts: Options) -> Section:
    base = opts.workdir / f"bench-scale-{os.getpid()}"
    base.mkdir(parents=True)
    try:
        data = _measure(base, opts)
    finally:
        daemons.remove(base, label="scale")
    return Section(data, _markdown(data))


def _peers(data: Path) -> Json:
    snapshot: Json = json.loads(_cli("peers", "--json", "--data", data))
    return snapshot


class Node:
    def __init__(self, base: Path, name: str) -> None:
        self.name = name
        self.data = base / name
        self.mnt = base / f"mnt-{name}"
        self.listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
        self.node_id = ""
        self.info: Json = {}

    def init(self) -> None:
        self.node_id = json.loads(_cli("init", "--json", "--data", self.data))["node_id"]


@contextlib.contextmanager
def _mounted(node: Node, log: str) -> Iterator[int]:
    node.mnt.mkdir(exist_ok=True)
    argv = daemons.slurpfs("mount", "--foreground", "--data", str(node.data), str(node.mnt))
    stop = daemons.slurpfs("umount", str(node.mnt))
    info = node.info.setdefault(log, {})
    log_path = node.data.parent / f"{node.name}-{log}.log"
    with daemons.running(argv, node.mnt, log_path, info, env=ENV, stop=stop, label="scale") as pid:
        yield pid


def _holds_role(node: Node) -> bool:
    listed = json.loads(_cli("keys", "list", "--json", "--data", node.data))["roles"]
    return any(r["role"] == corpus.ROLE and r["held"] for r in listed)


def _join(founder: Node, node: Node) -> None:
    """`node` joins the cluster of `founder` (mounted) and is granted the role."""
    node.init()
    token = _cli("peers", "invite", "--data", founder.data, "--listen", founder.listen).strip()
    _until(f"{founder.name} listens", lambda: bool(_peers(founder.data).get("listening")))
    _cli("peers", "join", token, "--data", node.data, "--listen", node.listen)
    _cli("keys", "grant", corpus.ROLE, "--to", node.node_id, "--data", founder.data)


def _form(nodes: Sequence[Node]) -> None:
    founder = nodes[0]
    founder.init()
    with _mounted(founder, "form"):
        for node in nodes[1:]:
            _join(founder, node)
        _cli("peers", "settings", "--data", founder.data, "--factor", str(FACTOR))
        for node in nodes[1:]:  # each takes the granted key at its first mount
            with _mounted(node, "form"):
                _until(f"{node.name} holds the role", functools.partial(_holds_role, node))


def _status(node: Node) -> dict[str, str]:
    """The mount's ``.slurp/status`` lines: a file read, so that polling starts no
    process and takes no CPU from the nodes measured (a ``slurpfs peers`` per node
    and round kept a core busy on a 2-core machine)."""
    text = (node.mnt / ".slurp" / "status").read_text()
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


_STILL = ("under_replicated", "partitions_lacking", "partitions_surplus")


def _settled(nodes: Sequence[Node], versions: int) -> Callable[[], bool]:
    """Every node's worker reports R copies of everything and nothing to move."""

    def check() -> bool:
        copies = 0
        for node in nodes:
            status = _status(node)
            if status.get("task_replication_worker") != "running":
                return False
            if any(status.get(f"task_replication_{k}") != "0" for k in _STILL):
                return False
            copies += int(status.get("task_replication_body_copies", "0"))
        return copies == FACTOR * versions

    return check


def _first_reads(mnt: Path, docs: Sequence[corpus.Doc]) -> list[float]:
    """Seconds of the first open+read of each doc through the mount (content checked)."""
    times = []
    for doc in docs:
        t0 = time.perf_counter()
        data = _path(mnt, doc).read_bytes()
        times.append(time.perf_counter() - t0)
        if data != doc.data:
            raise RuntimeError(f"{doc.address} reads wrong content through {mnt}")
    return times


def _split(
    docs: Sequence[corpus.Doc], nodes: Sequence[Node], reader: Node
) -> tuple[list[corpus.Doc], list[corpus.Doc]]:
    """Docs whose bodies `reader` does not hold, and those it holds (by placement)."""
    from slurpfs import ucxl
    from slurpfs.net.placement import Placement

    placement = Placement.compute((bytes.fromhex(n.node_id) for n in nodes), FACTOR)
    me = bytes.fromhex(reader.node_id)
    remote: list[corpus.Doc] = []
    local: list[corpus.Doc] = []
    for doc in docs:
        holders = placement.holders_of_address(ucxl.parse(doc.address).key)
        (local if me in holders else remote).append(doc)
    return remote, local


def _ms(values: list[float]) -> Json:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _measure(base: Path, opts: Options) -> Json:
    docs = list(corpus.generate(min(opts.docs, MAX_DOCS), seed=11))
    nodes = [Node(base, name) for name in "abcde"]
    out: Json = {"versions": len(docs), "factor": FACTOR, "nodes": NODES,
                 "load_1min": [os.getloadavg()[0]]}  # fmt: skip
    _form(nodes)
    _import(nodes[0].data, docs)
    out["store_bytes"] = json.loads(_cli("status", "--json", "--data", nodes[0].data))[
        "stored_bytes"
    ]
    with contextlib.ExitStack() as stack:
        for node in nodes:
            stack.enter_context(_mounted(node, "run"))
        t0 = time.monotonic()
        _until("five nodes rebalanced", _settled(nodes, len(docs)), SETTLE_LIMIT_S)
        out["initial_spread_s"] = round(time.monotonic() - t0, 1)
        reader = nodes[1]
        remote, local = _split(docs, nodes, reader)
        rng = random.Random(5)
        out["remote_read"] = _ms(
            _first_reads(reader.mnt, rng.sample(remote, min(SAMPLE, len(remote))))
        )
        out["local_read"] = _ms(
            _first_reads(reader.mnt, rng.sample(local, min(SAMPLE, len(local))))
        )
        out["load_1min"].append(os.getloadavg()[0])
        print(f"scale: remote read {out['remote_read']}, local read {out['local_read']}",
              file=sys.stderr)  # fmt: skip
        try:
            out["join"] = _join_sixth(base, nodes, stack, len(docs))
        except RuntimeError as exc:  # (the read figures above still stand)
            out["join"] = {"error": str(exc)}
        out["load_1min"].append(os.getloadavg()[0])
    out["daemons"] = {n.name: n.info for n in nodes}
    return out


def _join_sixth(base: Path, nodes: list[Node], stack: contextlib.ExitStack, versions: int) -> Json:
    before = {n.name: _peers(n.data) for n in nodes}
    sixth = Node(base, "f")
    _join(nodes[0], sixth)
    t0 = time.monotonic()
    stack.enter_context(_mounted(sixth, "run"))
    everyone = [*nodes, sixth]
    _until("six nodes rebalanced", _settled(everyone, versions), SETTLE_LIMIT_S)
    elapsed = time.monotonic() - t0
    after = {n.name: _peers(n.data) for n in everyone}

    def moved(key: str) -> int:
        return sum(
            r["rebalance"][key] - before.get(name, {}).get("rebalance", {}).get(key, 0)
            for name, r in after.items()
        )

    def dropped(cause: str) -> int:
        return sum(
            r["dropped"][cause] - before.get(name, {}).get("dropped", {}).get(cause, 0)
            for name, r in after.items()
        )

    left = sum(before[n]["bodies"]["copies"] - after[n]["bodies"]["copies"] for n in before)

    # The joiner started empty: every copy it holds moved to it (by the pull of the
    # versions, sent whole to a holder, or fetched by its rebalancer).
    fetched = _peers(sixth.data)["bodies"]["copies"]
    fetched_bytes = json.loads(_cli("status", "--json", "--data", sixth.data))["stored_bytes"]
    copies = FACTOR * versions
    print(f"scale: the join moved {fetched} of {copies} copies in {elapsed:.1f} s", file=sys.stderr)
    return {
        "moved_bodies": fetched,
        "copies": copies,
        "moved_fraction": round(fetched / copies, 4),
        "moved_bytes": fetched_bytes,
        "fetched_by_rebalancing": moved("fetched"),
        "dropped": {cause: dropped(cause) for cause in ("moved", "handed_off", "cache_evicted")},
        "copies_left_old_nodes": left,
        "expected_fraction": round(1 / len(everyone), 4),
        "seconds": round(elapsed, 1),
    }


def _markdown(data: Json) -> list[str]:
    remote, local, join = data["remote_read"], data["local_read"], data["join"]
    store = data["store_bytes"]
    if "error" in join:
        moved = f"- a sixth node joins: **failed**: {join['error']}"
    else:
        moved = (
            f"- a sixth node joins: {join['moved_bodies']:,} of {join['copies']:,} copies moved"
            f" ({join['moved_fraction']:.1%}; 1/N = {join['expected_fraction']:.1%}),"
            f" {join['moved_bytes'] / 1e6:.1f} MB of {data['factor'] * store / 1e6:.1f} MB of"
            f" copies; {join['copies_left_old_nodes']:,} copies left the five (dropped:"
            f" {join['dropped']['moved']:,} by the rebalancer after the new holder confirmed,"
            f" {join['dropped']['handed_off']:,} handed off once every holder acknowledged);"
            f" settled in {join['seconds']} s"
        )
    return [
        f"### Replication at scale: {data['nodes']} nodes, factor {data['factor']},"
        f" {data['versions']:,} contexts, mounts on loopback",
        "",
        f"- spreading A's {data['versions']:,} bodies to their holders after the first mount:"
        f" {data['initial_spread_s']} s",
        f"- first read through B's mount of a context B does not hold (fetched from a holder,"
        f" verified): p50 {remote['p50_ms']} ms, p99 {remote['p99_ms']} ms, max"
        f" {remote['max_ms']} ms ({remote['n']} contexts; goal p50 < {GOAL_REMOTE_P50_MS:.0f} ms)",
        f"- first read of a context B holds: p50 {local['p50_ms']} ms, p99 {local['p99_ms']} ms,"
        f" max {local['max_ms']} ms ({local['n']} contexts)",
        moved,
        "- 1-minute load average at start, after the reads, at the end: "
        + ", ".join(f"{x:.2f}" for x in data["load_1min"]),
    ]
