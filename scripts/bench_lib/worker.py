"""Section `worker`: a mount while its search worker builds the first index, against idle.

Imports `--docs` contexts of 4 KiB (the mount section's corpus) into a new data
directory, mounts it in the foreground and at once runs warm `cat` of every file,
`find` and `grep -r` through the mount while the search worker builds its first
index (the build's progress is read from `.slurp/status` before and after each
run), then waits until search answers (time from the mount command to fully
searchable: the worker reports `ready` and a query finds the needle), measures
the same tools on the now idle mount, and reports the resident memory of the
daemon and of its worker. The mount's tool runs are interleaved with nothing else,
but the machine may be shared: the 1-minute load average is recorded.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_lib import corpus, daemons
from bench_lib.common import Json, Options, Section, table
from bench_lib.mount import ENV, NEEDLE

TOOLS: dict[str, tuple[list[str], tuple[int, ...]]] = {
    "cat": ([], (0,)),  # filled in with the file list
    "find": (["find", "ucxl"], (0,)),
    "grep": (["grep", "-r", "-l", "-F", NEEDLE, "ucxl"], (0, 1)),
}
GOAL = 1.3  # during the build, within this factor of idle
SEARCHABLE_LIMIT_S = 1800.0
FRESH_AUTHORITY = "bench:developer@fresh:index"
FRESH_SAVES = 60  # one a second
FRESH_VOCABULARY = 30_000  # distinct words of the one large context stored first
FRESH_LIMIT_S = 30.0


def run(opts: Options) -> Section:
    base = opts.workdir / f"bench-worker-{os.getpid()}"
    base.mkdir(parents=True)
    try:
        data = _measure(base, opts)
    finally:
        daemons.remove(base, label="worker")
    return Section(data, _markdown(data))


def import_docs(base: Path, docs: list[corpus.Doc], versions: tuple[bytes, ...] = (b"",)) -> Path:
    """A new data directory under `base` holding `docs`: one version of each per entry
    of `versions` (appended to its text), in that order."""
    from slurpfs import config, ucxl
    from slurpfs.model import BatchItem, ContextStore

    data = base / "data"
    cfg = config.load(environ={"HOME": str(base)}, overrides={"node.data_dir": str(data)})
    t0 = time.perf_counter()
    with ContextStore.init(cfg, None) as store:
        for suffix in versions:
            for i in range(0, len(docs), 500):
                batch = [
                    BatchItem(ucxl.parse(d.address), corpus.ROLE, d.data + suffix)
                    for d in docs[i : i + 500]
                ]
                report = store.put_many(batch)
                if report.failed:
                    raise RuntimeError(f"import failed: {report.failed[:3]}")
    print(f"bench: imported {len(docs)} contexts x {len(versions)} versions in"
          f" {time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip
    return data


def _status(mnt: Path) -> dict[str, str]:
    lines = (mnt / ".slurp" / "status").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def _tool(mnt: Path, argv: list[str], ok: tuple[int, ...]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=mnt, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)  # fmt: skip
    if proc.returncode not in ok:
        raise RuntimeError(f"{argv[0]}: exit {proc.returncode}: {proc.stderr[-300:]!r}")
    return time.perf_counter() - t0


def _rounds(mnt: Path, tools: dict[str, tuple[list[str], tuple[int, ...]]], repeat: int,
            *, watch: bool) -> Json:  # fmt: skip
    """One untimed warm-up round, then `repeat` timed rounds of every tool."""
    runs: dict[str, list[float]] = {name: [] for name in tools}
    progress: list[str] = []
    for rep in range(repeat + 1):
        for name, (argv, ok) in tools.items():
            elapsed = _tool(mnt, argv, ok)
            if rep:
                runs[name].append(elapsed)
            if watch:
                progress.append(f"{name}: {_status(mnt).get('search_progress', '?')}")
    out: Json = {
        name: {"wall": round(statistics.median(t), 4), "runs_s": [round(x, 4) for x in t]}
        for name, t in runs.items()
    }
    out["progress_seen"] = progress
    return out


def _rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of `pid` now (or its peak, with ``VmHWM``)."""
    if not pid:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _freshness(mnt: Path) -> Json:
    """Save-to-searchable through the mount: one context of `FRESH_VOCABULARY` distinct
    words first (the case where merges held new documents up), then one new context a
    second for `FRESH_SAVES` seconds, each with a word of its own; the time from its
    ``close`` until ``.search/<word>`` lists it."""
    root = mnt / "ucxl" / FRESH_AUTHORITY
    (root / "big").mkdir(parents=True)
    words = " ".join(f"v{i:05d}x" for i in range(FRESH_VOCABULARY))
    (root / "big" / corpus.ROLE).write_text(f"a large vocabulary: {words}\n")
    latencies: list[float] = []
    missed = 0
    tick = time.monotonic()
    for i in range(FRESH_SAVES):
        word = f"fresh{os.getpid()}n{i}"
        (root / f"n{i}").mkdir()
        (root / f"n{i}" / corpus.ROLE).write_text(f"saved with {word} in it\n")
        saved = time.monotonic()
        while not [n for n in os.listdir(mnt / ".search" / word) if not n.startswith(".")]:
            if time.monotonic() - saved > FRESH_LIMIT_S:
                missed += 1
                break
            time.sleep(0.005)
        else:
            latencies.append(time.monotonic() - saved)
        tick += 1.0
        time.sleep(max(0.0, tick - time.monotonic()))
    ordered = sorted(latencies)
    return {
        "saves": FRESH_SAVES,
        "missed": missed,
        "p50_ms": round(statistics.median(ordered) * 1000, 1) if ordered else None,
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1)
        if ordered
        else None,
        "max_ms": round(ordered[-1] * 1000, 1) if ordered else None,
    }


