"""Section `maintenance`: a mount while a backup or a compaction runs, against idle.

Imports `--docs` contexts of 4 KiB (the mount section's corpus), each with two
versions (the second one line longer), into a new data directory, makes the
backup key pair and mounts it with the default configuration. Once the daemon is
idle (its first index built), a *round* of probes measures what a user of the
mount meets: warm `cat` of a sample of files (one `xargs cat`), open/read/close
of single files and the editor's atomic save (temporary file, `fsync`, rename,
`fsync` of the directory), each per operation. Rounds run on the idle mount,
then again and again while `slurpfs backup create DEST --full` runs in another
process, and while `slurpfs compact` (with `retention.keep_versions = 1`) drops
every context's older version; the command's own time is reported too. The
machine may be shared: the 1-minute load average is recorded.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_lib import corpus, daemons
from bench_lib.common import Json, Options, Section, table
from bench_lib.mount import ENV, _atomic_save

CAT_FILES = 1000  # files `cat` reads per round
READS = 200  # single-file reads per round
SAVES = 20  # atomic saves per round
IDLE_ROUNDS = 3
COMMAND_LIMIT_S = 1800.0
GOAL = 1.5  # p50 during maintenance within this factor of idle (what the section checks)


def run(opts: Options) -> Section:
    base = opts.workdir / f"bench-maintenance-{os.getpid()}"
    base.mkdir(parents=True)
    try:
        data = _measure(base, opts)
    finally:
        daemons.remove(base, label="maintenance")
    return Section(data, _markdown(data))


def _import(base: Path, docs: list[corpus.Doc]) -> Path:
    from slurpfs import config, ucxl
    from slurpfs.model import BatchItem, ContextStore

    data = base / "data"
    cfg = config.load(environ={"HOME": str(base)}, overrides={"node.data_dir": str(data)})
    with ContextStore.init(cfg, None) as store:
        for suffix in (b"", b"edited once\n"):
            for i in range(0, len(docs), 500):
                batch = [
                    BatchItem(ucxl.parse(d.address), corpus.ROLE, d.data + suffix)
                    for d in docs[i : i + 500]
                ]
                report = store.put_many(batch)
                if report.failed:
                    raise RuntimeError(f"import failed: {report.failed[:3]}")
    return data


def _cli(data: Path, *args: str) -> list[str]:
    return daemons.slurpfs(*args, "--data", str(data))


def _round(mnt: Path, files: list[str], rng: random.Random, n: int) -> Json:
    """One round of probes: `cat` of a sample, single reads, atomic saves (µs each)."""
    sample = rng.sample(files, min(CAT_FILES, len(files)))
    listing = mnt.parent / "cat.list"
    listing.write_bytes(b"".join(os.fsencode(f) + b"\0" for f in sample))
    t0 = time.perf_counter()
    subprocess.run(["xargs", "-0", "-a", str(listing), "cat"], cwd=mnt,
                   stdout=subprocess.DEVNULL, check=True)  # fmt: skip
    cat_ms = (time.perf_counter() - t0) * 1000
    reads = []
    for rel in rng.sample(files, min(READS, len(files))):
        t = time.perf_counter_ns()
        fd = os.open(mnt / rel, os.O_RDONLY)
        try:
            while os.read(fd, 1 << 16):
                pass
        finally:
            os.close(fd)
        reads.append((time.perf_counter_ns() - t) / 1000)
    saves = []
    for i, rel in enumerate(rng.sample(files, min(SAVES, len(files)))):
        content = f"saved during round {n}, save {i}\n".encode() * 64
        t = time.perf_counter_ns()
        _atomic_save(mnt / rel, content)
        saves.append((time.perf_counter_ns() - t) / 1000)
    return {"cat_ms": cat_ms, "read_us": reads, "save_us": saves}


def _summary(rounds: list[Json]) -> Json:
    reads = sorted(x for r in rounds for x in r["read_us"])
    saves = sorted(x for r in rounds for x in r["save_us"])

    def pct(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(len(values) * q))], 1)

    return {
        "rounds": len(rounds),
        "cat_ms": round(statistics.median(r["cat_ms"] for r in rounds), 1),
        "read_p50_us": round(statistics.median(reads), 1),
        "read_p99_us": pct(reads, 0.99),
        "save_p50_us": round(statistics.median(saves), 1),
        "save_p99_us": pct(saves, 0.99),
        "save_max_us": round(saves[-1], 1),
    }


def _during(mnt: Path, files: list[str], rng: random.Random, argv: list[str], log: Path,
            env: dict[str, str]) -> Json:  # fmt: skip
    """Rounds of probes while `argv` runs (at least one), the command's time and output."""
    rounds: list[Json] = []
    load = [os.getloadavg()[0]]
    ended: list[float] = []
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

        def wait() -> None:
            proc.wait()
            ended.append(time.monotonic())

        waiter = threading.Thread(target=wait)
        waiter.start()
        try:
            while True:
                rounds.append(_round(mnt, files, rng, len(rounds)))
                if ended or time.monotonic() - t0 > COMMAND_LIMIT_S:
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            waiter.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[3:]} exited {proc.returncode}: {log.read_text()[-500:]}")
    load.append(os.getloadavg()[0])
    said = "; ".join(line.strip() for line in log.read_text().splitlines() if line.strip())
    return {**_summary(rounds), "command_s": round(ended[0] - t0, 2), "output": said,
            "load_1min": load}  # fmt: skip


