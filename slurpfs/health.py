"""Health checks of a node: what ``.slurp/health`` and the HTTP ``/health`` endpoints report.

Each check has a name, a status (``ok``, ``warn`` or ``fail``) and a one-line
detail for a person. The node is *healthy* when no check fails (a warning is
worth a look, not an alarm), and *ready* when the checks in `READY` pass: the
store answers and the mount answers. Details say no more than ``.slurp/status``
does: counts, sizes and states, never a context's content or address.

Checks: ``store`` (a read transaction works; warns when the LMDB map is nearly
full), ``mount`` (supplied by the caller: the filesystem layer knows only
whether it is shutting down, the daemon probes the mount through the kernel),
``search`` (the indexes are open and the indexer keeps up), ``audit`` (the last
entry could be written and the log is still the file at its path), ``disk``
(free space under the data directory, against ``health.min_free_bytes``) and, in
a mount's daemon, ``tasks`` (its background tasks run: ``warn`` while one restarts
after a failure, ``fail`` once one failed five times in a row; see
`slurpfs.service.supervisor`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from slurpfs.model import ContextStore

Status = Literal["ok", "warn", "fail"]
OK: Status = "ok"
WARN: Status = "warn"
FAIL: Status = "fail"
READY = ("store", "mount")
MAP_WARN = 0.9  # share of store.map_size in use from which the store check warns


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == OK


def overall(checks: Sequence[Check]) -> Status:
    """``fail`` if any check fails, else ``warn`` if any warns, else ``ok``."""
    statuses = {c.status for c in checks}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else OK


def ready(checks: Sequence[Check]) -> bool:
    """Every check named in `READY` is present and ok."""
    passed = {c.name for c in checks if c.ok}
    return all(name in passed for name in READY)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def store_check(model: ContextStore) -> Check:
    problem = model.store.problem()
    if problem is not None:
        return Check("store", FAIL, f"the store does not answer: {problem}")
    st = model.store.statistics()
    used = st.map_used / st.map_size if st.map_size else 0.0
    detail = (
        f"open: {st.versions} versions; {used:.0%} of store.map_size ({_size(st.map_size)}) in use"
    )
    if used >= MAP_WARN:
        return Check("store", WARN, detail + "; raise store.map_size before it fills up")
    return Check("store", OK, detail)


def audit_check(model: ContextStore) -> Check:
    problem = model.audit_problem()
    if problem is not None:
        return Check("audit", FAIL, problem)
    return Check("audit", OK, "the last entry was written")


def disk_check(path: os.PathLike[str] | str, min_free: int) -> Check:
    try:
        sv = os.statvfs(path)
    except OSError as exc:
        return Check(
            "disk", FAIL, f"cannot tell the free space of the data directory: {exc.strerror}"
        )
    free = sv.f_bavail * sv.f_frsize
    detail = (
        f"{_size(free)} free of {_size(sv.f_blocks * sv.f_frsize)} under the data directory;"
        f" health.min_free_bytes is {_size(min_free)}"
    )
    return Check("disk", FAIL if free < min_free else OK, detail)


def disk_numbers(path: os.PathLike[str] | str, min_free: int) -> dict[str, int]:
    """Free bytes under the data directory and the bound of the ``disk`` check (metrics)."""
    try:
        sv = os.statvfs(path)
    except OSError:
        return {"disk_min_free_bytes": min_free}
    return {"disk_free_bytes": sv.f_bavail * sv.f_frsize, "disk_min_free_bytes": min_free}


LEVEL = {OK: 0, WARN: 1, FAIL: 2}  # a check's status as a number (``slurpfs_health_<check>``)


def numbers(checks: Sequence[Check]) -> dict[str, int]:
    """``health_<check>``: 0 ok, 1 warn, 2 fail, for metrics and alert rules."""
    return {f"health_{c.name}": LEVEL[c.status] for c in checks}


def mount_check(stopping: bool) -> Check:
    """The filesystem layer's own view: it answers (it is answering) unless shutting down."""
    if stopping:
        return Check("mount", FAIL, "shutting down")
    return Check("mount", OK, "answering")


class Health:
    """The checks of one mounted node, from live state (cheap enough to run per request)."""

    def __init__(
        self,
        model: ContextStore,
        *,
        search: Callable[[], Check],
        stopping: Callable[[], bool],
    ) -> None:
        self.model = model
        self._search = search
        self._stopping = stopping
        # Checks of the parts above the filesystem layer (the daemon's ``tasks``).
        self.extra: list[Callable[[], Check]] = []

    def store(self) -> Check:
        return store_check(self.model)

    def checks(self, mount: Check | None = None) -> list[Check]:
        """Every check; `mount` replaces the filesystem layer's own view of the mount."""
        model = self.model
        return [
            self.store(),
            mount if mount is not None else mount_check(self._stopping()),
            self._search(),
            audit_check(model),
            disk_check(model.config.data_dir, model.config.health.min_free_bytes),
            *(check() for check in self.extra),
        ]
