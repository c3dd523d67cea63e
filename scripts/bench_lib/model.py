"""Section `model`: the context model without FUSE (put, cold get, warm get, stored size).

Each context is put at its own address for role `developer` (sealed to two reader
roles, developer and architect, as the default configuration says). "Cold" means a
fresh `ContextStore` (empty plaintext cache) on a store written by a previous one;
the LMDB file is still in the OS page cache, so cold is not cold-from-disk.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zstandard

from bench_lib import corpus
from bench_lib.common import Json, Options, Section, latency, mib, percentile, table, timed_loop
from slurpfs import config, ucxl
from slurpfs.audit import AuditLog
from slurpfs.cache.memory import PlaintextCache
from slurpfs.crypto import envelope as env
from slurpfs.crypto.keys import NodeIdentity
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import ContextStore
from slurpfs.store import Store

GOALS_US = {"put": 300.0, "get_cold": 100.0, "get_warm": 100.0}


def _config(data_dir: Path) -> config.Config:
    # An explicit, empty environment: the caller's SLURPFS_* variables must not leak in.
    return config.load(
        environ={"HOME": str(data_dir.parent)}, overrides={"node.data_dir": str(data_dir)}
    )


def run(opts: Options) -> Section:
    docs = list(corpus.generate(opts.docs))
    addresses = [ucxl.parse(d.address) for d in docs]
    role = corpus.ROLE
    zstd = zstandard.ZstdCompressor(level=env.ZSTD_LEVEL)
    runs: list[Json] = []
    size: Json = {}
    for _ in range(opts.runs):
        with tempfile.TemporaryDirectory(prefix="bench-model-", dir=opts.workdir) as tmp:
            ops, size = _one_run(Path(tmp) / "data", docs, addresses)
        runs.append(ops)
    size["raw_plaintext_bytes"] = sum(len(d.data) for d in docs)
    size["zstd_only_bytes"] = sum(len(zstd.compress(d.data)) for d in docs)
    profile = None
    if opts.profile:
        with tempfile.TemporaryDirectory(prefix="bench-profile-", dir=opts.workdir) as tmp:
            profile = _profile(Path(tmp) / "data", docs, addresses)

    # Each figure is the median over the runs (one run: that run); every run is kept.
    ops = {
        name: {key: _median([r[name][key] for r in runs]) for key in runs[0][name]}
        for name in runs[0]
    }
    for name, summary in ops.items():
        p50s = [r[name]["p50_us"] for r in runs]
        summary["p50_us_min"], summary["p50_us_max"] = min(p50s), max(p50s)
    goals = {
        name: {"p50_us": ops[name]["p50_us"], "goal_p50_us": goal, "met": ops[name]["p50_us"] < goal}
        for name, goal in GOALS_US.items()
    }  # fmt: skip
    data: Json = {
        "contexts": len(docs),
        "context_bytes": len(docs[0].data),
        "role": role,
        "readers": list(_config(opts.workdir / "unused").readers_of(role)),
        "runs": len(runs),
        "ops": ops,
        "every_run": runs,
        "size": size,
        "goals": goals,
    }
    if profile is not None:
        data["profile"] = profile
    return Section(data, _markdown(data))


def _median(values: list[Any]) -> Any:
    if any(v is None for v in values):
        return None
    middle = statistics.median(values)
    if all(isinstance(v, int) for v in values) and middle == int(middle):
        return int(middle)
    return round(middle, 2)


def _one_run(
    data_dir: Path, docs: list[corpus.Doc], addresses: list[ucxl.Address]
) -> tuple[Json, Json]:
    """Put every context into a new store, then read each twice from a fresh ContextStore."""
    cfg = _config(data_dir)
    role = corpus.ROLE
    items = list(zip(addresses, docs, strict=True))
    store = ContextStore.init(cfg, None, kdf=KdfParams.weak())
    try:
        gc.collect()
        put_ns, put_wall, _ = timed_loop(items, lambda it: store.put(it[0], role, it[1].data))
        store.sync()
    finally:
        store.close()
    ops: Json = {"put": latency(put_ns, put_wall)}
    store = ContextStore.open(cfg, None, kdf=KdfParams.weak())
    try:
        for name in ("get_cold", "get_warm"):
            gc.collect()
            ns, wall, got = timed_loop(addresses, lambda a: store.get(a, role))
            bad = sum(
                1 for c, d in zip(got, docs, strict=True) if getattr(c, "data", None) != d.data
            )
            if bad:
                raise RuntimeError(f"{name}: {bad} contexts came back different")
            ops[name] = latency(ns, wall)
        stats = store.statistics()
    finally:
        store.close()
    st = (cfg.data_dir / "store" / "data.mdb").stat()
    size: Json = {
        "envelope_bytes": stats.store.envelope_bytes,
        "lmdb_file_bytes": st.st_size,
        "lmdb_allocated_bytes": st.st_blocks * 512,
        "lmdb_map_used_bytes": stats.store.map_used,
        "versions": stats.store.versions,
    }
    return ops, size


def _markdown(data: Json) -> list[str]:
    ops, size, goals = data["ops"], data["size"], data["goals"]
    lines = [
        f"### model: {data['contexts']:,} contexts of {data['context_bytes']:,} bytes "
        f"(role `{data['role']}`, sealed to {', '.join(data['readers'])})",
        "",
        "Cold: first read in a fresh `ContextStore` (empty plaintext cache) of a store written by "
        "another; the LMDB file is in the OS page cache. Warm: the second pass. "
        f"Each figure is the median over {data['runs']} run(s) on a new store; the last column "
        "shows the spread of p50 between runs.",
        "",
    ]
    labels = {"put": "put", "get_cold": "get, cold (fresh process cache)", "get_warm": "get, warm"}
    lines += table(
        ["operation", "ops/s", "mean µs", "p50 µs", "p90 µs", "p99 µs", "max µs", "goal p50", "met",
         "p50 min–max over runs"],
        (
            [labels[k], v["ops_per_s"], v["mean_us"], v["p50_us"], v["p90_us"], v["p99_us"], v["max_us"],
             f"< {goals[k]['goal_p50_us']:.0f} µs" if k in goals else None,
             ("yes" if goals[k]["met"] else "**no**") if k in goals else None,
             f"{v['p50_us_min']:.0f}–{v['p50_us_max']:.0f}"]
            for k, v in ops.items()
        ),
    )  # fmt: skip
    raw = size["raw_plaintext_bytes"]
    lines += [""]
    lines += table(
        ["stored size", "MiB", "vs raw plaintext"],
        (
            [name, mib(size[key]), f"{size[key] / raw:.2f}x"]
            for name, key in (
                ("raw plaintext", "raw_plaintext_bytes"),
                ("zstd level 3 alone (per document)", "zstd_only_bytes"),
                ("envelopes (`statistics().envelope_bytes`)", "envelope_bytes"),
                ("LMDB pages in use (`map_used`)", "lmdb_map_used_bytes"),
                ("LMDB data.mdb file size", "lmdb_file_bytes"),
                ("LMDB data.mdb allocated on disk", "lmdb_allocated_bytes"),
            )
        ),
    )
    if "profile" in data:
        lines += ["", *_profile_markdown(data["profile"])]
    return lines


# -- stage breakdown (--profile) ----------------------------------------------------------


class _Stages:
    """Inclusive time per call path: a stack of the wrapped calls currently running."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, ...], list[int]] = {}  # insertion order = first entry
        self._stack: list[str] = []

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.perf_counter_ns
        stack, samples = self._stack, self.samples

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append(label)
            path = tuple(stack)
            bucket = samples.get(path)
            if bucket is None:
                bucket = samples[path] = []
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                bucket.append(clock() - t0)
                stack.pop()

        return timed