def _measure(base: Path, opts: Options) -> Json:
    docs = list(corpus.generate(opts.docs))
    data = _import(base, docs)
    keys = subprocess.run(
        [*_cli(data, "backup", "keys", "init"), "--private-key", str(base / "backup.key")],
        env=ENV, capture_output=True, check=False,
    )  # fmt: skip
    if keys.returncode != 0:
        raise RuntimeError(f"backup keys init failed: {keys.stderr[-500:]!r}")
    mnt = base / "mnt"
    mnt.mkdir()
    files = ["/".join(("ucxl", *d.parts, corpus.ROLE)) for d in docs]
    rng = random.Random(7)
    argv = daemons.slurpfs("mount", "--foreground", "--data", str(data), str(mnt))
    stop = daemons.slurpfs("umount", str(mnt))
    out: Json = {"documents": opts.docs, "load_1min": [os.getloadavg()[0]]}
    with daemons.running(argv, mnt, base / "slurpfs.log", out, env=ENV, stop=stop,
                         label="maintenance") as pid:  # fmt: skip
        out["settled_s"] = daemons.settle(pid, limit_s=900, window_s=2.0)
        _round(mnt, files, rng, -1)  # warm-up
        out["idle"] = _summary([_round(mnt, files, rng, n) for n in range(IDLE_ROUNDS)])
        print(f"maintenance: idle {out['idle']}", file=sys.stderr)
        backup = [*_cli(data, "backup", "create", str(base / "backups")), "--full"]
        out["backup"] = _during(mnt, files, rng, backup, base / "backup.log", ENV)
        print(f"maintenance: during a backup {out['backup']}", file=sys.stderr)
        daemons.settle(pid, limit_s=300, window_s=2.0)
        out["compact"] = _during(mnt, files, rng, _cli(data, "compact"), base / "compact.log",
                                 {**ENV, "SLURPFS_RETENTION_KEEP_VERSIONS": "1"})  # fmt: skip
        print(f"maintenance: during a compaction {out['compact']}", file=sys.stderr)
        out["load_1min"].append(os.getloadavg()[0])
    idle = out["idle"]
    out["ratio"] = {
        op: {key: round(out[op][key] / idle[key], 2) for key in ("cat_ms", "read_p50_us",
                                                                "save_p50_us")}
        for op in ("backup", "compact")
    }  # fmt: skip
    return out


def _markdown(data: Json) -> list[str]:
    labels = {
        "cat_ms": f"`cat` of {min(CAT_FILES, data['documents']):,} files (warm, median round) [ms]",
        "read_p50_us": "open/read/close, p50 [µs]",
        "read_p99_us": "open/read/close, p99 [µs]",
        "save_p50_us": "atomic save, p50 [µs]",
        "save_p99_us": "atomic save, p99 [µs]",
    }
    rows = []
    idle, backup, compact = data["idle"], data["backup"], data["compact"]
    for key, label in labels.items():
        rows.append([label, f"{idle[key]:,.0f}", f"{backup[key]:,.0f}",
                     f"{backup[key] / idle[key]:.2f}x", f"{compact[key]:,.0f}",
                     f"{compact[key] / idle[key]:.2f}x"])  # fmt: skip
    return [
        f"### Maintenance: the mount during a backup and a compaction ({data['documents']:,}"
        " contexts, two versions each)",
        "",
        *table(
            [
                "probe",
                "idle",
                "during `backup create --full`",
                "ratio",
                "during `compact`",
                "ratio",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"- rounds: idle {idle['rounds']}, backup {backup['rounds']}, compaction"
        f" {compact['rounds']}; the backup took {backup['command_s']} s"
        f" ({backup['output']}), the compaction {compact['command_s']} s"
        f" ({compact['output']})",
        f"- goal: p50 during maintenance within {GOAL}x of idle",
        f"- 1-minute load average: start/end {data['load_1min']}, during the backup"
        f" {backup['load_1min']}, during the compaction {compact['load_1min']}",
    ]
