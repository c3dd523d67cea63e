"""Section `mount`: the same documents in a plain directory, gocryptfs and a slurpfs mount.

Every column holds the same tree, laid out as the slurpfs mount shows it:
``ucxl/<authority>/<p1>/.../<role>``, one 4 KiB file per context. The tools run on
``<root>/ucxl`` so that slurpfs' virtual ``.search`` and ``.slurp`` are not walked.
Whole-tree tool runs are timed after one untimed warm-up run (warm caches); per-op
latencies come from `os.stat` / open-read-close in this process, also after a warm-up
pass. Every process started here is stopped by its PID, every mount unmounted, in
`finally` blocks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_lib import corpus, daemons
from bench_lib.common import Json, Options, Section, latency, table, timed_loop

NEEDLE = "rotating"  # appears in a fraction of the documents (an adjective of the corpus)
PASSWORD_CMD = "echo pw"
ENV = daemons.clean_env()  # daemons and tools run without SLURPFS_* settings
SETTLE_LIMIT_S = 900.0  # how long a daemon may stay busy after mounting before we measure anyway

# metric -> (label, unit, how to read the value, goal for slurpfs/gocryptfs from the issue)
METRICS: dict[str, tuple[str, str, str, float | None]] = {
    "find": ("`find` walk", "ms", "wall", 1.0),
    "cat": ("`cat` of all files (warm)", "ms", "wall", 1.0),
    "grep": ("`grep -r`", "ms", "wall", 1.3),
    "ls_lR": ("`ls -lR`", "ms", "wall", None),
    "stat": ("stat, per op (p50)", "µs", "p50_us", 1.5),
    "open_read": ("open/read/close, per op (p50)", "µs", "p50_us", None),
    "mkdir": ("mkdir of new address dirs (total)", "ms", "wall_s", None),
    "create_write": ("create+write+close (total)", "ms", "wall_s", 1.5),
    "create_write_op": ("create+write+close, per op (p50)", "µs", "create_write.p50_us", None),
    "save": ("atomic save loop, per save (p50)", "µs", "p50_us", None),
}
BACKENDS = ("plain", "gocryptfs", "floor", "slurpfs")


@dataclass(frozen=True)
class Workload:
    docs: list[corpus.Doc]
    files: list[str]  # relative to a column's root: ucxl/<authority>/.../<role>
    new_docs: list[corpus.Doc]  # for create+write
    list_file: Path  # NUL-separated `files`, outside every mount (for xargs)


def run(opts: Options) -> Section:
    base = opts.workdir / f"bench-mount-{os.getpid()}"
    base.mkdir(parents=True)
    try:
        docs = list(corpus.generate(opts.docs))
        files = [_rel(d) for d in docs]
        list_file = base / "files.list"
        list_file.write_bytes(b"".join(os.fsencode(f) + b"\0" for f in files))
        work = Workload(docs, files, list(corpus.generate(opts.creates, seed=2)), list_file)
        columns: dict[str, Json] = {}
        columns_setup = (("plain", _plain), ("gocryptfs", _gocryptfs), ("floor", _floor),
                         ("slurpfs", _slurpfs))  # fmt: skip
        for name, setup in columns_setup:
            extra: Json = {}
            with setup(base / name, work, extra) as (root, note):
                if root is None:
                    columns[name] = {"skipped": note}
                    print(f"mount: {name}: skipped: {note}", file=sys.stderr)
                    continue
                print(f"mount: {name}: measuring {root}", file=sys.stderr)
                load = os.getloadavg()[0]
                columns[name] = {"note": note, **_measure(root, work, opts)}
                columns[name]["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            columns[name].update(extra)  # filled in at teardown (daemon log)
    finally:
        daemons.remove(base, label="mount")
    hits = {name: col["grep_hits"] for name, col in columns.items() if "grep_hits" in col}
    data: Json = {
        "documents": opts.docs,
        "repeat": opts.repeat,
        "needle": NEEDLE,
        "grep_hits": hits,
        "columns_agree": len(set(hits.values())) <= 1,
        "columns": columns,
        "comparison": _compare(columns),
    }

    return Section(data, _markdown(data))


def _rel(doc: corpus.Doc) -> str:
    return "/".join(("ucxl", *doc.parts, corpus.ROLE))


# -- the measurements --------------------------------------------------------------------


def _tool(root: Path, argv: Sequence[str], repeat: int, ok: Sequence[int] = (0,)) -> Json:
    """Run a shell-level tool `repeat` times after one warm-up; median wall seconds."""
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter_ns()
        proc = subprocess.run(
            argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
        elapsed = time.perf_counter_ns() - t0
        if proc.returncode not in ok:
            raise RuntimeError(
                f"{' '.join(argv)} in {root}: exit {proc.returncode}: {proc.stderr[-500:]!r}"
            )
        if i:
            times.append(elapsed / 1e9)
    return {"wall": round(statistics.median(times), 4), "runs_s": [round(t, 4) for t in times]}


def _count(root: Path, argv: Sequence[str]) -> int:
    proc = subprocess.run(argv, cwd=root, capture_output=True, check=False)
    return proc.stdout.count(b"\n")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _measure(root: Path, work: Workload, opts: Options) -> Json:
    out: Json = {}
    n = opts.repeat
    out["files_found"] = _count(root, ["find", "ucxl", "-type", "f"])
    if out["files_found"] != len(work.files):
        raise RuntimeError(
            f"{root}: find sees {out['files_found']} files, expected {len(work.files)}"
        )
    out["grep_hits"] = _count(root, ["grep", "-r", "-l", "-F", NEEDLE, "ucxl"])
    out["find"] = _tool(root, ["find", "ucxl"], n)
    out["ls_lR"] = _tool(root, ["ls", "-lR", "ucxl"], n)
    out["cat"] = _tool(root, ["xargs", "-0", "-a", str(work.list_file), "cat"], n)
    out["grep"] = _tool(root, ["grep", "-r", "-l", "-F", NEEDLE, "ucxl"], n, ok=(0, 1))

    paths = [str(root / f) for f in work.files]
    for p in paths:  # warm-up pass for both per-op tests
        os.stat(p)
    ns, wall, _ = timed_loop(paths, os.stat)
    out["stat"] = latency(ns, wall)
    ns, wall, got = timed_loop(paths, _read)
    if any(data != doc.data for data, doc in zip(got, work.docs, strict=True)):
        raise RuntimeError(f"{root}: a file reads back different from what was stored")
    out["open_read"] = latency(ns, wall)

    authority = work.docs[0].parts[0]
    new_dirs = [
        root / "ucxl" / authority / "bench-new" / f"n{i:05d}" for i in range(len(work.new_docs))
    ]
    ns, wall, _ = timed_loop(new_dirs, lambda d: os.makedirs(d))
    out["mkdir"] = latency(ns, wall)
    items = list(zip(new_dirs, work.new_docs, strict=True))
    ns, wall, _ = timed_loop(items, lambda it: _create(it[0] / corpus.ROLE, it[1].data))
    out["create_write"] = latency(ns, wall)

    targets = [root / f for f in work.files[: opts.saves]]
    edits = [(t, doc.data + f"edited in save {i}\n".encode())
             for i, (t, doc) in enumerate(zip(targets, work.docs, strict=False))]  # fmt: skip
    ns, wall, _ = timed_loop(edits, lambda e: _atomic_save(e[0], e[1]))
    for target, data in edits:
        if target.read_bytes() != data:
            raise RuntimeError(f"{target}: the saved content did not stick")
    out["save"] = latency(ns, wall)
    return out


def _create(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _atomic_save(target: Path, data: bytes) -> None:
    """What editors do: write a temporary file, fsync it, rename it over, fsync the directory."""
    tmp = target.with_name(f"{target.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _populate(root: Path, work: Workload) -> None:
    for rel, doc in zip(work.files, work.docs, strict=True):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(doc.data)


# -- the columns -----------------------------------------------------------------------

Column = Iterator[tuple[Path | None, str]]


@contextlib.contextmanager
def _plain(base: Path, work: Workload, extra: Json) -> Column:
    base.mkdir()
    _populate(base, work)
    yield base, f"directory on {_fs_type(base)}"


@contextlib.contextmanager
def _gocryptfs(base: Path, work: Workload, extra: Json) -> Column:
    exe = shutil.which("gocryptfs")
    if exe is None:
        yield None, "gocryptfs is not installed"
        return
    if not os.path.exists("/dev/fuse"):
        yield None, "no /dev/fuse"
        return
    cipher, mnt = base / "cipher", base / "mnt"
    cipher.mkdir(parents=True)
    mnt.mkdir()
    subprocess.run([exe, "-init", "-q", "-extpass", PASSWORD_CMD, "-scryptn", "10", str(cipher)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    argv = [exe, "-fg", "-q", "-extpass", PASSWORD_CMD, str(cipher), str(mnt)]
    with daemons.running(argv, mnt, base / "gocryptfs.log", extra, env=ENV, label="mount") as pid:
        _populate(mnt, work)
        _settle(pid, extra)
        yield mnt, "gocryptfs defaults (-scryptn 10 only speeds up -init)"


@contextlib.contextmanager
def _floor(base: Path, work: Workload, extra: Json) -> Column:
    """The pyfuse3 floor (bench_lib/floorfs.py): what any pyfuse3 file system costs."""
    if not os.path.exists("/dev/fuse"):
        yield None, "no /dev/fuse"
        return
    mnt = base / "mnt"
    mnt.mkdir(parents=True)
    argv = [sys.executable, str(Path(__file__).with_name("floorfs.py")), str(mnt)]
    with daemons.running(argv, mnt, base / "floorfs.log", extra, env=ENV, label="mount") as pid:
        _populate(mnt, work)
        _settle(pid, extra)
        yield mnt, "a minimal pyfuse3 file system in memory, slurpfs' FUSE and cache settings"


@contextlib.contextmanager
def _slurpfs(base: Path, work: Workload, extra: Json) -> Column:
    probe = subprocess.run(daemons.slurpfs("mount", "--help"), capture_output=True, env=ENV,
                           check=False)  # fmt: skip
    if probe.returncode != 0:
        yield None, "`slurpfs mount` does not exist yet"
        return
    if not os.path.exists("/dev/fuse"):
        yield None, "no /dev/fuse"
        return
    from slurpfs import config, ucxl
    from slurpfs.model import BatchItem, ContextStore

    data, mnt = base / "data", base / "mnt"
    mnt.mkdir(parents=True)
    cfg = config.load(environ={"HOME": str(base)}, overrides={"node.data_dir": str(data)})
    with ContextStore.init(cfg, None) as store:
        for i in range(0, len(work.docs), 500):
            batch = [
                BatchItem(ucxl.parse(d.address), corpus.ROLE, d.data)
                for d in work.docs[i : i + 500]
            ]
            report = store.put_many(batch)
            if report.failed:
                raise RuntimeError(f"slurpfs import failed: {report.failed[:3]}")
    argv = daemons.slurpfs("mount", "--foreground", "--data", str(data), str(mnt))
    stop = daemons.slurpfs("umount", str(mnt))
    with daemons.running(
        argv, mnt, base / "slurpfs.log", extra, env=ENV, stop=stop, label="mount"
    ) as pid:
        _settle(pid, extra)
        yield mnt, "slurpfs mount --foreground, default configuration"


def _settle(pid: int, extra: Json) -> None:
    """Wait until the daemon is idle (background work such as indexing done): under 5% of a
    core over 2 s. Measuring while it still works would time that work, not the tools."""
    extra["settle_s"] = daemons.settle(pid, limit_s=SETTLE_LIMIT_S, window_s=2.0)
    if extra["settle_s"] is None:  # still busy: measured anyway, and the table says so
        print(f"mount: pid {pid} still busy after {SETTLE_LIMIT_S:.0f} s; measuring anyway",
              file=sys.stderr)  # fmt: skip


def _fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[fields.index("-") + 1]
    return kind


# -- comparison and table --------------------------------------------------------------


def _value(column: Json, metric: str) -> float | None:
    if "skipped" in column:
        return None
    key, _, field = METRICS[metric][2].rpartition(".")
    entry = column[key or metric]
    value = entry[field]
    if value is None:
        return None
    return round(float(value) * 1000, 2) if METRICS[metric][1] == "ms" else float(value)


def _compare(columns: dict[str, Json]) -> Json:
    out: Json = {}
    for metric, (_, unit, _, goal) in METRICS.items():
        values = {b: _value(columns[b], metric) for b in BACKENDS if b in columns}
        ref = values.get("gocryptfs")
        ratios = {
            b: round(v / ref, 2) if v is not None and ref else None for b, v in values.items()
        }
        mine = ratios.get("slurpfs")
        met = None if goal is None or mine is None else mine <= goal
        out[metric] = {
            "unit": unit,
            "values": values,
            "vs_gocryptfs": ratios,
            "goal": goal,
            "met": met,
        }
    return out


def _markdown(data: Json) -> list[str]:
    cols = data["columns"]
    lines = [f"### mount: {data['documents']:,} files of 4 KiB (tool runs: median of {data['repeat']} "
             "after one warm-up)", ""]  # fmt: skip
    for name in BACKENDS:
        if "skipped" in cols.get(name, {}):
            lines.append(f"- {name}: skipped: {cols[name]['skipped']}")
        elif name in cols:
            col = cols[name]
            daemon = ""
            if "daemon_exit" in col:
                settle = col.get("settle_s")
                busy = (
                    f"daemon idle after {settle:.0f} s"
                    if settle is not None
                    else f"**still busy after {SETTLE_LIMIT_S:.0f} s**"
                )
                daemon = (
                    f" ({busy}; exit status {col['daemon_exit']}, "
                    f"{col['daemon_log_problems']} WARNING/ERROR log lines)"
                )
            load = col["load_1min"]
            lines.append(
                f"- {name}: {col['note']}{daemon}; load average {load[0]:.2f} → {load[1]:.2f}"
            )
    hits = data["grep_hits"]
    if data["columns_agree"]:
        lines.append(
            f"- every column lists {data['documents']:,} files; `grep -rl {data['needle']}` finds "
            f"the same {next(iter(hits.values()), 0):,} files in each"
        )
    else:
        lines.append(f"- **the columns disagree**: `grep -rl {data['needle']}` hits: {hits}")
    lines.append("")
    rows = []
    for metric, cmp in data["comparison"].items():
        label, unit = METRICS[metric][0], cmp["unit"]
        v, r = cmp["values"], cmp["vs_gocryptfs"]
        goal = f"<= {cmp['goal']}" if cmp["goal"] is not None else None
        met = None if cmp["met"] is None else ("yes" if cmp["met"] else "**no**")
        rows.append([f"{label} [{unit}]", v.get("plain"), v.get("gocryptfs"), v.get("floor"),
                     v.get("slurpfs"), r.get("plain"), r.get("floor"), r.get("slurpfs"), goal,
                     met])  # fmt: skip
    lines += table(
        ["test", "plain", "gocryptfs", "pyfuse3 floor", "slurpfs", "plain / gocryptfs",
         "floor / gocryptfs", "slurpfs / gocryptfs", "goal (slurpfs / gocryptfs)", "met"],
        rows,
    )  # fmt: skip
    return lines
