"""Hybrid logical clock.

A timestamp is one unsigned 64-bit integer: wall-clock milliseconds in the high
48 bits and a logical counter in the low 16. It never goes backwards on a node,
and `observe` moves it past any timestamp seen from elsewhere, so a version is
always stamped later than its parents.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

LOGICAL_BITS = 16
_LOGICAL_MASK = (1 << LOGICAL_BITS) - 1


def physical_ms(hlc: int) -> int:
    return hlc >> LOGICAL_BITS


def to_seconds(hlc: int) -> float:
    """The wall-clock time of a timestamp, as epoch seconds."""
    return physical_ms(hlc) / 1000.0


def from_datetime(when: datetime) -> int:
    """The greatest timestamp at or before `when` (used for "as of" reads)."""
    ms = int(when.astimezone(UTC).timestamp() * 1000)
    return (ms << LOGICAL_BITS) | _LOGICAL_MASK


class HybridClock:
    """Thread-safe HLC; `wall` returns nanoseconds (injectable for tests)."""

    def __init__(self, wall: Callable[[], int] = time.time_ns) -> None:
        self._wall = wall
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        with self._lock:
            candidate = (self._wall() // 1_000_000) << LOGICAL_BITS
            self._last = candidate if candidate > self._last else self._last + 1
            return self._last

    def observe(self, remote: int) -> None:
        with self._lock:
            self._last = max(self._last, remote)
