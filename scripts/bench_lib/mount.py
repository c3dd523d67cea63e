"""Section `mount`: the same documents in a plain directory, gocryptfs, the pyfuse3 floor
(bench_lib/floorfs.py) and a slurpfs mount.

Every column holds the same tree, laid out as the slurpfs mount shows it:
``ucxl/<authority>/<p1>/.../<role>``, one 4 KiB file per context. The tools run on
``<root>/ucxl`` so that slurpfs' virtual ``.search`` and ``.slurp`` are not walked.
All columns are mounted at once and measured interleaved (this machine's load moves
by tens of percent within minutes; measured one after the other, a busy spell would
land on one column): whole-tree tool runs rotate the column order every repetition,
after one untimed warm-up round; per-op latencies (`os.stat`, open-read-close,
mkdir, create+write, atomic save) come from loops in this process, in chunks that
the columns take in turn. Every process started here is stopped by its PID, every
mount unmounted, in `finally` blocks."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
BACKENDS = ("plain", "gocryptfs", "floor", "slurpfs", "slurpfs_sync")


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
        extras: dict[str, Json] = {}
        with contextlib.ExitStack() as stack:
            roots: dict[str, Path] = {}
            for name, setup in COLUMNS:
                extras[name] = {}
                root, note = stack.enter_context(setup(base / name, work, extras[name]))
                if root is None:
                    columns[name] = {"skipped": note}
                    print(f"mount: {name}: skipped: {note}", file=sys.stderr)
                else:
                    columns[name] = {"note": note}
                    roots[name] = root
            print(f"mount: measuring {', '.join(roots)}, interleaved", file=sys.stderr)
            load = os.getloadavg()[0]
            for name, measured in _measure(roots, work, opts).items():
                columns[name].update(measured)
            for name in roots:
                columns[name]["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        for name, extra in extras.items():
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


def _tool(root: Path, argv: Sequence[str], ok: Sequence[int] = (0,)) -> float:
    """Run a shell-level tool once in `root`; wall seconds."""
    t0 = time.perf_counter_ns()
    proc = subprocess.run(
        argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    elapsed = time.perf_counter_ns() - t0
    if proc.returncode not in ok:
        raise RuntimeError(
            f"{' '.join(argv)} in {root}: exit {proc.returncode}: {proc.stderr[-500:]!r}"
        )
    return elapsed / 1e9


def _count(root: Path, argv: Sequence[str]) -> int:
    proc = subprocess.run(argv, cwd=root, capture_output=True, check=False)
    return proc.stdout.count(b"\n")


def _measure(roots: dict[str, Path], work: Workload, opts: Options) -> dict[str, Json]:
    """Every test on every column, interleaved so that a busy spell of the machine is
    shared by all columns rather than landing on one: tool runs rotate the column order
    each repetition; per-op loops run in chunks, the columns taking turns per chunk."""
    out: dict[str, Json] = {name: {} for name in roots}
    for name, root in roots.items():
        found = _count(root, ["find", "ucxl", "-type", "f"])
        if found != len(work.files):
            raise RuntimeError(f"{root}: find sees {found} files, expected {len(work.files)}")
        out[name]["files_found"] = found
        out[name]["grep_hits"] = _count(root, ["grep", "-r", "-l", "-F", NEEDLE, "ucxl"])
    tools: dict[str, tuple[list[str], tuple[int, ...]]] = {
        "find": (["find", "ucxl"], (0,)),
        "ls_lR": (["ls", "-lR", "ucxl"], (0,)),
        "cat": (["xargs", "-0", "-a", str(work.list_file), "cat"], (0,)),
        "grep": (["grep", "-r", "-l", "-F", NEEDLE, "ucxl"], (0, 1)),
    }
    for metric, (argv, ok) in tools.items():
        runs: dict[str, list[float]] = {name: [] for name in roots}
        for rep in range(opts.repeat + 1):  # the first round warms up, untimed
            for name in _rotated(list(roots), rep):
                elapsed = _tool(roots[name], argv, ok)
                if rep:
                    runs[name].append(elapsed)
        for name, times in runs.items():
            out[name][metric] = {
                "wall": round(statistics.median(times), 4),
                "runs_s": [round(t, 4) for t in times],
            }

    paths = {name: [str(root / f) for f in work.files] for name, root in roots.items()}
    for name in roots:  # warm-up pass for both per-op tests
        for p in paths[name]:
            os.stat(p)
    _interleaved(out, "stat", {n: [(p, None) for p in ps] for n, ps in paths.items()},
                 lambda p, _: os.stat(p))  # fmt: skip
    reads = {n: list(zip(ps, work.docs, strict=True)) for n, ps in paths.items()}
    _interleaved(out, "open_read", reads, _read_and_check)

    authority = work.docs[0].parts[0]
    new_dirs = {
        name: [root / "ucxl" / authority / "bench-new" / f"n{i:05d}"
               for i in range(len(work.new_docs))]
        for name, root in roots.items()
    }  # fmt: skip
    _interleaved(out, "mkdir", {n: [(d, None) for d in ds] for n, ds in new_dirs.items()},
                 lambda d, _: os.makedirs(d))  # fmt: skip
    creates = {n: list(zip(ds, work.new_docs, strict=True)) for n, ds in new_dirs.items()}
    cpu_before = {n: _thread_cpu_ns(_DAEMONS[r]) for n, r in roots.items() if r in _DAEMONS}
    worker_before = {n: _worker_cpu_ns(_DAEMONS[r]) for n, r in roots.items() if r in _DAEMONS}
    _interleaved(out, "create_write", creates, lambda d, doc: _create(d / corpus.ROLE, doc.data))
    time.sleep(1.0)  # a group commit still running ends (durability.commit_delay is 10 ms)
    for name, before in cpu_before.items():
        pid, saves = _DAEMONS[roots[name]], len(creates[name])
        out[name]["create_write_cpu"] = _cpu_split(before, _thread_cpu_ns(pid), pid, saves)
        worker = _worker_cpu_ns(pid) - worker_before[name]
        out[name]["create_write_cpu"]["commit_worker_us_per_save"] = round(worker / saves / 1000, 1)

    edits = {
        name: [(root / f, doc.data + f"edited in save {i}\n".encode())
               for i, (f, doc) in enumerate(zip(work.files[: opts.saves], work.docs, strict=False))]
        for name, root in roots.items()
    }  # fmt: skip
    _interleaved(out, "save", edits, _atomic_save)
    for per_column in edits.values():
        for target, data in per_column:
            if target.read_bytes() != data:
                raise RuntimeError(f"{target}: the saved content did not stick")
    for name, root in roots.items():
        if root in _CONFIGS:
            out[name]["close_to_visible"] = _close_to_visible(root, work)
    return out


CHUNKS = 8  # per-op loops: how many turns each column takes
_DAEMONS: dict[Path, int] = {}  # mount root -> the slurpfs daemon's pid
_CONFIGS: dict[Path, Any] = {}  # mount root -> the slurpfs configuration of its data
VISIBLE_SAVES = 50  # saves timed from `close` to the version seen by another process
VISIBLE_LIMIT_NS = 10_000_000_000  # a save not seen this long after its close: an error


def _close_to_visible(root: Path, work: Workload) -> Json:
    """From a save's `close` returning in the mount to its version in the store as
    another process reads it (this one, polling the store every 0.2 ms), as a
    ``slurpfs get`` would see it: no time with a synchronous close, the group commit's
    with write-behind."""
    from slurpfs import ucxl
    from slurpfs.model import ContextStore

    samples = []
    with ContextStore.open(_CONFIGS[root], None) as model:
        for i, (rel, doc) in enumerate(zip(work.files, work.docs[:VISIBLE_SAVES], strict=False)):
            key = ucxl.parse(doc.address).key
            before = model.store.leaves(key, corpus.ROLE)
            (root / rel).write_bytes(doc.data + f"seen by another process {i}\n".encode())
            start = time.perf_counter_ns()
            while model.store.leaves(key, corpus.ROLE) == before:
                if time.perf_counter_ns() - start > VISIBLE_LIMIT_NS:
                    raise RuntimeError(f"{rel}: the save was not in the store 10 s after close")
                time.sleep(0.0002)
            samples.append(time.perf_counter_ns() - start)
    return latency(samples)


def _thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time (ns, from schedstat) of every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            out[int(tid)] = int(f.read().split()[0])
    return out


def _worker_cpu_ns(pid: int) -> int:
    """CPU time (ns) of the daemon's commit worker process (write-behind), 0 if none."""
    total, children = 0, []
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    for child in children:
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"slurpfs.service.commit_worker" in f.read():
                total += sum(_thread_cpu_ns(int(child)).values())
    return total


