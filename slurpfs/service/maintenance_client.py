"""The daemon's side of the maintenance worker (`slurpfs.service.maintenance_worker`):
hands it the configuration and keeps the status it reports for ``.slurp/status``
and the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from slurpfs.config import Config
from slurpfs.health import OK, WARN, Check
from slurpfs.service.wire import Message, Peer, WireError
from slurpfs.service.workers import store_hello


class MaintenanceClient:
    """`WorkerLogic` for the maintenance worker."""

    def __init__(self, config: Config, passphrase: bytes | None) -> None:
        self._config = config
        self._passphrase = passphrase
        self.status: dict[str, Any] = {}

    def setup(self) -> Mapping[str, Any]:
        return store_hello(self._config, self._passphrase)

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        if message.kind != "status" or message.id is not None:
            raise WireError(f"the maintenance worker sent an unexpected {message.kind!r}")
        self.status.update(message.fields)
        return None

    def connected(self, peer: Peer) -> None:
        pass

    def disconnected(self, reason: str) -> None:
        for key in ("backup_state", "compaction_state"):
            if self.status.get(key) == "running":
                self.status[key] = f"interrupted: the maintenance worker {reason}"

    async def feed(self, peer: Peer) -> None:
        await trio.sleep_forever()  # nothing to pass on: the worker keeps its own time

    def check(self) -> Check:
        """The ``maintenance`` health check: ``warn`` while the last scheduled run of a
        job failed (the mount serves files regardless), naming the job and why."""
        failed = [
            f"the last scheduled {job} failed: {self.status.get(f'{job}_last_error', '?')}"
            for job in ("backup", "compaction")
            if self.status.get(f"{job}_state") == "failed"
        ]
        if failed:
            return Check("maintenance", WARN, "; ".join(failed))
        made = self.status.get("backup_last")
        return Check("maintenance", OK, f"last backup {made}" if made else "no backup yet")

    def report(self) -> dict[str, Any]:
        """Lines for ``.slurp/status`` (numbers also become metrics)."""
        return {f"maintenance_{k}": v for k, v in sorted(self.status.items())}
