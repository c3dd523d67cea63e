"""Section `backup`: backups and compaction of a store of `--docs` contexts of 2 KiB.

Full backup, incremental backup (after 1 % of the contexts got a new version),
`backup verify` without the private key, restore of the chain through ingest
(into a new data directory), the backups' size against the store; then
compaction: the retention policy dropping every context's older version, the
free pages it leaves, the compacting copy, and the zstd dictionary gain on the
role's 2 KiB documents. Everything in one process, without FUSE.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from bench_lib import corpus
from bench_lib.common import Json, Options, Section, mib, table
from slurpfs import compact, config, ucxl
from slurpfs.backup import create, restore, verify
from slurpfs.backup import keys as backup_keys
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import BatchItem, ContextStore, data_paths

DOC_BYTES = 2048
BATCH = 1000


def _config(data_dir: Path, **sections: object) -> config.Config:
    cfg = config.load(
        environ={"HOME": str(data_dir.parent)}, overrides={"node.data_dir": str(data_dir)}
    )
    return cfg.replace(**sections) if sections else cfg


def _put(model: ContextStore, docs: list[corpus.Doc], suffix: bytes = b"") -> None:
    for start in range(0, len(docs), BATCH):
        items = [
            BatchItem(ucxl.parse(d.address), corpus.ROLE, d.data + suffix)
            for d in docs[start : start + BATCH]
        ]
        report = model.put_many(items)
        if report.failed:
            raise RuntimeError(f"bench data not stored: {report.failed[:3]}")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(opts: Options) -> Section:
    docs = list(corpus.generate(opts.docs, size=DOC_BYTES))
    with tempfile.TemporaryDirectory(prefix="bench-backup-", dir=opts.workdir) as tmp:
        data = _measure(Path(tmp), docs)
    return Section(data, _markdown(data))


def _measure(root: Path, docs: list[corpus.Doc]) -> Json:
    kdf = KdfParams.weak()
    data_dir, dest = root / "data", root / "dest"
    cfg = _config(data_dir)
    out: Json = {"contexts": len(docs), "document_bytes": DOC_BYTES}
    with ContextStore.init(cfg, None, kdf=kdf) as model:
        _put(model, docs)
    backup_keys.init(data_dir, root / "backup.key")
    private = backup_keys.load_private(root / "backup.key")
    store_file = data_paths(data_dir)["store"] / "data.mdb"
    with ContextStore.open(cfg, None, kdf=kdf) as model:
        envelope_bytes = model.store.statistics().envelope_bytes
        t0 = time.perf_counter()
        full = create.create(model, dest)
        out["full"] = _rate(full, time.perf_counter() - t0)
        _put(model, docs[: max(1, len(docs) // 100)], b"\nupdated\n")
        t0 = time.perf_counter()
        incremental = create.create(model, dest)
        out["incremental"] = _rate(incremental, time.perf_counter() - t0)
    out["store_envelope_bytes"] = envelope_bytes
    out["store_file_bytes"] = store_file.stat().st_size
    t0 = time.perf_counter()
    report = verify.verify(dest)
    out["verify_s"] = round(time.perf_counter() - t0, 2)
    assert report.ok, report.problems
    t0 = time.perf_counter()
    restored = restore.restore(
        dest, incremental.id, root / "restored", private, passphrase=None, kdf=kdf
    )
    seconds = time.perf_counter() - t0
    out["restore"] = {
        "versions": restored.versions,
        "seconds": round(seconds, 2),
        "versions_per_s": round(restored.versions / seconds, 1),
        "mib_per_s": round(mib(full.bytes + incremental.bytes) / seconds, 2),
    }
    out["compaction"] = _compaction(data_dir, docs, kdf)
    return out


def _rate(made: create.Created, seconds: float) -> Json:
    return {
        "kind": made.kind,
        "versions": made.versions,
        "bytes": made.bytes,
        "seconds": round(seconds, 2),
        "versions_per_s": round(made.versions / seconds, 1),
        "mib_per_s": round(mib(made.bytes) / seconds, 2),
    }


def _compaction(data_dir: Path, docs: list[corpus.Doc], kdf: KdfParams) -> Json:
    keep_one = config.RetentionConfig(keep_versions=1)
    cfg = _config(data_dir, retention=keep_one)
    store_file = data_paths(data_dir)["store"] / "data.mdb"
    with ContextStore.open(cfg, None, kdf=kdf) as model:
        _put(model, docs, b"\nsecond version\n")  # every context gets a second version
        before = store_file.stat().st_size
        t0 = time.perf_counter()
        plan = compact.plan_retention(model)
        dropped = compact.apply_retention(model, plan)
        retention_s = time.perf_counter() - t0
        free = compact.space(model.store).free_bytes
        gain = compact.dictionary_gain(model, corpus.ROLE)
    t0 = time.perf_counter()
    copied_before, after = compact.compacting_copy(cfg)
    copy_s = time.perf_counter() - t0
    return {
        "dropped": dropped,
        "retention_s": round(retention_s, 2),
        "file_bytes_before": before,
        "free_bytes_after_retention": free,
        "file_bytes_after_copy": after,
        "copy_s": round(copy_s, 2),
        "copied_from": copied_before,
        "dictionary": dataclasses.asdict(gain)
        | {"ratio_before": round(gain.ratio_before, 3), "ratio_after": round(gain.ratio_after, 3)},
    }


def _markdown(d: Json) -> list[str]:
    n = d["contexts"]
    rows = [
        [
            name,
            d[name]["versions"],
            mib(d[name]["bytes"]),
            d[name]["seconds"],
            d[name]["versions_per_s"],
            d[name]["mib_per_s"],
        ]
        for name in ("full", "incremental")
    ]
    r = d["restore"]
    rows.append(
        ["restore (chain)", r["versions"], None, r["seconds"], r["versions_per_s"], r["mib_per_s"]]
    )
    c = d["compaction"]
    g = c["dictionary"]
    return [
        f"### Backup and compaction: {n:,} contexts of {d['document_bytes']:,} bytes",
        "",
        *table(["", "versions", "MiB", "s", "versions/s", "MiB/s"], rows),
        "",
        f"Store: {mib(d['store_envelope_bytes'])} MiB of envelopes in a"
        f" {mib(d['store_file_bytes'])} MiB data.mdb; the full backup is"
        f" {d['full']['bytes'] / d['store_envelope_bytes']:.2f}× the envelopes, the incremental"
        f" one (1 % changed) {d['incremental']['bytes'] / d['full']['bytes']:.3f}× the full."
        f" `backup verify` of both (no key): {d['verify_s']} s.",
        "",
        f"Compaction: retention (keep 1 version) dropped {c['dropped']:,} versions in"
        f" {c['retention_s']} s, leaving {mib(c['free_bytes_after_retention'])} MiB of free pages"
        f" in a {mib(c['file_bytes_before'])} MiB file; the compacting copy took {c['copy_s']} s"
        f" and left {mib(c['file_bytes_after_copy'])} MiB. zstd dictionary on"
        f" {g['documents']:,} documents of 2 KiB: ratio {g['ratio_before']} without,"
        f" {g['ratio_after']} with (measured on the half not trained on).",
    ]