def _measure(base: Path, opts: Options) -> Json:
    docs = list(corpus.generate(opts.docs))
    data = import_docs(base, docs)
    mnt = base / "mnt"
    mnt.mkdir()
    files = base / "files.list"
    files.write_bytes(b"".join(os.fsencode("/".join(("ucxl", *d.parts, corpus.ROLE))) + b"\0"
                               for d in docs))  # fmt: skip
    tools = dict(TOOLS)
    tools["cat"] = (["xargs", "-0", "-a", str(files), "cat"], (0,))
    argv = daemons.slurpfs("mount", "--foreground", "--data", str(data), str(mnt))
    stop = daemons.slurpfs("umount", str(mnt))
    out: Json = {"documents": opts.docs, "repeat": opts.repeat, "load_1min": [os.getloadavg()[0]]}
    started = time.monotonic()
    with daemons.running(argv, mnt, base / "slurpfs.log", out, env=ENV, stop=stop,
                         label="worker") as pid:  # fmt: skip
        out["mounted_s"] = round(time.monotonic() - started, 2)
        out["progress_at_start"] = _status(mnt).get("search_progress")
        out["during_build"] = _rounds(mnt, tools, opts.repeat, watch=True)
        out["progress_after_tools"] = _status(mnt).get("search_progress")
        out["searchable_s"] = _wait_searchable(mnt, started)
        st = _status(mnt)
        worker = int(st.get("worker_search_pid", "0"))
        out["rss_after_build"] = {"daemon": _rss(pid), "worker": _rss(worker) if worker else 0}
        out["documents_indexed"] = st.get("index_documents_developer")
        out["load_1min"].append(os.getloadavg()[0])
        daemons.settle(pid, limit_s=120, window_s=2.0)
        out["idle"] = _rounds(mnt, tools, opts.repeat, watch=False)
        out["rss_idle"] = {"daemon": _rss(pid), "worker": _rss(worker) if worker else 0}
        out["freshness"] = _freshness(mnt)
        out["rss_peak"] = {"daemon": _rss(pid, "VmHWM"), "worker": _rss(worker, "VmHWM")}
        # RSS counts the store's memory map pages each process touched (the same page
        # cache, shared and reclaimable); the anonymous part is what each one holds.
        out["rss_anon"] = {"daemon": _rss(pid, "RssAnon"), "worker": _rss(worker, "RssAnon")}
        out["load_1min"].append(os.getloadavg()[0])
    out["ratio"] = {
        name: round(out["during_build"][name]["wall"] / out["idle"][name]["wall"], 2)
        for name in TOOLS
    }
    return out


def _wait_searchable(mnt: Path, started: float) -> float | None:
    """Seconds from the mount command until the worker is ready and finds the needle."""
    deadline = time.monotonic() + SEARCHABLE_LIMIT_S
    while time.monotonic() < deadline:
        if _status(mnt).get("search_progress") == "ready":
            hits = [n for n in os.listdir(mnt / ".search" / NEEDLE) if not n.startswith(".")]
            if hits:
                return round(time.monotonic() - started, 1)
        time.sleep(0.2)
    return None


def _markdown(data: Json) -> list[str]:
    rows = []
    for name in TOOLS:
        during, idle = data["during_build"][name]["wall"], data["idle"][name]["wall"]
        rows.append([f"`{name}`" if name != "grep" else "`grep -r`", f"{during * 1000:.0f}",
                     f"{idle * 1000:.0f}", f"{data['ratio'][name]:.2f}x",
                     "yes" if data["ratio"][name] <= GOAL else "no"])  # fmt: skip
    mib = 1 << 20
    return [
        f"### Worker: the first index build of {data['documents']} imported contexts",
        "",
        *table(
            ["tool (warm, median)", "during the build, ms", "idle, ms", "ratio", f"within {GOAL}x"],
            rows,
        ),  # fmt: skip
        "",
        f"- fully searchable {data['searchable_s']} s after the mount command",
        f"- search progress when the tools began: {data['progress_at_start']}; when they"
        f" ended: {data['progress_after_tools']}",
        f"- RSS after the build: daemon {data['rss_after_build']['daemon'] / mib:.0f} MiB,"
        f" worker {data['rss_after_build']['worker'] / mib:.0f} MiB;"
        f" idle: daemon {data['rss_idle']['daemon'] / mib:.0f} MiB,"
        f" worker {data['rss_idle']['worker'] / mib:.0f} MiB",
        f"- peak RSS (VmHWM): daemon {data['rss_peak']['daemon'] / mib:.0f} MiB,"
        f" worker {data['rss_peak']['worker'] / mib:.0f} MiB; anonymous at the end: daemon"
        f" {data['rss_anon']['daemon'] / mib:.0f} MiB, worker"
        f" {data['rss_anon']['worker'] / mib:.0f} MiB (the rest is the store's shared map)",
        f"- save to searchable through the mount ({data['freshness']['saves']} saves, one a"
        f" second, after a context of {FRESH_VOCABULARY} distinct words): p50"
        f" {data['freshness']['p50_ms']} ms, p99 {data['freshness']['p99_ms']} ms, max"
        f" {data['freshness']['max_ms']} ms, {data['freshness']['missed']} not found"
        f" within {FRESH_LIMIT_S:.0f} s",
        f"- 1-minute load average at start, after the build, at the end: {data['load_1min']}",
    ]
