"""What the daemon's HTTP endpoints answer (docs/ARCHITECTURE.md, "Health and the HTTP endpoints").

=================  =====================================================================
``/metrics``       ``.slurp/metrics``, rendered afresh by prometheus-client (text format 0.0.4)
``/health/live``   200 ``{"status": "ok"}`` whenever the trio loop answers at all
``/health/ready``  200 once the store and the mount answer; 503 before, and from the
                   moment shutdown begins: ``{"status", "checks": {name: status}}``
``/health``        503 if any check fails, else 200: ``{"status", "checks": {name: status}}``
``/health/checks`` the same status code, every check with its detail:
                   ``{"status", "checks": [{"name", "status", "detail"}]}``
=================  =====================================================================

The checks are `slurpfs.health`'s, as in ``.slurp/health``, except ``mount``:
here it is `MountProbe`, a real request through the kernel to the mount.
Nothing here says more than ``.slurp/status`` and ``.slurp/metrics`` do.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from slurpfs import health
from slurpfs.health import FAIL, OK, Check, Health
from slurpfs.metrics import CONTENT_TYPE
from slurpfs.service.http import JSON, Response, Route

log = logging.getLogger("slurpfs.http")

METRICS_CONTENT_TYPE = CONTENT_TYPE
PROBE_TIMEOUT = 2.0  # seconds the mount has to answer a probe
PROBE_FRESH = 1.0  # seconds a probe's answer is reused


class MountProbe:
    """Whether the mount answers: ``stat`` of a status file through the kernel.

    The ``stat`` runs in a worker thread: the daemon's own FUSE loop answers it,
    so a loop that is stuck (or a mount the kernel no longer has) shows. One
    probe runs at a time and its answer is reused for `fresh` seconds, however
    many clients ask. A probe that gets no answer within `timeout` is left
    behind in its thread; until that thread returns no other is started, and
    the check fails saying how long the mount has been silent.
    """

    def __init__(
        self,
        path: Path,
        stopping: Callable[[], bool],
        *,
        timeout: float = PROBE_TIMEOUT,
        fresh: float = PROBE_FRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._stopping = stopping
        self.timeout = timeout
        self.fresh = fresh
        self._clock = clock
        self._last: Check | None = None
        self._last_at = 0.0
        self._running: trio.Event | None = None
        self._waiting_since: float | None = None  # a probe thread has not returned since

    async def check(self) -> Check:
        if self._stopping():
            return health.mount_check(stopping=True)
        if self._last is not None and self._clock() - self._last_at < self.fresh:
            return self._last
        if self._running is not None:  # another request's probe: share its answer
            await self._running.wait()
            return self._last or Check("mount", FAIL, "the probe of the mount was interrupted")
        self._running = trio.Event()
        try:
            self._last = await self._probe()
            self._last_at = self._clock()
            return self._last
        finally:
            self._running.set()
            self._running = None

    async def _probe(self) -> Check:
        if self._waiting_since is not None:
            silent = self._clock() - self._waiting_since
            return Check(
                "mount", FAIL, f"a request to the mount has had no answer for {silent:.0f} s"
            )
        self._waiting_since = self._clock()
        with trio.move_on_after(self.timeout):
            try:
                await trio.to_thread.run_sync(self._stat, abandon_on_cancel=True)
            except OSError as exc:
                return Check("mount", FAIL, f"the mount does not answer: {exc.strerror or exc}")
            return Check("mount", OK, "answering")
        return Check("mount", FAIL, f"the mount did not answer within {self.timeout:g} s")

    def _stat(self) -> None:  # in a worker thread
        try:
            os.stat(self.path)
        finally:
            self._waiting_since = None


def _json(status: int, body: Mapping[str, Any]) -> Response:
    return Response(status, (json.dumps(body) + "\n").encode(), JSON)


class Endpoints:
    """The routes of the daemon's HTTP server over its health checks and metrics."""

    def __init__(self, health: Health, probe: MountProbe, metrics: Callable[[], bytes]) -> None:
        self.health = health
        self.probe = probe
        self._metrics = metrics

    def routes(self) -> dict[str, Route]:
        return {
            "/metrics": self.metrics,
            "/health": self.summary,
            "/health/live": self.live,
            "/health/ready": self.ready,
            "/health/checks": self.checks,
        }

    async def metrics(self) -> Response:
        return Response(200, self._metrics(), METRICS_CONTENT_TYPE)

    async def live(self) -> Response:
        return _json(200, {"status": OK})

    async def ready(self) -> Response:
        checks = [self.health.store(), await self.probe.check()]
        ready = health.ready(checks)
        return _json(
            200 if ready else 503,
            {"status": OK if ready else FAIL, "checks": {c.name: c.status for c in checks}},
        )

    async def _all(self) -> tuple[int, health.Status, list[Check]]:
        checks = self.health.checks(mount=await self.probe.check())
        status = health.overall(checks)
        return (503 if status == FAIL else 200), status, checks

    async def summary(self) -> Response:
        code, status, checks = await self._all()
        return _json(code, {"status": status, "checks": {c.name: c.status for c in checks}})

    async def checks(self) -> Response:
        code, status, checks = await self._all()
        listed = [{"name": c.name, "status": c.status, "detail": c.detail} for c in checks]
        return _json(code, {"status": status, "checks": listed})
