"""The replication worker: the libp2p host and `Replicator`, in a process of their own.

Started by the mount's daemon (`slurpfs.service.replication.ReplicationClient`)
as ``python -m slurpfs.net.worker`` whenever the data directory has a cluster
(``<data>/cluster/``); the process rules (priority, parent death, signals) are
`slurpfs.service.workers`'. py-libp2p costs about 1 ms of CPU per replicated
version: in the daemon's process that would slow the FUSE loop.

The worker opens the store with the configuration and passphrase of the
daemon's hello, loads the cluster (`slurpfs.net.members.Cluster`), listens on
``replication.listen`` (empty: the address this node has in the member log)
and replicates (`slurpfs.net.replica`) until told to stop. It also answers
joins (`slurpfs.net.join.Admissions`) for ``slurpfs peers join`` while an
invite is pending.

Messages (docs/FORMAT.md, "Worker protocol"):

* from the daemon: ``committed`` (the daemon committed: push), ``cluster`` (the
  member log may have changed: read it again), ``stop``; requests ``quorum``
  (wait for ``n`` peer acks of ``ids``), ``peers`` (the members' state) and
  ``body`` (the envelope of a version this node holds only a stub of, from its
  holders: `Replicator.fetch_body`);
* to the daemon: ``changed`` after each ingest (the daemon's invalidator runs
  at once, so a peer's save shows through the mount), ``members`` when the
  member log changed (trust and granted role keys: the daemon reloads its
  keys), ``status`` (what changed in the members' state, at most every
  `STATUS_INTERVAL`).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import trio

from slurpfs.config import Config, loads
from slurpfs.errors import BodyUnavailable, SlurpError
from slurpfs.ingest import IngestReport
from slurpfs.model import ContextStore
from slurpfs.net.join import Admissions
from slurpfs.net.members import Cluster
from slurpfs.net.rebalance import DROP_CAUSES, Rebalancer
from slurpfs.net.replica import QuorumFailed, Replicator
from slurpfs.net.transport import Transport
from slurpfs.service.wire import Message, Peer, PeerGone
from slurpfs.service.workers import child_connect, child_start, serve_while

log = logging.getLogger("slurpfs.replica")

STATUS_INTERVAL = 1.0  # seconds between looks for news in the members' state
CLUSTER_POLL = 1.0  # seconds between looks at the member log on disk
STORE_POLL = 0.5  # seconds between looks at the store's change sequence
# The daemon's priority (nice 0), not lower. At idle priority a peer's save waited
# up to seconds for a CPU (measured on 2 shared cores: p99 0.5-1.8 s, 30 ms at nice
# 0). At nice 10 a busy machine (load 10 of ordinary processes on 2 cores) left the
# worker a few percent of a CPU, shared by its event loop with the threads that
# serve pulls and ingest: it answered its peers' pings seconds late, each side saw
# the other go down every few seconds and every pull in flight was cut off (five
# nodes did not spread 1,000 bodies in 300 s). Liveness needs the loop to run in
# time; the work is bounded by the protocol (batches, backlog).
NICE = 0


def listen_address(config: Config, cluster: Cluster) -> str:
    """Where the worker listens: ``replication.listen``, else this node's own
    address in the member log (with several, the first one's port on every
    interface)."""
    if config.replication.listen:
        return config.replication.listen
    addrs = cluster.me().addrs
    if not addrs:
        raise SlurpError(
            "this node has no address in the member log; set replication.listen"
            " (e.g. /ip4/0.0.0.0/tcp/7400)"
        )
    if len(addrs) == 1:
        return addrs[0]
    port = addrs[0].rsplit("/", 1)[-1]
    return f"/ip4/0.0.0.0/tcp/{port}"


class ReplicationWorker:
    """The worker's logic: open, load the cluster, replicate until stopped."""

    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.model: ContextStore | None = None
        self.cluster: Cluster | None = None
        self.replicator: Replicator | None = None
        self.transport: Transport | None = None
        self.listening: list[str] = []
        self.problem = ""
        self._stop = trio.Event()
        self._digest = b""
        self._last: dict[str, Any] = {}
        self._poke = trio.Event()
        self.rebalancer: Rebalancer | None = None
        self.down_after = 600.0

    async def run(self, hello: Message) -> None:
        try:
            await self._serve(hello)
        finally:
            with trio.CancelScope(shield=True):
                if self.model is not None:
                    await trio.to_thread.run_sync(self.model.close)

    async def _serve(self, hello: Message) -> None:
        try:
            config = loads(str(hello["config"]))
            self.down_after = config.replication.down_after
            secret = hello.fields.get("passphrase")
            passphrase = None if secret is None else base64.b64decode(secret)
            self.model = await trio.to_thread.run_sync(ContextStore.open, config, passphrase)
            self.cluster = await trio.to_thread.run_sync(
                Cluster.load, config.data_dir, self.model.keystore
            )
        except SlurpError as exc:
            await self._unavailable(f"replication cannot start: {exc}")
            return
        if self.cluster is None:
            await self._unavailable("this node belongs to no cluster (slurpfs peers invite)")
            return
        try:
            listen = listen_address(config, self.cluster)  # (a removed node has no address)
        except SlurpError as exc:
            await self._unavailable(f"replication cannot start: {exc}")
            return
        await self._replicate(listen, self.model, self.cluster)

    async def _unavailable(self, why: str) -> None:
        log.error("%s", why)
        self.problem = why
        await self._send_status(force=True)
        await self._stop.wait()

    async def _replicate(self, listen: str, model: ContextStore, cluster: Cluster) -> None:
        model.max_clock_ahead_ms = cluster.settings().max_clock_offset_ms
        self._digest = cluster.digest()
        replicator = self.replicator = Replicator(
            model, cluster, on_ingest=self._ingested, on_log=self._poke.set
        )
        self.rebalancer = replicator.rebalancer = Rebalancer(
            model,
            cluster,
            cluster.me().node_id,
            lambda: [m.node_id for m in cluster.members()],
            lambda: (cluster.settings().factor, cluster.settings().partitions),
            replicator,
            down_after=self.down_after,
        )
        token = trio.lowlevel.current_trio_token()
        # This process's own reads of bodies held elsewhere (merging concurrent leaves),
        # from the threads trio runs them in.
        model.fetch_body = lambda info: trio.from_thread.run(
            replicator.fetch_body, info.version_id, info.address, trio_token=token
        )
        await self._complete_rotations(model)  # (a rotation heard of while not running)
        members = {m.node_id: (m.addrs[0] if m.addrs else None) for m in cluster.members()}
        admissions = Admissions(cluster, admitted=lambda member: self._poke.set())
        keys = cluster.keys()
        self.transport = Transport(
            model.keyring.node, keys.current, replicator, members, admissions
        )
        self.transport.set_keys(keys.current, keys.previous, keys.until)
        failed: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            try:
                self.listening = await nursery.start(self.transport.run, listen)
            except* (SlurpError, OSError) as group:
                failed += group.exceptions
            if not failed:
                log.info("replication listening on %s", ", ".join(self.listening))
                nursery.start_soon(replicator.run, self.transport)
                nursery.start_soon(self.rebalancer.run)
                nursery.start_soon(self._report)
                nursery.start_soon(self._watch_cluster)
                nursery.start_soon(self._watch_store, model, replicator)
                await self._stop.wait()
                self.transport.stop()
                nursery.cancel_scope.cancel()
        if failed:
            await self._unavailable(f"replication cannot listen on {listen}: {failed[0]}")

    @staticmethod
    async def _complete_rotations(model: ContextStore) -> None:
        """A new role generation in the log: versions sealed here to an older one
        (before this node heard of it) get a slot for it (`complete_rotations`)."""
        done = await trio.to_thread.run_sync(model.complete_rotations)
        if done:
            log.info("%d versions re-wrapped for the newest role key generations", done)

    async def _ingested(self, report: IngestReport) -> None:
        if self.peer is not None:
            try:
                await self.peer.notify("changed", count=len(report.stored), seq=report.sequence)
            except PeerGone:
                self.stop()

    @staticmethod
    async def _watch_store(model: ContextStore, replicator: Replicator) -> None:
        """Commits of other processes (``slurpfs put`` while mounted, `import`) are
        pushed too: the daemon hears of them only when the command tells it."""
        seen = model.store.sequence()
        while True:
            await trio.sleep(STORE_POLL)
            now = model.store.sequence()
            if now != seen:
                seen = now
                replicator.local_changed()

    async def _watch_cluster(self) -> None:
        while True:
            await self._cluster_changed()
            with trio.move_on_after(CLUSTER_POLL):
                await self._poke.wait()  # a join admitted here: at once
            self._poke = trio.Event()

    async def _cluster_changed(self) -> None:
        """Follow the member log on disk (the CLI and merges append to it)."""
        cluster, model, replicator = self.cluster, self.model, self.replicator
        if cluster is None or model is None or replicator is None:
            return
        digest = await trio.to_thread.run_sync(cluster.digest)
        if digest == self._digest:
            return
        self._digest = digest
        await self._follow_keys(cluster)
        await trio.to_thread.run_sync(model.reload_keyring)  # trust, granted role keys
        await self._complete_rotations(model)
        model.max_clock_ahead_ms = cluster.settings().max_clock_offset_ms
        replicator.members_changed()
        replicator.log_changed()
        log.info("the member log changed: %d members", len(cluster.members()))
        if self.peer is not None:
            try:
                await self.peer.notify("members")  # the daemon reads its keys again too
            except PeerGone:
                self.stop()

    async def _follow_keys(self, cluster: Cluster) -> None:
        """The transport dials with the cluster key in force (a removal rotated it)."""
        try:
            if await trio.to_thread.run_sync(cluster.heal_psk):
                log.info("sealed the cluster key to the members lacking it, or rotated it")
        except SlurpError as exc:  # (this node was removed: it signs nothing)
            log.warning("cannot rotate the cluster key: %s", exc)
        keys = await trio.to_thread.run_sync(cluster.keys)
        if self.transport is not None:
            self.transport.set_keys(keys.current, keys.previous, keys.until)

    def stop(self) -> None:
        self._stop.set()

    # -- reports ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        replicator = self.replicator
        out: dict[str, Any] = {"problem": self.problem, "listening": self.listening}
        if replicator is not None:
            out["peers"] = [dataclasses.asdict(r) for r in replicator.reports()]
            out["ingested"] = replicator.ingested
            out["rejected"] = replicator.rejected
            out["merges"] = replicator.merges
            out["bodies_fetched"] = replicator.bodies_fetched
            out["bodies_refused"] = replicator.bodies_refused
            out["handed_off"] = replicator.handed_off
        if self.rebalancer is not None and self.model is not None:
            out.update(self._bodies(self.rebalancer, self.model, out.get("peers", [])))
            if replicator is not None:
                out["dropped"] = _dropped(self.rebalancer, replicator, self.model)
        if self.transport is not None:
            out["transport"] = dataclasses.asdict(self.transport.statistics())
        return out

    @staticmethod
    def _bodies(
        rebalancer: Rebalancer, model: ContextStore, peers: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Body counts (this node's, each peer's as it announced them) and rebalancing."""
        copies, caches = model.store.body_count()
        announced = {n.hex(): c for n, c in rebalancer.peer_bodies().items()}
        for p in peers:
            p["bodies"] = copies if p["state"] == "me" else announced.get(p["node_id"])
        report = rebalancer.report()
        return {
            "bodies": {"copies": copies, "caches": caches},
            "under_replicated": report.under_replicated,
            "rebalance": dataclasses.asdict(report),
        }

    async def _report(self) -> None:
        try:
            while True:
                await self._send_status()
                await trio.sleep(STATUS_INTERVAL)
        except PeerGone as exc:
            log.info("cannot report to the daemon (%s): stopping", exc)
            self.stop()

    async def _send_status(self, *, force: bool = False) -> None:
        status = self.status()
        # Times move every second; the rest only when something happened.
        news = {k: v for k, v in status.items() if self._last.get(k) != v}
        if (news or force) and self.peer is not None:
            await self.peer.notify("status", **(news or status), at=time.time())
            self._last = {**self._last, **status}

    # -- messages from the daemon ----------------------------------------------------------

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        if message.kind == "committed":
            if self.replicator is not None:
                self.replicator.local_changed()
        elif message.kind == "cluster":
            await self._cluster_changed()
        elif message.kind == "stop":
            self.stop()
        elif message.kind == "quorum":
            return await self._quorum(message)
        elif message.kind == "peers":
            return self.status()
        elif message.kind == "body":
            return await self._body(message)
        else:
            raise SlurpError(f"the replication worker does not know {message.kind!r}")
        return None

    async def _body(self, message: Message) -> Mapping[str, Any]:
        if self.replicator is None:
            raise BodyUnavailable(self.problem or "replication is not running")
        version_id = bytes.fromhex(str(message["version"]))
        body = await self.replicator.fetch_body(version_id, str(message["address"]))
        return {"envelope": base64.b64encode(body).decode("ascii")}

    async def _quorum(self, message: Message) -> Mapping[str, Any]:
        if self.replicator is None:
            raise QuorumFailed(self.problem or "replication is not running")
        ids = [bytes.fromhex(str(v)) for v in message["ids"]]
        await self.replicator.quorum(ids, int(message["n"]), float(message["timeout"]))
        return {}


def _dropped(rebalancer: Rebalancer, replicator: Replicator, model: ContextStore) -> dict[str, int]:
    """Bodies this process turned back into stubs since it started, by cause (`DROP_CAUSES`)."""
    counts = (rebalancer.dropped, replicator.handed_off, model.caches_evicted)
    return dict(zip(DROP_CAUSES, counts, strict=True))


async def _main(sock: socket.socket) -> int:
    worker = ReplicationWorker()
    peer, hello = await child_connect(sock, worker.handle)
    worker.peer = peer
    await serve_while(peer, functools.partial(worker.run, hello), worker.stop)
    return 0


class _LibraryStray(logging.Filter):
    """py-libp2p logs a routine condition (a peer's connection closing while its
    addresses are read) as a warning on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Error getting transport addresses" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    args = child_start(sys.argv[1:] if argv is None else argv, "replication", nice=NICE)
    for noisy in ("libp2p", "multiaddr"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger().addFilter(_LibraryStray())
    return trio.run(_main, args.sock)


if __name__ == "__main__":
    sys.exit(main())