class _TimedCompressor:
    def __init__(self, real: Any, compress: Callable[..., Any]) -> None:
        self._real = real
        self.compress = compress


@contextmanager
def _instrumented(stages: _Stages) -> Iterator[None]:
    """Wrap the calls of the put/get paths with timers; restore everything afterwards."""
    import nacl.bindings as sodium

    targets: list[tuple[str, Any, str]] = [
        ("ContextStore.put", ContextStore, "put"),
        ("ContextStore.get", ContextStore, "get"),
        ("Store.leaves (LMDB read txn)", Store, "leaves"),
        ("Store.head (LMDB read txn)", Store, "head"),
        ("Store.commit (LMDB write txn)", Store, "commit"),
        ("Store.read_version (LMDB read txn)", Store, "read_version"),
        ("PlaintextCache.put", PlaintextCache, "put"),
        ("PlaintextCache.get", PlaintextCache, "get"),
        ("AuditLog.record", AuditLog, "record"),
        ("envelope.seal", env, "seal"),
        ("envelope.verify", env, "verify"),
        ("envelope.decrypt", env, "decrypt"),
        ("Envelope.decode", env.Envelope, "decode"),
        ("check metadata + version id", ContextStore, "_check_matches"),
        ("SealedBox seal (per reader)", env, "wrap_data_key"),
        ("SealedBox open (unwrap_data_key)", env, "unwrap_data_key"),
        ("BLAKE2b-256", env, "blake2b_256"),
        ("Ed25519 sign", NodeIdentity, "sign"),
        ("Ed25519 verify", env, "verify_signature"),
        ("XChaCha20-Poly1305 encrypt", sodium, "crypto_aead_xchacha20poly1305_ietf_encrypt"),
        ("XChaCha20-Poly1305 decrypt", sodium, "crypto_aead_xchacha20poly1305_ietf_decrypt"),
        ("zstd decompress", env, "_decompress"),
    ]
    saved: list[tuple[Any, str, Any]] = []
    zstd_local: Any = env._zstd  # per-thread zstd contexts; this thread's gets a timed proxy
    real_compressor = zstd_local.compressor
    try:
        for label, owner, attr in targets:
            original = vars(owner)[attr]
            saved.append((owner, attr, original))
            wrapped = stages.wrap(label, getattr(owner, attr))
            if isinstance(original, classmethod | staticmethod):
                wrapped = staticmethod(wrapped)
            setattr(owner, attr, wrapped)
        zstd_local.compressor = _TimedCompressor(
            real_compressor, stages.wrap("zstd compress", real_compressor.compress)
        )
        yield
    finally:
        zstd_local.compressor = real_compressor
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def _profile(data_dir: Path, docs: list[corpus.Doc], addresses: list[ucxl.Address]) -> Json:
    """Per-stage µs of put, cold get and warm get on a fresh store (at most 2,000 contexts)."""
    n = min(len(docs), 2000)
    cfg = _config(data_dir)
    role = corpus.ROLE
    out: Json = {"contexts": n, "timer_overhead_us": _timer_overhead_us()}
    store = ContextStore.init(cfg, None, kdf=KdfParams.weak())
    try:
        stages = _Stages()
        with _instrumented(stages):
            for address, doc in zip(addresses[:n], docs[:n], strict=True):
                store.put(address, role, doc.data)
        out["put"] = _stage_rows(stages, n)
    finally:
        store.close()
    store = ContextStore.open(cfg, None, kdf=KdfParams.weak())
    try:
        for name in ("get_cold", "get_warm"):
            stages = _Stages()
            with _instrumented(stages):
                for address in addresses[:n]:
                    store.get(address, role)
            out[name] = _stage_rows(stages, n)
    finally:
        store.close()
    return out


