"""Read-only status files under ``.slurp/``: status, health, metrics, peers, audit, refused.

Each file is rendered from live state. A rendering is kept for a moment so
that the ``getattr`` before an ``open`` and the ``open`` itself agree: the size a
file reports is the size ``cat`` reads. Handles on these files use direct I/O,
so a newer rendering at the next ``open`` is never cut to an older size.
A per-user file (``refused``) is rendered for the calling uid each time (it is
small), so the size each user is told is that of their own file.
Nothing here contains context plaintext.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slurpfs import __version__, audit, health
from slurpfs.metrics import Metrics
from slurpfs.model import ContextStore

Provider = Callable[[], str]
PerUser = Callable[[int], str]  # renders the file for one uid
# Status files only the mount's owner (and root) may read: the audit trail names
# every user, role and address accessed.
PRIVATE_STATUS = frozenset({"audit"})
_FRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class FsStatistics:
    """Counters of the filesystem layer (also exported as metrics)."""

    inodes: int
    open_files: int
    open_dirs: int
    scratch_files: int
    scratch_bytes: int
    scratch_limit: int
    commits: int
    commit_failures: int
    syncs: int  # syncs of the store (one covers every write before it)
    invalidations: int
    view_hits: int  # model reads answered by the fs layer's memo (`slurpfs.fs.view`)
    view_misses: int
    busy_poll_windows: int  # spells of polling for requests (`slurpfs.fs.busypoll`)


class VirtualFiles:
    """Named providers of text, rendered on demand and cached briefly."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._providers: dict[str, Provider] = {}
        self._per_user: dict[str, PerUser] = {}
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._clock = clock

    def register(self, name: str, provider: Provider) -> None:
        self._providers[name] = provider
        self._cache.pop(name, None)

    def register_per_user(self, name: str, provider: PerUser) -> None:
        """A file whose content depends on who reads it (`render` passes the uid)."""
        self._per_user[name] = provider

    def names(self) -> list[str]:
        return sorted([*self._providers, *self._per_user])

    def __contains__(self, name: str) -> bool:
        return name in self._providers or name in self._per_user

    def produce(self, name: str) -> bytes:
        """A new rendering that leaves the one kept for the mount alone (the HTTP endpoints)."""
        return self._providers[name]().encode("utf-8")

    def render(self, name: str, *, fresh: bool = False, uid: int = 0) -> bytes:
        """The file's bytes (for `uid`); `fresh` forces a new rendering."""
        per_user = self._per_user.get(name)
        if per_user is not None:
            return per_user(uid).encode("utf-8")
        now = self._clock()
        cached = self._cache.get(name)
        if cached is not None and not fresh and now - cached[0] < _FRESH_SECONDS:
            return cached[1]
        data = self._providers[name]().encode("utf-8")
        self._cache[name] = (now, data)
        return data


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _flatten(f"{prefix}{f.name}_", getattr(value, f.name), out)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}{key}_", item, out)
    else:
        out[prefix.rstrip("_")] = value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) statistics dataclass as ``{"a_b": number}`` (mappings nest by key)."""
    out: dict[str, Any] = {}
    _flatten(prefix, value, out)
    return out


def _text(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(map(str, value))
    return str(value)


def render_status(info: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    lines = [f"slurpfs {__version__}"]
    lines += [f"{k}: {_text(v)}" for k, v in info.items()]
    lines += [f"{k}: {_text(v)}" for k, v in sorted(stats.items())]
    return "\n".join(lines) + "\n"


_HEALTH_HEADLINE = {health.OK: "ok", health.WARN: "ok, with warnings", health.FAIL: "unhealthy"}
_HEALTH_WORD = {health.OK: "ok", health.WARN: "warn", health.FAIL: "FAILING"}


def render_health(checks: Sequence[health.Check]) -> str:
    lines = [_HEALTH_HEADLINE[health.overall(checks)]]
    lines += [f"{c.name}: {_HEALTH_WORD[c.status]} - {c.detail}" for c in checks]
    return "\n".join(lines) + "\n"


def render_audit(path: Path, limit: int = 100) -> str:
    """The newest audit entries, one JSON object per line."""
    if not path.exists():
        return ""
    entries = audit.read(path, limit)
    return "".join(
        json.dumps({n: getattr(e, n) for n in e.__slots__}, sort_keys=True) + "\n" for e in entries
    )


def render_peers() -> str:
    return "no peers: replication is not configured on this node\n"


def register_defaults(
    files: VirtualFiles,
    model: ContextStore,
    audit_log: Path,
    *,
    info: Callable[[], Mapping[str, object]],
    fs_stats: Callable[[], FsStatistics],
    checks: Callable[[], Sequence[health.Check]],
    metrics: Metrics,
    extra_stats: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """The standard ``.slurp/`` files over a model and the filesystem's counters.

    `checks` are the node's health checks (`slurpfs.health`); `extra_stats` adds
    flattened counters of other components (search, indexer, HTTP endpoints).
    ``metrics`` is `metrics`' registry rendered by prometheus-client; the numbers
    of ``status`` are in it too (`Metrics.add_statistics`).
    """
    started = time.time()

    def stats() -> dict[str, Any]:
        out = flatten(model.statistics(), "model_")
        out.update(flatten(fs_stats(), "fs_"))
        if extra_stats is not None:
            out.update(extra_stats())
        out["uptime_seconds"] = round(time.time() - started, 3)
        return out

    def status() -> str:
        facts: dict[str, object] = {
            **info(),
            "data_dir": str(model.config.data_dir),
            "node": f"{model.config.node.name} ({model.keyring.node.node_id_hex})",
            "roles_held": ", ".join(sorted(model.held_roles())) or "(none)",
            "roles_configured": ", ".join(model.role_names),
        }
        return render_status(facts, stats())

    files.register("status", status)
    files.register("health", lambda: render_health(checks()))
    metrics.add_statistics(stats)
    data_dir, min_free = model.config.data_dir, model.config.health.min_free_bytes
    metrics.add_statistics(lambda: health.numbers(checks()))
    metrics.add_statistics(lambda: health.disk_numbers(data_dir, min_free))
    files.register("metrics", lambda: metrics.render().decode("utf-8"))
    files.register("peers", render_peers)
    files.register("audit", lambda: render_audit(audit_log))
