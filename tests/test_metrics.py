"""Metrics: one prometheus-client registry per daemon, rendered by the library.

The text is parsed with prometheus-client's own parser and the type of each
family checked: monotone counts are counters (``_total``), levels gauges, and
latencies histograms.
"""

from __future__ import annotations

import errno

import pytest
from conftest import Node
from fsutil import AUTH, OpsHarness, raises_errno
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from slurpfs.errors import AccessDenied
from slurpfs.fs import virtual
from slurpfs.fs.ops import Operations
from slurpfs.metrics import Metrics, is_counter
from slurpfs.model import ContextStore
from slurpfs.ucxl import parse

DIR = f"ucxl/{AUTH}/src/auth.go"
DEV = "developer"


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def labelled(family: Metric, suffix: str, label: str) -> dict[str, float]:
    """``{label value: sample value}`` of the samples ``<family><suffix>``."""
    name = family.name + suffix
    return {s.labels[label]: s.value for s in family.samples if s.name == name}


def test_statistics_are_counters_or_gauges_whatever_the_role_names() -> None:
    """Role names may hold `-`; statistics keyed by role become metric names.
    Expected: the text parses with prometheus-client's parser, every number under a
    valid name, monotone totals as counters (``_total``), levels as gauges, and
    what is not a number left out."""
    metrics = Metrics(process=False)
    stats = virtual.flatten({"index": {"documents": {"dev-ops": 3, "qa": 1}}, "uptime": 1.5})
    metrics.add_statistics(lambda: {**stats, "model_puts": 7, "ready": True, "name": "node"})
    found = families(metrics.render().decode())
    numbers = {
        n: (f.type, f.samples[0].name, f.samples[0].value) for n, f in found.items() if f.samples
    }
    assert numbers == {
        "slurpfs_index_documents_dev_ops": ("gauge", "slurpfs_index_documents_dev_ops", 3),
        "slurpfs_index_documents_qa": ("gauge", "slurpfs_index_documents_qa", 1),
        "slurpfs_uptime": ("gauge", "slurpfs_uptime", 1.5),
        "slurpfs_model_puts": ("counter", "slurpfs_model_puts_total", 7),
        # (an unlabelled gauge: 0 until the replication worker reports)
        "slurpfs_replication_under_replicated": (
            "gauge",
            "slurpfs_replication_under_replicated",
            0,
        ),
    }
    # Nothing observed yet: the histograms and labelled counters are declared, typed.
    assert {n: f.type for n, f in found.items() if not f.samples} == {
        "slurpfs_fuse_request_seconds": "histogram",
        "slurpfs_model_seconds": "histogram",
        "slurpfs_crypto_seconds": "histogram",
        "slurpfs_search_query_seconds": "histogram",
        "slurpfs_replication_seconds": "histogram",
        "slurpfs_redis_seconds": "histogram",
        "slurpfs_errors": "counter",
        "slurpfs_audit_events": "counter",
        "slurpfs_replication_lag_seconds": "gauge",
        "slurpfs_replication_bodies": "gauge",
        "slurpfs_replication_failures": "counter",
    }


def test_the_process_collector_is_in_a_daemons_registry() -> None:
    found = families(Metrics().render().decode())
    assert found["slurpfs_process_cpu_seconds"].type == "counter"
    assert found["slurpfs_process_resident_memory_bytes"].type == "gauge"


async def test_requests_reads_saves_and_crypto_are_timed(
    fs: OpsHarness, ops: Operations, node: Node
) -> None:
    """Expected after a mkdir, a save, a read and a refused name through the FUSE
    handlers: a latency histogram per FUSE operation, the model's put and get, the
    seal of the new version; the refused name counted as an ``invalid`` error; the
    audit's allowed entries counted; the store's counters as ``_total`` counters."""
    await fs.makedirs(DIR)
    await fs.write(f"{DIR}/{DEV}", b"hello\n")
    assert await fs.read(f"{DIR}/{DEV}") == b"hello\n"
    with raises_errno(errno.EINVAL):
        await fs.mkdir(f"{DIR}/.git")

    found = families((await fs.read(".slurp/metrics")).decode())

    fuse = found["slurpfs_fuse_request_seconds"]
    assert fuse.type == "histogram"
    counts = labelled(fuse, "_count", "op")
    assert {"lookup", "mkdir", "create", "write", "flush", "release", "open", "read"} <= set(counts)
    assert all(n >= 1 for n in counts.values())
    assert labelled(found["slurpfs_model_seconds"], "_count", "op") == {"put": 1, "get": 1}
    assert labelled(found["slurpfs_crypto_seconds"], "_count", "op") == {"seal": 1}
    assert labelled(found["slurpfs_errors"], "_total", "kind") == {"invalid": 1}
    assert labelled(found["slurpfs_audit_events"], "_total", "outcome")["allowed"] >= 2
    assert found["slurpfs_model_puts"].type == "counter"
    assert found["slurpfs_model_puts"].samples[0].name == "slurpfs_model_puts_total"
    assert found["slurpfs_model_store_versions"].type == "gauge"
    assert found["slurpfs_fs_commits"].type == "counter"


def test_opening_an_envelope_is_timed(model: ContextStore, node: Node) -> None:
    """Expected: a read that is not in the plaintext cache opens the envelope, and
    the ``open`` is observed; a denied read is counted as an audit denial."""
    address = parse(f"ucxl://{AUTH}/src/auth.go")
    model.put(address, DEV, b"sealed\n")
    other = node.reopen(model)  # as a fresh process: nothing cached
    metrics = Metrics(process=False)
    other.instrument(metrics)
    assert other.get(address, DEV).data == b"sealed\n"
    with pytest.raises(AccessDenied):
        other.get(address, DEV, caller_roles=["reviewer"], who="uid 4242")
    found = families(metrics.render().decode())
    assert labelled(found["slurpfs_crypto_seconds"], "_count", "op") == {"open": 1}
    assert labelled(found["slurpfs_model_seconds"], "_count", "op")["get"] == 2
    outcomes = labelled(found["slurpfs_audit_events"], "_total", "outcome")
    assert outcomes == {"allowed": 1, "denied": 1}


def test_counter_names_are_those_of_monotone_statistics() -> None:
    for name in ("model_puts", "fs_commits", "http_requests", "indexer_batches", "redis_hits"):
        assert is_counter(name), name
    for name in ("model_store_versions", "indexer_lag", "fs_inodes", "search_ready"):
        assert not is_counter(name), name
