"""The daemon's side of the replication worker (`slurpfs.net.worker`).

`ReplicationClient` is the worker's `slurpfs.service.workers.WorkerLogic`: it
gives the worker its setup (the effective configuration, the passphrase),
passes the daemon's commits on as ``committed`` notices (coalesced), and keeps
what the worker last reported. A ``changed`` notice from the worker (a peer's
versions were ingested) runs the kernel cache invalidator at once, so an open
``tail -f`` or a new ``cat`` on this mount sees a peer's save.

It fetches the bodies of versions this node holds only stubs of
(`ContextStore.fetch_body`: the worker asks their holders), and serves, from
its report: ``.slurp/peers``, the ``peers`` and ``replication`` health
checks, the status lines, and `replicated` (``replication.write_quorum``: an
``fsync`` or ``close`` of a written file waits for that many peers' acks).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from slurpfs.config import Config
from slurpfs.errors import BodyUnavailable
from slurpfs.health import FAIL, OK, WARN, Check
from slurpfs.metrics import Metrics
from slurpfs.model import VersionInfo
from slurpfs.net.rebalance import DROP_CAUSES
from slurpfs.service.wire import Message, Peer, PeerGone, RemoteError, WireError
from slurpfs.service.workers import store_hello

log = logging.getLogger("slurpfs.daemon")

__all__ = ["REPLICATION_WORKER", "ReplicationClient", "render_peers_table"]

REPLICATION_WORKER = "slurpfs.net.worker"
QUORUM_SLACK = 2.0  # seconds the daemon waits for the worker's answer past the timeout
BODY_WAIT = 10.0  # hang guard: the worker answers within slurpfs.net.replica.BODY_DEADLINE
LOGGED_BODIES = 1024  # versions whose unavailable body was logged (each once)


class ReplicationClient:
    """What the daemon knows of, and tells, its replication worker."""

    def __init__(
        self,
        config: Config,
        passphrase: bytes | None,
        on_changed: Callable[[], Awaitable[None]],
        on_members: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self._passphrase = passphrase
        self._on_changed = on_changed
        self._on_members = on_members
        self._peer: Peer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread: int | None = None
        self._news = trio.Event()
        self._cluster = False  # a `cluster` notice is due
        self.state = "starting"  # starting, running, restarting: <reason>
        self.report: dict[str, Any] = {}
        self.changes = 0  # `changed` notices received (ingests)
        self.quorum_waits = self.quorum_failures = 0
        self.metrics: Metrics | None = None  # the daemon's: body gauges follow the reports
        self.bodies_fetched = self.bodies_unavailable = 0
        self._logged: dict[bytes, None] = {}  # versions whose unavailable body was logged
        # Caches the daemon's own reads evicted (`ContextStore.caches_evicted`; the daemon sets it)
        self.evicted_here: Callable[[], int] = lambda: 0

    # -- WorkerLogic -------------------------------------------------------------------

    def setup(self) -> Mapping[str, Any]:
        return store_hello(self.config, self._passphrase)

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        if message.id is not None:
            raise WireError(f"the replication worker sent an unexpected {message.kind!r}")
        if message.kind == "changed":
            self.changes += 1
            await self._on_changed()
        elif message.kind == "members":
            if self._on_members is not None:
                await self._on_members()
        elif message.kind == "status":
            self.report.update(message.fields)
            self._gauges()
        else:
            raise WireError(f"the replication worker sent an unexpected {message.kind!r}")
        return None

    def _gauges(self) -> None:
        metrics, bodies = self.metrics, self.report.get("bodies")
        if metrics is None or not bodies:
            return
        metrics.replication_bodies.labels("copy").set(bodies["copies"])
        metrics.replication_bodies.labels("cache").set(bodies["caches"])
        metrics.replication_under_replicated.set(self.report.get("under_replicated") or 0)

    def connected(self, peer: Peer) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        self._peer = peer
        self.state = "running"

    def disconnected(self, reason: str) -> None:
        self._peer = None
        self.state = f"restarting: the replication worker {reason}"

    async def feed(self, peer: Peer) -> None:
        """Pass on commits (coalesced while a send is under way) and cluster news."""
        self._news.set()  # commits made while the worker was down
        while True:
            await self._news.wait()
            self._news = trio.Event()
            cluster, self._cluster = self._cluster, False
            try:
                if cluster:
                    await peer.notify("cluster")
                await peer.notify("committed")
            except PeerGone:
                return

    # -- from the daemon -------------------------------------------------------------------

    def committed(self, info: VersionInfo) -> None:
        """Model subscriber: runs in the committing thread; never blocks it."""
        token = self._token
        if token is None:
            return  # no worker yet: it pushes from the change log when it starts
        if threading.get_ident() == self._loop_thread:
            self._news.set()
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._news.set)

    def wake(self) -> None:
        """Another process committed (the control socket's ``changed``). Trio thread."""
        self._news.set()

    def cluster_changed(self) -> None:
        """The member log changed (``slurpfs peers ...``). Trio thread."""
        self._cluster = True
        self._news.set()

    async def replicated(self, version_ids: Sequence[bytes]) -> None:
        """Wait until ``replication.write_quorum`` peers acknowledged `version_ids`.

        Raises `OSError` (EIO) after ``replication.quorum_timeout`` or without a
        running worker; the log says why.
        """
        settings = self.config.replication
        if settings.write_quorum == 0 or not version_ids:
            return
        self.quorum_waits += 1
        peer = self._peer
        timeout = settings.quorum_timeout
        why = "the replication worker is not running"
        if peer is not None:
            why = "the replication worker did not answer"
            with trio.move_on_after(timeout + QUORUM_SLACK):
                try:
                    await peer.request(
                        "quorum",
                        ids=[v.hex() for v in version_ids],
                        n=settings.write_quorum,
                        timeout=timeout,
                    )
                    return
                except (RemoteError, PeerGone) as exc:
                    why = str(exc)
        self.quorum_failures += 1
        log.error(
            "write quorum not reached for version %s: %s (replication.write_quorum = %d,"
            " replication.quorum_timeout = %g s); the file is stored here, the write is"
            " reported as failed (EIO)",
            version_ids[0].hex()[:16],
            why,
            settings.write_quorum,
            timeout,
        )
        raise OSError(5, f"write quorum not reached: {why}")

    def fetch_body(self, info: VersionInfo) -> bytes:
        """`ContextStore.fetch_body`: the body of a version this node holds a stub of,
        from the worker (which asks the holders). Runs in a worker thread of the
        daemon; `BodyUnavailable` (EIO) when no holder gave it, logged once per
        version with the members asked; never waits past `BODY_WAIT`."""
        token = self._token
        if token is None or threading.get_ident() == self._loop_thread:
            raise self._unavailable(info, "the replication worker is not running", ())
        return trio.from_thread.run(self._fetch_body, info, trio_token=token)

    async def _fetch_body(self, info: VersionInfo) -> bytes:
        peer = self._peer
        why, tried = "the replication worker is not running", ()
        if peer is not None:
            why = "the replication worker did not answer"
            with trio.move_on_after(BODY_WAIT):
                try:
                    answer = await peer.request(
                        "body", version=info.version_id.hex(), address=info.address
                    )
                    self.bodies_fetched += 1
                    return base64.b64decode(str(answer["envelope"]))
                except RemoteError as exc:
                    why, tried = str(exc), tuple(exc.fields.get("tried", ()))
                except PeerGone as exc:
                    why = str(exc)
        raise self._unavailable(info, why, tried)

    def _unavailable(self, info: VersionInfo, why: str, tried: Sequence[str]) -> BodyUnavailable:
        self.bodies_unavailable += 1
        if info.version_id not in self._logged:
            self._logged[info.version_id] = None
            if len(self._logged) > LOGGED_BODIES:
                del self._logged[next(iter(self._logged))]
            log.error("cannot read %s [%s]: %s", info.address, info.role, why)
        return BodyUnavailable(
            f"the body of version {info.short_id} is unavailable: {why}", tuple(tried)
        )

    # -- what the worker reported ------------------------------------------------------

    @property
    def peers(self) -> list[dict[str, Any]]:
        return list(self.report.get("peers", []))

    def snapshot(self) -> dict[str, Any]:
        """The report as ``slurpfs peers --json`` prints it."""
        return {
            "worker": self.state,
            "problem": self.report.get("problem", ""),
            "listening": self.report.get("listening", []),
            "peers": self.peers,
            "transport": self.report.get("transport", {}),
            "bodies": self.report.get("bodies"),
            "under_replicated": self.report.get("under_replicated"),
            "rebalance": self.report.get("rebalance"),
            "dropped": self.dropped() if self.report.get("dropped") is not None else None,
        }

    def dropped(self) -> dict[str, int]:
        """Bodies turned back into stubs here, by cause (`DROP_CAUSES`): the worker's
        since it started, and the caches the daemon's own reads evicted."""
        worker = self.report.get("dropped") or {}
        out = {cause: int(worker.get(cause, 0)) for cause in DROP_CAUSES}
        out["cache_evicted"] += self.evicted_here()
        return out

    def render(self) -> str:
        """``.slurp/peers``."""
        return render_peers_table(self.snapshot())

    def check(self) -> Check:
        """The ``peers`` health check: fails while a member is down longer than
        ``replication.down_after``, or while pushes fail."""
        problem = self.report.get("problem") or ""
        if problem:
            return Check("peers", FAIL, problem)
        if self.state != "running":
            return Check("peers", WARN, self.state)
        now = time.time()
        late, failing, up, total = [], [], 0, 0
        for p in self.peers:
            if p["state"] not in ("up", "down"):
                continue
            total += 1
            up += p["state"] == "up"
            since = p.get("down_since")
            if p["state"] == "down" and since and now - since > self.config.replication.down_after:
                late.append(f"{p['name']} down for {now - since:.0f} s")
            if p.get("push_failing") and p["state"] == "up":
                failing.append(f"pushes to {p['name']} fail: {p.get('last_error') or '?'}")
        if late or failing:
            return Check("peers", FAIL, "; ".join(late + failing))
        if up < total:
            return Check("peers", WARN, f"{up} of {total} peers up")
        return Check("peers", OK, f"{up} of {total} peers up")

    def check_replication(self) -> Check:
        """The ``replication`` health check: fails while an address has fewer than R
        reachable copies of its bodies, warns while bodies move to new holders."""
        rebalance = self.report.get("rebalance")
        if self.state != "running" or not rebalance:
            return Check("replication", WARN, f"no report from the worker yet ({self.state})")
        short = int(self.report.get("under_replicated") or 0)
        if short:
            return Check(
                "replication",
                FAIL,
                f"{short} addresses have fewer than R reachable copies"
                f" ({rebalance['under_replicated_partitions']} partitions){_frozen(rebalance)}",
            )
        if rebalance["lacking"] or rebalance["surplus"]:
            return Check("replication", WARN, f"bodies moving: {_moving(rebalance)}")
        return Check("replication", OK, f"every address has R copies; {_holding(self.report)}")

    def status_lines(self) -> dict[str, object]:
        """``task_replication_*`` lines of ``.slurp/status``."""
        peers = [p for p in self.peers if p["state"] in ("up", "down")]
        lags = [p["lag"] for p in peers if p.get("lag") is not None]
        return {
            "task_replication_worker": self.state,
            "task_replication_peers_up": sum(p["state"] == "up" for p in peers),
            "task_replication_peers": len(peers),
            "task_replication_lag_versions": max(lags, default=0),
            "task_replication_pushed": sum(p.get("pushed", 0) for p in peers),
            "task_replication_pulled": sum(p.get("pulled", 0) for p in peers),
            "task_replication_failures": sum(p.get("failures", 0) for p in peers),
            "task_replication_ingested": self.report.get("ingested", 0),
            "task_replication_merges": self.report.get("merges", 0),
            "task_replication_rejected": self.report.get("rejected", 0),
            "task_replication_quorum_waits": self.quorum_waits,
            "task_replication_quorum_failures": self.quorum_failures,
            "task_replication_bodies_fetched": self.bodies_fetched,
            "task_replication_bodies_unavailable": self.bodies_unavailable,
            **self._body_lines(),
        }

    def _body_lines(self) -> dict[str, object]:
        bodies = self.report.get("bodies") or {}
        rebalance = self.report.get("rebalance") or {}
        return {
            "task_replication_body_copies": bodies.get("copies", 0),
            "task_replication_body_caches": bodies.get("caches", 0),
            "task_replication_under_replicated": self.report.get("under_replicated", 0),
            "task_replication_partitions_lacking": rebalance.get("lacking", 0),
            "task_replication_partitions_surplus": rebalance.get("surplus", 0),
            "task_replication_rebalance_fetched": rebalance.get("fetched", 0),
            "task_replication_rebalance_dropped": rebalance.get("dropped", 0),
            **{f"task_replication_bodies_dropped_{c}": n for c, n in self.dropped().items()},
        }


def _frozen(rebalance: Mapping[str, Any]) -> str:
    if rebalance.get("frozen"):
        return "; a quarter or more of the members are down: no re-replication"
    if rebalance.get("left_out"):
        return f"; re-replicating the partitions of {rebalance['left_out']} members down"
    return ""


def _moving(rebalance: Mapping[str, Any]) -> str:
    return f"{rebalance['lacking']} partitions to fetch here, {rebalance['surplus']} to hand over"


def _holding(report: Mapping[str, Any]) -> str:
    bodies = report.get("bodies") or {}
    return f"{bodies.get('copies', 0)} copies and {bodies.get('caches', 0)} caches held here"


def _ms(value: object) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def _ago(when: object, now: float) -> str:
    if not isinstance(when, int | float):
        return "-"
    return f"{max(now - when, 0):.0f}s ago"


def render_peers_table(snapshot: Mapping[str, Any]) -> str:
    """The members, one line each (``slurpfs peers``, ``.slurp/peers``)."""
    now = time.time()
    lines = []
    if snapshot.get("problem"):
        lines.append(f"replication: {snapshot['problem']}")
    if snapshot.get("listening"):
        lines.append(f"listening: {', '.join(snapshot['listening'])}")
    lines += _body_summary(snapshot)
    header = ("NODE", "NAME", "STATE", "MODE", "ADDRESS", "RTT", "OFFSET", "CONTACT", "LAG",
              "BODIES")  # fmt: skip
    rows = [header]
    for p in snapshot.get("peers", []):
        rows.append(
            (
                str(p["node_id"])[:16],
                p.get("name") or "-",
                p["state"],
                p.get("mode") or "-",
                p.get("address") or "-",
                _ms(p.get("rtt_ms")),
                _ms(p.get("clock_offset_ms")),
                _ago(p.get("last_contact"), now),
                "-" if p.get("lag") is None else str(p["lag"]),
                "-" if p.get("bodies") is None else str(p["bodies"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def _body_summary(snapshot: Mapping[str, Any]) -> list[str]:
    """The lines on bodies above the table (none before the worker reported them)."""
    bodies, rebalance = snapshot.get("bodies"), snapshot.get("rebalance")
    if not bodies or not rebalance:
        return []
    lines = [
        f"bodies: {bodies['copies']} copies, {bodies['caches']} caches;"
        f" under-replicated addresses: {snapshot.get('under_replicated') or 0}"
        f"{_frozen(rebalance)}"
    ]
    if rebalance["lacking"] or rebalance["surplus"]:
        lines.append(f"moving: {_moving(rebalance)}")
    dropped = snapshot.get("dropped")
    if dropped:
        lines.append(
            f"dropped: {dropped['moved']} moved to their new holders,"
            f" {dropped['handed_off']} handed off to their holders,"
            f" {dropped['cache_evicted']} caches evicted"
        )
    return lines


def snapshot_json(snapshot: Mapping[str, Any]) -> str:
    return json.dumps(snapshot, sort_keys=True)