def _cpu_split(before: dict[int, int], after: dict[int, int], pid: int, saves: int) -> Json:
    """µs of daemon CPU per save: the FUSE loop (the main thread) and every other thread
    (the group commit's worker threads, the periodic sync, the key preparer)."""
    loop = after.get(pid, 0) - before.get(pid, 0)
    others = sum(ns - before.get(tid, 0) for tid, ns in after.items() if tid != pid)
    return {
        "fuse_loop_us_per_save": round(loop / saves / 1000, 1),
        "other_threads_us_per_save": round(others / saves / 1000, 1),
    }


def _interleaved(
    out: dict[str, Json],
    metric: str,
    items: dict[str, list[tuple[Any, Any]]],
    op: Callable[[Any, Any], object],
) -> None:
    """Run `op` over each column's items in CHUNKS turns, the columns alternating."""
    samples: dict[str, list[int]] = {name: [] for name in items}
    walls = dict.fromkeys(items, 0)
    for turn in range(CHUNKS):
        for name in _rotated(list(items), turn):
            column = items[name]
            size = -(-len(column) // CHUNKS)
            ns, wall, _ = timed_loop(column[turn * size : (turn + 1) * size], lambda it: op(*it))
            samples[name] += ns
            walls[name] += wall
    for name in items:
        out[name][metric] = latency(samples[name], walls[name])


def _rotated(names: list[str], k: int) -> list[str]:
    k %= len(names) or 1
    return names[k:] + names[:k]


def _read_and_check(path: str, doc: corpus.Doc) -> None:
    with open(path, "rb") as f:
        data = f.read()
    if data != doc.data:
        raise RuntimeError(f"{path}: reads back different from what was stored")


def _create(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _atomic_save(target: Path, data: bytes) -> None:
    """What editors do: write a temporary file, fsync it, rename it over, fsync the directory."""
    atomic_save_steps(target, data)


def atomic_save_steps(target: Path, data: bytes) -> tuple[float, float, float]:
    """`_atomic_save`, timed in three parts (µs): the temporary file (create, write,
    fsync, close), the rename over the target, the directory's fsync."""
    t0 = time.perf_counter()
    tmp = target.with_name(f"{target.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    t1 = time.perf_counter()
    os.replace(tmp, target)
    t2 = time.perf_counter()
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    t3 = time.perf_counter()
    return (t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6


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
        yield (
            mnt,
            (
                "a minimal pyfuse3 file system in memory, slurpfs' FUSE and cache settings, "
                "xattr requests answered as slurpfs answers them"
            ),
        )


@contextlib.contextmanager
def _slurpfs(base: Path, work: Workload, extra: Json, *, write_behind: bool = True) -> Column:
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
    env = dict(ENV, SLURPFS_DURABILITY_WRITE_BEHIND="true" if write_behind else "false")
    with daemons.running(
        argv, mnt, base / "slurpfs.log", extra, env=env, stop=stop, label="mount"
    ) as pid:
        _DAEMONS[mnt] = pid
        _CONFIGS[mnt] = cfg
        _settle(pid, extra)
        if write_behind:
            yield mnt, "slurpfs mount --foreground, default configuration (write-behind)"
        else:
            yield mnt, "slurpfs mount --foreground, durability.write_behind = false"


COLUMNS: tuple[
    tuple[
        str,
        Callable[
            [Path, Workload, Json], contextlib.AbstractContextManager[tuple[Path | None, str]]
        ],
    ],
    ...,
] = (
    ("plain", _plain),
    ("gocryptfs", _gocryptfs),
    ("floor", _floor),
    ("slurpfs", _slurpfs),
    ("slurpfs_sync", functools.partial(_slurpfs, write_behind=False)),
)


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
                     v.get("slurpfs"), v.get("slurpfs_sync"), r.get("plain"), r.get("floor"),
                     r.get("slurpfs"), r.get("slurpfs_sync"), goal, met])  # fmt: skip
    split = [
        f"{name}: {c['create_write_cpu']['fuse_loop_us_per_save']} µs on the FUSE loop + "
        f"{c['create_write_cpu']['other_threads_us_per_save']} µs in other threads + "
        f"{c['create_write_cpu'].get('commit_worker_us_per_save', 0)} µs in the commit worker"
        for name, c in cols.items()
        if "create_write_cpu" in c
    ]
    if split:
        lines += ["- daemon CPU per create+write+close: " + "; ".join(split), ""]
    seen = [
        f"{name}: p50 {c['close_to_visible']['p50_us'] / 1000:.2f} ms, p99 "
        f"{c['close_to_visible']['p99_us'] / 1000:.2f} ms, max "
        f"{c['close_to_visible']['max_us'] / 1000:.2f} ms"
        for name, c in cols.items()
        if "close_to_visible" in c
    ]
    if seen:
        lines += ["- a save's `close` → its version seen by another process: " + "; ".join(seen)]
        lines.append("")
    lines += table(
        ["test", "plain", "gocryptfs", "pyfuse3 floor", "slurpfs", "slurpfs synchronous",
         "plain / gocryptfs", "floor / gocryptfs", "slurpfs / gocryptfs",
         "synchronous / gocryptfs", "goal (slurpfs / gocryptfs)", "met"],
        rows,
    )  # fmt: skip
    return lines
