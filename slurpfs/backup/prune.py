"""Retention of backups: keep the newest backup of each of the last N days,
weeks (ISO) and months, and every backup a kept one is incremental on."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slurpfs.backup import catalog
from slurpfs.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Policy:
    daily: int = 7
    weekly: int = 4
    monthly: int = 6

    def __post_init__(self) -> None:
        if min(self.daily, self.weekly, self.monthly) < 0:
            raise ConfigError("backup retention counts must be 0 or more")
        if self.daily + self.weekly + self.monthly == 0:
            raise ConfigError("a backup retention that keeps nothing: keep at least one")


@dataclass(frozen=True, slots=True)
class Pruned:
    kept: list[str]
    removed: list[str]


def _periods(entry: catalog.Entry) -> tuple[str, str, str]:
    c = entry.created
    year, week, _ = c.isocalendar()
    return c.strftime("%Y-%m-%d"), f"{year}-W{week:02d}", c.strftime("%Y-%m")


def plan(entries: list[catalog.Entry], policy: Policy) -> set[str]:
    """Ids to keep (newest backup per period, per node; then their chains)."""
    keep: set[str] = set()
    newest_first = sorted(entries, key=lambda e: e.id, reverse=True)
    for slot, count in enumerate((policy.daily, policy.weekly, policy.monthly)):
        seen: dict[str, set[str]] = {}
        for entry in newest_first:
            periods = seen.setdefault(entry.node, set())
            period = _periods(entry)[slot]
            if period in periods or len(periods) >= count:
                continue
            periods.add(period)
            keep.add(entry.id)
    by_id = {e.id: e for e in entries}
    for backup_id in list(keep):
        parent = by_id[backup_id].parent
        while parent is not None and parent in by_id:
            keep.add(parent)
            parent = by_id[parent].parent
    return keep


def prune(
    dest: Path, policy: Policy, *, dry_run: bool = False, say: Callable[[str], None] | None = None
) -> Pruned:
    entries = [catalog.load(dest, i) for i in catalog.ids(dest)]
    keep = plan(entries, policy)
    removed = [e.id for e in entries if e.id not in keep]
    if not dry_run:
        for backup_id in removed:
            if say is not None:
                say(f"removing {backup_id}")
            # Renamed first, so an interrupted removal never leaves a half backup
            # that looks whole.
            doomed = dest / f".{backup_id}.removing"
            (dest / backup_id).rename(doomed)
            shutil.rmtree(doomed)
    return Pruned(sorted(keep), removed)