def _timer_overhead_us() -> float:
    """What one timed wrapper adds to a call (median of the difference), in µs."""

    def nothing() -> None:
        return None

    timed = _Stages().wrap("nothing", nothing)
    clock = time.perf_counter_ns
    bare, wrapped = [], []
    for _ in range(20_000):
        t0 = clock()
        nothing()
        t1 = clock()
        timed()
        t2 = clock()
        bare.append(t1 - t0)
        wrapped.append(t2 - t1)
    return round((percentile(sorted(wrapped), 50) - percentile(sorted(bare), 50)) / 1000, 2)


def _stage_rows(stages: _Stages, n: int) -> list[Json]:
    """Rows in call-tree order: calls per op, mean µs per op (additive), median µs per call."""
    rows: list[Json] = []
    paths = list(stages.samples)  # first-entry order

    def visit(path: tuple[str, ...]) -> None:
        calls = stages.samples[path]
        rows.append(
            {"stage": path[-1], "depth": len(path) - 1, "calls_per_op": round(len(calls) / n, 2),
             "us_per_op": round(sum(calls) / n / 1000, 2),
             "p50_us_per_call": round(percentile(sorted(calls), 50) / 1000, 2)}
        )  # fmt: skip
        kids = [p for p in paths if len(p) == len(path) + 1 and p[:-1] == path]
        for kid in kids:
            visit(kid)
        if kids:
            rest = sum(calls) - sum(sum(stages.samples[k]) for k in kids)
            rows.append(
                {"stage": f"rest of {path[-1]} (its own Python code)", "depth": len(path),
                 "calls_per_op": None, "us_per_op": round(rest / n / 1000, 2),
                 "p50_us_per_call": None}
            )  # fmt: skip

    for root in (p for p in paths if len(p) == 1):
        visit(root)
    return rows


def _profile_markdown(profile: Json) -> list[str]:
    lines = [
        f"Where the time goes: a separate run of {profile['contexts']:,} contexts with every call "
        "below wrapped in a `perf_counter_ns` timer (each adds "
        f"{profile['timer_overhead_us']} µs, counted in its parent). Mean µs per operation add up "
        "along the tree; p50 is per call:",
    ]
    for name, title in (("put", "put"), ("get_cold", "get, cold"), ("get_warm", "get, warm")):
        lines += ["", f"**{title}**", ""]
        lines += table(
            ["stage", "calls/op", "mean µs/op", "p50 µs/call"],
            (
                [
                    "&nbsp;&nbsp;" * r["depth"] + r["stage"],
                    r["calls_per_op"],
                    r["us_per_op"],
                    r["p50_us_per_call"],
                ]
                for r in profile[name]
            ),
        )
    return lines
