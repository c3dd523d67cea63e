"""The daemon's metrics: one prometheus-client `CollectorRegistry`, rendered by the library.

Two kinds of metric live in it:

- **Latency histograms and event counters** the code observes as things happen
  (`Metrics.fuse`, `model`, `crypto`, `search`, `replication`, `redis`; `errors`,
  `audit`). A component takes a `Latency` (one histogram, its children resolved
  once per label so the hot path pays a dict lookup and the library's observe)
  and calls ``observe`` or uses ``time``. Without a daemon (the command line,
  tests) components hold `NO_LATENCY`, which does nothing.
- **Statistics** the components already keep (their ``statistics()`` dataclasses,
  flattened as ``.slurp/status`` shows them): `StatsCollector` reads them at
  each scrape and exposes each number as a counter (``slurpfs_<name>_total``) when
  its name is in `COUNTERS`, else as a gauge (``slurpfs_<name>``).

Adding metrics (replication, say): observe latencies into ``Metrics.replication``
(labels ``push``/``fetch``), failures into ``Metrics.replication_failures``, each
peer's lag into ``Metrics.replication_lag.labels(peer)``, body counts into
``Metrics.replication_bodies`` and ``replication_under_replicated`` (the alert rules in
``monitoring/`` use these names), and register the component's flattened
statistics with `Metrics.add_statistics`, listing its monotone totals in
`COUNTERS`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

PREFIX = "slurpfs_"
# The text format `generate_latest` writes (the library's CONTENT_TYPE_LATEST names
# the newer 1.0.0 format, which its renderer does not produce).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a cached FUSE getattr (tens of microseconds) to a slow disk (seconds).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# Flattened statistics that only ever grow while the process runs: exposed as
# counters. Every other number is a gauge. (Anchored regular expressions.)
COUNTERS = tuple(
    re.compile(p)
    for p in (
        r"model_(puts|gets|denied|corrupt|prepared_keys_(taken|missed))",
        r"model_cache_(hits|misses)",
        r"redis_(hits|misses|errors|puts|rejected|reconnects)",
        r"fs_(commits|commit_failures|syncs|invalidations|view_hits|view_misses|busy_poll_windows)",
        r"search_(queries|cached|invalid|not_ready)",
        r"(worker_search|index)_(indexed|removed|skipped|searches|query_errors)",
        r"indexer_(documents_indexed|documents_removed|skipped|batches|dropped_notices|errors|tidied)",
        r"http_(connections|requests|bad_requests|timeouts|rejected|failures)",
        r"worker_[a-z_]+_(starts|unexpected_exits)",
        r"task_[a-z_]+_restarts",
        r"task_replication_bodies_dropped_[a-z_]+",
    )
)
_UNMETRIC = re.compile(r"[^a-zA-Z0-9_:]")

StatsSource = Callable[[], Mapping[str, Any]]


def is_counter(name: str) -> bool:
    return any(p.fullmatch(name) for p in COUNTERS)


def metric_name(name: str) -> str:
    """``slurpfs_<name>`` with what a metric name may not hold (a role's ``-``) as ``_``."""
    return PREFIX + _UNMETRIC.sub("_", name)


class StatsCollector(Collector):
    """The numbers of flattened statistics, read at each scrape (counters per `COUNTERS`)."""

    def __init__(self) -> None:
        self._sources: list[StatsSource] = []

    def add(self, source: StatsSource) -> None:
        self._sources.append(source)

    def numbers(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for source in self._sources:
            for name, value in source().items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    out[name] = value
        return out

    def collect(self) -> Iterable[Metric]:
        for name, value in sorted(self.numbers().items()):
            if is_counter(name):
                yield CounterMetricFamily(metric_name(name), f"{name} (total)", value=value)
            else:
                yield GaugeMetricFamily(metric_name(name), name, value=value)


class Latency:
    """Observes durations into one histogram, its labelled children resolved once."""

    __slots__ = ("_histogram", "_children")

    def __init__(self, histogram: Histogram | None) -> None:
        self._histogram = histogram
        self._children: dict[str, Any] = {}

    def observe(self, label: str, seconds: float) -> None:
        if self._histogram is None:
            return
        child = self._children.get(label)
        if child is None:
            child = self._children[label] = self._histogram.labels(label)
        child.observe(seconds)

    @contextmanager
    def time(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(label, time.perf_counter() - start)


NO_LATENCY = Latency(None)


class Events:
    """Counts events by kind into one labelled counter (or nowhere, for `NO_EVENTS`)."""

    __slots__ = ("_counter", "_children")

    def __init__(self, counter: Counter | None) -> None:
        self._counter = counter
        self._children: dict[str, Any] = {}

    def count(self, kind: str) -> None:
        if self._counter is None:
            return
        child = self._children.get(kind)
        if child is None:
            child = self._children[kind] = self._counter.labels(kind)
        child.inc()


NO_EVENTS = Events(None)


def _histogram(registry: CollectorRegistry, name: str, doc: str, label: str) -> Latency:
    return Latency(
        Histogram(PREFIX + name, doc, [label], registry=registry, buckets=LATENCY_BUCKETS)
    )


class Metrics:
    """One daemon's registry: latency histograms, event counters, statistics, the process."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(namespace="slurpfs", registry=self.registry)
        r = self.registry
        self.fuse = _histogram(r, "fuse_request_seconds", "FUSE requests by operation", "op")
        self.model = _histogram(r, "model_seconds", "Context reads and saves (get, put)", "op")
        self.crypto = _histogram(r, "crypto_seconds", "Envelope seal and open", "op")
        self.search = _histogram(r, "search_query_seconds", "Search queries by kind", "kind")
        self.replication = _histogram(r, "replication_seconds", "Replication push and fetch", "op")
        self.redis = _histogram(r, "redis_seconds", "Calls to the Redis tier", "op")
        # Replication (set by the daemon from its replication worker's reports):
        # seconds each peer is behind, and failed pushes and fetches.
        self.replication_lag = Gauge(
            PREFIX + "replication_lag_seconds", "Seconds a peer is behind", ["peer"], registry=r
        )
        # Bodies held here (copies, caches) and addresses with fewer than R reachable
        # copies, as the worker last counted them.
        self.replication_bodies = Gauge(
            PREFIX + "replication_bodies", "Bodies held here by kind", ["kind"], registry=r
        )
        self.replication_under_replicated = Gauge(
            PREFIX + "replication_under_replicated",
            "Addresses with fewer than R reachable copies of their bodies",
            registry=r,
        )
        self.replication_failures = Events(
            Counter(PREFIX + "replication_failures", "Failed replication by op", ["op"], registry=r)
        )
        self.errors = Events(
            Counter(PREFIX + "errors", "Failed requests by kind", ["kind"], registry=r)
        )
        self.audit = Events(
            Counter(PREFIX + "audit_events", "Audit entries by outcome", ["outcome"], registry=r)
        )
        self.stats = StatsCollector()
        r.register(self.stats)

    def add_statistics(self, source: StatsSource) -> None:
        """Expose a component's flattened statistics (see `COUNTERS`)."""
        self.stats.add(source)

    def render(self) -> bytes:
        """The Prometheus text exposition (`CONTENT_TYPE`) of the whole registry."""
        return generate_latest(self.registry)
