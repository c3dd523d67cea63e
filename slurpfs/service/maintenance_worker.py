"""The maintenance worker: scheduled backups and compaction, in a process of its own.

A mount whose configuration names a schedule (``[backup] schedule``,
``[compaction] schedule``: cron expressions, read by croniter, in UTC) starts
this worker (`slurpfs.service.workers`). It sleeps until the next time a
schedule names, then runs the job in a thread of its own process (the FUSE loop
never waits for it): a backup (`slurpfs.backup.create`, incremental when it can,
then `prune` with ``[backup] keep_*``), or compaction (the retention policy; the
compacting copy waits for an unmount, see docs/ARCHITECTURE.md). Progress goes
to the daemon as ``status`` notices: ``.slurp/status`` and the metrics show it.
A job that fails is logged and counted; the schedule goes on.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio
from croniter import croniter

from slurpfs import compact
from slurpfs.backup import create, prune
from slurpfs.config import Config, loads
from slurpfs.errors import SlurpError
from slurpfs.model import ContextStore
from slurpfs.service.wire import Message, Peer, PeerGone
from slurpfs.service.workers import child_connect, child_start, serve_while

log = logging.getLogger("slurpfs.maintenance")
MAINTENANCE_WORKER = "slurpfs.service.maintenance_worker"
STATUS_INTERVAL = 0.5


def next_time(expression: str, after: float) -> float:
    """The next time (epoch seconds, UTC) `expression` names after `after`."""
    base = dt.datetime.fromtimestamp(after, dt.UTC)
    return float(croniter(expression, base).get_next(float))


class MaintenanceWorker:
    def __init__(self, config: Config, passphrase: bytes | None) -> None:
        self.config = config
        self.passphrase = passphrase
        self.peer: Peer | None = None
        self.status: dict[str, Any] = {
            "backup_state": "idle" if config.backup.schedule else "off",
            "backups_made": 0,
            "backup_failures": 0,
            "backup_versions_done": 0,
            "backup_versions_total": 0,
            "compaction_state": "idle" if config.compaction.schedule else "off",
            "compactions_run": 0,
            "compaction_failures": 0,
            "retention_dropped": 0,
        }
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report)
            for kind, expression, job in (
                ("backup", self.config.backup.schedule, self._backup),
                ("compaction", self.config.compaction.schedule, self._compact),
            ):
                if expression:
                    nursery.start_soon(self._schedule, kind, expression, job)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def _schedule(self, kind: str, expression: str, job: Callable[[], str]) -> None:
        while True:
            due = next_time(expression, time.time())
            self.status[f"{kind}_next"] = dt.datetime.fromtimestamp(due, dt.UTC).isoformat()
            await trio.sleep_until(trio.current_time() + max(0.0, due - time.time()))
            self.status[f"{kind}_state"] = "running"
            try:
                # Shielded: a stop waits for the job in hand (a backup is written
                # whole or not at all; a retention batch is one transaction).
                with trio.CancelScope(shield=True):
                    outcome = await trio.to_thread.run_sync(job)
            except (SlurpError, OSError) as exc:
                log.error("the scheduled %s failed: %s", kind, exc)
                self.status[f"{kind}_last_error"] = str(exc)
                self.status[f"{kind}_state"] = "failed"
                key = "backup_failures" if kind == "backup" else "compaction_failures"
                self.status[key] += 1
                continue
            self.status[f"{kind}_state"] = "idle"
            self.status[f"{kind}_last"] = outcome
            self.status[f"{kind}_last_at"] = dt.datetime.now(dt.UTC).isoformat()

    def _open(self) -> ContextStore:
        return ContextStore.open(self.config, self.passphrase)

    def _backup(self) -> str:
        def progress(done: int, total: int) -> None:
            self.status["backup_versions_done"] = done
            self.status["backup_versions_total"] = total

        dest = Path(self.config.backup.dest)
        with self._open() as model:
            made = create.create(model, dest, progress=progress)
        b = self.config.backup
        pruned = prune.prune(dest, prune.Policy(b.keep_daily, b.keep_weekly, b.keep_monthly))
        self.status["backups_made"] += 1
        log.info(
            "scheduled %s backup %s: %d versions, %d bytes; %d old backups pruned",
            made.kind,
            made.id,
            made.versions,
            made.bytes,
            len(pruned.removed),
        )
        return made.id

    def _compact(self) -> str:
        with self._open() as model:
            plan = compact.plan_retention(model)
            dropped = compact.apply_retention(model, plan)
            room = compact.space(model.store)
        self.status["compactions_run"] += 1
        self.status["retention_dropped"] += dropped
        self.status["store_free_bytes"] = room.free_bytes
        due = room.free_bytes >= self.config.compaction.free_threshold
        log.info(
            "scheduled compaction: %d versions dropped by retention; %d bytes of free pages%s",
            dropped,
            room.free_bytes,
            " (a compacting copy is due: it waits for an unmount)" if due else "",
        )
        return f"{dropped} versions dropped"

    async def _report(self) -> None:
        last: dict[str, Any] = {}
        try:
            while True:
                news = {k: v for k, v in self.status.items() if last.get(k) != v}
                if news and self.peer is not None:
                    await self.peer.notify("status", **news)
                    last.update(news)
                await trio.sleep(STATUS_INTERVAL)
        except PeerGone as exc:
            log.info("cannot report to the daemon (%s): stopping", exc)
            self.stop()

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        if message.kind == "stop":
            self.stop()
            return None
        raise SlurpError(f"the maintenance worker does not know {message.kind!r}")


async def _main(sock: Any) -> int:
    worker: MaintenanceWorker | None = None

    async def handle(message: Message) -> Mapping[str, Any] | None:
        if worker is None:
            return None
        return await worker.handle(message)

    peer, hello = await child_connect(sock, handle)
    secret = hello.fields.get("passphrase")
    worker = MaintenanceWorker(
        loads(str(hello["config"])), None if secret is None else base64.b64decode(secret)
    )
    worker.peer = peer
    await serve_while(peer, worker.run, worker.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = child_start(sys.argv[1:] if argv is None else argv, "maintenance")
    return trio.run(_main, args.sock)


if __name__ == "__main__":
    sys.exit(main())
