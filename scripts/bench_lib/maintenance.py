"""Section `maintenance`: a mount while a backup or a compaction runs, against idle.

Imports `--docs` contexts of 4 KiB (the mount section's corpus), each with two
versions (the second one line longer), into a new data directory, makes the
backup key pair and mounts it with the default configuration. Once the daemon is
idle (its first index built) and every file was read once, *cycles* of probes
measure what a user of the mount meets: `cat` of 100 files (one `xargs cat`),
20 open/read/close of single files and 2 editor's atomic saves (temporary file,
`fsync`, rename, `fsync` of the directory), each timed (a save also in parts). Cycles run on the idle
mount, then while `slurpfs backup create DEST --full` runs in another process,
and while `slurpfs compact` (with `retention.keep_versions = 1`) drops every
context's older version; only probes that ended before the command did count,
and the command's own time is reported. The machine may be shared: the 1-minute
load average is recorded.
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
from bench_lib.mount import ENV, atomic_save_steps
from bench_lib.worker import import_docs

CAT_FILES = 100  # files one `cat` probe reads
READS = 20  # single-file reads per cycle
SAVES = 2  # atomic saves per cycle
IDLE_CYCLES = 60
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


def _cli(data: Path, *args: str) -> list[str]:
    return daemons.slurpfs(*args, "--data", str(data))


class Probes:
    """Timed probes of the mount: (kind, end time, value) of each, in order."""

    def __init__(self, mnt: Path, files: list[str], rng: random.Random) -> None:
        self.mnt, self.files, self.rng = mnt, files, rng
        self.listing = mnt.parent / "cat.list"
        self.saves = 0

    def cycle(self) -> list[tuple[str, float, float]]:
        """`cat` of a sample (ms), single reads and atomic saves (µs)."""
        out = []
        sample = self.rng.sample(self.files, min(CAT_FILES, len(self.files)))
        self.listing.write_bytes(b"".join(os.fsencode(f) + b"\0" for f in sample))
        t = time.perf_counter()
        subprocess.run(["xargs", "-0", "-a", str(self.listing), "cat"], cwd=self.mnt,
                       stdout=subprocess.DEVNULL, check=True)  # fmt: skip
        out.append(("cat_ms", time.monotonic(), (time.perf_counter() - t) * 1000))
        for rel in self.rng.sample(self.files, min(READS, len(self.files))):
            t = time.perf_counter()
            fd = os.open(self.mnt / rel, os.O_RDONLY)
            try:
                while os.read(fd, 1 << 16):
                    pass
            finally:
                os.close(fd)
            out.append(("read_us", time.monotonic(), (time.perf_counter() - t) * 1e6))
        for rel in self.rng.sample(self.files, min(SAVES, len(self.files))):
            self.saves += 1
            content = f"saved by the maintenance bench, save {self.saves}\n".encode() * 64
            steps = atomic_save_steps(self.mnt / rel, content)
            end = time.monotonic()
            out.append(("save_us", end, sum(steps)))
            out.append(("rename_us", end, steps[1]))
            out.append(("syncdir_us", end, steps[2]))
        return out


def _summary(probes: list[tuple[str, float, float]]) -> Json:
    def values(kind: str) -> list[float]:
        return sorted(v for k, _, v in probes if k == kind)

    def pct(ordered: list[float], q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)

    cat, reads, saves = values("cat_ms"), values("read_us"), values("save_us")
    return {
        "probes": {"cat": len(cat), "reads": len(reads), "saves": len(saves)},
        "cat_ms": round(statistics.median(cat), 1),
        "read_p50_us": round(statistics.median(reads), 1),
        "read_p99_us": pct(reads, 0.99),
        "save_p50_us": round(statistics.median(saves), 1),
        "save_p99_us": pct(saves, 0.99),
        "save_max_us": round(saves[-1], 1),
        "rename_p99_us": pct(values("rename_us"), 0.99),
        "syncdir_p99_us": pct(values("syncdir_us"), 0.99),
    }


def _during(probes: Probes, argv: list[str], log: Path, env: dict[str, str]) -> Json:
    """Cycles of probes while `argv` runs; only probes that ended before it count."""
    seen: list[tuple[str, float, float]] = []
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
            while not ended and time.monotonic() - t0 < COMMAND_LIMIT_S:
                seen += probes.cycle()
        finally:
            if proc.poll() is None:
                proc.kill()
            waiter.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[3:]} exited {proc.returncode}: {log.read_text()[-500:]}")
    load.append(os.getloadavg()[0])
    counted = [p for p in seen if p[1] <= ended[0]]
    if not any(k == "save_us" for k, _, _ in counted):
        raise RuntimeError(f"{argv[3:]} ended before a probe of every kind did; more --docs")
    said = "; ".join(line.strip() for line in log.read_text().splitlines() if line.strip())
    return {**_summary(counted), "command_s": round(ended[0] - t0, 2), "output": said,
            "load_1min": load}  # fmt: skip


def _measure(base: Path, opts: Options) -> Json:
    docs = list(corpus.generate(opts.docs))
    data = import_docs(base, docs, versions=(b"", b"edited once\n"))
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
        out["settled_s"] = daemons.settle(pid, limit_s=1800, window_s=2.0)
        listing = base / "all.list"
        listing.write_bytes(b"".join(os.fsencode(f) + b"\0" for f in files))
        subprocess.run(["xargs", "-0", "-a", str(listing), "cat"], cwd=mnt,
                       stdout=subprocess.DEVNULL, check=True)  # fmt: skip
        probes = Probes(mnt, files, rng)
        quiet: list[tuple[str, float, float]] = []
        for _ in range(IDLE_CYCLES):
            quiet += probes.cycle()
        out["idle"] = _summary(quiet)
        print(f"maintenance: idle {out['idle']}", file=sys.stderr)
        backup = [*_cli(data, "backup", "create", str(base / "backups")), "--full"]
        out["backup"] = _during(probes, backup, base / "backup.log", ENV)
        print(f"maintenance: during a backup {out['backup']}", file=sys.stderr)
        daemons.settle(pid, limit_s=300, window_s=2.0)
        out["compact"] = _during(probes, _cli(data, "compact"), base / "compact.log",
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
        "cat_ms": f"`cat` of {min(CAT_FILES, data['documents']):,} files (warm), p50 [ms]",
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
        f"- probes (cat / reads / saves): idle {_counts(idle)}, during the backup"
        f" {_counts(backup)}, during the compaction {_counts(compact)}; the backup took"
        f" {backup['command_s']} s"
        f" ({backup['output']}), the compaction {compact['command_s']} s"
        f" ({compact['output']})",
        f"- the atomic saves' tail, p99 of the `rename` / of the directory's `fsync` [µs]:"
        f" idle {idle['rename_p99_us']:,.0f} / {idle['syncdir_p99_us']:,.0f}, during the backup"
        f" {backup['rename_p99_us']:,.0f} / {backup['syncdir_p99_us']:,.0f}, during the"
        f" compaction {compact['rename_p99_us']:,.0f} / {compact['syncdir_p99_us']:,.0f};"
        f" the slowest save: idle {idle['save_max_us']:,.0f}, backup"
        f" {backup['save_max_us']:,.0f}, compaction {compact['save_max_us']:,.0f}",
        f"- goal: p50 during maintenance within {GOAL}x of idle",
        f"- 1-minute load average: start/end {data['load_1min']}, during the backup"
        f" {backup['load_1min']}, during the compaction {compact['load_1min']}",
    ]


def _counts(summary: Json) -> str:
    n = summary["probes"]
    return f"{n['cat']} / {n['reads']} / {n['saves']}"
